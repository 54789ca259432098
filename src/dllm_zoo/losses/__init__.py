"""Training losses."""

from dllm_zoo.losses.masked_diffusion import LossOutput, MaskedDiffusionLoss

__all__ = ["LossOutput", "MaskedDiffusionLoss"]
