"""MaskGIT's cosine schedule (Chang et al. 2022), as MMaDA uses it for image tokens (research/mmada.md §4.1, §5.2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dllm_zoo.schedules.base import NoisedBatch, NoiseSchedule, rank_mask, reveals_from_remaining


class CosineSchedule(NoiseSchedule):
    """Cosine masking: ratio ``r = cos(π t / 2)``, an exact count of masked tokens per row.

    Training (MMaDA t2i): ``n = max(1, round(N · max(r, min_mask_rate)))`` of the ``N`` maskable tokens are
    masked, chosen uniformly (the released code ranks uniform noise). Sampling (MaskGIT): after step ``k`` of
    ``S``, ``⌊m · cos(π k / 2S)⌋`` tokens stay masked, with at least one reveal per step while any remain.

    Args:
        min_mask_rate: Lower clip of the ratio during training (MMaDA: 0).
    """

    def __init__(self, min_mask_rate: float = 0.0) -> None:
        if not 0.0 <= min_mask_rate <= 1.0:
            raise ValueError(f"CosineSchedule min_mask_rate must be in [0, 1], got {min_mask_rate}")
        self.min_mask_rate = min_mask_rate

    def mask_prob(self, t: Tensor) -> Tensor:
        """See :meth:`NoiseSchedule.mask_prob`."""
        return torch.cos(t * (math.pi / 2)).clamp(min=self.min_mask_rate)

    def masked_fraction(self, progress: Tensor) -> Tensor:
        """MaskGIT's reveal curve ``cos(π r / 2)`` at ``r = progress``; shapes ``[...]``.

        ``t = 0`` is fully masked in this schedule (``t`` is MaskGIT's ``r``), so this is :meth:`mask_prob`
        without the training clip ``min_mask_rate``.
        """
        return torch.cos(progress * (math.pi / 2))

    def add_noise(
        self,
        tokens: Tensor,
        maskable: Tensor,
        mask_id: int,
        *,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        at_least_one: bool = True,
        sample_ids: Tensor | None = None,
    ) -> NoisedBatch:
        """Mask an exact, cosine-scheduled count per row (at least one: MaskGIT's ``max(1, ·)``). Shapes ``[B, L]``.

        Packed rows (``sample_ids``) are not supported: the count is per row.
        """
        if sample_ids is not None:
            raise ValueError(
                "CosineSchedule masks an exact count per row and does not support packed rows (sample_ids); "
                "turn packing off (--data.pack false) or use LinearSchedule"
            )
        if t is None:
            t = self.sample_t(tokens.shape[0], generator=generator, device=tokens.device)
        p = self.mask_prob(t).to(torch.float32)
        n_maskable = maskable.sum(dim=1)
        n = torch.round(n_maskable.to(torch.float32) * p).to(torch.int64)
        if at_least_one:
            n = n.clamp(min=1)
        masked = rank_mask(maskable, n, generator=generator)
        noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
        return NoisedBatch(noisy=noisy, masked=masked, t=t, p_mask=p)

    def reveal_counts(self, n_masked: Tensor, steps: int) -> Tensor:
        """See :meth:`NoiseSchedule.reveal_counts`."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        n = n_masked.to(torch.int64)
        k = torch.arange(steps + 1, device=n.device, dtype=torch.float64)
        # cos(k·π/(2S)), not masked_fraction(k/S): the two differ by an ulp for some S, which can flip a floor, and
        # this plan is pinned by the LLaDA-sampler tests.
        ratio = torch.cos(k * (math.pi / (2 * steps)))
        remaining = torch.floor(n[:, None].to(torch.float64) * ratio[None, :]).to(torch.int64)
        remaining[:, 0] = n
        return reveals_from_remaining(remaining)
