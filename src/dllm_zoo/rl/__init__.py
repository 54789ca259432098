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
from dllm_zoo.rl.trace import (
    TraceRows,
    rollout_positions,
    rollout_trace_rows,
    shrink_steps,
    trace_rows,
    training_block_ids,
)
from dllm_zoo.rl.value import (
    StepGAE,
    clipped_value_loss,
    outcome_token_rewards,
    process_token_rewards,
    step_returns_and_gae,
)
from dllm_zoo.rl.value_model import ValueModel

__all__ = [
    "ValueModel",
    "ClippedSurrogate",
    "CoupledMasking",
    "ObjectiveOutput",
    "PolicyObjective",
    "RandomMasking",
    "ResponseMasking",
    "Rollout",
    "StepGAE",
    "TraceRows",
    "UniformlySpacedMasking",
    "aggregate",
    "choose_steps",
    "clipped_value_loss",
    "combine_rewards",
    "group_advantages",
    "group_mean_std",
    "informative_groups",
    "k3_kl",
    "mask_bernoulli",
    "mask_count",
    "masked_token_logprobs",
    "normalize_rewards",
    "outcome_token_rewards",
    "process_token_rewards",
    "repeat_prompts",
    "replay_rows",
    "response_mask",
    "rollout_positions",
    "rollout_trace_rows",
    "score_rewards",
    "shrink_steps",
    "step_advantages",
    "step_returns_and_gae",
    "taken_logprobs",
    "trace_rows",
    "training_block_ids",
    "uniformly_spaced_ratios",
]
