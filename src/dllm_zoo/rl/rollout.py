"""In-process rollouts: what every RL stage passes from generation to optimisation (DESIGN.md §3a ``Rollout``).

The released UniGRPO/TraceRL pipelines write rollouts to JSON and reload the checkpoint in a new process for each
phase (research/mmada.md §4.4). Here a rollout is a record of tensors on the model's device, produced by any
:class:`~dllm_zoo.samplers.base.Sampler` under ``no_grad``, scored by :class:`~dllm_zoo.rewards.base.Reward` objects,
and consumed by the stage in the same process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from dllm_zoo.rewards.base import Reward
from dllm_zoo.rl.advantages import StdKind, group_advantages

RewardAggregation = Literal["sum_then_normalize", "normalize_then_sum"]
_R = TypeVar("_R", bound="Rollout")


@dataclass
class Rollout:
    """``N = prompts × G`` completions and everything the optimisation needs about them.

    Attributes:
        tokens: ``[N, P + G]`` int64 prompt (left-padded) + completion canvas.
        attention_mask: ``[N, P + G]`` bool, False on prompt padding.
        prompt_mask: ``[N, P + G]`` bool, True on the prompt part (real tokens and padding): never masked.
        response_mask: ``[N, P + G]`` bool, the trainable completion positions (see :func:`response_mask`).
        step_map: ``[N, P + G]`` int64, the denoising step at which each position was revealed (0 = prompt).
        group: ``[N]`` int64, the prompt each completion answers (``0..prompts−1``).
        rewards: Per reward name, ``[N]`` float32 scores; NaN where the reward does not apply.
        total: ``[N]`` float32 weighted total reward (non-applicable terms count 0).
        advantages: ``[N]`` (per sequence) or ``[N, P + G]`` (per token) float32.
        keep: ``[N]`` bool, completions that train (groups filtered out are False).
        completions: ``N`` decoded completion texts.
        nfe: Forward passes the sampler used.
    """

    tokens: Tensor
    attention_mask: Tensor
    prompt_mask: Tensor
    response_mask: Tensor
    step_map: Tensor
    group: Tensor
    rewards: dict[str, Tensor] = field(default_factory=dict)
    total: Tensor | None = None
    advantages: Tensor | None = None
    keep: Tensor | None = None
    completions: list[str] = field(default_factory=list)
    nfe: int = 0

    @property
    def num_rollouts(self) -> int:
        """``N``."""
        return int(self.tokens.shape[0])

    def kept(self: _R) -> _R:
        """The rollouts whose ``keep`` is True (all when ``keep`` is unset), every per-rollout field indexed.

        Per-rollout tensors (first dimension ``N``, in subclasses too), the rewards and the completion texts are
        selected; other fields (``nfe``, widths) are copied. One host sync (the kept indices).
        """
        n = self.num_rollouts
        if self.keep is None:
            return dataclasses.replace(self)
        index = self.keep.nonzero().squeeze(1)
        rows = index.tolist()
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
                changes[f.name] = value[index]
            elif f.name == "rewards":
                changes[f.name] = {k: v[index] for k, v in value.items()}
            elif f.name == "completions" and len(value) == n:
                changes[f.name] = [value[i] for i in rows]
        return dataclasses.replace(self, **changes)


def repeat_prompts(prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int) -> tuple[Tensor, Tensor, Tensor]:
    """Repeat each prompt ``G`` times (rows of one group adjacent) and give each row its group id.

    Args:
        prompt_ids: ``[B, P]`` int64.
        prompt_mask: ``[B, P]`` bool.
        num_generations: ``G``.

    Returns:
        ``(ids [B·G, P], mask [B·G, P], group [B·G])``.
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    group = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat_interleave(num_generations)
    return prompt_ids[group], prompt_mask[group], group


def response_mask(completion: Tensor, pad_id: int, post_num: int = 1) -> Tensor:
    """Trainable completion positions: everything before the first ``pad_id`` plus the first ``post_num`` pads.

    A masked-diffusion sampler fills a fixed-length canvas; after the answer (and its end-of-turn token) it writes
    EOS padding. The released UniGRPO/TraceRL trainers train the first ``post_num`` (default 1) padding tokens, so the
    policy learns where to stop, and exclude the rest (research/tracerl_llada.md §2.3).

    Args:
        completion: ``[N, G]`` int64 generated tokens.
        pad_id: The padding id the sampler writes after the answer (the layout's EOS for LLaDA-style models).
        post_num: Padding tokens that stay trainable.

    Returns:
        ``[N, G]`` bool.

    Example:
        >>> response_mask(torch.tensor([[5, 6, 0, 0, 0]]), pad_id=0).tolist()
        [[True, True, True, False, False]]
    """
    if post_num < 0:
        raise ValueError(f"post_num must be >= 0, got {post_num}")
    is_pad = completion == pad_id
    pads_so_far = is_pad.long().cumsum(dim=1)
    return ~is_pad | (pads_so_far <= post_num)


