"""How the responses of a rollout are masked for the policy's log-likelihood (UniGRPO's "structured noising").

A masked-diffusion policy has no exact sequence likelihood; UniGRPO (research/mmada.md §4.3) masks part of each
response (never the prompt), and takes the mean log-probability of the masked tokens as the sequence's
log-likelihood. Each scheme here returns, for the ``μ`` inner iterations, which response positions are masked:

* :class:`UniformlySpacedMasking` — the paper (Alg. 1): per response a start ``t_1 = ⌊r·T⌋``, ``r ~ U(0, 1)``, then
  ``t_n = ⌊(n−1)/(μ−1)·(T − t_1) + t_1⌋`` for ``n = 1..μ``; mask ratio ``t_n / T``. The ratios cover the whole
  range across the inner iterations (an approximation of the Monte-Carlo average over ``t``).
* :class:`RandomMasking` — the released ``random_masking`` (research/mmada.md §4.4): ``copies`` independent masks per
  response and iteration with ``t ~ U[low, high]``, positions masked i.i.d. with probability ``t``.
* :class:`CoupledMasking` — the released ``coupled`` (DiffuCoder): a random mask and its complement, two rows with
  the same advantage, so every response token is scored exactly once per pair.

All schemes are vectorised over the batch and draw from the given generator on the data's device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def mask_count(response: Tensor, ratio: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mask exactly ``clamp(round(ratio·n), 1, n)`` of each row's ``n`` response positions, chosen uniformly.

    Args:
        response: ``[N, L]`` bool, the maskable (response) positions.
        ratio: ``[N]`` float mask ratios in ``[0, 1]``.
        generator: Random source (on ``response``'s device).

    Returns:
        ``[N, L]`` bool, a subset of ``response``; rows without response positions stay all False.
    """
    n = response.sum(dim=1)
    k = torch.round(ratio.to(torch.float32) * n).long().clamp(min=1)
    k = torch.minimum(k, n)
    noise = torch.rand(response.shape, generator=generator, device=response.device)
    noise = noise.masked_fill(~response, 2.0)  # non-response positions rank last
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank < k[:, None]) & response


