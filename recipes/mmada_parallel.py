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
ShapesWorld text-to-image, image understanding and Arithmetic), trained once and cached as a backbone directory
under ``$DLLM_ZOO_CACHE/warm_start/`` (keyed by the hash of that config). A backbone that names its own
``pretrained`` directory (the ParaRL config) keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dllm_zoo.data import MultiTaskDataModule, ParallelDataModule
from dllm_zoo.recipe import (
    SFTRecipe,
    WarmStartCLI,
    cached_warm_start,
    run_recipe,
    warm_start_dirs,
    with_extra_configs,
)
from dllm_zoo.stages import DiffusionStage, MMaDAPretraining

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "mmada_parallel" / "default.yaml"
PRETRAINING = SFTRecipe(MMaDAPretraining, MultiTaskDataModule, CONFIGS / "mmada" / "default.yaml")
WARM_START_PHASES: tuple[tuple[str, tuple[Path, ...]], ...] = (("pretrain", ()),)
PREFIX = "mmada-parallel-shapes"


def warm_start_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the cached MMaDA warm start lives; the name carries the hash of the pretraining config."""
    return warm_start_dirs(PREFIX, PRETRAINING, WARM_START_PHASES, cache_dir)[-1][0]


def ensure_warm_start(cache_dir: str | Path | None = None, extra_configs: Sequence[Path] = ()) -> Path:
    """The cached warm-start backbone directory, trained by ``recipes/mmada.py`` when missing (written atomically).

    ``extra_configs`` go on top of every phase (and into its cache key), e.g. a test's shorter run.
    """
    return cached_warm_start(PREFIX, PRETRAINING, with_extra_configs(WARM_START_PHASES, extra_configs), cache_dir)


class MMaDAParallelCLI(WarmStartCLI):
    """LightningCLI with ``--warm_start auto|none|<dir>`` (see the module docstring)."""

    auto_help = "the cached MMaDA pretraining of the tiny model (recipes/mmada.py default; trained once if missing)"

    def ensure_warm_start(self, config: Any) -> Path:
        """The cached MMaDA pretraining; refused for a backbone it does not fit."""
        kind = str(config.model.init_args.backbone.class_path)
        if not kind.endswith("LLaDABackbone"):
            raise ValueError(
                f"--warm_start auto trains a tiny LLaDA-architecture MMaDA model, which does not fit {kind}: give "
                "--warm_start a checkpoint directory of that backbone, or none"
            )
        return ensure_warm_start()

    def warm_start_backbones(self, config: Any) -> list[Any]:
        """The policy's backbone; under ``auto`` only when it has no ``pretrained`` directory of its own."""
        backbone = config.model.init_args.backbone
        if config.get("warm_start") == "auto" and backbone.init_args.get("pretrained"):
            return []
        return [backbone]


def main(args: list[str] | None = None) -> None:
    # DiffusionStage, not ParallelSFT: the ParaRL config selects its own stage class from the same recipe.
    run_recipe(DiffusionStage, ParallelDataModule, DEFAULT_CONFIG, args, cli_class=MMaDAParallelCLI)


if __name__ == "__main__":
    main()
