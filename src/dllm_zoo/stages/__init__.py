"""Training stages (LightningModules)."""

from dllm_zoo.stages.base import DiffusionStage
from dllm_zoo.stages.block_sft import BlockDiffusionSFT
from dllm_zoo.stages.mmada import MixedCoTSFT, MMaDAPretraining
from dllm_zoo.stages.optim import OptimConfig
from dllm_zoo.stages.parallel_sft import ParallelSFT
from dllm_zoo.stages.pararl import ParaRL
from dllm_zoo.stages.policy_gradient import PolicyGradientStage
from dllm_zoo.stages.pretrain import MaskedDiffusionPretraining
from dllm_zoo.stages.tracerl import TraceRL
from dllm_zoo.stages.unigrpo import UniGRPO

__all__ = [
    "BlockDiffusionSFT",
    "DiffusionStage",
    "MMaDAPretraining",
    "MaskedDiffusionPretraining",
    "MixedCoTSFT",
    "OptimConfig",
    "ParaRL",
    "ParallelSFT",
    "PolicyGradientStage",
    "TraceRL",
    "UniGRPO",
]
