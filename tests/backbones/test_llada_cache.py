"""KVCache and LLaDABackbone's windowed forward: exactness of prefix/dual caches, padding, GQA, staleness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dllm_zoo.backbones import KVCache, LLaDABackbone, LLaDAConfig
from dllm_zoo.backbones.layers import apply_rotary

L = 24  # canvas length
TOL = 1e-5


def _model(n_kv_heads: int | None = None, seed: int = 0) -> LLaDABackbone:
    torch.manual_seed(seed)
    cfg = LLaDAConfig.preset("tiny")
    if n_kv_heads is not None:
        cfg = dataclasses.replace(cfg, n_kv_heads=n_kv_heads)
    return LLaDABackbone(cfg).eval()


@pytest.fixture(scope="module")
def tiny() -> LLaDABackbone:
    return _model()


def _ids(b: int, seq: int = L, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 336, (b, seq), generator=torch.Generator().manual_seed(seed))


def _positions(b: int, seq: int = L) -> torch.Tensor:
    return torch.arange(seq).expand(b, seq)


def _padded(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with different padding: left-padded by 0, 3, 7, … plus one row right-padded into the suffix."""
    keep = torch.ones(b, L, dtype=torch.bool)
    for row in range(b - 1):
        keep[row, : [0, 3, 7, 11][row % 4]] = False
    keep[b - 1, L - 5 :] = False
    positions = (keep.long().cumsum(1) - 1).clamp(min=0)
    return keep, positions


def _window_forward(
    model: LLaDABackbone,
    ids: torch.Tensor,
    s: int,
    e: int,
    *,
    dual: bool,
    keep: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, KVCache, KVCache]:
    """Full forward (logits, cache) and the window [s, e) run against the prefix (+ suffix) of that cache."""
    b, seq = ids.shape
    positions = _positions(b, seq) if positions is None else positions
    full = model(ids, attention_mask=keep, position_ids=positions, return_cache=True)
    ctx = full.cache.select(slice(0, s))
    if dual:
        ctx = KVCache.cat([ctx, full.cache.select(slice(e, seq))])
    window_mask = None if keep is None else keep[:, s:e]
    out = model(ids[:, s:e], attention_mask=window_mask, position_ids=positions[:, s:e], cache=ctx, return_cache=True)
    return full.logits, out.logits, full.cache, out.cache


# --------------------------------------------------------------------------------------------------- KVCache
def _toy_cache(b: int = 2, s: int = 5, layers: int = 3, mask: bool = True) -> KVCache:
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(b, 2, s, 4, generator=g) for _ in range(layers)]
    values = [torch.randn(b, 2, s, 4, generator=g) for _ in range(layers)]
    key_mask = torch.rand(b, s, generator=g) > 0.3 if mask else None
    return KVCache(keys, values, key_mask)


def test_kvcache_select_slice_gives_views_and_index_gives_copies():
    c = _toy_cache()
    assert (c.seq_len, c.batch_size, c.n_layers) == (5, 2, 3)
    head = c.select(slice(1, 4))
    assert head.seq_len == 3
    assert head.keys[1].data_ptr() == c.keys[1][:, :, 1:].data_ptr()  # a view
    torch.testing.assert_close(head.values[2], c.values[2][:, :, 1:4], atol=0, rtol=0)
    assert torch.equal(head.key_mask, c.key_mask[:, 1:4])
    idx = torch.tensor([4, 0, 2])
    picked = c.select(idx)
    torch.testing.assert_close(picked.keys[0], c.keys[0][:, :, idx], atol=0, rtol=0)
    assert torch.equal(picked.key_mask, c.key_mask[:, idx])
    picked.keys[0].zero_()
    assert c.keys[0].abs().sum() > 0  # a copy
    by_bool = c.select(torch.tensor([True, False, True, False, False]))
    torch.testing.assert_close(by_bool.values[1], c.values[1][:, :, [0, 2]], atol=0, rtol=0)
    empty = c.select(slice(0, 0))
    assert empty.seq_len == 0
    assert empty.key_mask.shape == (2, 0)


