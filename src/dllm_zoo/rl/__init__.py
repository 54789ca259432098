"""RL building blocks shared by UniGRPO, TraceRL and ParaRL: group advantages and policy objectives."""

from dllm_zoo.rl.advantages import group_advantages, group_mean_std, informative_groups
from dllm_zoo.rl.objectives import (
    ClippedSurrogate,
    ObjectiveOutput,
    PolicyObjective,
    aggregate,
    k3_kl,
)

__all__ = [
    "ClippedSurrogate",
    "ObjectiveOutput",
    "PolicyObjective",
    "aggregate",
    "group_advantages",
    "group_mean_std",
    "informative_groups",
    "k3_kl",
]
