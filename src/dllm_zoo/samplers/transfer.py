"""Transfer rules: how many, and which, masked positions of the active block a sampler reveals at one step.

* :class:`StaticQuota` — LLaDA (Nie et al. 2025): the top-``k`` positions by confidence, ``k`` from the noise
  schedule's reveal plan (:meth:`~dllm_zoo.schedules.base.NoiseSchedule.reveal_counts`).
* :class:`Threshold` — Fast-dLLM (Wu et al. 2025) confidence-aware parallel decoding: every candidate with
  confidence ``>= threshold``, and always at least the top-1.
* :class:`Factor` — Fast-dLLM's "factor" rule: the largest ``n`` with ``(n + 1)·(1 − c_(n)) < factor``.
* :class:`Dynamic` — dLLM-RL's dynamic decoding: all candidates with confidence ``> threshold`` when they are at
  least the static quota, else the top-quota.
* :class:`EntropyBounded` — SDAR / JetEngine ``entropy_bounded``: the lowest-entropy candidates while their summed
  entropy stays below a bound, at least one.

Every rule is a pure, batched function of ``[B, K]`` tensors (no per-row Python loop, no host sync). Rules with
``adaptive = True`` reveal a data-dependent number of tokens; the sampler then runs steps until the block is
filled instead of a fixed number of steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor


def _candidate_scores(confidence: Tensor, candidates: Tensor) -> Tensor:
    """``[B, K]`` scores where non-candidates (-inf) order after every candidate, even a -inf or NaN one."""
    lowest = torch.finfo(confidence.dtype).min
    finite = torch.nan_to_num(confidence, nan=lowest, neginf=lowest)
    return finite.masked_fill(~candidates, -torch.inf)


def _descending_order(confidence: Tensor, candidates: Tensor) -> Tensor:
    """``[B, K]`` positions by descending confidence, candidates first, ties by position (a stable sort)."""
    return torch.sort(_candidate_scores(confidence, candidates), dim=-1, descending=True, stable=True).indices


def confidence_ranks(confidence: Tensor, candidates: Tensor) -> Tensor:
    """Rank of each position by descending confidence among the candidates of its row.

    Ties are broken by position (lower index first; a stable sort). Non-candidates rank after every candidate.

    Args:
        confidence: ``[B, K]`` floating scores.
        candidates: ``[B, K]`` bool, positions that may be revealed (masked, inside the active block).

    Returns:
        ``[B, K]`` int64 ranks, 0 = most confident candidate.
    """
    order = _descending_order(confidence, candidates)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def top_k_mask(confidence: Tensor, candidates: Tensor, k: Tensor) -> Tensor:
    """Select the ``k[b]`` most confident candidates of each row (per-row ``k``, vectorised).

    Args:
        confidence: ``[B, K]`` floating scores.
        candidates: ``[B, K]`` bool.
        k: ``[B]`` int64; rows with fewer candidates reveal all of them.

    Returns:
        ``[B, K]`` bool.
    """
    # Mark the first k[b] places of the stable descending order, then scatter the marks back to their positions
    # (the ranks themselves are not needed). Non-candidates sort last, so "& candidates" handles short rows.
    order = _descending_order(confidence, candidates)
    first_k = torch.arange(order.shape[-1], device=order.device) < k.unsqueeze(-1)
    return torch.zeros_like(candidates).scatter_(-1, order, first_k) & candidates


def top1_mask(confidence: Tensor, candidates: Tensor) -> Tensor:
    """The most confident candidate of each row (lowest position on ties), without a sort.

    Equals ``confidence_ranks(...) == 0`` restricted to candidates, at the cost of one ``argmax`` (this runs
    every step of every adaptive rule).

    Args:
        confidence: ``[B, K]`` floating scores.
        candidates: ``[B, K]`` bool.

    Returns:
        ``[B, K]`` bool, one True per row that has a candidate.
    """
    # argmax returns the first maximal index on ties (documented torch behaviour).
    best = _candidate_scores(confidence, candidates).argmax(dim=-1, keepdim=True)
    return torch.zeros_like(candidates).scatter_(-1, best, True) & candidates


class TransferRule(ABC):
    """Chooses the positions revealed at one step.

    Attributes:
        adaptive: ``False``: the rule follows the static reveal plan and the sampler runs exactly the planned steps
            per block. ``True``: the count is data-dependent; the sampler runs steps until the block is filled
            (one host sync per step to know when to stop).
    """

    adaptive: ClassVar[bool] = False

    @abstractmethod
    def select(self, confidence: Tensor, candidates: Tensor, quota: Tensor) -> Tensor:
        """Positions to reveal now.

        Args:
            confidence: ``[B, K]`` floating scores (higher = more confident); ignored where not a candidate.
            candidates: ``[B, K]`` bool, masked positions of the active block.
            quota: ``[B]`` int64, this step's count in the schedule's reveal plan (0 past the plan's end).

        Returns:
            ``[B, K]`` bool, a subset of ``candidates``.
        """


class StaticQuota(TransferRule):
    """LLaDA: reveal the ``quota`` most confident candidates (the schedule's reveal plan)."""

    adaptive = False

    def select(self, confidence: Tensor, candidates: Tensor, quota: Tensor) -> Tensor:
        """See :meth:`TransferRule.select`."""
        return top_k_mask(confidence, candidates, quota)


class Threshold(TransferRule):
    """Fast-dLLM threshold rule: every candidate with confidence ``>= threshold``, plus always the top-1.

    Args:
        threshold: Confidence threshold (Fast-dLLM: 0.9). ``1.0`` with probabilities reveals one token per step
            unless a probability is exactly 1; ``0.0`` reveals the whole block at once.
    """

    adaptive = True

    def __init__(self, threshold: float = 0.9) -> None:
        self.threshold = threshold

    def select(self, confidence: Tensor, candidates: Tensor, quota: Tensor) -> Tensor:
        """See :meth:`TransferRule.select`."""
        return top1_mask(confidence, candidates) | (candidates & (confidence >= self.threshold))


class Factor(TransferRule):
    """Fast-dLLM "factor" rule: the largest ``n`` with ``(n + 1)·(1 − c_(n)) < factor``, at least one.

    Reveals the ``n`` most confident candidates (``c_(n)`` = n-th highest confidence). The left side grows with
    ``n`` (``c_(n)`` falls), so the admissible ``n`` form a prefix ``1..n*``. This is the published rule (Wu et
    al. 2025): the notes in research/peers.md name it without a formula. Departure: Fast-dLLM's code tests
    ``c_(n) >= 1 − factor/(n+1)``, which admits the boundary case of equality that the strict form here rejects.

    Args:
        factor: The factor ``f`` (Fast-dLLM uses values around 1–2).
    """

    adaptive = True

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = factor

    def select(self, confidence: Tensor, candidates: Tensor, quota: Tensor) -> Tensor:
        """See :meth:`TransferRule.select`."""
        ranks = confidence_ranks(confidence, candidates)
        n = torch.arange(1, confidence.shape[-1] + 1, device=confidence.device)
        # Sorted confidences c_(1) >= c_(2) >= ...; non-candidates sort last and never count.
        sorted_conf = torch.empty_like(confidence).scatter_(-1, ranks, confidence)
        sorted_cand = torch.zeros_like(candidates).scatter_(-1, ranks, candidates)
        ok = ((n + 1) * (1 - sorted_conf) < self.factor) & sorted_cand
        count = ok.to(torch.int64).cumprod(-1).sum(-1).clamp(min=1)
        return (ranks < count.unsqueeze(-1)) & candidates


class Dynamic(TransferRule):
    """dLLM-RL dynamic decoding: confidence ``> threshold`` (strict), with the static quota as a floor.

    Reveals all candidates above the threshold if there are at least ``quota`` of them, else the ``quota`` most
    confident ones, so a block always finishes within its planned steps. The floor is at least one token
    (dLLM-RL always reveals the argmax), so a step whose planned count is 0 (more steps than tokens) still
    makes progress.

    Args:
        threshold: Confidence threshold (dLLM-RL: 0.95).
    """

    adaptive = True

    def __init__(self, threshold: float = 0.95) -> None:
        self.threshold = threshold

    def select(self, confidence: Tensor, candidates: Tensor, quota: Tensor) -> Tensor:
        """See :meth:`TransferRule.select`."""
        floor = quota.clamp(min=1)
        high = candidates & (confidence > self.threshold)
        enough = high.sum(-1) >= floor
        return torch.where(enough.unsqueeze(-1), high, top_k_mask(confidence, candidates, floor))


class EntropyBounded(TransferRule):
    """SDAR / JetEngine entropy-bounded decoding: reveal low-entropy candidates while their entropies sum below a bound.

    Candidates are ordered by entropy (ascending); with ``S_n`` the sum of the ``n`` lowest entropies, the rule
    reveals ``n = #{n : S_n < eb_threshold}`` of them (``searchsorted`` of the cumulative sum, research/
    tracerl_llada.md §3.5), at least one. Pair it with :class:`~dllm_zoo.samplers.confidence.NegEntropy`
    scores: the entropy of a position is minus its score.

    Args:
        eb_threshold: Entropy budget per step (JetEngine default 0.35 nats).
    """

    adaptive = True

    def __init__(self, eb_threshold: float = 0.35) -> None:
        if eb_threshold < 0:
            raise ValueError(f"eb_threshold must be >= 0, got {eb_threshold}")
        self.eb_threshold = eb_threshold

    def select(self, confidence: Tensor, candidates: Tensor, quota: Tensor) -> Tensor:
        """See :meth:`TransferRule.select`; ``confidence`` must be negative entropies."""
        ranks = confidence_ranks(confidence, candidates)
        entropy = torch.where(candidates, -confidence, torch.zeros_like(confidence))
        sorted_entropy = torch.empty_like(entropy).scatter_(-1, ranks, entropy)
        sorted_cand = torch.zeros_like(candidates).scatter_(-1, ranks, candidates)
        under = (sorted_entropy.cumsum(-1) < self.eb_threshold) & sorted_cand
        count = under.sum(-1).clamp(min=1)
        return (ranks < count.unsqueeze(-1)) & candidates