def _row_scores(reward: Reward, values: object, size: int) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != size:
        got = f"{type(values).__name__} of length {len(values)}" if isinstance(values, Sized) else repr(values)
        kind = type(reward).__name__
        raise ValueError(f"reward {reward.name!r} ({kind}) must return a list of {size} scores, got {got}")
    out: list[float] = []
    for v in values:
        if v is None:
            out.append(math.nan)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError) as err:
            raise ValueError(f"reward {reward.name!r} returned {v!r}, which is neither a number nor None") from err
        if not math.isfinite(f):
            raise ValueError(f"reward {reward.name!r} returned {f}; return None for 'not applicable'")
        out.append(f)
    return out


def score_rewards(
    rewards: Sequence[Reward],
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence[Any]],
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Call every reward on the batch; ``None`` scores become NaN.

    Args:
        rewards: The reward functions (names must be distinct: they are the metric keys).
        prompts: ``N`` prompt texts.
        completions: ``N`` completion texts.
        fields: Per-sample lists of length ``N`` passed as keyword arguments.
        device: Where the score tensors go.

    Returns:
        ``{name: [N] float32}``.

    Raises:
        ValueError: on duplicate names, a wrong number of scores, a non-numeric or non-finite score.
        RuntimeError: when a reward raises; the message names the reward (the original exception is chained).
    """
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be distinct (they are the metric keys), got {names}; set name=…")
    n = len(completions)
    out: dict[str, Tensor] = {}
    for reward in rewards:
        try:
            values = reward(list(prompts), list(completions), **fields)
        except Exception as err:  # noqa: BLE001 - re-raised with the reward's name, never swallowed
            raise RuntimeError(f"reward {reward.name!r} ({type(reward).__name__}) raised: {err!r}") from err
        out[reward.name] = torch.tensor(_row_scores(reward, values, n), dtype=torch.float32, device=device)
    return out


def combine_rewards(
    scores: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group: Tensor,
    aggregation: RewardAggregation = "sum_then_normalize",
    std: StdKind = "population",
    eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Weighted total reward and group advantages of several reward functions.

    * ``sum_then_normalize`` (GRPO, UniGRPO): ``total = Σ_k w_k r_k`` (non-applicable terms count 0), then the group
      z-score of the total.
    * ``normalize_then_sum`` (GDPO-style, so one large-scale reward cannot drown the others): each reward is
      z-scored within the group over the completions it applies to, then ``Σ_k w_k A_k``.

    Args:
        scores: ``{name: [N]}`` with NaN = not applicable.
        weights: ``{name: w}`` (every name of ``scores``).
        group: ``[N]`` int64 group ids.
        aggregation: See above.
        std: Standard deviation kind of the z-scores.
        eps: Added to the standard deviation.

    Returns:
        ``(total [N], advantages [N])``.
    """
    if aggregation not in ("sum_then_normalize", "normalize_then_sum"):
        raise ValueError(f"aggregation must be sum_then_normalize or normalize_then_sum, got {aggregation!r}")
    missing = set(scores) - set(weights)
    if missing:
        raise ValueError(f"no weight for rewards {sorted(missing)}")
    n = group.shape[0]
    total = torch.zeros(n, dtype=torch.float32, device=group.device)
    adv = torch.zeros_like(total)
    for name, s in scores.items():
        applies = ~torch.isnan(s)
        term = torch.where(applies, s, 0.0)
        total = total + weights[name] * term
        if aggregation == "normalize_then_sum":
            # Rows the reward does not apply to form their own groups, so they do not move its statistics.
            g = torch.where(applies, group, group + n)
            a = group_advantages(torch.cat([term, term.new_zeros(n)]), torch.cat([g, group + n]), std, eps)[:n]
            adv = adv + weights[name] * torch.where(applies, a, 0.0)
    if aggregation == "sum_then_normalize":
        adv = group_advantages(total, group, std, eps)
    return total, adv
