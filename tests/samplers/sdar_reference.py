"""The SDAR / dLLM-RL reference block-diffusion loop, written from its description (research/tracerl_llada.md §3.5).

``block_diffusion_generate`` runs on a HuggingFace causal-LM class (``transformers`` Qwen3 stands in for SDAR's
``modeling_sdar.py``, which is Qwen3 with a block mask) with an HF ``DynamicCache``: prefill of ``⌊p/B⌋·B``
prompt tokens, then per block up to ``denoising_steps`` forwards of the block whose K/V are not kept (the
reference's ``store_kv=False``; emulated by cropping the cache back), and one last forward that keeps them. Per-row
Python loops for the top-k choice, as in the reference. Deliberate addition: ``temperature == 0`` is argmax with
confidences from the raw softmax (the reference has no greedy mode), so greedy runs are deterministic and
comparable. Batch rows must share one prompt length (the reference has no left-padding support).

Used by the sampler parity tests and by ``benchmarks/sampling.py`` (the speed baseline).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor


def get_num_transfer_tokens(block_length: int, steps: int) -> list[int]:
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def sample_with_temperature_topk_topp(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """temperature -> top-k -> softmax -> top-p -> multinomial; returns (tokens, prob of each token)."""
    if temperature == 0:
        probs = torch.softmax(logits.float(), dim=-1)
        x0 = probs.argmax(dim=-1)
        return x0, torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_probs.cumsum(-1)
        remove = cum - sorted_probs >= top_p
        remove[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(remove, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    flat = probs.reshape(-1, probs.shape[-1])
    x0 = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return x0, torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def block_diffusion_generate(
    model: torch.nn.Module,
    prompt: Tensor,
    *,
    mask_id: int,
    gen_length: int,
    block_length: int,
    denoising_steps: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    remasking_strategy: str = "low_confidence_static",
    confidence_threshold: float = 0.9,
    stopping_criteria_idx: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Reference loop; returns ``(x [B, ceil((p + G)/B)·B], forward passes)``."""
    from transformers import DynamicCache

    b, p = prompt.shape
    num_blocks = (p + gen_length + block_length - 1) // block_length
    total = num_blocks * block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks, dtype=torch.bool))
    attn = block_mask.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None]
    attn = attn.expand(b, 1, total, total)
    position_ids = torch.arange(total).expand(b, total)
    x = torch.full((b, total), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    cache = DynamicCache(config=model.config)
    prefill_blocks = p // block_length
    prefill_length = prefill_blocks * block_length
    nfe = 0
    if prefill_length > 0:
        model(
            x[:, :prefill_length],
            attention_mask=attn[:, :, :prefill_length, :prefill_length],
            position_ids=position_ids[:, :prefill_length],
            past_key_values=cache,
            use_cache=True,
        )
        nfe += 1
    num_transfer = get_num_transfer_tokens(block_length, denoising_steps)
    for num_block in range(prefill_blocks, num_blocks):
        s, e = num_block * block_length, (num_block + 1) * block_length
        cur_x = x[:, s:e].clone()
        cur_attn = attn[:, :, s:e, :e]
        cur_pos = position_ids[:, s:e]
        for step in range(denoising_steps + 1):
            mask_index = cur_x == mask_id
            if mask_index.sum() == 0:
                model(cur_x, attention_mask=cur_attn, position_ids=cur_pos, past_key_values=cache, use_cache=True)
                nfe += 1
                break
            logits = model(
                cur_x, attention_mask=cur_attn, position_ids=cur_pos, past_key_values=cache, use_cache=True
            ).logits
            cache.crop(-block_length)  # store_kv=False
            nfe += 1
            x0, x0_p = sample_with_temperature_topk_topp(logits, temperature, top_k, top_p, generator)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -math.inf))
            transfer = torch.zeros_like(mask_index)
            for j in range(b):
                k = num_transfer[step] if step < denoising_steps else 0
                if remasking_strategy == "low_confidence_static":
                    idx = torch.topk(confidence[j], k).indices
                    transfer[j, idx] = True
                elif remasking_strategy == "low_confidence_dynamic":
                    high = confidence[j] > confidence_threshold
                    if int(high.sum()) >= k:
                        transfer[j] = high
                    else:
                        transfer[j, torch.topk(confidence[j], k).indices] = True
                else:
                    raise ValueError(remasking_strategy)
            transfer &= mask_index
            cur_x[transfer] = x0[transfer]
        x[:, s:e] = cur_x
        if stopping_criteria_idx is not None and any(bool((x[:, p:] == t).any()) for t in stopping_criteria_idx):
            break
    return x, nfe


def qwen3_twin(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """The same weights as a transformers ``Qwen3ForCausalLM`` (the reference loop's model class).

    ``model`` is an :class:`~dllm_zoo.backbones.SDARBackbone`; its checkpoint is Qwen3's keys and config fields with
    ``model_type: sdar``, which is the only thing changed here.
    """
    from transformers import Qwen3ForCausalLM

    model.save_pretrained(directory)  # type: ignore[operator]
    config = Path(directory) / "config.json"
    data = json.loads(config.read_text())
    data["model_type"] = "qwen3"
    config.write_text(json.dumps(data))
    return Qwen3ForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
