"""Noise schedules: one object defines the training corruption AND the sampler's reveal plan.

Keeping both in one class means a loss and a sampler built from the same schedule cannot drift apart
(DESIGN.md §3 "Schedules"; diffusers keeps ``add_noise`` next to ``step`` for the same reason).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NoisedBatch:
    """Result of :meth:`NoiseSchedule.add_noise`.

    Attributes:
        noisy: ``[B, L]`` tokens with the masked positions replaced by the mask id.
        masked: ``[B, L]`` bool, True where a token was masked (always a subset of the maskable positions).
        t: ``[B]`` float32 diffusion time of each row (``[S]``, one per sample, when noised with ``sample_ids``).
        p_mask: ``[B]`` float32 masking probability of each row, ``mask_prob(t)`` (``[S]`` with ``sample_ids``).
    """

    noisy: Tensor
    masked: Tensor
    t: Tensor
    p_mask: Tensor


class NoiseSchedule(ABC):
    """Base class: maps a time ``t ∈ [0, 1]`` to a mask probability and plans the reverse process.

    Subclasses define :meth:`mask_prob` and :meth:`reveal_counts`; :meth:`add_noise` masks each maskable
    token independently with probability ``mask_prob(t)`` unless a subclass overrides it.
    """

    @abstractmethod
    def mask_prob(self, t: Tensor) -> Tensor:
        """Mask probability ``[B]`` for times ``t`` ``[B]``."""

    @abstractmethod
    def reveal_counts(self, n_masked: Tensor, steps: int) -> Tensor:
        """How many tokens each of ``steps`` sampling steps reveals.

        Args:
            n_masked: ``[B]`` int64 number of masked positions to fill.
            steps: Number of denoising steps.

        Returns:
            ``[B, steps]`` int64, non-negative, each row summing to ``n_masked``.
        """

    def masked_fraction(self, progress: Tensor) -> Tensor:
        """The reveal curve: fraction of the canvas still masked after ``progress`` of the reverse process.

        1 at ``progress = 0`` (everything masked) and 0 at ``progress = 1`` up to the schedule's floor
        (:class:`~dllm_zoo.schedules.linear.LinearSchedule` keeps ``eps``). Samplers that re-plan every step
        (MaskGIT) read it directly; :meth:`reveal_counts` is its integer counterpart.

        The default, ``mask_prob(1 − progress)``, suits schedules whose ``t = 1`` is fully masked (diffusion time);
        schedules in MaskGIT's convention (``t = 0`` fully masked) override it.

        Args:
            progress: ``[...]`` floats in ``[0, 1]`` (MaskGIT's ratio ``r = (s + 1) / S`` after step ``s``).

        Returns:
            ``[...]`` masked fractions in ``[0, 1]``, non-increasing in ``progress``.
        """
        return self.mask_prob(1 - progress)

    def sample_t(
        self, batch_size: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Draw ``t ~ U(0, 1)`` per row: ``[batch_size]`` float32."""
        return torch.rand(batch_size, generator=generator, device=device)

    def add_noise(
        self,
        tokens: Tensor,
        maskable: Tensor,
        mask_id: int,
        *,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        at_least_one: bool = False,
        sample_ids: Tensor | None = None,
    ) -> NoisedBatch:
        """Corrupt ``tokens``: each maskable position is masked i.i.d. with probability ``mask_prob(t)``.

        Args:
            tokens: ``[B, L]`` clean token ids.
            maskable: ``[B, L]`` bool, positions that may be masked (not prompt, not padding).
            mask_id: Id written at masked positions (the layout's ``mask_id``).
            t: ``[B]`` times (``[S]`` with ``sample_ids``); drawn with :meth:`sample_t` when omitted.
            generator: Random source (the training stage keeps one in its checkpoint for exact resume).
            at_least_one: Force one masked position in every row (sample) that has a maskable one (SDAR SFT).
            sample_ids: Optional ``[B, L]`` long index of the sample each position belongs to, for packed rows
                (:func:`~dllm_zoo.data.packing.packed_sample_ids`): values in ``[0, S)``, −1 where there is no
                sample (never masked). Each sample then has its own ``t``; drawn for ``S = B·L`` slots when ``t``
                is omitted, so no host sync is needed to count samples.

        Returns:
            A :class:`NoisedBatch`.
        """
        if sample_ids is not None:
            return self._add_noise_per_sample(tokens, maskable, mask_id, sample_ids, t, generator, at_least_one)
        b = tokens.shape[0]
        if t is None:
            t = self.sample_t(b, generator=generator, device=tokens.device)
        p = self.mask_prob(t).to(torch.float32)
        u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        masked = (u < p[:, None]) & maskable
        if at_least_one:
            masked = _force_one(masked, maskable, u)
        noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
        return NoisedBatch(noisy=noisy, masked=masked, t=t, p_mask=p)

    def _add_noise_per_sample(
        self,
        tokens: Tensor,
        maskable: Tensor,
        mask_id: int,
        sample_ids: Tensor,
        t: Tensor | None,
        generator: torch.Generator | None,
        at_least_one: bool,
    ) -> NoisedBatch:
        """:meth:`add_noise` with one time per packed sample. Shapes ``[B, L]``; ``t`` ``[S]``."""
        if sample_ids.shape != tokens.shape:
            raise ValueError(f"sample_ids must be [B, L] = {tuple(tokens.shape)}, got {tuple(sample_ids.shape)}")
        if t is None:
            t = self.sample_t(tokens.numel(), generator=generator, device=tokens.device)
        p = self.mask_prob(t).to(torch.float32)
        in_sample = sample_ids >= 0
        ids = sample_ids.clamp(min=0)
        u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        maskable = maskable & in_sample
        masked = (u < p[ids]) & maskable
        if at_least_one:
            masked = _force_one_per_sample(masked, maskable, u, ids, p.shape[0])
        noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
        return NoisedBatch(noisy=noisy, masked=masked, t=t, p_mask=p)


def reveals_from_remaining(remaining: Tensor) -> Tensor:
    """Per-step reveal counts from a planned number of tokens still masked after each step.

    Column 0 is the starting count and the last column is forced to 0; the plan is then pushed down to
    ``r_k <= r_{k-1} - 1`` while tokens remain (at least one reveal per step): ``r'_k = min_{j<=k}(r_j + j) - k``,
    clipped at 0. Shared by the schedules whose plan is ``⌊m · masked_fraction(k / S)⌋`` (cosine, sigmoid).

    Args:
        remaining: ``[B, S + 1]`` int64, tokens still masked after ``k = 0..S`` steps (``remaining[:, 0] = m``).

    Returns:
        ``[B, S]`` int64 reveals per step, non-negative, each row summing to ``remaining[:, 0]``.
    """
    remaining = remaining.to(torch.int64).clone()
    remaining[:, -1] = 0
    idx = torch.arange(remaining.shape[1], device=remaining.device)
    remaining = (torch.cummin(remaining + idx, dim=1).values - idx).clamp(min=0)
    return remaining[:, :-1] - remaining[:, 1:]


def _force_one(masked: Tensor, maskable: Tensor, u: Tensor) -> Tensor:
    """Mask the maskable position with the smallest draw in rows where nothing got masked. Shapes ``[B, L]``."""
    empty = ~masked.any(dim=1) & maskable.any(dim=1)
    pick = torch.where(maskable, u, torch.full_like(u, 2.0)).argmin(dim=1)
    extra = torch.zeros_like(masked)
    extra[torch.arange(masked.shape[0], device=masked.device), pick] = True
    return masked | (extra & empty[:, None])


def _force_one_per_sample(masked: Tensor, maskable: Tensor, u: Tensor, ids: Tensor, num_samples: int) -> Tensor:
    """:func:`_force_one` per sample: ``ids`` ``[B, L]`` (clamped, in ``[0, S)``), the others ``[B, L]``."""
    flat = ids.flatten()
    draws = torch.where(maskable, u, torch.full_like(u, 2.0)).flatten()
    lowest = torch.full((num_samples,), 2.0, device=u.device).scatter_reduce(0, flat, draws, reduce="amin")
    hits = torch.zeros(num_samples, dtype=torch.long, device=u.device).index_add_(0, flat, masked.flatten().long())
    pick = maskable & (u == lowest[ids]) & (hits[ids] == 0)
    return masked | pick


def rank_mask(maskable: Tensor, n_mask: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Mask exactly ``n_mask[b]`` uniformly chosen maskable positions per row (vectorised, no Python loop).

    Args:
        maskable: ``[B, L]`` bool.
        n_mask: ``[B]`` int64; clipped to the number of maskable positions.
        generator: Random source.

    Returns:
        ``[B, L]`` bool.
    """
    scores = torch.rand(maskable.shape, generator=generator, device=maskable.device)
    scores = scores.masked_fill(~maskable, 2.0)  # non-maskable sort last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < n_mask[:, None]) & maskable
