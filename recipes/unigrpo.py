"""UniGRPO (MMaDA §3.3) of a masked-diffusion LM: in-process rollouts, rewards, group advantages, μ inner iterations.

python recipes/unigrpo.py fit                                   # warm-start SFT (cached) -> UniGRPO on Arithmetic, CPU
python recipes/unigrpo.py fit --warm_start /path/to/backbone    # start from your own checkpoint directory
python recipes/unigrpo.py fit --warm_start none --config my.yaml  # the backbone exactly as the config builds it
python recipes/unigrpo.py fit --print_config                    # every option, resolved

``--warm_start auto`` (the default) trains the policy's starting point with our own SFT recipe
in two phases, once: ``recipes/pretrain.py`` + ``configs/pretrain/sft_arithmetic.yaml`` +
``configs/unigrpo/warm_start.yaml`` teaches the worked procedure, then ``configs/unigrpo/warm_start_terse.yaml``
continues from it on mostly direct answers. Each phase is cached as a backbone directory under
``$DLLM_ZOO_CACHE/warm_start/`` (keyed by the hash of its configs); later runs load it.
The run logs the held-out accuracy before and after RL on the same prompts.
"""

from __future__ import annotations

from pathlib import Path

from dllm_zoo.data import PromptDataModule, TextDiffusionDataModule
from dllm_zoo.recipe import SFTRecipe, WarmStart, WarmStartCLI, run_recipe
from dllm_zoo.stages import MaskedDiffusionPretraining, UniGRPO

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "unigrpo" / "default.yaml"
SFT = SFTRecipe(MaskedDiffusionPretraining, TextDiffusionDataModule, CONFIGS / "pretrain" / "default.yaml")
# The warm start: the SFT recipe's embedded default plus these files, in two cached phases. Phase 1 teaches the
# worked procedure; phase 2 continues from it on answers that are mostly direct, so the policy can reason but
# rarely does. RL then has something to discover (reasoning pays) that greedy decoding of the warm start misses.
WARM_START_PHASES: tuple[tuple[str, tuple[Path, ...]], ...] = (
    ("sft", (CONFIGS / "pretrain" / "sft_arithmetic.yaml", CONFIGS / "unigrpo" / "warm_start.yaml")),
    ("terse", (CONFIGS / "unigrpo" / "warm_start_terse.yaml",)),
)
WARM_START = WarmStart("unigrpo-arithmetic", SFT, WARM_START_PHASES)


class UniGRPOCLI(WarmStartCLI):
    """LightningCLI with ``--warm_start auto|none|<dir>`` (see the module docstring)."""

    auto_help = "the cached SFT warm start (trained once if missing)"
    warm_start = WARM_START


def main(args: list[str] | None = None) -> None:
    run_recipe(UniGRPO, PromptDataModule, DEFAULT_CONFIG, args, cli_class=UniGRPOCLI)


if __name__ == "__main__":
    main()
