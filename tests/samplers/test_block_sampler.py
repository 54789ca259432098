"""BlockSampler: parity with the SDAR reference loop, exact cache, batching with stops, policies, step maps."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sampler_helpers import LogitBias, left_pad, prompts
from sdar_reference import block_diffusion_generate, qwen3_twin

from dllm_zoo.backbones import SDARBackbone, SDARConfig
from dllm_zoo.samplers import BlockSampler, Dynamic, EntropyBounded, NegEntropy

MASK = 258


@pytest.fixture(scope="module")
def sdar() -> SDARBackbone:
    torch.manual_seed(0)
    return SDARBackbone(dataclasses.replace(SDARConfig.preset("tiny"), initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def qwen(sdar, tmp_path_factory):
    return qwen3_twin(sdar, tmp_path_factory.mktemp("qwen3_twin"))


def _generated(out, p: int) -> list[list[int]]:
    """Each row's generated tokens (as the reference lays them out after the prompt)."""
    toks, mask = out.tokens[:, p:], out.attention_mask[:, p:]
    return [[t for t, m in zip(r, k) if m] for r, k in zip(toks.tolist(), mask.tolist())]


@pytest.mark.parametrize(
    ("gen", "blk", "steps", "plen"),
    [(8, 4, 4, 6), (8, 4, 2, 8), (10, 8, 4, 5)],
)
@pytest.mark.parametrize("strategy", ["low_confidence_static", "low_confidence_dynamic"])
def test_greedy_matches_reference_loop_batched_and_batch_1(sdar, qwen, gen, blk, steps, plen, strategy):
    ids = prompts(8, plen, seed=plen)
    sampler = BlockSampler.for_strategy(
        strategy, threshold=0.5, gen_length=gen, block_length=blk, denoising_steps=steps, stop_token_ids=[]
    )
    ref, ref_nfe = block_diffusion_generate(
        qwen,
        ids,
        mask_id=MASK,
        gen_length=gen,
        block_length=blk,
        denoising_steps=steps,
        remasking_strategy=strategy,
        confidence_threshold=0.5,
    )
    ours = sampler.generate(sdar, ids)
    assert _generated(ours, plen) == ref[:, plen:].tolist()
    one = sampler.generate(sdar, ids[:1])
    assert _generated(one, plen) == ref[:1, plen:].tolist()
    # the reference spends a forward on the prefill (if any) and one per block storing it; ours fuse them
    blocks = (plen + gen + blk - 1) // blk - plen // blk
    assert ref_nfe - ours.nfe == blocks + (plen >= blk)


def test_left_padded_batch_rows_equal_their_batch_1_runs(sdar, qwen):
    rows = [prompts(1, n, seed=n)[0] for n in (3, 9, 4, 1)]
    ids, mask = left_pad(rows, pad_id=sdar.layout.pad_id)
    sampler = BlockSampler(gen_length=10, block_length=4, denoising_steps=2, stop_token_ids=[])
    out = sampler.generate(sdar, ids, mask)
    gen = _generated(out, ids.shape[1])
    for i, r in enumerate(rows):
        ref, _ = block_diffusion_generate(qwen, r[None], mask_id=MASK, gen_length=10, block_length=4, denoising_steps=2)
        assert gen[i] == ref[0, len(r) :].tolist(), f"row {i} (prompt length {len(r)})"
        single = sampler.generate(sdar, r[None])
        assert torch.equal(single.step_map[0, len(r) :], out.step_map[i, ids.shape[1] :][: len(gen[i])])
    assert torch.equal(out.tokens[:, : ids.shape[1]], ids)
    assert not out.step_map[:, : ids.shape[1]].any()