def mask_bernoulli(response: Tensor, prob: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mask each response position independently with its row's probability (at least one per non-empty row).

    Args:
        response: ``[N, L]`` bool maskable positions.
        prob: ``[N]`` (per row) or ``[N, L]`` (per position) masking probabilities.
        generator: Random source.

    Returns:
        ``[N, L]`` bool, a subset of ``response``.
    """
    p = prob[:, None] if prob.dim() == 1 else prob
    u = torch.rand(response.shape, generator=generator, device=response.device)
    masked = (u < p) & response
    # A row with nothing masked contributes no log-likelihood at all: mask its lowest-u response position.
    empty = ~masked.any(dim=1) & response.any(dim=1)
    first = u.masked_fill(~response, 2.0).argmin(dim=1)
    forced = torch.zeros_like(masked).scatter_(1, first[:, None], True) & empty[:, None]
    return masked | forced


def uniformly_spaced_ratios(
    num_rows: int,
    num_iterations: int,
    num_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """UniGRPO's uniformly spaced mask ratios (MMaDA Alg. 1): ``[μ, N]``, row ``n`` = ``t_n / T``.

    ``t_1 = ⌊r·T⌋`` with ``r ~ U(0, 1)`` per response; ``t_n = ⌊(n−1)/(μ−1)·(T − t_1) + t_1⌋``. With ``μ = 1`` only
    ``t_1``. The last ratio is 1 (the whole response masked), as the formula gives (the paper's worked example,
    100 → 900 for μ = 5, uses another step; research/mmada.md §4.3 notes the inconsistency).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> [round(r, 3) for r in uniformly_spaced_ratios(1, 5, generator=g).squeeze(1).tolist()]
        [0.496, 0.622, 0.748, 0.874, 1.0]
    """
    if num_iterations < 1 or num_timesteps < 1:
        raise ValueError(f"num_iterations and num_timesteps must be >= 1, got {num_iterations}, {num_timesteps}")
    r = torch.rand(num_rows, generator=generator, device=device)
    t1 = torch.floor(r * num_timesteps)
    n = torch.arange(num_iterations, device=t1.device, dtype=torch.float64)[:, None]
    frac = n / max(1, num_iterations - 1)
    t = torch.floor(frac * (num_timesteps - t1.double()) + t1.double())
    # ratio 0 would mask nothing; mask_count masks at least one token anyway, so the ratio is kept as drawn
    return (t / num_timesteps).to(torch.float32)


class ResponseMasking(ABC):
    """Base class: which response positions each inner iteration masks.

    ``copies`` is the number of masked rows built per response and iteration (1 for most schemes, 2 for the coupled
    pair); every copy carries the response's advantage.
    """

    copies: int = 1

    @abstractmethod
    def __call__(self, response: Tensor, num_iterations: int, generator: torch.Generator | None = None) -> Tensor:
        """Masks for all inner iterations.

        Args:
            response: ``[N, L]`` bool trainable response positions of the ``N`` rollouts.
            num_iterations: ``μ``, the inner iterations per rollout batch.
            generator: Random source on ``response``'s device.

        Returns:
            ``[μ, copies, N, L]`` bool, each a subset of ``response``, at least one position per non-empty row.
        """


class UniformlySpacedMasking(ResponseMasking):
    """The paper's UniGRPO masking: uniformly spaced ratios across the ``μ`` iterations (exact token counts).

    Args:
        num_timesteps: ``T``, the discretisation of the ratio (the paper: 1000).
    """

    def __init__(self, num_timesteps: int = 1000) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def __call__(self, response: Tensor, num_iterations: int, generator: torch.Generator | None = None) -> Tensor:
        """See :meth:`ResponseMasking.__call__`."""
        ratios = uniformly_spaced_ratios(
            response.shape[0], num_iterations, self.num_timesteps, generator=generator, device=response.device
        )
        return torch.stack([mask_count(response, r, generator) for r in ratios])[:, None]


class RandomMasking(ResponseMasking):
    """The released ``random_masking``: ``t ~ U[low, high]`` per copy, positions masked i.i.d. with probability ``t``.

    Args:
        low: Lower bound of ``t`` (release: 0.1).
        high: Upper bound of ``t`` (release: 0.9).
        copies: Masked rows per response and iteration (release: ``mask_times_per_sample`` 2).
        per_position: Draw a probability per position instead of per row (the release's block-model variant).
    """

    def __init__(self, low: float = 0.1, high: float = 0.9, copies: int = 1, per_position: bool = False) -> None:
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.low = low
        self.high = high
        self.copies = copies
        self.per_position = per_position

    def _draw(self, response: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
        shape = (count, *response.shape) if self.per_position else (count, response.shape[0])
        t = self.low + (self.high - self.low) * torch.rand(shape, generator=generator, device=response.device)
        return torch.stack([mask_bernoulli(response, p, generator) for p in t])

    def __call__(self, response: Tensor, num_iterations: int, generator: torch.Generator | None = None) -> Tensor:
        """See :meth:`ResponseMasking.__call__`."""
        masks = self._draw(response, num_iterations * self.copies, generator)
        return masks.view(num_iterations, self.copies, *response.shape)


class CoupledMasking(RandomMasking):
    """The released ``coupled`` scheme: a random mask (as :class:`RandomMasking`) and its complement.

    The complement of a mask that covers the whole response is empty; such a row contributes nothing (its
    mean over zero masked tokens is 0 and it is excluded by the objective's mask).
    """

    def __init__(self, low: float = 0.1, high: float = 0.9, per_position: bool = False) -> None:
        super().__init__(low, high, copies=1, per_position=per_position)
        self.copies = 2

    def __call__(self, response: Tensor, num_iterations: int, generator: torch.Generator | None = None) -> Tensor:
        """See :meth:`ResponseMasking.__call__`."""
        masks = self._draw(response, num_iterations, generator)
        return torch.stack([masks, response & ~masks], dim=1)
