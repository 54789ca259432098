"""MMaDA-Parallel: text and image denoised together — parallel SFT, then ParaRL. The library's front door.

python recipes/mmada_parallel.py fit                        # cached MMaDA warm start -> parallel SFT, ShapesWorld
python recipes/mmada_parallel.py fit --warm_start none      # parallel SFT from scratch (the backbone as configured)
python recipes/mmada_parallel.py fit --config recipes/configs/mmada_parallel/pararl.yaml   # ParaRL (see its header)
python recipes/mmada_parallel.py fit --print_config         # every option, resolved

The default run fine-tunes a tiny masked-diffusion model on ShapesWorld editing and generation quadruplets
(input image, instruction → reasoning, output image), then prints a ParaBench-style table on held-out prompts
(text quality, text alignment, image alignment, image consistency, output alignment), judged by the task's exact
checker, and writes it to the run directory as ``parabench.json`` / ``parabench.md``.

Like the paper (MMaDA-Parallel starts from MMaDA), ``--warm_start auto`` (the default) starts from MMaDA
pretraining: ``recipes/mmada.py`` with its embedded default (``configs/mmada/default.yaml``: the same tiny model on
ShapesWorld text-to-image, image understanding and Arithmetic) and ``configs/mmada/words.yaml`` on top (the
closed-vocabulary ``WordTokenizer`` the parallel SFT reads and writes), trained once and cached as a backbone directory
under ``$DLLM_ZOO_CACHE/warm_start/`` (keyed by the hash of that config). A backbone that names its own
``pretrained`` directory (the ParaRL config) keeps it.
"""

from __future__ import annotations

from pathlib import Path

from dllm_zoo.data import MultiTaskDataModule, ParallelDataModule
from dllm_zoo.recipe import SFTRecipe, WarmStart, WarmStartCLI, run_recipe
from dllm_zoo.stages import DiffusionStage, MMaDAPretraining

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "mmada_parallel" / "default.yaml"
PRETRAINING = SFTRecipe(MMaDAPretraining, MultiTaskDataModule, CONFIGS / "mmada" / "default.yaml")
WARM_START_PHASES: tuple[tuple[str, tuple[Path, ...]], ...] = (("pretrain", (CONFIGS / "mmada" / "words.yaml",)),)
WARM_START = WarmStart("mmada-parallel-shapes", PRETRAINING, WARM_START_PHASES)


class MMaDAParallelCLI(WarmStartCLI):
    """LightningCLI with ``--warm_start auto|none|<dir>`` (see the module docstring)."""

    auto_help = "the cached MMaDA pretraining of the tiny model (recipes/mmada.py default; trained once if missing)"
    warm_start = WARM_START


def main(args: list[str] | None = None) -> None:
    # DiffusionStage, not ParallelSFT: the ParaRL config selects its own stage class from the same recipe.
    run_recipe(DiffusionStage, ParallelDataModule, DEFAULT_CONFIG, args, cli_class=MMaDAParallelCLI)


if __name__ == "__main__":
    main()
