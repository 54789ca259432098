"""LLaDASampler behaviour: nfe, step maps, snapshots, randomness, parallel decoding, early stop, argument checks."""

from __future__ import annotations

import pytest
import torch
from sampler_helpers import LogitBias, prompts

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.samplers import (
    Dynamic,
    Factor,
    LLaDASampler,
    Margin,
    NegEntropy,
    RandomConfidence,
    SamplerOutput,
    Threshold,
)
from dllm_zoo.schedules import CosineSchedule, LinearSchedule

P = 5


def _check_step_map(out: SamplerOutput, p: int, mask_id: int) -> None:
    assert out.step_map.dtype == torch.int64
    assert bool((out.step_map[:, :p] == 0).all())
    assert bool((out.step_map[:, p:] >= 1).all())  # every generated position revealed (exactly once: one entry)
    assert bool((out.step_map[:, p:] <= out.nfe).all())
    assert not bool((out.tokens == mask_id).any())


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()])
def test_static_step_map_follows_plan(model: LLaDABackbone, schedule):
    gen, blk, steps = 24, 8, 12
    sampler = LLaDASampler(gen_length=gen, block_length=blk, steps=steps, schedule=schedule)
    out = sampler.generate(model, prompts(3, P))
    assert out.nfe == steps
    _check_step_map(out, P, model.layout.mask_id)
    spb = steps // (gen // blk)
    plan = schedule.reveal_counts(torch.tensor([blk]), spb)[0]
    for b in range(gen // blk):
        block = out.step_map[:, P + b * blk : P + (b + 1) * blk]
        assert bool(((block > b * spb) & (block <= (b + 1) * spb)).all())
        for i in range(spb):
            counts = (block == b * spb + i + 1).sum(dim=1)
            assert counts.tolist() == [int(plan[i])] * 3


def test_snapshots_agree_with_step_map(model: LLaDABackbone):
    out = LLaDASampler(gen_length=16, block_length=8, steps=8).generate(model, prompts(2, P), record={1, 4, 5, 8, 99})
    assert out.snapshots is not None
    assert sorted(out.snapshots) == [1, 4, 5, 8]
    mask_id = model.layout.mask_id
    for step, canvas in out.snapshots.items():
        revealed = canvas != mask_id
        assert torch.equal(revealed[:, P:], out.step_map[:, P:] <= step)
        assert torch.equal(canvas[revealed], out.tokens[revealed])
    assert LLaDASampler(gen_length=8, block_length=8, steps=8).generate(model, prompts(1, P)).snapshots is None


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.7}, {"confidence": RandomConfidence()}, {"temperature": 1.0, "cfg_scale": 1.0}]
)
def test_randomness_is_seeded(model: LLaDABackbone, kwargs: dict):
    sampler = LLaDASampler(gen_length=16, block_length=8, steps=8, **kwargs)
    x = prompts(3, P)
    a = sampler.generate(model, x, generator=torch.Generator().manual_seed(0))
    b = sampler.generate(model, x, generator=torch.Generator().manual_seed(0))
    c = sampler.generate(model, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.step_map, b.step_map)
    assert not (torch.equal(a.tokens, c.tokens) and torch.equal(a.step_map, c.step_map))


def test_threshold_one_is_one_token_per_step(model: LLaDABackbone):
    x = prompts(1, P)
    one = LLaDASampler(gen_length=16, block_length=8, steps=16).generate(model, x)
    thr = LLaDASampler(gen_length=16, block_length=8, steps=16, transfer=Threshold(1.0)).generate(model, x)
    assert torch.equal(thr.tokens, one.tokens)
    assert torch.equal(thr.step_map, one.step_map)
    assert thr.nfe == 16


def test_threshold_zero_fills_each_block_in_one_step(model: LLaDABackbone):
    out = LLaDASampler(gen_length=24, block_length=8, steps=24, transfer=Threshold(0.0)).generate(model, prompts(4, P))
    assert out.nfe == 3
    _check_step_map(out, P, model.layout.mask_id)
    for b in range(3):
        assert bool((out.step_map[:, P + 8 * b : P + 8 * (b + 1)] == b + 1).all())


