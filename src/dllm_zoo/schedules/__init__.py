"""Noise schedules shared by training losses and samplers."""

from dllm_zoo.schedules.base import NoisedBatch, NoiseSchedule, rank_mask
from dllm_zoo.schedules.cosine import CosineSchedule
from dllm_zoo.schedules.linear import LinearSchedule

__all__ = ["CosineSchedule", "LinearSchedule", "NoiseSchedule", "NoisedBatch", "rank_mask"]
