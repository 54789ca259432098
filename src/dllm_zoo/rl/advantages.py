"""Group-relative advantages (GRPO; MMaDA UniGRPO research/mmada.md §4.3–4.4; TraceRL research/tracerl_llada.md §2.2).

Every prompt is answered ``G`` times; a completion's advantage is its reward standardised within its group. The
released UniGRPO and TraceRL code use the population standard deviation and give 0 to a group without spread, and
drop groups that are (nearly) all right or all wrong (UniGRPO: accuracy > 0.95 or < 0.05; TraceRL: > 0.8 or < 0.2).
Everything here is vectorised over the batch (scatter over group ids, no Python loop, no host sync).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StdKind = Literal["population", "sample"]


def _group_sums(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)


def group_mean_std(values: Tensor, group: Tensor, std: StdKind = "population") -> tuple[Tensor, Tensor]:
    """Per-row mean and standard deviation of the row's group.

    Args:
        values: ``[B]`` float.
        group: ``[B]`` int64 group id of each row, in ``[0, B)``.
        std: ``population`` (divide by ``n``, as the released code) or ``sample`` (``n − 1``; 0 for singleton groups).

    Returns:
        ``(mean, std)``, each ``[B]`` (the statistics of each row's group, broadcast back to the rows).
    """
    if values.shape != group.shape or values.dim() != 1:
        raise ValueError(f"values and group must both be [B], got {tuple(values.shape)} and {tuple(group.shape)}")
    b = values.shape[0]
    v = values.to(torch.float64)
    count = _group_sums(torch.ones_like(v), group, b)
    mean = _group_sums(v, group, b) / count.clamp(min=1)
    sq = _group_sums((v - mean[group]) ** 2, group, b)
    denom = count if std == "population" else (count - 1)
    var = torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))
    return mean[group].to(values.dtype), var.sqrt()[group].to(values.dtype)


def group_advantages(rewards: Tensor, group: Tensor, std: StdKind = "population", eps: float = 0.0) -> Tensor:
    """GRPO advantages ``(r − mean_g) / (std_g + eps)``, and exactly 0 for rows whose group has no spread.

    Args:
        rewards: ``[B]`` total reward of each completion.
        group: ``[B]`` int64 prompt (group) id of each completion.
        std: Standard deviation kind (default population, as UniGRPO/TraceRL release).
        eps: Added to the std (the MMaDA paper's ``std + ε``); 0 reproduces the released code.

    Returns:
        ``[B]`` advantages (``rewards``' dtype).

    Example:
        >>> group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])).tolist()
        [1.0, -1.0, 0.0, 0.0]
    """
    mean, sd = group_mean_std(rewards, group, std)
    spread = sd > 0
    return torch.where(spread, (rewards - mean) / (sd + eps).clamp(min=torch.finfo(rewards.dtype).tiny), 0.0)


def informative_groups(correct: Tensor, group: Tensor, low: float = 0.05, high: float = 0.95) -> Tensor:
    """Rows whose group's accuracy lies in ``[low, high]`` (the others teach nothing: all right or all wrong).

    Args:
        correct: ``[B]`` bool or 0/1 float correctness.
        group: ``[B]`` int64 group id.
        low: Drop groups with accuracy below this (UniGRPO release 0.05, TraceRL 0.2).
        high: Drop groups with accuracy above this (UniGRPO release 0.95, TraceRL 0.8).

    Returns:
        ``[B]`` bool keep mask. Count the dropped groups for the logs with ``(~keep).sum()`` rows.
    """
    acc, _ = group_mean_std(correct.to(torch.float32), group)
    return (acc >= low) & (acc <= high)
