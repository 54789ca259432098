"""TraceRL (research/tracerl_llada.md §2) of a block-attention dLLM: RL on the sampler's own decoding trace.

python recipes/tracerl.py fit                                    # cached SDAR SFT warm start -> TraceRL, CPU
python recipes/tracerl.py fit --warm_start /path/to/backbone     # start from your own checkpoint directory
python recipes/tracerl.py fit --config recipes/configs/tracerl/value.yaml          # with a diffusion value model
python recipes/tracerl.py fit --config recipes/configs/tracerl/full_attention.yaml  # LLaDA, full attention
python recipes/tracerl.py fit --print_config                     # every option, resolved

``--warm_start auto`` (the default) trains the policy's starting point once with our own block-diffusion SFT recipe
(``recipes/sdar.py`` with its embedded default, ``configs/sdar/default.yaml``: the tiny SDAR preset on Arithmetic) and
caches the backbone directory under ``$DLLM_ZOO_CACHE/warm_start/`` (keyed by the hash of that config); later runs
load it. With a value model (``configs/tracerl/value.yaml``) whose backbone has no ``pretrained`` directory, the value
model starts from the same weights (the release initialises it from the policy checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dllm_zoo.data import PromptDataModule, TextDiffusionDataModule
from dllm_zoo.recipe import SFTRecipe, WarmStart, WarmStartCLI, run_recipe
from dllm_zoo.stages import BlockDiffusionSFT, TraceRL

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "tracerl" / "default.yaml"
SFT = SFTRecipe(
    BlockDiffusionSFT, TextDiffusionDataModule, CONFIGS / "sdar" / "default.yaml", "dllm_zoo.backbones.SDARBackbone"
)
# The warm start: the block-diffusion SFT recipe's embedded default (plus these files, none by default).
WARM_START_PHASES: tuple[tuple[str, tuple[Path, ...]], ...] = (("sft", ()),)
WARM_START = WarmStart("tracerl-sdar-arithmetic", SFT, WARM_START_PHASES)


class TraceRLCLI(WarmStartCLI):
    """LightningCLI with ``--warm_start auto|none|<dir>`` (see the module docstring)."""

    auto_help = "the cached block-diffusion SFT warm start (trained once if missing)"
    warm_start = WARM_START

    def warm_start_backbones(self, config: Any) -> list[Any]:
        """The policy's backbone, and a value model's when it has no checkpoint of its own (the release's init)."""
        backbones = [config.model.init_args.backbone]
        value = config.model.init_args.get("value_model")
        if value is not None and value.init_args.backbone.init_args.get("pretrained") is None:
            backbones.append(value.init_args.backbone)
        return backbones


def main(args: list[str] | None = None) -> None:
    run_recipe(TraceRL, PromptDataModule, DEFAULT_CONFIG, args, cli_class=TraceRLCLI)


if __name__ == "__main__":
    main()
