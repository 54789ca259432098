"""RL building blocks shared by UniGRPO, TraceRL and ParaRL: rollouts, advantages, masking, objectives."""

from dllm_zoo.rl.advantages import group_advantages, group_mean_std, informative_groups
from dllm_zoo.rl.logprobs import masked_token_logprobs
from dllm_zoo.rl.masking import (
    CoupledMasking,
    RandomMasking,
    ResponseMasking,
    UniformlySpacedMasking,
    mask_bernoulli,
    mask_count,
    uniformly_spaced_ratios,
)
from dllm_zoo.rl.objectives import (
    ClippedSurrogate,
    ObjectiveOutput,
    PolicyObjective,
    aggregate,
    k3_kl,
)
from dllm_zoo.rl.rollout import Rollout, combine_rewards, repeat_prompts, response_mask, score_rewards

__all__ = [
    "ClippedSurrogate",
    "CoupledMasking",
    "ObjectiveOutput",
    "PolicyObjective",
    "RandomMasking",
    "ResponseMasking",
    "Rollout",
    "UniformlySpacedMasking",
    "aggregate",
    "combine_rewards",
    "group_advantages",
    "group_mean_std",
    "informative_groups",
    "k3_kl",
    "mask_bernoulli",
    "mask_count",
    "masked_token_logprobs",
    "repeat_prompts",
    "response_mask",
    "score_rewards",
    "uniformly_spaced_ratios",
]
