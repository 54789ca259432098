"""Prefix / dual KV caches of LLaDASampler: exact where the approximation is exact, batched and padding-correct.

A bidirectional model has no exact cache: context keys go stale when the block changes. Two cases are exact and
pin the plumbing (positions, key-padding masks, CFG rows, window bounds): (1) one step per block — every forward
is a full one; (2) a ONE-layer model — its keys/values depend only on each position's own token, and the cached
positions (prefix; all-mask suffix) do not change within a block.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sampler_helpers import Spy, left_pad, make_model, prompts

from dllm_zoo.backbones import LLaDABackbone, LLaDAConfig
from dllm_zoo.samplers import LLaDASampler, Threshold

P = 6
MODES = [{"cache": "prefix"}, {"cache": "prefix", "further_horizon": 4}, {"cache": "dual"}]


@pytest.fixture(scope="module")
def one_layer() -> LLaDABackbone:
    torch.manual_seed(3)
    cfg = dataclasses.replace(LLaDAConfig.preset("tiny"), n_layers=1, init_std=0.2)
    return LLaDABackbone(cfg).eval()


def _padded_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    rows = [prompts(1, n, seed=10 + n)[0] for n in (4, 9, 6, 2)]
    ids, mask = left_pad(rows, pad_id)
    return ids, mask, rows


@pytest.mark.parametrize("mode", MODES)
def test_one_step_per_block_is_exact(model: LLaDABackbone, mode: dict):
    ids, mask, _ = _padded_batch(model.layout.pad_id)
    plain = LLaDASampler(gen_length=24, block_length=8, steps=3).generate(model, ids, mask)
    cached = LLaDASampler(gen_length=24, block_length=8, steps=3, **mode).generate(model, ids, mask)
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.nfe == plain.nfe == 3


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("mode", [{"cache": "prefix"}, {"cache": "prefix", "further_horizon": 16}, {"cache": "dual"}])
def test_one_layer_model_cache_is_exact(one_layer: LLaDABackbone, mode: dict, cfg_scale: float):
    ids, mask, _ = _padded_batch(one_layer.layout.pad_id)
    kw = {"gen_length": 24, "block_length": 8, "steps": 24, "cfg_scale": cfg_scale}
    plain = LLaDASampler(**kw).generate(one_layer, ids, mask)
    cached = LLaDASampler(**kw, **mode).generate(one_layer, ids, mask)
    assert torch.equal(cached.tokens, plain.tokens)
    assert torch.equal(cached.step_map, plain.step_map)
    assert plain.tokens[:, ids.shape[1] :].unique().numel() >= 8


def test_one_layer_short_horizon_is_not_exact(one_layer: LLaDABackbone):
    """Guard: dropping the far suffix from the window changes the output, so the test above is not vacuous."""
    ids, mask, _ = _padded_batch(one_layer.layout.pad_id)
    kw = {"gen_length": 24, "block_length": 8, "steps": 24}
    plain = LLaDASampler(**kw).generate(one_layer, ids, mask)
    short = LLaDASampler(**kw, cache="prefix", further_horizon=0).generate(one_layer, ids, mask)
    assert not torch.equal(short.tokens, plain.tokens)


@pytest.mark.parametrize("mode", MODES)
def test_forward_pattern_and_first_step_logits_are_exact(model: LLaDABackbone, mode: dict):
    ids, mask, _ = _padded_batch(model.layout.pad_id)
    p, gen, blk, spb = ids.shape[1], 24, 8, 4
    total = p + gen
    spy = Spy(model)
    LLaDASampler(gen_length=gen, block_length=blk, steps=12, **mode).generate(spy, ids, mask)  # type: ignore[arg-type]
    assert len(spy.calls) == 12
    for b in range(3):
        s, e = p + b * blk, p + (b + 1) * blk
        first, rest = spy.calls[b * spb], spy.calls[b * spb + 1 : (b + 1) * spb]
        assert first.get("cache") is None
        assert first["input_ids"].shape == (4, total)
        with torch.no_grad():
            at = torch.arange(s, e).expand(4, -1)
            exact = model(first["input_ids"], attention_mask=first["attention_mask"], logits_at=at).logits
        assert torch.equal(first["logits"], exact)  # bitwise: the block's first step is the no-cache forward
        if mode["cache"] == "dual":
            width, ctx = blk, s + (total - e)
        else:
            end = total if "further_horizon" not in mode else min(e + mode["further_horizon"], total)
            width, ctx = end - s, s
        for call in rest:
            assert call["input_ids"].shape == (4, width)
            assert call["cache"].seq_len == ctx
            assert torch.equal(call["position_ids"][0], torch.arange(s, s + width))
            assert torch.equal(call["cache"].key_mask[:, :p], mask.bool())  # prompt padding stays masked


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_batched_rows_equal_batch_one_cached_runs(model: LLaDABackbone, mode: dict, cfg_scale: float):
    """The Fast-dLLM batch>1 bug: rows with different prompt lengths must get their batch-1 result."""
    ids, mask, rows = _padded_batch(model.layout.pad_id)
    sampler = LLaDASampler(gen_length=16, block_length=8, steps=16, cfg_scale=cfg_scale, **mode)
    out = sampler.generate(model, ids, mask)
    for i, r in enumerate(rows):
        single = sampler.generate(model, r[None])
        assert torch.equal(out.tokens[i, ids.shape[1] :], single.tokens[0, len(r) :]), i
        assert torch.equal(out.step_map[i, ids.shape[1] :], single.step_map[0, len(r) :]), i


def test_cached_threshold_batched_rows_equal_single_runs(model: LLaDABackbone):
    ids, mask, rows = _padded_batch(model.layout.pad_id)
    sampler = LLaDASampler(gen_length=16, block_length=8, steps=16, cache="dual", transfer=Threshold(0.08))
    out = sampler.generate(model, ids, mask)
    assert out.nfe < 16
    for i, r in enumerate(rows):
        assert torch.equal(out.tokens[i, ids.shape[1] :], sampler.generate(model, r[None]).tokens[0, len(r) :]), i


@pytest.mark.parametrize(("mode", "floor"), [({"cache": "prefix"}, 0.8), ({"cache": "dual"}, 0.7)])
def test_cached_output_close_to_exact_on_default_init(mode: dict, floor: float):
    """Measured agreement on the default-init tiny model (prefix 0.91, dual 0.82 of tokens; pinned with slack).

    On the scaled-up random model the stale context changes most tokens (~25-30% agree): random deep features
    are chaotic, which is why the exact cases above carry the correctness checks.
    """
    m = make_model(init_std=0.02)
    x = prompts(8, P)
    plain = LLaDASampler(gen_length=32, block_length=8, steps=32).generate(m, x)
    cached = LLaDASampler(gen_length=32, block_length=8, steps=32, **mode).generate(m, x)
    agree = (cached.tokens[:, P:] == plain.tokens[:, P:]).float().mean().item()
    assert agree >= floor
