"""Block-diffusion SFT (SDAR / TraDo) of a block-attention backbone, with answer accuracy from the block sampler.

python recipes/sdar.py fit                                              # tiny SDAR, Arithmetic, CPU, minutes
python recipes/sdar.py fit --config recipes/configs/sdar/sdar_4b.yaml   # SDAR-4B-Chat checkpoint, GPUs
python recipes/sdar.py fit --print_config                               # every option, resolved
"""

from pathlib import Path

from dllm_zoo.data import TextDiffusionDataModule
from dllm_zoo.recipe import run_recipe
from dllm_zoo.stages import BlockDiffusionSFT

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sdar" / "default.yaml"


def main(args: list[str] | None = None) -> None:
    run_recipe(BlockDiffusionSFT, TextDiffusionDataModule, DEFAULT_CONFIG, args)


if __name__ == "__main__":
    main()