def test_kvcache_cat_and_masks():
    a, b = _toy_cache(s=3), _toy_cache(s=4, mask=False)
    joined = KVCache.cat([a, b])
    assert joined.seq_len == 7
    assert joined.keys[2].is_contiguous()
    torch.testing.assert_close(joined.keys[2], torch.cat([a.keys[2], b.keys[2]], dim=2), atol=0, rtol=0)
    assert torch.equal(joined.key_mask, torch.cat([a.key_mask, torch.ones(2, 4, dtype=torch.bool)], dim=1))
    assert KVCache.cat([b, b]).key_mask is None
    assert KVCache.cat([a]).seq_len == 3
    as_int = KVCache(a.keys, a.values, a.key_mask.long())
    assert as_int.key_mask.dtype == torch.bool
    assert torch.equal(as_int.key_mask, a.key_mask)


def test_kvcache_refusals():
    c = _toy_cache()
    with pytest.raises(ValueError, match="at least one cache"):
        KVCache.cat([])
    with pytest.raises(ValueError, match="agree"):
        KVCache.cat([c, _toy_cache(b=3)])
    with pytest.raises(ValueError, match="layers"):
        KVCache.cat([c, _toy_cache(layers=2)])
    with pytest.raises(ValueError, match=r"key_mask must be \[B, S\]"):
        KVCache(c.keys, c.values, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="layer 1"):
        KVCache(c.keys, [c.values[0], c.values[1][:, :, :2], c.values[2]])
    with pytest.raises(ValueError, match="one key and one value"):
        KVCache(c.keys, c.values[:2])
    with pytest.raises(ValueError, match="slice or a 1-D integer"):
        c.select(torch.zeros(2, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------ return_cache
def test_return_cache_holds_post_rope_keys_and_changes_nothing(tiny):
    ids = _ids(2)
    with torch.no_grad():
        plain = tiny(ids, return_hidden=True)
        out = tiny(ids, return_hidden=True, return_cache=True)
        masked = tiny(ids, attention_mask=torch.ones_like(ids), return_cache=True)
    assert plain.cache is None
    assert torch.equal(out.logits, plain.logits)
    assert torch.equal(out.hidden, plain.hidden)
    c = out.cache
    assert isinstance(c, KVCache)
    assert c.key_mask is None
    assert c.n_layers == 2
    assert c.keys[0].shape == c.values[1].shape == (2, 4, L, 16)
    assert masked.cache.key_mask.dtype == torch.bool
    assert masked.cache.key_mask.all()
    # Layer 0 by hand: keys are RoPE(k_proj(attn_norm(embedding))), values v_proj(...), both [B, H_kv, L, hd].
    block = tiny.transformer_blocks()[0]
    with torch.no_grad():
        n = block.attn_norm(tiny.transformer.wte(ids))
        cos, sin = tiny.rotary(L, ids.device, None)
        k = apply_rotary(block.k_proj(n).view(2, L, 4, 16), cos, sin).transpose(1, 2)
        v = block.v_proj(n).view(2, L, 4, 16).transpose(1, 2)
    torch.testing.assert_close(c.keys[0], k, atol=1e-6, rtol=0)
    torch.testing.assert_close(c.values[0], v, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(
    ("s", "e", "dual"), [(8, 16, True), (0, 8, True), (16, 24, True), (8, 24, False), (0, 24, False)]
)
def test_window_against_cached_context_is_exact(tiny, s, e, dual):
    ids = _ids(2, seed=s + e)
    if not dual:
        assert e == L  # the prefix cache feeds the whole rest of the canvas
    with torch.no_grad():
        full, window, full_cache, own = _window_forward(tiny, ids, s, e, dual=dual)
    assert window.shape == (2, e - s, 336)
    assert (window - full[:, s:e]).abs().max().item() <= TOL
    # With cache= and return_cache=True the window's own keys come back (not the concatenation).
    assert own.seq_len == e - s
    assert own.key_mask is None
    for i in range(tiny.config.n_layers):
        torch.testing.assert_close(own.keys[i], full_cache.keys[i][:, :, s:e], atol=TOL, rtol=0)
        torch.testing.assert_close(own.values[i], full_cache.values[i][:, :, s:e], atol=TOL, rtol=0)


def test_window_logits_at_and_hidden(tiny):
    ids = _ids(2, seed=3)
    pos = _positions(2)
    with torch.no_grad():
        full = tiny(ids, position_ids=pos, return_cache=True, return_hidden=True)
        ctx = KVCache.cat([full.cache.select(slice(0, 4)), full.cache.select(slice(12, L))])
        idx = torch.tensor([[0, 7], [3, 3]])
        out = tiny(ids[:, 4:12], position_ids=pos[:, 4:12], cache=ctx, logits_at=idx, return_hidden=True)
    assert out.cache is None
    assert out.hidden.shape == (2, 8, 64)
    torch.testing.assert_close(out.hidden, full.hidden[:, 4:12], atol=TOL, rtol=0)
    torch.testing.assert_close(out.logits, full.logits[:, 4:12][torch.arange(2)[:, None], idx], atol=TOL, rtol=0)


@pytest.mark.parametrize("dual", [True, False])
def test_padded_rows_with_cache_are_exact(tiny, dual):
    """Different padding per row (left padding in the prefix, right padding in the suffix) is respected."""
    ids = _ids(4, seed=7)
    keep, positions = _padded(4)
    s, e = (10, 18) if dual else (10, L)
    with torch.no_grad():
        full, window, full_cache, own = _window_forward(tiny, ids, s, e, dual=dual, keep=keep, positions=positions)
        assert torch.equal(full_cache.key_mask, keep)
        assert torch.equal(own.key_mask, keep[:, s:e])
        # Ignoring the context's padding (what Fast-dLLM does) gives a different answer: the mask matters.
        ctx = full_cache.select(slice(0, s))
        if dual:
            ctx = KVCache.cat([ctx, full_cache.select(slice(e, L))])
        blind = tiny(
            ids[:, s:e],
            attention_mask=keep[:, s:e],
            position_ids=positions[:, s:e],
            cache=KVCache(ctx.keys, ctx.values, None),
        ).logits
    assert (window - full[:, s:e]).abs().max().item() <= TOL
    assert (blind - full[:, s:e]).abs().max().item() > 1e-3


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_gqa_cache_is_exact(n_kv_heads):
    model = _model(n_kv_heads)
    ids = _ids(2, seed=11)
    with torch.no_grad():
        full, window, full_cache, _ = _window_forward(model, ids, 6, 14, dual=True)
    assert full_cache.keys[0].shape == (2, n_kv_heads, L, 16)
    assert (window - full[:, 6:14]).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------- staleness
def test_stale_context_equals_manual_computation(tiny):
    """After the window's tokens change, the cached forward = window queries over OLD context keys + NEW window keys.

    The manual computation runs one ordinary (cache-free) forward over ``[old canvas, new window]`` with a 4-D mask:
    old-canvas queries see only the old canvas (so its per-layer keys are exactly the cached ones), new-window
    queries see the old context positions and the new window, not the old window.
    """
    mask_id = tiny.layout.mask_id
    s, e, b = 8, 16, 2
    old = _ids(b, seed=21)
    old[:, s:e] = mask_id
    new = old.clone()
    new[0, [s, s + 3]] = torch.tensor([5, 9])
    new[1, s + 5] = 17
    pos = _positions(b)
    with torch.no_grad():
        ctx_full = tiny(old, position_ids=pos, return_cache=True).cache
        ctx = KVCache.cat([ctx_full.select(slice(0, s)), ctx_full.select(slice(e, L))])
        cached = tiny(new[:, s:e], position_ids=pos[:, s:e], cache=ctx).logits

        w = e - s
        joint_ids = torch.cat([old, new[:, s:e]], dim=1)
        joint_pos = torch.cat([pos, pos[:, s:e]], dim=1)
        allow = torch.zeros(L + w, L + w, dtype=torch.bool)
        allow[:L, :L] = True
        allow[L:, :s] = True
        allow[L:, e:L] = True
        allow[L:, L:] = True
        manual = tiny(joint_ids, position_ids=joint_pos, attention_mask=allow.expand(b, 1, -1, -1)).logits[:, L:]
        fresh = tiny(new, position_ids=pos).logits[:, s:e]
    assert (cached - manual).abs().max().item() <= TOL
    assert (cached - fresh).abs().max().item() > 1e-4  # the context really is stale


# ------------------------------------------------------------------------------------------- refusals, grad
def test_cache_refusals(tiny):
    ids = _ids(2)
    with torch.no_grad():
        c = tiny(ids, return_cache=True).cache
    window = ids[:, :4]
    pos = _positions(2, 4)
    with pytest.raises(ValueError, match="needs position_ids"):
        tiny(window, cache=c)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        tiny(window, position_ids=pos, cache=object())
    with pytest.raises(ValueError, match="does not fit"):
        tiny(window, position_ids=pos, cache=KVCache(c.keys[:1], c.values[:1]))
    with pytest.raises(ValueError, match="does not fit"):
        tiny(window[:1], position_ids=pos[:1], cache=c)
    with pytest.raises(ValueError, match=r"must have shape \(2, 4\)"):
        tiny(window, position_ids=pos, cache=c, attention_mask=torch.ones(2, L + 4))
    with pytest.raises(ValueError, match=rf"4-D attention_mask must have shape \(2, 1, 4, 4\) or \(…, {L + 4}\)"):
        tiny(window, position_ids=pos, cache=c, attention_mask=torch.ones(2, 1, 4, L + 3, dtype=torch.bool))


def test_a_whole_window_mask_equals_the_one_built_from_key_mask_and_pattern(tiny):
    """A [B, 1, W, S + W] mask (context keys first) is used as-is: a sampler builds it once for many steps."""
    ids = _ids(2)
    with torch.no_grad():
        key_mask = torch.arange(L)[None, :] >= torch.tensor([[0], [3]])
        c = dataclasses.replace(tiny(ids, return_cache=True).cache, key_mask=key_mask)
        window, pos = ids[:, :4], _positions(2, 4)
        own = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
        built = tiny(window, position_ids=pos, cache=c, attention_mask=own.expand(2, 1, 4, 4)).logits
        whole = torch.cat([c.key_mask[:, None, None, :].expand(2, 1, 4, L), own.expand(2, 1, 4, 4)], dim=-1)
        given = tiny(window, position_ids=pos, cache=c, attention_mask=whole).logits
    torch.testing.assert_close(given, built, rtol=0, atol=0)


def test_explicit_pattern_with_cache_equals_key_padding_path(tiny):
    """A 4-D mask with return_cache / cache gives the same K/V and logits as the equivalent key padding."""
    ids = _ids(2, 12)
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, :3] = False
    pattern = pad[:, None, None, :].expand(2, 1, 12, 12)
    with torch.no_grad():
        a = tiny(ids, attention_mask=pad, return_cache=True)
        b = tiny(ids, attention_mask=pattern, return_cache=True)
    assert b.cache.key_mask is None  # a 4-D mask carries no per-key padding: the caller sets it
    torch.testing.assert_close(a.logits[pad], b.logits[pad])
    torch.testing.assert_close(a.cache.keys[0], b.cache.keys[0])
    ctx = dataclasses.replace(b.cache.select(slice(0, 8)), key_mask=pad[:, :8])
    pos = torch.arange(8, 12).expand(2, 4)
    with torch.no_grad():
        w = tiny(ids[:, 8:], position_ids=pos, cache=ctx, attention_mask=torch.ones(2, 1, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(w.logits, a.logits[:, 8:], atol=1e-5, rtol=0)


def test_return_cache_while_training_with_checkpointing():
    model = _model()
    model.train()
    model.set_gradient_checkpointing(True)
    ids = _ids(2, 12)
    out = model(ids, return_cache=True)
    assert out.cache.n_layers == 2  # recomputation did not append twice
    out.logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    pos = _positions(2, 12)
    ctx = model(ids, position_ids=pos, return_cache=True).cache.select(slice(0, 6))
    model(ids[:, 6:], position_ids=pos[:, 6:], cache=ctx).logits.sum().backward()  # grad through the cache path
    assert model.transformer.wte.weight.grad is not None
