"""Confidence scores that decide which masked positions a sampler reveals first ("remasking" policies).

LLaDA (Nie et al. 2025) ranks positions by the probability of the predicted token (``low_confidence``) or at
random (``random``); dLLM-RL adds the top-1/top-2 margin and the negative entropy. Every score is "higher = more
confident": a transfer rule (:mod:`dllm_zoo.samplers.transfer`) reveals the highest-scoring masked positions.

All scores are computed on the logits of the active block only, ``[B, K, V]`` -> ``[B, K]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Confidence(ABC):
    """How confident the model is in its prediction ``x0`` at each position (higher = reveal sooner)."""

    @abstractmethod
    def __call__(self, logits: Tensor, x0: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Score each position.

        Args:
            logits: ``[B, K, V]`` logits of the positions being scored (after any EOS/EoT suppression).
            x0: ``[B, K]`` int64 tokens the sampler predicted there.
            generator: Random source (used by :class:`RandomConfidence` only).

        Returns:
            ``[B, K]`` floating scores; higher = more confident.
        """


class LowConfidence(Confidence):
    """LLaDA ``low_confidence``: softmax probability of the predicted token, ``softmax(logits)[x0]``.

    The softmax runs in the logits' dtype, as the reference does since it dropped its float64 softmax (so
    bf16 models rank by bf16 probabilities).
    """

    def __call__(self, logits: Tensor, x0: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """See :meth:`Confidence.__call__`."""
        p = torch.softmax(logits, dim=-1)
        return torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)


class Margin(Confidence):
    """Margin confidence (dLLM-RL ``margin_confidence``): top-1 minus top-2 probability of the distribution.

    The score does not depend on ``x0`` (at temperature > 0 the sampled token need not be the top-1 one).
    """

    def __call__(self, logits: Tensor, x0: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """See :meth:`Confidence.__call__`."""
        top = torch.softmax(logits, dim=-1).topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]


class NegEntropy(Confidence):
    """Negative entropy ``Σ_v p_v log p_v`` of the predicted distribution (0 for a one-hot prediction).

    Higher = more confident. dLLM-RL's ``neg_entropy`` ranks by +entropy and so reveals the *least* confident
    positions first (research/tracerl_llada.md §1.4); this class has the intended sign.
    """

    def __call__(self, logits: Tensor, x0: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """See :meth:`Confidence.__call__`."""
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        return torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


class RandomConfidence(Confidence):
    """LLaDA ``random`` remasking: i.i.d. ``U(0, 1)`` scores drawn from ``generator`` (float32).

    Departure: the reference draws ``[B, L]`` uniforms over the whole canvas each step; this draws ``[B, K]``
    over the scored positions only, so the random stream (not the distribution) differs from the reference.
    """

    def __call__(self, logits: Tensor, x0: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """See :meth:`Confidence.__call__`."""
        return torch.rand(x0.shape, generator=generator, device=x0.device)
