"""TraceRL trace rows: shrinkage, block / full-attention rounds, post_num, block-size adaptation, reference parity."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from dllm_zoo.rl import Rollout, rollout_positions, rollout_trace_rows, shrink_steps, trace_rows
from dllm_zoo.rl.rollout import response_mask

MASK = 99
PAD = 0


# ------------------------------------------------------------------------------------------ reference (brute force)
def ref_collapse(values: list[int], s: int) -> list[int]:
    """``collapse_k_unique`` as research §2.3 describes it: runs of s distinct sorted values -> the run's largest."""
    distinct = sorted(set(values))
    to = {}
    for i in range(0, len(distinct), s):
        run = distinct[i : i + s]
        for v in run:
            to[v] = run[-1]
    return [to[v] for v in values]


def ref_block_rows(
    steps: list[int], bs: int, s: int, is_pad: list[bool] | None = None, post_num: int | None = None
) -> list[tuple[set[int], set[int]]]:
    """dLLM-RL ``one_round_vectorized`` (§2.3) on one response: blocks from the response start, -1 = done.

    Returns ``(trained targets, noisy positions)`` per kept row, response coordinates. ``post_num`` is counted per
    row (the reference's rule); ``None`` = no padding filter.
    """
    n = len(steps)
    state: list[int] = []
    for b0 in range(0, n, bs):
        state += ref_collapse(steps[b0 : b0 + bs], s)
    rows = []
    while any(x != -1 for x in state):
        targets: set[int] = set()
        noise: set[int] = set()
        for b0 in range(0, n, bs):
            rem = [x for x in state[b0 : b0 + bs] if x != -1]
            if not rem:
                continue
            m = min(rem)
            for j in range(b0, min(b0 + bs, n)):
                if state[j] != -1 and state[j] >= m:
                    noise.add(j)
                if state[j] == m:
                    targets.add(j)
        for j in targets:
            state[j] = -1
        trained = set(targets)
        if is_pad is not None and post_num is not None:
            pads = sorted(j for j in targets if is_pad[j])
            trained -= set(pads[post_num:])
        if trained:
            rows.append((trained, noise))
    return rows


def ref_full_rows(steps: list[int], s: int, trainable: list[bool] | None = None) -> list[tuple[set[int], set[int]]]:
    """dLLM-RL ``rl_llada.py`` (§2.3): one row per distinct shrunk step of the whole response."""
    shr = ref_collapse(steps, s)
    rows = []
    for v in sorted(set(shr)):
        noise = {j for j, x in enumerate(shr) if x >= v}
        targets = {j for j, x in enumerate(shr) if x == v and (trainable is None or trainable[j])}
        if targets:
            rows.append((targets, noise))
    return rows


def ours_as_sets(rows, i: int, start: int) -> list[tuple[set[int], set[int]]]:  # type: ignore[no-untyped-def]
    out = []
    for m in (rows.source == i).nonzero().flatten().tolist():
        t = {j - start for j in rows.target_mask[m].nonzero().flatten().tolist()}
        z = {j - start for j in rows.noisy_mask[m].nonzero().flatten().tolist()}
        out.append((t, z))
    return out


# ------------------------------------------------------------------------------------------ rollout simulators
def block_decode(p: int, g: int, bs: int, steps_per_block: int, rng: random.Random, dynamic: bool = False) -> list[int]:
    """Step map of ``g`` generated positions decoded on the absolute grid (prompt of ``p``), as the block sampler does.

    Static: step i of a block reveals ``bs // steps + (i < bs % steps)`` random masked positions; dynamic: a random
    number >= 1. The global step counter runs across blocks.
    """
    out = [0] * g
    step = 0
    first = p // bs * bs
    for b0 in range(first, p + g, bs):
        cols = [c - p for c in range(max(b0, p), min(b0 + bs, p + g))]
        rng.shuffle(cols)
        i = 0
        while cols:
            k = rng.randint(1, len(cols)) if dynamic else bs // steps_per_block + (i < bs % steps_per_block)
            step += 1
            for c in cols[:k]:
                out[c] = step
            cols = cols[k:]
            i += 1
    return out


