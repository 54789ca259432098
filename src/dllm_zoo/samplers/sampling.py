"""Token sampling with temperature, top-k and top-p (nucleus) filtering, as block-diffusion samplers use it.

SDAR / dLLM-RL / JetEngine sample each masked position from ``temperature → top-k → softmax → top-p`` and use the
probability of the sampled token under that filtered distribution as its confidence (research/tracerl_llada.md
§3.5, §7.1). :func:`filter_logits` returns the filtered logits (``-inf`` outside the kept set) so that every
:class:`~dllm_zoo.samplers.confidence.Confidence` policy scores positions under the distribution actually sampled
from; :func:`sample_tokens` draws from it. Temperature 0 is true greedy decoding (argmax of the raw logits, no
filtering): the references have no greedy mode and approximate it with ``top_k=1``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature-scale logits and set everything outside the top-k / top-p set to ``-inf``.

    Args:
        logits: ``[..., V]`` floating logits.
        temperature: > 0; logits are divided by it first.
        top_k: Keep the ``top_k`` largest logits (0 = keep all). Ties at the k-th value are all kept.
        top_p: Keep the smallest set of most probable tokens whose probability mass reaches ``top_p`` (1.0 = keep
            all); the most probable token is always kept.

    Returns:
        ``[..., V]`` float32 (or the input's wider dtype) filtered logits; ``softmax`` of it is the sampling
        distribution.
    """
    if temperature <= 0:
        raise ValueError(f"filter_logits needs temperature > 0 (temperature 0 is argmax), got {temperature}")
    out = logits.float() / temperature if logits.dtype in (torch.float16, torch.bfloat16) else logits / temperature
    if 0 < top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, -torch.inf)
    if top_p < 1.0:
        probs, order = torch.softmax(out, dim=-1).sort(dim=-1, descending=True)
        # Mass strictly before each token: a token is kept while the tokens ranked above it hold < top_p.
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, -torch.inf)
    return out


def sample_tokens(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per position.

    Args:
        logits: ``[..., V]`` logits.
        temperature: 0 = greedy (argmax of ``logits``; ``top_k``/``top_p`` unused); otherwise multinomial sampling
            from :func:`filter_logits`.
        top_k: See :func:`filter_logits`.
        top_p: See :func:`filter_logits`.
        generator: Random source of the multinomial draw.

    Returns:
        ``(tokens, scored_logits)``: ``[...]`` int64 tokens and the ``[..., V]`` logits of the distribution they
        were drawn from (``logits`` itself at temperature 0), for confidence scoring.
    """
    if temperature == 0:
        return logits.argmax(dim=-1), logits
    filtered = filter_logits(logits, temperature, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, filtered
