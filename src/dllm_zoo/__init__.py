"""dllm_zoo: swappable, tested components for diffusion language models in PyTorch Lightning.

Importing the package imports every built-in component, so LightningCLI resolves short class names
(``class_path: LLaDABackbone``) and :mod:`dllm_zoo.registry` lists them.
"""

from dllm_zoo.backbones import Backbone, BackboneOutput, LLaDABackbone, LLaDAConfig
from dllm_zoo.data import TextDiffusionDataModule
from dllm_zoo.data.synthetic import Arithmetic, SyntheticTask
from dllm_zoo.losses import MaskedDiffusionLoss
from dllm_zoo.rewards import Reward
from dllm_zoo.rl import ClippedSurrogate, PolicyObjective, UniformlySpacedMasking
from dllm_zoo.samplers import LLaDASampler, Sampler, SamplerOutput
from dllm_zoo.schedules import CosineSchedule, LinearSchedule, NoiseSchedule
from dllm_zoo.stages import MaskedDiffusionPretraining, OptimConfig, UniGRPO
from dllm_zoo.tokenizers import ByteTokenizer, HFTextTokenizer, TextTokenizer, TokenLayout

__version__ = "0.1.0"

__all__ = [
    "Arithmetic",
    "Backbone",
    "BackboneOutput",
    "ByteTokenizer",
    "ClippedSurrogate",
    "CosineSchedule",
    "HFTextTokenizer",
    "LLaDABackbone",
    "LLaDAConfig",
    "LLaDASampler",
    "LinearSchedule",
    "MaskedDiffusionLoss",
    "MaskedDiffusionPretraining",
    "NoiseSchedule",
    "OptimConfig",
    "PolicyObjective",
    "Reward",
    "Sampler",
    "SamplerOutput",
    "SyntheticTask",
    "TextDiffusionDataModule",
    "TextTokenizer",
    "TokenLayout",
    "UniGRPO",
    "UniformlySpacedMasking",
]
