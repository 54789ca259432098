"""RL building blocks shared by UniGRPO, TraceRL and ParaRL: rollouts, advantages, masking, step replay, objectives."""

from dllm_zoo.rl.advantages import group_advantages, group_mean_std, informative_groups
from dllm_zoo.rl.logprobs import masked_token_logprobs, taken_logprobs
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
from dllm_zoo.rl.replay import choose_steps, normalize_rewards, replay_rows, step_advantages
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
    "choose_steps",
    "combine_rewards",
    "group_advantages",
    "group_mean_std",
    "informative_groups",
    "k3_kl",
    "mask_bernoulli",
    "mask_count",
    "masked_token_logprobs",
    "normalize_rewards",
    "repeat_prompts",
    "replay_rows",
    "response_mask",
    "score_rewards",
    "step_advantages",
    "taken_logprobs",
    "uniformly_spaced_ratios",
]