@pytest.mark.parametrize(
    "make",
    [
        lambda: BlockSampler(gen_length=12, block_length=4, denoising_steps=4),
        lambda: BlockSampler(gen_length=12, block_length=8, denoising_steps=3),  # grid != the model's block_size
        lambda: BlockSampler(gen_length=12, block_length=4, transfer=Dynamic(0.3)),
        lambda: BlockSampler(gen_length=12, block_length=4, confidence=NegEntropy(), transfer=EntropyBounded(0.5)),
        lambda: BlockSampler(gen_length=12, block_length=4, temperature=1.0, top_k=20, top_p=0.9),
    ],
)
def test_cache_and_no_cache_give_identical_tokens(sdar, make):
    rows = [prompts(1, n, seed=10 + n)[0] for n in (5, 11, 2)]
    ids, mask = left_pad(rows, pad_id=sdar.layout.pad_id)
    cached, uncached = make(), make()
    uncached.use_cache = False
    a = cached.generate(sdar, ids, mask, generator=torch.Generator().manual_seed(3))
    b = uncached.generate(sdar, ids, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.step_map, b.step_map)
    assert torch.equal(a.attention_mask, b.attention_mask)


def test_stop_tokens_finish_rows_at_different_blocks_without_overwriting(sdar):
    eos = sdar.layout.eos_id
    biased = LogitBias(sdar, {eos: 3.0})
    rows = [prompts(1, n, seed=20 + n)[0] for n in (4, 7, 2, 9, 6, 3)]
    ids, mask = left_pad(rows, pad_id=sdar.layout.pad_id)
    sampler = BlockSampler(gen_length=24, block_length=4, denoising_steps=2)
    out = sampler.generate(biased, ids, mask)
    p = ids.shape[1]
    lengths = out.attention_mask[:, p:].sum(dim=1).tolist()
    assert len(set(lengths)) > 1, "rows should stop at different blocks in this setup"
    for i, r in enumerate(rows):
        single = sampler.generate(biased, r[None])
        n = int(single.attention_mask[0, len(r) :].sum())
        assert lengths[i] == n
        assert torch.equal(out.tokens[i, p : p + n], single.tokens[0, len(r) : len(r) + n])
        assert torch.equal(out.step_map[i, p : p + n], single.step_map[0, len(r) : len(r) + n])
        # a row stops at the end of the block holding its first EOS; later positions are padding
        gen = single.tokens[0, len(r) : len(r) + n]
        if n < int(sampler.gen_length):
            assert bool((gen == eos).any())
        assert (out.tokens[i, p + n :] == sdar.layout.pad_id).all()
        assert not out.step_map[i, p + n :].any()


def test_step_map_and_nfe_bookkeeping(sdar):
    sampler = BlockSampler(gen_length=8, block_length=4, denoising_steps=2, stop_token_ids=[])
    ids = prompts(2, 4)
    out = sampler.generate(sdar, ids)
    # prompt = 1 full block, cached by the first step's forward; 2 blocks x 2 steps; no store forwards
    assert out.nfe == 4
    # quota B // steps = 2 per step; the step counter runs on across blocks
    assert out.step_map[:, 4:8].sort(dim=1).values.tolist() == [[1, 1, 2, 2]] * 2
    assert out.step_map[:, 8:].sort(dim=1).values.tolist() == [[3, 3, 4, 4]] * 2
    assert out.tokens.shape == (2, 12)
    assert (out.tokens[:, 4:] != MASK).all()


def test_record_snapshots_and_errors(sdar):
    sampler = BlockSampler(gen_length=4, block_length=4, denoising_steps=4, stop_token_ids=[])
    out = sampler.generate(sdar, prompts(1, 4), record={1, 4, 99})
    assert sorted(out.snapshots) == [1, 4]
    assert int((out.snapshots[1][0, 4:] == MASK).sum()) == 3
    assert torch.equal(out.snapshots[4], out.tokens)
    with pytest.raises(ValueError, match="positive"):
        BlockSampler(block_length=0)
    with pytest.raises(ValueError, match="unknown strategy"):
        BlockSampler.for_strategy("sequential")  # type: ignore[arg-type]
