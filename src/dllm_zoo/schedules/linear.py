"""LLaDA's linear schedule: ``p = (1 − ε)·t + ε`` (Nie et al. 2025; research/tracerl_llada.md §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_zoo.schedules.base import NoiseSchedule


class LinearSchedule(NoiseSchedule):
    """Linear masking schedule with a floor ``eps``, and LLaDA's even reveal plan.

    Training masks each maskable token i.i.d. with ``p = (1 − eps)·t + eps``. Sampling reveals the ``m``
    masked tokens of a block evenly over ``S`` steps: ``⌊m/S⌋`` per step plus one more in each of the first
    ``m mod S`` steps (LLaDA ``get_num_transfer_tokens``).

    Args:
        eps: Minimum mask probability (LLaDA: 1e-3), so ``1/p`` stays bounded.

    Example:
        >>> LinearSchedule().reveal_counts(torch.tensor([10]), 4).tolist()
        [[3, 3, 2, 2]]
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"LinearSchedule eps must be in [0, 1), got {eps}")
        self.eps = eps

    def mask_prob(self, t: Tensor) -> Tensor:
        """See :meth:`NoiseSchedule.mask_prob`."""
        return (1.0 - self.eps) * t + self.eps

    def reveal_counts(self, n_masked: Tensor, steps: int) -> Tensor:
        """See :meth:`NoiseSchedule.reveal_counts`; integer-exact LLaDA semantics."""
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        n = n_masked.to(torch.int64)
        base = torch.div(n, steps, rounding_mode="floor")
        rem = n - base * steps
        idx = torch.arange(steps, device=n.device)
        return base[:, None] + (idx[None, :] < rem[:, None]).to(torch.int64)
