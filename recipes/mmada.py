"""MMaDA: one masked-diffusion model over text and image tokens — multi-task pretraining and mixed long-CoT SFT.

python recipes/mmada.py fit                                                  # tiny model, ShapesWorld + Arithmetic, CPU
python recipes/mmada.py fit --config recipes/configs/mmada/cot_sft.yaml      # mixed long-CoT SFT (+ reasoning-to-image)
python recipes/mmada.py fit --config recipes/configs/mmada/mmada_8b.yaml ... # MMaDA-8B checkpoint + MAGVIT-v2, GPUs
python recipes/mmada.py fit --print_config                                   # every option, resolved
"""

from pathlib import Path

from dllm_zoo.data import MultiTaskDataModule
from dllm_zoo.recipe import run_recipe
from dllm_zoo.stages import MMaDAPretraining

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "mmada" / "default.yaml"


def main(args: list[str] | None = None) -> None:
    run_recipe(MMaDAPretraining, MultiTaskDataModule, DEFAULT_CONFIG, args)


if __name__ == "__main__":
    main()