@pytest.mark.parametrize("transfer", [Threshold(0.08), Factor(4.0), Dynamic(0.08)])
def test_adaptive_rules_reveal_at_least_one_per_step(model: LLaDABackbone, transfer):
    out = LLaDASampler(gen_length=16, block_length=8, steps=16, transfer=transfer).generate(model, prompts(1, P))
    _check_step_map(out, P, model.layout.mask_id)
    assert set(out.step_map[0, P:].tolist()) == set(range(1, out.nfe + 1))
    assert out.nfe < 16  # this model is confident enough to reveal several tokens in some step


def test_adaptive_rules_batched_rows_equal_single_runs(model: LLaDABackbone):
    """Rows finish blocks at different steps; each row still gets exactly its batch-1 tokens."""
    sampler = LLaDASampler(gen_length=16, block_length=8, steps=16, transfer=Threshold(0.08))
    x = prompts(4, P, seed=5)
    out = sampler.generate(model, x)
    _check_step_map(out, P, model.layout.mask_id)
    for i in range(4):
        assert torch.equal(out.tokens[i], sampler.generate(model, x[i : i + 1]).tokens[0])


def test_dynamic_never_needs_more_than_the_plan(model: LLaDABackbone):
    sampler = LLaDASampler(gen_length=16, block_length=8, steps=8, transfer=Dynamic(0.99))
    out = sampler.generate(model, prompts(2, P))
    assert out.nfe <= 8
    _check_step_map(out, P, model.layout.mask_id)


@pytest.mark.parametrize("confidence", [Margin(), NegEntropy()])
def test_other_confidences_run(model: LLaDABackbone, confidence):
    out = LLaDASampler(gen_length=16, block_length=8, steps=8, confidence=confidence).generate(model, prompts(2, P))
    assert out.nfe == 8
    _check_step_map(out, P, model.layout.mask_id)


def test_early_stop(model: LLaDABackbone):
    eos = model.layout.eos_id
    biased = LogitBias(model, {eos: 5.0})
    x = prompts(3, P, seed=2)
    full = LLaDASampler(gen_length=32, block_length=8, steps=32).generate(biased, x)
    stop = LLaDASampler(gen_length=32, block_length=8, steps=32, early_stop=True).generate(biased, x)
    gen = full.tokens[:, P:]
    # first block after which every row has an EOS
    done = [(gen[:, : 8 * (b + 1)] == eos).any(dim=1).all().item() for b in range(4)]
    first = done.index(True)
    assert first < 3, "the EOS bias must make the batch finish early for this test to mean anything"
    end = P + 8 * (first + 1)
    assert stop.nfe == 8 * (first + 1) < full.nfe
    assert torch.equal(stop.tokens[:, :end], full.tokens[:, :end])
    assert bool((stop.tokens[:, end:] == eos).all())
    assert bool((stop.step_map[:, end:] == stop.nfe).all())
    assert torch.equal(stop.step_map[:, :end], full.step_map[:, :end])
    # no early stop when one row has no EOS: the plain model rarely emits EOS
    assert LLaDASampler(gen_length=16, block_length=8, steps=16, early_stop=True).generate(model, x).nfe == 16


def test_argument_checks():
    with pytest.raises(ValueError, match="gen_length=30 must be a multiple of block_length=8"):
        LLaDASampler(gen_length=30, block_length=8, steps=30)
    with pytest.raises(ValueError, match="steps=10 must be a multiple"):
        LLaDASampler(gen_length=32, block_length=8, steps=10)
    with pytest.raises(ValueError, match="further_horizon"):
        LLaDASampler(gen_length=32, block_length=8, steps=32, cache="dual", further_horizon=8)
    with pytest.raises(ValueError, match="cache"):
        LLaDASampler(cache="full")  # type: ignore[arg-type]


def test_prompt_mask_shape_is_checked(model: LLaDABackbone):
    with pytest.raises(ValueError, match="prompt_mask"):
        LLaDASampler(gen_length=8, block_length=8, steps=8).generate(model, prompts(2, P), torch.ones(2, P + 1))
