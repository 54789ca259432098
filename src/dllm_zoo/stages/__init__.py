"""Training stages (LightningModules)."""

from dllm_zoo.stages.base import DiffusionStage
from dllm_zoo.stages.optim import OptimConfig
from dllm_zoo.stages.pretrain import MaskedDiffusionPretraining

__all__ = ["DiffusionStage", "MaskedDiffusionPretraining", "OptimConfig"]
