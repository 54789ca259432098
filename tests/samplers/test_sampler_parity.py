"""LLaDASampler vs a literal re-statement of LLaDA's reference ``generate``: token-identical at temperature 0."""

from __future__ import annotations

import pytest
import torch
from llada_reference import reference_generate
from sampler_helpers import LogitBias, left_pad, prompts

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.samplers import LLaDASampler
from dllm_zoo.tokenizers.layout import EOT


def _ids(model: LLaDABackbone) -> dict[str, int]:
    lay = model.layout
    return {"mask_id": lay.mask_id, "eos_id": lay.eos_id, "eot_id": lay.special_tokens[EOT]}


def _check_nontrivial(tokens: torch.Tensor, p: int) -> None:
    gen = tokens[:, p:]
    assert gen.unique().numel() >= 4, "the tiny model must not produce one repeated token (vacuous parity)"


SETTINGS = [(16, 16, 16), (16, 4, 8), (24, 8, 12), (12, 4, 12)]


@pytest.mark.parametrize(("gen_length", "block_length", "steps"), SETTINGS)
@pytest.mark.parametrize("batch", [1, 8])
def test_matches_reference_greedy(model: LLaDABackbone, gen_length: int, block_length: int, steps: int, batch: int):
    x = prompts(batch, 5, seed=batch + gen_length)
    ref = reference_generate(model, x, steps=steps, gen_length=gen_length, block_length=block_length, **_ids(model))
    out = LLaDASampler(gen_length=gen_length, block_length=block_length, steps=steps).generate(model, x)
    assert torch.equal(out.tokens, ref)
    assert out.nfe == steps
    _check_nontrivial(out.tokens, 5)


@pytest.mark.parametrize(
    "options",
    [
        {"cfg_scale": 1.5},
        {"logits_eos_inf": True},
        {"confidence_eos_eot_inf": True},
        {"cfg_scale": 0.5, "logits_eos_inf": True, "confidence_eos_eot_inf": True},
    ],
)
def test_matches_reference_options(model: LLaDABackbone, options: dict):
    x = prompts(4, 6, seed=7)
    ref = reference_generate(model, x, steps=8, gen_length=16, block_length=8, **_ids(model), **options)
    out = LLaDASampler(gen_length=16, block_length=8, steps=8, **options).generate(model, x)
    assert torch.equal(out.tokens, ref)
    _check_nontrivial(out.tokens, 6)


def test_options_change_the_output(model: LLaDABackbone):
    """Guard against the option tests above being vacuous."""
    x = prompts(4, 6, seed=7)
    plain = LLaDASampler(gen_length=16, block_length=8, steps=8).generate(model, x).tokens
    cfg = LLaDASampler(gen_length=16, block_length=8, steps=8, cfg_scale=1.5).generate(model, x).tokens
    assert not torch.equal(plain, cfg)


def test_eos_eot_suppression_with_frequent_eos(model: LLaDABackbone):
    """Bias the logits towards EOS/EoT so the suppression options actually matter, then compare with the reference."""
    lay = model.layout
    eot = lay.special_tokens[EOT]
    biased = LogitBias(model, {lay.eos_id: 2.5, eot: 2.5})
    x = prompts(4, 6, seed=3)
    base = LLaDASampler(gen_length=16, block_length=8, steps=16).generate(biased, x).tokens
    gen = base[:, 6:]
    assert bool((gen == lay.eos_id).any())
    assert bool((gen == eot).any())
    for options in ({"logits_eos_inf": True}, {"confidence_eos_eot_inf": True}):
        ref = reference_generate(
            biased, x, steps=16, gen_length=16, block_length=8, **_ids(model), **options, stable_ties=True
        )
        out = LLaDASampler(gen_length=16, block_length=8, steps=16, **options).generate(biased, x)
        assert torch.equal(out.tokens, ref), options
        assert not torch.equal(out.tokens, base), options
        if "logits_eos_inf" in options:
            assert not bool((out.tokens[:, 6:] == lay.eos_id).any())


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_left_padded_batch_rows_equal_batch_one_runs(model: LLaDABackbone, cfg_scale: float):
    rows = [prompts(1, n, seed=n)[0] for n in (3, 7, 5, 9)]
    ids, mask = left_pad(rows, model.layout.pad_id)
    sampler = LLaDASampler(gen_length=16, block_length=8, steps=16, cfg_scale=cfg_scale)
    out = sampler.generate(model, ids, mask)
    ref = reference_generate(
        model, ids, mask, steps=16, gen_length=16, block_length=8, cfg_scale=cfg_scale, **_ids(model)
    )
    assert torch.equal(out.tokens, ref)
    assert torch.equal(out.attention_mask[:, ids.shape[1] :], torch.ones(4, 16, dtype=torch.bool))
    assert torch.equal(out.attention_mask[:, : ids.shape[1]], mask.bool())
    for i, r in enumerate(rows):
        single = sampler.generate(model, r[None])
        assert torch.equal(out.tokens[i, ids.shape[1] :], single.tokens[0, len(r) :]), i
        assert torch.equal(out.step_map[i, ids.shape[1] :], single.step_map[0, len(r) :]), i
    _check_nontrivial(out.tokens, ids.shape[1])
