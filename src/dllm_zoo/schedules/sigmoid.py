"""MaskGIT/MUSE's sigmoid mask schedule (Chang et al. 2022, §3.3; Chang et al. 2023, MUSE).

``γ(r) = (σ(end/τ) − σ((r·(end − start) + start)/τ)) / (σ(end/τ) − σ(start/τ))``: a rescaled, flipped logistic
that keeps most tokens masked early and reveals fast in the middle. MMaDA's ``models/sampling.py`` ships it next
to the cosine schedule (research/mmada.md §5.2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_zoo.schedules.base import NoiseSchedule, reveals_from_remaining


class SigmoidSchedule(NoiseSchedule):
    """Sigmoid masking curve ``γ`` with ``γ(0) = 1`` and ``γ(1) = 0``, in MaskGIT's time convention.

    ``t`` plays MaskGIT's ``r``: :meth:`mask_prob` is ``γ(t)`` (``t = 0`` fully masked, like
    :class:`~dllm_zoo.schedules.cosine.CosineSchedule`), so ``t ~ U(0, 1)`` draws a training mask ratio from the
    same curve the sampler follows (MUSE trains with ``γ(r)``, ``r ~ U(0, 1)``); training masks each maskable token
    i.i.d. with that probability (the base :meth:`~NoiseSchedule.add_noise`), clipped below at ``min_mask_rate``.
    :meth:`masked_fraction` is ``γ(r)`` itself (no clip), and :meth:`reveal_counts` keeps
    ``⌊m · γ(k / S)⌋`` tokens masked after step ``k`` of ``S``, with at least one reveal per step while any remain.

    Args:
        start: Left end of the logistic's input range (MaskGIT: −3).
        end: Right end (MaskGIT: 3); must exceed ``start``.
        tau: Temperature of the logistic (MaskGIT: 1); positive.
        min_mask_rate: Lower clip of the training mask probability (``γ`` reaches 0 at ``t = 1``; a floor keeps
            ``1/p`` loss weights bounded).

    Example:
        >>> SigmoidSchedule().masked_fraction(torch.tensor([0.0, 0.5, 1.0])).tolist()
        [1.0, 0.5, 0.0]
    """

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0, min_mask_rate: float = 0.0) -> None:
        if not end > start:
            raise ValueError(f"SigmoidSchedule end must exceed start, got start={start}, end={end}")
        if not tau > 0:
            raise ValueError(f"SigmoidSchedule tau must be positive, got {tau}")
        if not 0.0 <= min_mask_rate <= 1.0:
            raise ValueError(f"SigmoidSchedule min_mask_rate must be in [0, 1], got {min_mask_rate}")
        self.start = start
        self.end = end
        self.tau = tau
        self.min_mask_rate = min_mask_rate

    def _gamma(self, r: Tensor) -> Tensor:
        """``γ(r)`` ``[...]``, computed in ``r``'s floating dtype (float32 for integer input)."""
        r = r if r.is_floating_point() else r.to(torch.float32)
        lo = torch.sigmoid(torch.tensor(self.start / self.tau, dtype=r.dtype, device=r.device))
        hi = torch.sigmoid(torch.tensor(self.end / self.tau, dtype=r.dtype, device=r.device))
        mid = torch.sigmoid((r * (self.end - self.start) + self.start) / self.tau)
        return ((hi - mid) / (hi - lo)).clamp(0.0, 1.0)

    def mask_prob(self, t: Tensor) -> Tensor:
        """See :meth:`NoiseSchedule.mask_prob`: ``max(γ(t), min_mask_rate)``."""
        return self._gamma(t).clamp(min=self.min_mask_rate)

    def masked_fraction(self, progress: Tensor) -> Tensor:
        """See :meth:`NoiseSchedule.masked_fraction`: ``γ(progress)``, shapes ``[...]``."""
        return self._gamma(progress)

    def reveal_counts(self, n_masked: Tensor, steps: int) -> Tensor:
        """See :meth:`NoiseSchedule.reveal_counts`."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        n = n_masked.to(torch.int64)
        progress = torch.arange(steps + 1, device=n.device, dtype=torch.float64) / steps
        remaining = torch.floor(n[:, None].to(torch.float64) * self._gamma(progress)[None, :]).to(torch.int64)
        remaining[:, 0] = n
        return reveals_from_remaining(remaining)
