"""LLaDABackbone vs an independent reference: transformers' LlamaForCausalLM run bidirectionally.

The Llama weights are renamed to LLaDA's original keys and written as a sharded checkpoint by hand (conftest.py),
then loaded with ``LLaDABackbone.from_pretrained``.
"""

from __future__ import annotations

import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_logits_match_bidirectional_llama(make_llama_checkpoint, llama_logits, original_keys, n_kv_heads):
    llama, path = make_llama_checkpoint(n_kv_heads)
    model = LLaDABackbone.from_pretrained(path).eval()
    assert sorted(model.state_dict()) == sorted(original_keys(2))  # strict load succeeded with exactly these keys
    assert model.layout.name == "default"  # inferred: 336 rows and mask id 258
    ids = torch.randint(0, 336, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
    ref = llama_logits(llama, ids)
    assert ours.shape == ref.shape == (2, 24, 336)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_position_ids_match_llama(make_llama_checkpoint, llama_logits):
    llama, path = make_llama_checkpoint(4)
    model = LLaDABackbone.from_pretrained(path).eval()
    ids = torch.randint(0, 336, (2, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.stack([torch.arange(12) + 7, torch.arange(12) * 3])
    with torch.no_grad():
        ours = model(ids, position_ids=pos).logits
    ref = llama_logits(llama, ids, position_ids=pos)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_unpadded_rows(make_llama_checkpoint, llama_logits):
    llama, path = make_llama_checkpoint(4)
    model = LLaDABackbone.from_pretrained(path).eval()
    gen = torch.Generator().manual_seed(2)
    lengths = [16, 11, 5]
    rows = [torch.randint(0, 336, (n,), generator=gen) for n in lengths]
    pad = model.layout.pad_id
    ids = torch.full((3, 16), pad)
    keep = torch.zeros(3, 16, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 16 - len(row) :] = row
        keep[i, 16 - len(row) :] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=keep).logits
        # left-padded rows may also shift RoPE so real tokens start at 0: relative positions are unchanged
        shifted = model(ids, attention_mask=keep, position_ids=(keep.cumsum(1) - 1).clamp(min=0)).logits
        assert torch.isfinite(batched).all()
        for i, row in enumerate(rows):
            single = model(row[None]).logits[0]
            assert (batched[i, 16 - len(row) :] - single).abs().max().item() <= 1e-5
            assert (shifted[i, 16 - len(row) :] - single).abs().max().item() <= 1e-5
    ref = llama_logits(llama, ids, keep)  # the reference with an additive key-padding mask agrees too
    real = keep.bool()
    assert (batched[real] - ref[real]).abs().max().item() <= 1e-4


def test_fully_padded_row_stays_finite(make_llama_checkpoint):
    _, path = make_llama_checkpoint(4)
    model = LLaDABackbone.from_pretrained(path).eval()
    ids = torch.randint(0, 336, (2, 8), generator=torch.Generator().manual_seed(3))
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False
    with torch.no_grad():
        out = model(ids, attention_mask=keep).logits
        alone = model(ids[:1]).logits
    assert torch.isfinite(out).all()
    assert (out[0] - alone[0]).abs().max().item() <= 1e-5


def test_attention_is_bidirectional():
    torch.manual_seed(0)
    model = LLaDABackbone("tiny").eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 256
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[0, 0] - b[0, 0]).abs().max().item() > 1e-4  # the first position sees the last token
