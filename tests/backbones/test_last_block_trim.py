"""An index ``logits_at`` computes the last block only at those positions: same logits, same gradients."""

from __future__ import annotations

import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone, SDARBackbone
from dllm_zoo.backbones.attention import block_causal_mask


@pytest.mark.parametrize("family", [LLaDABackbone, SDARBackbone])
def test_index_logits_match_full_logits_with_padding_and_cache(family) -> None:
    torch.manual_seed(0)
    model = family("tiny").eval()
    ids = torch.randint(0, 256, (3, 12))
    pad = torch.ones(3, 12, dtype=torch.bool)
    pad[1, :3] = False
    at = torch.tensor([[8, 9, 10, 11], [0, 5, 9, 11], [11, 10, 4, 8]])
    with torch.no_grad():
        full = model(ids, attention_mask=pad).logits
        trimmed = model(ids, attention_mask=pad, logits_at=at).logits
        torch.testing.assert_close(trimmed, torch.gather(full, 1, at[..., None].expand(-1, -1, full.shape[-1])))
        # the cache path: a 4-D pattern, context keys, the window's own keys all still come from every position
        ctx = model(ids[:, :8], attention_mask=pad[:, :8], return_cache=True).cache
        pos = torch.arange(8, 12).expand(3, 4)
        pattern = block_causal_mask(pos, 4)
        window = model(ids[:, 8:], position_ids=pos, cache=ctx, attention_mask=pattern).logits
        picked = model(
            ids[:, 8:], position_ids=pos, cache=ctx, attention_mask=pattern, logits_at=at[:1, :2].expand(3, 2) - 8
        ).logits
    torch.testing.assert_close(picked, window[:, :2])


def test_trimmed_last_block_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = LLaDABackbone("tiny")
    ids = torch.randint(0, 256, (2, 10))
    at = torch.tensor([[1, 7], [3, 9]])
    model(ids).logits.gather(1, at[..., None].expand(-1, -1, 336)).square().sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids, logits_at=at).logits.square().sum().backward()
    for a, b in zip(ref, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