def left_pad_batch(
    prompt_lens: list[int], resp_steps: list[list[int]], width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Tokens, step map, prompt mask, attention mask of rollouts ``[left-padded prompt | response]``."""
    pw = max(prompt_lens)
    g = width if width is not None else max(len(r) for r in resp_steps)
    n = len(prompt_lens)
    tokens = torch.full((n, pw + g), PAD, dtype=torch.long)
    steps = torch.zeros(n, pw + g, dtype=torch.long)
    attn = torch.zeros(n, pw + g, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_steps)):
        tokens[i, pw - p : pw] = torch.arange(10, 10 + p)
        attn[i, pw - p : pw + len(r)] = True
        tokens[i, pw : pw + len(r)] = torch.arange(50, 50 + len(r))
        steps[i, pw : pw + len(r)] = torch.tensor(r, dtype=torch.long)
    prompt_mask = torch.zeros(n, pw + g, dtype=torch.bool)
    prompt_mask[:, :pw] = True
    return tokens, steps, prompt_mask, attn, pw


def distinct_per_block(steps: list[int], p: int, bs: int | None) -> int:
    blocks: dict[int, set[int]] = {}
    for j, s in enumerate(steps):
        if s > 0:
            blocks.setdefault(0 if bs is None else (p + j) // bs, set()).add(s)
    return max((len(v) for v in blocks.values()), default=0)


# ------------------------------------------------------------------------------------------ shrinkage
def test_shrink_merges_runs_of_distinct_values_to_the_largest() -> None:
    steps = torch.tensor([[0, 9, 1, 4, 3, 7, 4]])
    train = steps > 0
    # distinct {1, 3, 4, 7, 9}: runs of 2 *distinct values* (not integer windows [1, 2], [3, 4], ...)
    assert shrink_steps(steps, train, 2).tolist() == [[0, 9, 3, 7, 3, 7, 7]]
    assert shrink_steps(steps, train, 3).tolist() == [[0, 9, 4, 4, 4, 9, 4]]
    assert shrink_steps(steps, train, 1).tolist() == steps.tolist()
    assert shrink_steps(steps, train, 10).tolist() == [[0, 9, 9, 9, 9, 9, 9]]
    # non-trainable positions neither count nor get a step
    part = train.clone()
    part[0, 2] = False
    assert shrink_steps(steps, part, 2).tolist() == [[0, 9, 0, 4, 4, 9, 4]]


def test_shrink_is_per_block() -> None:
    steps = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    blocks = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    assert shrink_steps(steps, steps > 0, 2, blocks).tolist() == [[2, 2, 4, 4, 6, 6, 8, 8]]
    assert shrink_steps(steps, steps > 0, 3, blocks).tolist() == [[3, 3, 3, 4, 7, 7, 7, 8]]
    # over the whole row the runs cross the block boundary
    assert shrink_steps(steps, steps > 0, 3).tolist() == [[3, 3, 3, 6, 6, 6, 8, 8]]


@pytest.mark.parametrize("seed", range(6))
def test_shrink_matches_reference_collapse(seed: int) -> None:
    rng = random.Random(seed)
    rows = [[rng.randint(1, 12) for _ in range(11)] for _ in range(4)]
    bs = 3
    for s in (1, 2, 3, 4):
        got = shrink_steps(
            torch.tensor(rows), torch.ones(4, 11, dtype=torch.bool), s, (torch.arange(11) // bs).expand(4, 11)
        )
        for r, row in enumerate(rows):
            want = [v for b0 in range(0, 11, bs) for v in ref_collapse(row[b0 : b0 + bs], s)]
            assert got[r].tolist() == want


# ------------------------------------------------------------------------------------------ pinned rows
def test_block_rows_pinned_example_on_the_absolute_grid() -> None:
    # prompt of 3 real tokens (1 left pad), B = 2: the first generated token shares block 1 with the prompt's
    # last token (positions 2, 3), then blocks {4, 5} and {6}.
    tokens = torch.tensor([[0, 10, 11, 12, 50, 51, 52, 53]])
    steps = torch.tensor([[0, 0, 0, 0, 1, 3, 2, 4]])
    prompt_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]]).bool()
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]).bool()
    pos = rollout_positions(prompt_mask, attn)
    assert pos.tolist() == [[0, 0, 1, 2, 3, 4, 5, 6]]
    rows = trace_rows(tokens, steps, steps > 0, MASK, block_size=2, positions=pos)
    # block {pos 3} = step 1; block {4, 5} = steps 3, 2; block {6} = step 4 -> 2 rounds
    assert rows.rows_per_rollout.tolist() == [2]
    assert rows.input_ids.tolist() == [
        [0, 10, 11, 12, MASK, MASK, MASK, MASK],  # round 0: every block before its first step
        [0, 10, 11, 12, 50, MASK, 52, 53],  # round 1: block {4, 5} before step 3; the others done (clean)
    ]
    assert rows.target_mask.long().tolist() == [[0, 0, 0, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1, 0, 0]]
    assert rows.target_step.tolist() == [[0, 0, 0, 0, 1, 0, 2, 4], [0, 0, 0, 0, 0, 3, 0, 0]]
    assert rows.source.tolist() == [0, 0]
    assert rows.round.tolist() == [0, 1]
    assert rows.steps.tolist() == steps.tolist()


def test_full_attention_rows_pinned_example_with_shrink() -> None:
    tokens = torch.tensor([[10, 11, 50, 51, 52, 53, 54]])
    steps = torch.tensor([[0, 0, 5, 1, 2, 4, 2]])
    rows = trace_rows(tokens, steps, steps > 0, MASK, shrink=2)  # distinct {1, 2, 4, 5} -> runs {1, 2}, {4, 5}
    assert rows.steps.tolist() == [[0, 0, 5, 2, 2, 5, 2]]
    assert rows.input_ids.tolist() == [
        [10, 11, MASK, MASK, MASK, MASK, MASK],  # before step 1
        [10, 11, MASK, 51, 52, MASK, 54],  # before step 4
    ]
    assert rows.target_mask.long().tolist() == [[0, 0, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 1, 0]]


# ------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("bs", [None, 2, 4])
@pytest.mark.parametrize("shrink", [1, 2, 3])
def test_each_trainable_token_is_a_target_exactly_once(seed: int, bs: int | None, shrink: int) -> None:
    rng = random.Random(seed)
    blk = bs or 4
    plens = [rng.randint(1, 9) for _ in range(4)]
    resp = [block_decode(p, rng.randint(1, 11), blk, rng.choice([1, 2, 4]), rng, rng.random() < 0.5) for p in plens]
    tokens, steps, pm, attn, pw = left_pad_batch(plens, resp)
    # trailing answer padding: the last k generated tokens are PAD, the first post_num of them trainable
    for i, r in enumerate(resp):
        k = rng.randint(0, len(r) - 1)
        tokens[i, pw + len(r) - k : pw + len(r)] = PAD
    post_num = rng.randint(0, 2)
    train = torch.zeros_like(pm)
    train[:, pw:] = response_mask(tokens[:, pw:], PAD, post_num) & (steps[:, pw:] > 0)
    pos = rollout_positions(pm, attn)
    rows = trace_rows(tokens, steps, train, MASK, block_size=bs, shrink=shrink, positions=pos)

    # every trainable token exactly once, nothing else
    count = torch.zeros_like(steps).index_put_(
        (rows.source[:, None].expand_as(rows.target_mask)[rows.target_mask], rows.target_mask.nonzero()[:, 1]),
        torch.ones(int(rows.target_mask.sum()), dtype=torch.long),
        accumulate=True,
    )
    assert torch.equal(count, train.long())
    assert (rows.target_mask.sum(dim=1) > 0).all()  # no empty rows
    assert not (rows.target_mask & ~rows.noisy_mask).any()
    assert not (rows.noisy_mask & pm[rows.source]).any()  # the prompt is never masked
    assert torch.equal(rows.target_step, torch.where(rows.target_mask, steps[rows.source], 0))
    shrunk = shrink_steps(steps, train, shrink, None if bs is None else pos // bs)
    assert torch.equal(rows.steps, shrunk)
    for i, p in enumerate(plens):
        n_rows = int((rows.source == i).sum())
        assert n_rows == distinct_per_block(shrunk[i, pw:].tolist(), p, bs), i
        assert rows.round[rows.source == i].tolist() == list(range(n_rows))


@pytest.mark.parametrize("seed", range(6))
def test_noisy_copy_is_the_block_state_just_before_the_run(seed: int) -> None:
    rng = random.Random(seed)
    bs, shrink = 4, rng.choice([1, 2])
    plens = [rng.randint(1, 9) for _ in range(3)]
    resp = [block_decode(p, rng.randint(3, 12), bs, 2, rng, dynamic=True) for p in plens]
    tokens, steps, pm, attn, pw = left_pad_batch(plens, resp)
    pos = rollout_positions(pm, attn)
    rows = trace_rows(tokens, steps, steps > 0, MASK, block_size=bs, shrink=shrink, positions=pos)
    blocks = pos // bs
    for m in range(rows.num_rows):
        i = int(rows.source[m])
        for b in blocks[i, pw:].unique().tolist():
            in_b = (blocks[i] == b) & (steps[i] > 0)
            tgt = rows.target_mask[m] & in_b
            if tgt.any():
                first = int(steps[i][tgt].min())
                assert torch.equal(rows.noisy_mask[m] & in_b, in_b & (steps[i] >= first))
                assert torch.equal(rows.input_ids[m][in_b], torch.where(steps[i] >= first, MASK, tokens[i])[in_b])
            else:  # a block already done (or not started in this round's sense) is clean
                assert not (rows.noisy_mask[m] & in_b).any()


# ------------------------------------------------------------------------------------------ reference parity
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("shrink", [1, 2, 3])
def test_block_rows_equal_the_reference_when_prompts_fill_whole_blocks(seed: int, shrink: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([2, 3, 4])
    plens = [bs * rng.randint(1, 3) for _ in range(4)]  # p mod B = 0: both grids coincide
    resp = [[rng.randint(1, 15) for _ in range(rng.randint(1, 13))] for _ in plens]  # any step map
    tokens, steps, pm, attn, pw = left_pad_batch(plens, resp)
    rows = trace_rows(
        tokens, steps, steps > 0, MASK, block_size=bs, shrink=shrink, positions=rollout_positions(pm, attn)
    )
    for i, r in enumerate(resp):
        assert ours_as_sets(rows, i, pw) == ref_block_rows(r, bs, shrink), i


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("shrink", [1, 2, 8])
def test_full_attention_rows_equal_the_reference(seed: int, shrink: int) -> None:
    rng = random.Random(seed)
    g = 12
    resp = [[rng.randint(1, 20) for _ in range(g)] for _ in range(3)]
    trainable = [[j < g - rng.randint(0, 4) for j in range(g)] for _ in range(3)]  # trailing untrained padding
    tokens, steps, pm, attn, pw = left_pad_batch([3, 5, 2], resp)
    train = torch.zeros_like(pm)
    train[:, pw:] = torch.tensor(trainable)
    rows = trace_rows(tokens, steps, train, MASK, shrink=shrink)
    for i, r in enumerate(resp):
        if all(trainable[i]):  # with untrained tokens the reference still shrinks over them (see the next test)
            assert ours_as_sets(rows, i, pw) == ref_full_rows(r, shrink, trainable[i]), i
        else:
            got = ours_as_sets(rows, i, pw)
            assert {j for t, _ in got for j in t} == {j for j in range(g) if trainable[i][j]}


def test_difference_non_trainable_tokens_open_no_rows() -> None:
    # Reference: padding tokens take part in the shrinkage and open their own rounds (rows without a trained
    # target are dropped, but the runs shift). Ours: only trainable tokens count.
    steps = [1, 2, 3, 4]  # the token at step 2 is untrained padding
    trainable = [True, False, True, True]
    tokens, sm, pm, attn, pw = left_pad_batch([2], [steps])
    train = torch.zeros_like(pm)
    train[:, pw:] = torch.tensor([trainable])
    rows = trace_rows(tokens, sm, train, MASK, shrink=2)
    assert ours_as_sets(rows, 0, pw) == [({0, 2}, {0, 1, 2, 3}), ({3}, {3})]  # runs {1, 3}, {4}
    assert ref_full_rows(steps, 2, trainable) == [({0}, {0, 1, 2, 3}), ({2, 3}, {2, 3})]  # runs {1, 2}, {3, 4}
    # with s = 1 both are the exact trace; the padding revealed at step 2 is clean in the row of step 3
    rows1 = trace_rows(tokens, sm, train, MASK, shrink=1)
    assert ours_as_sets(rows1, 0, pw) == ref_full_rows(steps, 1, trainable)


def test_difference_block_grid_follows_inference_not_the_response_start() -> None:
    # p = 3, B = 4: inference decodes positions 3 (with the prompt tail 0..2), then 4..7. The reference blocks the
    # response as 3..6, 7.. instead.
    bs, p = 4, 3
    resp = [1, 2, 3, 4, 5]  # sequential decoding on the inference grid: position 3 first, then 4, 5, 6, 7
    tokens, steps, pm, attn, pw = left_pad_batch([p], [resp])
    rows = trace_rows(tokens, steps, steps > 0, MASK, block_size=bs, positions=rollout_positions(pm, attn))
    ours = ours_as_sets(rows, 0, pw)
    ref = ref_block_rows(resp, bs, 1)
    # ours: block {3} has 1 step, block {4..7} has 4 -> 4 rows; round 0 masks the first token's block only and the
    # whole next block (it has not started)
    assert ours == [({0, 1}, {0, 1, 2, 3, 4}), ({2}, {2, 3, 4}), ({3}, {3, 4}), ({4}, {4})]
    assert ref == [({0, 4}, {0, 1, 2, 3, 4}), ({1}, {1, 2, 3}), ({2}, {2, 3}), ({3}, {3})]
    assert ours != ref
    # with p a multiple of B the two agree
    tokens, steps, pm, attn, pw = left_pad_batch([4], [resp])
    rows = trace_rows(tokens, steps, steps > 0, MASK, block_size=bs, positions=rollout_positions(pm, attn))
    assert ours_as_sets(rows, 0, pw) == ref_block_rows(resp, bs, 1)


def test_difference_post_num_is_per_response_not_per_row() -> None:
    # 4 padding tokens after a 4-token answer, each decoded at its own step; B = 8, post_num = 1.
    resp_steps = [1, 2, 3, 4, 5, 6, 7, 8]
    is_pad = [False] * 4 + [True] * 4
    ref = ref_block_rows(resp_steps, 8, 1, is_pad, post_num=1)
    ref_pads = sorted(j for t, _ in ref for j in t if is_pad[j])
    assert ref_pads == [4, 5, 6, 7]  # the reference trains one padding token per row: all four here
    tokens, steps, pm, attn, pw = left_pad_batch([8], [resp_steps])
    tokens[0, pw + 4 :] = PAD
    train = torch.zeros_like(pm)
    train[:, pw:] = response_mask(tokens[:, pw:], PAD, post_num=1)
    rows = trace_rows(tokens, steps, train, MASK, block_size=8, positions=rollout_positions(pm, attn))
    ours_pads = sorted(j for t, _ in ours_as_sets(rows, 0, pw) for j in t if is_pad[j])
    assert ours_pads == [4]  # exactly post_num per response, as the GAE counts them


# ------------------------------------------------------------------------------------------ block-size adaptation
@pytest.mark.parametrize("seed", range(6))
def test_block_size_adaptation_4_to_8_covers_each_token_once(seed: int) -> None:
    rng = random.Random(seed)
    plens = [rng.randint(1, 12) for _ in range(4)]
    resp = [block_decode(p, rng.randint(4, 20), 4, 4, rng, dynamic=rng.random() < 0.5) for p in plens]
    tokens, steps, pm, attn, pw = left_pad_batch(plens, resp)
    pos = rollout_positions(pm, attn)
    rows = trace_rows(tokens, steps, steps > 0, MASK, block_size=8, positions=pos)
    hits = torch.zeros_like(steps)
    for m in range(rows.num_rows):
        hits[rows.source[m]] += rows.target_mask[m].long()
    assert torch.equal(hits, (steps > 0).long())
    for i, p in enumerate(plens):
        assert int(rows.rows_per_rollout[i]) == distinct_per_block(resp[i], p, 8)
    # every rollout block of 4 sits inside one training block of 8, so the 8-blocks replay both halves in order:
    # while the first half is being decoded, the second half is still fully masked
    for m in range(rows.num_rows):
        i = int(rows.source[m])
        t = rows.target_mask[m]
        for b8 in (pos[i][t] // 8).unique().tolist():
            in8 = (pos[i] // 8 == b8) & (steps[i] > 0)
            first = int(steps[i][t & in8].min())
            later_half = in8 & (pos[i] // 4 > int(pos[i][t & in8].max()) // 4)
            if later_half.any() and int(steps[i][later_half].min()) > first:
                assert rows.noisy_mask[m][later_half].all()


def test_static_b4_rollout_trained_at_b8_gives_8_rows() -> None:
    rng = random.Random(0)
    resp = block_decode(8, 16, 4, 4, rng)  # p = 8: two full training blocks of 8 = four rollout blocks of 4
    tokens, steps, pm, attn, pw = left_pad_batch([8], [resp])
    pos = rollout_positions(pm, attn)
    assert int(trace_rows(tokens, steps, steps > 0, MASK, block_size=4, positions=pos).num_rows) == 4
    assert int(trace_rows(tokens, steps, steps > 0, MASK, block_size=8, positions=pos).num_rows) == 8
    assert int(trace_rows(tokens, steps, steps > 0, MASK, block_size=8, shrink=2, positions=pos).num_rows) == 4


# ------------------------------------------------------------------------------------------ helpers / API
def test_to_rollout_and_from_rollout_round_trip() -> None:
    rng = random.Random(3)
    plens = [2, 5, 4]
    resp = [block_decode(p, 9, 4, 2, rng) for p in plens]
    tokens, steps, pm, attn, pw = left_pad_batch(plens, resp)
    rows = trace_rows(tokens, steps, steps > 0, MASK, block_size=4, positions=rollout_positions(pm, attn))
    per_token = torch.randn(steps.shape)
    spread = rows.from_rollout(per_token)
    assert spread.shape == rows.target_mask.shape
    assert not spread[~rows.target_mask].any()
    assert torch.equal(rows.to_rollout(spread), torch.where(steps > 0, per_token, 0.0))
    seq = rows.from_rollout(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(seq, torch.where(rows.target_mask, rows.source[:, None].float() + 1, 0.0))


def test_rollout_trace_rows_uses_positions_keep_and_generated_positions() -> None:
    rng = random.Random(1)
    plens = [3, 6]
    resp = [block_decode(p, 7, 4, 2, rng) for p in plens]
    tokens, steps, pm, attn, pw = left_pad_batch(plens, resp, width=9)  # two never-generated columns per row
    rollout = Rollout(
        tokens=tokens,
        attention_mask=attn,
        prompt_mask=pm,
        response_mask=~pm,  # includes the never-generated columns: they are left out (step_map 0)
        step_map=steps,
        group=torch.tensor([0, 0]),
        keep=torch.tensor([True, False]),
    )
    rows = rollout_trace_rows(rollout, MASK, block_size=4)
    assert rows.rows_per_rollout[1] == 0
    assert set(rows.source.tolist()) == {0}
    want = trace_rows(
        tokens[:1], steps[:1], steps[:1] > 0, MASK, block_size=4, positions=rollout_positions(pm, attn)[:1]
    )
    assert torch.equal(rows.input_ids, want.input_ids)
    assert torch.equal(rows.target_mask, want.target_mask)


def test_bad_input_is_rejected_with_a_clear_message() -> None:
    steps = torch.tensor([[0, 1, 0]])
    with pytest.raises(ValueError, match="never revealed"):
        trace_rows(torch.zeros(1, 3, dtype=torch.long), steps, torch.ones(1, 3, dtype=torch.bool), MASK)
    with pytest.raises(ValueError, match="shrink"):
        shrink_steps(steps, steps > 0, 0)
    with pytest.raises(ValueError, match="block_size"):
        trace_rows(torch.zeros(1, 3, dtype=torch.long), steps, steps > 0, MASK, block_size=0)
    empty = trace_rows(
        torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), steps.new_zeros(2, 3).bool(), MASK
    )
    assert empty.num_rows == 0
    assert empty.input_ids.shape == (0, 3)


# ------------------------------------------------------------------------------------------ against the sampler
def test_rows_replay_the_block_samplers_states() -> None:
    from dllm_zoo.backbones import SDARBackbone, SDARConfig
    from dllm_zoo.samplers import BlockSampler, Dynamic

    torch.manual_seed(0)
    model = SDARBackbone(dataclasses.replace(SDARConfig.preset("tiny"), initializer_range=0.2)).eval()
    mask_id = model.layout.mask_id
    for plen, transfer in ((5, None), (8, Dynamic(0.3))):
        kw = {} if transfer is None else {"transfer": transfer}
        sampler = BlockSampler(gen_length=9, block_length=4, denoising_steps=2, stop_token_ids=[], **kw)
        prompt = torch.randint(0, 200, (1, plen), generator=torch.Generator().manual_seed(plen))
        with torch.no_grad():
            out = sampler.generate(model, prompt, record=set(range(1, 40)))
        assert out.snapshots is not None
        steps = out.step_map
        train = steps > 0
        pos = torch.arange(steps.shape[1])[None]
        rows = trace_rows(out.tokens, steps, train, mask_id, block_size=4, positions=pos)
        snaps = {0: torch.where(train, mask_id, out.tokens)} | {k: v for k, v in out.snapshots.items()}
        for m in range(rows.num_rows):
            t = rows.target_mask[m]
            for b in (pos[0][t] // 4).unique().tolist():
                in_b = (pos[0] // 4 == b) & train[0]
                before = int(rows.target_step[m][t & in_b].min()) - 1
                # the block in the noisy row is exactly the sampler's canvas just before that step
                assert torch.equal(rows.input_ids[m][in_b], snaps[before][0][in_b]), (plen, m, b)
