"""Masked-diffusion pretraining (LLaDA objective) of any backbone.

python recipes/pretrain.py fit                                               # tiny LLaDA, Arithmetic, CPU
python recipes/pretrain.py fit --config recipes/configs/pretrain/small.yaml  # the `small` preset
python recipes/pretrain.py fit --ckpt_path runs/pretrain/checkpoints/last.ckpt   # resume exactly
python recipes/pretrain.py fit --print_config                                # every option, resolved
"""

from pathlib import Path

from dllm_zoo.data import TextDiffusionDataModule
from dllm_zoo.recipe import run_recipe
from dllm_zoo.stages import MaskedDiffusionPretraining

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain" / "default.yaml"


def main(args: list[str] | None = None) -> None:
    run_recipe(MaskedDiffusionPretraining, TextDiffusionDataModule, DEFAULT_CONFIG, args)


if __name__ == "__main__":
    main()
