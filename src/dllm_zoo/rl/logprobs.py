"""Per-token log-probabilities of a masked-diffusion policy at the masked positions of its training rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm_zoo.backbones.base import Backbone


def masked_token_logprobs(
    model: Backbone,
    noisy: Tensor,
    labels: Tensor,
    targets: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``log π(labels | noisy)`` at the ``targets`` positions, logits computed only there.

    The vocabulary projection dominates memory at 126k–151k vocabularies, so only the ``M`` target positions are
    projected (``logits_at``); the log-softmax runs in float32.

    Args:
        model: The policy (or reference) backbone.
        noisy: ``[N, L]`` int64 model input (masked response copies).
        labels: ``[N, L]`` int64 clean tokens (the taken actions).
        targets: ``[N, L]`` bool positions to score (masked, trainable).
        attention_mask: ``[N, L]`` key-padding mask (or a ``[N, 1, L, L]`` mask) for the backbone.
        position_ids: ``[N, L]`` positions, when not ``0..L−1``.
        with_entropy: Also return the predictive entropy at the targets (no gradient; for the logs).

    Returns:
        ``(logp [N, L] float32, entropy [N, L] float32 | None)``, zero outside ``targets``.
    """
    out = model(noisy, attention_mask=attention_mask, position_ids=position_ids, logits_at=targets)
    assert out.logits is not None  # logits were requested
    return taken_logprobs(out.logits, labels, targets, with_entropy)


def taken_logprobs(
    logits: Tensor, labels: Tensor, targets: Tensor, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of the taken tokens from the logits at the target positions, scattered back to ``[N, L]``.

    Args:
        logits: ``[M, V]`` logits at the ``M`` True positions of ``targets``, in row-major order.
        labels: ``[N, L]`` int64 taken tokens.
        targets: ``[N, L]`` bool.
        with_entropy: Also return the predictive entropy there (no gradient).

    Returns:
        ``(logp [N, L] float32, entropy [N, L] float32 | None)``, zero outside ``targets``; the log-softmax runs in
        float32.
    """
    logp_all = F.log_softmax(logits.float(), dim=-1)  # [M, V]
    taken = logp_all.gather(-1, labels[targets][:, None]).squeeze(-1)
    dense = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device).masked_scatter(targets, taken)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
            entropy = torch.zeros_like(dense).masked_scatter(targets, ent)
    return dense, entropy
