"""MMaDA-Parallel: text and image denoised together — parallel SFT, then ParaRL. The library's front door.

python recipes/mmada_parallel.py fit                        # parallel SFT, tiny model, ShapesWorld, CPU
python recipes/mmada_parallel.py fit --config recipes/configs/mmada_parallel/pararl.yaml   # ParaRL (see its header)
python recipes/mmada_parallel.py fit --print_config         # every option, resolved

The default run fine-tunes a tiny masked-diffusion model on ShapesWorld editing and generation quadruplets
(input image, instruction → reasoning, output image), then prints a ParaBench-style table on held-out prompts
(text quality, text alignment, image alignment, image consistency, output alignment), judged by the task's exact
checker, and writes it to the run directory as ``parabench.json`` / ``parabench.md``.
"""

from pathlib import Path

from dllm_zoo.data import ParallelDataModule
from dllm_zoo.recipe import run_recipe
from dllm_zoo.stages import DiffusionStage

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "mmada_parallel" / "default.yaml"


def main(args: list[str] | None = None) -> None:
    # DiffusionStage, not ParallelSFT: the ParaRL config selects its own stage class from the same recipe.
    run_recipe(DiffusionStage, ParallelDataModule, DEFAULT_CONFIG, args)


if __name__ == "__main__":
    main()
