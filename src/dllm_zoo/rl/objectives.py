"""Policy objectives: the clipped surrogate with a k3 KL penalty and a choice of aggregation (DESIGN.md §3 "RL").

One small class with typed arguments per objective (research/aesthetics.md (b)8), taking token-level tensors so that
sequence-level advantages (GRPO/UniGRPO), per-step ones (ParaRL) and token-level ones (TraceRL with a value model)
all go through the same call. Formulas (research/mmada.md §4.3–4.4, research/tracerl_llada.md §2.4, §6):

* ratio ``ρ = exp(logp_new − logp_old)`` per target token (optionally with the log-ratio clamped, as the released
  block-model trainers clamp it to ±10);
* surrogate ``min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A)``;
* KL, k3 estimator, against the frozen reference (paper GRPO, d1) or the behaviour policy (released UniGRPO/TraceRL):
  ``exp(x − new) − (x − new) − 1`` with ``x`` = ``logp_ref`` or ``logp_old``;
* ``loss = −agg(surrogate) + β·agg_kl(KL)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["token_mean", "sequence_mean", "sequence_sum"]
KLTarget = Literal["reference", "old"]


@dataclass
class ObjectiveOutput:
    """A policy objective's loss and diagnostics (all scalars).

    Attributes:
        loss: To minimise: ``−surrogate + β·KL``.
        surrogate: The aggregated clipped surrogate (to maximise).
        kl: The aggregated k3 KL estimate (0 when ``beta`` is 0 and no KL target was given).
        clip_fraction: Share of target tokens where the clipped branch is the active one.
        ratio_mean: Mean ratio over target tokens.
    """

    loss: Tensor
    surrogate: Tensor
    kl: Tensor
    clip_fraction: Tensor
    ratio_mean: Tensor


def aggregate(values: Tensor, mask: Tensor, how: Aggregation) -> Tensor:
    """Reduce token values ``[B, L]`` over the True positions of ``mask`` ``[B, L]``.

    ``token_mean``: sum over all target tokens ÷ their count (d1). ``sequence_mean``: each row's mean over its targets,
    then the mean over rows (UniGRPO; rows without targets count as 0). ``sequence_sum``: each row's sum, mean over rows
    (the released UniGRPO/LLaDA KL term).
    """
    m = mask.to(values.dtype)
    if how == "token_mean":
        return (values * m).sum() / m.sum().clamp(min=1)
    per_row = (values * m).sum(dim=1)
    if how == "sequence_mean":
        per_row = per_row / m.sum(dim=1).clamp(min=1)
    elif how != "sequence_sum":
        raise ValueError(f"aggregation must be token_mean, sequence_mean or sequence_sum, got {how!r}")
    return per_row.mean()


def k3_kl(logp_new: Tensor, logp_target: Tensor) -> Tensor:
    """The k3 estimator of ``KL(π_new ‖ π_target)`` per token: ``exp(d) − d − 1`` with ``d = target − new`` (≥ 0)."""
    d = logp_target - logp_new
    return torch.exp(d) - d - 1


class PolicyObjective(ABC):
    """Base class: ``(logp_new, logp_old, advantages, mask, logp_ref) -> ObjectiveOutput``."""

    def needs_reference(self) -> bool:
        """Whether ``logp_ref`` (a frozen reference policy) must be given; the stage then keeps a reference."""
        return False

    @abstractmethod
    def __call__(
        self,
        logp_new: Tensor,
        logp_old: Tensor,
        advantages: Tensor,
        mask: Tensor,
        logp_ref: Tensor | None = None,
    ) -> ObjectiveOutput:
        """Compute the objective.

        Args:
            logp_new: ``[B, L]`` log-probabilities of the taken tokens under the policy being trained (with grad).
            logp_old: ``[B, L]`` the same under the behaviour policy (no grad).
            advantages: ``[B]`` (one per sequence, broadcast) or ``[B, L]`` (per token).
            mask: ``[B, L]`` bool, the target tokens.
            logp_ref: ``[B, L]`` under the frozen reference policy, when the KL is against it.
        """


class ClippedSurrogate(PolicyObjective):
    """PPO/GRPO clipped surrogate with an optional k3 KL penalty.

    Args:
        eps: Lower clip ``ε`` (ratio ≥ 1 − ε); UniGRPO/TraceRL release 0.2.
        eps_high: Upper clip (DAPO's clip-higher); ``None`` = ``eps``.
        beta: KL weight ``β`` (released UniGRPO/TraceRL 0.01; MMaDA-Parallel 1e-4); 0 = no KL term.
        kl_against: ``reference`` (a frozen copy, or the base model with LoRA disabled) or ``old`` (the behaviour
            policy, as the released code does).
        aggregation: How the surrogate is reduced: ``sequence_mean`` (UniGRPO: mean over masked tokens per sequence)
            or ``token_mean`` (d1) or ``sequence_sum``.
        kl_aggregation: How the KL is reduced; ``None`` = ``aggregation`` (the released UniGRPO sums it per sequence:
            ``sequence_sum``).
        log_ratio_clamp: Clamp ``logp_new − logp_old`` to ``±value`` before ``exp`` (released block-model trainers:
            10); ``None`` = no clamp.

    Example:
        >>> obj = ClippedSurrogate(eps=0.2)
        >>> lp = torch.zeros(1, 2)
        >>> out = obj(lp, lp, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool))
        >>> out.loss.item(), out.clip_fraction.item()
        (-1.0, 0.0)
    """

    def __init__(
        self,
        eps: float = 0.2,
        eps_high: float | None = None,
        beta: float = 0.0,
        kl_against: KLTarget = "reference",
        aggregation: Aggregation = "sequence_mean",
        kl_aggregation: Aggregation | None = None,
        log_ratio_clamp: float | None = None,
    ) -> None:
        if not 0 < eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if eps_high is not None and eps_high <= 0:
            raise ValueError(f"eps_high must be > 0, got {eps_high}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if kl_against not in ("reference", "old"):
            raise ValueError(f"kl_against must be 'reference' or 'old', got {kl_against!r}")
        for name, value in (("aggregation", aggregation), ("kl_aggregation", kl_aggregation)):
            if value is not None and value not in ("token_mean", "sequence_mean", "sequence_sum"):
                raise ValueError(f"{name} must be token_mean, sequence_mean or sequence_sum, got {value!r}")
        self.eps = eps
        self.eps_high = eps if eps_high is None else eps_high
        self.beta = beta
        self.kl_against = kl_against
        self.aggregation: Aggregation = aggregation
        self.kl_aggregation: Aggregation = aggregation if kl_aggregation is None else kl_aggregation
        self.log_ratio_clamp = log_ratio_clamp

    def needs_reference(self) -> bool:
        """True when the KL term is on and measured against the frozen reference."""
        return self.beta > 0 and self.kl_against == "reference"

    def __call__(
        self,
        logp_new: Tensor,
        logp_old: Tensor,
        advantages: Tensor,
        mask: Tensor,
        logp_ref: Tensor | None = None,
    ) -> ObjectiveOutput:
        """See :meth:`PolicyObjective.__call__`.

        Raises:
            ValueError: when ``beta > 0`` and ``kl_against='reference'`` but ``logp_ref`` is missing, or on shapes.
        """
        if logp_new.shape != logp_old.shape or logp_new.shape != mask.shape:
            raise ValueError(
                f"logp_new, logp_old and mask must share [B, L], got {tuple(logp_new.shape)}, "
                f"{tuple(logp_old.shape)}, {tuple(mask.shape)}"
            )
        adv = advantages[:, None] if advantages.dim() == 1 else advantages
        if adv.shape[0] != logp_new.shape[0]:
            raise ValueError(
                f"advantages must be [B] or [B, L] with B={logp_new.shape[0]}, got {tuple(advantages.shape)}"
            )
        adv = adv.to(logp_new.dtype)
        mask = mask.bool()
        log_ratio = torch.where(
            mask, logp_new - logp_old, torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
        )
        if self.log_ratio_clamp is not None:
            log_ratio = log_ratio.clamp(-self.log_ratio_clamp, self.log_ratio_clamp)
        ratio = torch.exp(log_ratio)
        unclipped = ratio * adv
        clipped = ratio.clamp(1 - self.eps, 1 + self.eps_high) * adv
        surrogate_tok = torch.minimum(unclipped, clipped)
        surrogate = aggregate(surrogate_tok, mask, self.aggregation)
        kl = torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
        if self.beta > 0:
            target = logp_old if self.kl_against == "old" else logp_ref
            if target is None:
                raise ValueError("ClippedSurrogate(kl_against='reference', beta > 0) needs logp_ref")
            kl = aggregate(k3_kl(logp_new, target.detach()), mask, self.kl_aggregation)
        m = mask.to(logp_new.dtype)
        active = ((clipped < unclipped) & mask).to(logp_new.dtype)  # the clip bounds the objective there
        with torch.no_grad():
            clip_fraction = active.sum() / m.sum().clamp(min=1)
            ratio_mean = (ratio * m).sum() / m.sum().clamp(min=1)
        return ObjectiveOutput(
            loss=-surrogate + self.beta * kl,
            surrogate=surrogate.detach(),
            kl=kl.detach(),
            clip_fraction=clip_fraction,
            ratio_mean=ratio_mean,
        )
