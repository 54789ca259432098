"""Noise schedules shared by training losses and samplers."""

from dllm_zoo.schedules.base import NoisedBatch, NoiseSchedule, rank_mask, reveals_from_remaining
from dllm_zoo.schedules.cosine import CosineSchedule
from dllm_zoo.schedules.linear import LinearSchedule
from dllm_zoo.schedules.sigmoid import SigmoidSchedule

__all__ = [
    "CosineSchedule",
    "LinearSchedule",
    "NoiseSchedule",
    "NoisedBatch",
    "SigmoidSchedule",
    "rank_mask",
    "reveals_from_remaining",
]
