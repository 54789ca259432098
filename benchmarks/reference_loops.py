"""Plain reference loops, written from the published descriptions, that the benchmarks compare against.

* :func:`llada_generate` — LLaDA's reference ``generate`` (research/tracerl_llada.md §5.1), the literal
  restatement the parity tests use (``tests/samplers/llada_reference.py``): logits for the whole canvas at
  every step, static reveal counts, low-confidence remasking.
* :func:`fast_dllm_dual_threshold` — Fast-dLLM v1's dual cache with confidence-threshold decoding
  (research/reference-semantics.md "Fast-dLLM v1"): batch 1 only; per block one full forward that fills the
  cache, then forwards over the current block only; per step the top-1 masked position of the block plus
  every other one whose float64 softmax confidence is >= the threshold.

* :func:`block_diffusion_generate` — the SDAR / dLLM-RL block-diffusion loop (research/tracerl_llada.md §3.5) on a
  transformers model with an HF ``DynamicCache`` (``tests/samplers/sdar_reference.py``); :func:`qwen3_twin` gives
  the transformers Qwen3 model with an SDAR backbone's weights.

They are deliberately literal (per-row Python loops, no padding support); our samplers must match or beat
them on the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "samplers"))

from llada_reference import reference_generate  # noqa: E402
from sdar_reference import block_diffusion_generate, qwen3_twin  # noqa: E402,F401  (re-exported)

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.cache import KVCache


@torch.no_grad()
def llada_generate(
    model: Backbone, prompt: Tensor, steps: int, gen_length: int, block_length: int
) -> tuple[Tensor, int]:
    """LLaDA ``generate`` at temperature 0 (the test suite's literal reference). Returns (tokens, nfe = steps)."""
    lay = model.layout
    out = reference_generate(
        model,
        prompt,
        steps=steps,
        gen_length=gen_length,
        block_length=block_length,
        mask_id=lay.mask_id,
        eos_id=lay.eos_id,
        eot_id=lay.token_id("<|eot_id|>"),
    )
    return out, steps


@torch.no_grad()
def fast_dllm_dual_threshold(
    model: Backbone, prompt: Tensor, gen_length: int, block_length: int, threshold: float
) -> tuple[Tensor, int]:
    """Fast-dLLM dual cache + threshold, batch 1. Returns (tokens [1, P+G], nfe)."""
    if prompt.shape[0] != 1:
        raise ValueError("Fast-dLLM v1 runs at batch 1 only")
    mask_id = model.layout.mask_id
    p = prompt.shape[1]
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id, dtype=torch.long)], dim=1)
    pos = torch.arange(x.shape[1])[None]
    nfe = 0

    def reveal(x: Tensor, logits: Tensor, s: int, e: int) -> None:
        block = x[:, s:e]
        masked = block == mask_id
        probs = torch.softmax(logits.double(), dim=-1)
        conf, x0 = probs.max(dim=-1)
        conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
        chosen = (conf >= threshold) & masked
        chosen[0, conf[0].argmax()] = True
        x[:, s:e] = torch.where(chosen, x0, block)

    for blk in range(gen_length // block_length):
        s, e = p + blk * block_length, p + (blk + 1) * block_length
        out = model(x, return_cache=True)
        nfe += 1
        reveal(x, out.logits[:, s:e], s, e)
        ctx = KVCache.cat([out.cache.select(slice(0, s)), out.cache.select(slice(e, x.shape[1]))])
        while bool((x[:, s:e] == mask_id).any()):
            logits = model(x[:, s:e], position_ids=pos[:, s:e], cache=ctx).logits
            nfe += 1
            reveal(x, logits, s, e)
    return x, nfe
