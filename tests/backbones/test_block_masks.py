"""Block-attention masks against brute-force loops written from research/tracerl_llada.md §3.2–3.4."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from dllm_zoo.backbones.attention import (
    block_causal_mask,
    block_diffusion_mask,
    context_window_mask,
    sdar_training_mask,
    trajectory_input_ids,
    trajectory_mask,
    trajectory_position_ids,
    trajectory_tail_width,
)


# ------------------------------------------------------------------------------------------ fixtures
def packed_row(rng: random.Random, n: int) -> tuple[list[int], list[int], list[bool]]:
    """Positions, segment ids and key padding of one packed row: random samples, then a padding tail (-1)."""
    pos: list[int] = []
    seg: list[int] = []
    while len(pos) < n and rng.random() < 0.8:
        length = rng.randint(1, n - len(pos))
        pos += list(range(length))
        seg += [max(seg, default=-1) + 1] * length
    pad = n - len(pos)
    return pos + [0] * pad, seg + [-1] * pad, [True] * (n - pad) + [False] * pad


def packed_batch(seed: int, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    rows = [packed_row(rng, n) for _ in range(b)]
    pos, seg, keep = (torch.tensor([r[k] for r in rows]) for k in range(3))
    return pos, seg, keep


def fill_brute(mask: list[list[bool]]) -> list[list[bool]]:
    return [row if any(row) else [True] * len(row) for row in mask]


def no_empty_rows(mask: torch.Tensor) -> bool:
    return bool(mask.any(dim=-1).all())


CASES = [(n, bs, seed) for n in (1, 5, 8, 11) for bs in (1, 2, 3, 4) for seed in (0, 1)]


# ------------------------------------------------------------------------------------------ block-causal
@pytest.mark.parametrize(("n", "bs", "seed"), CASES)
def test_block_causal_mask_matches_brute_force(n: int, bs: int, seed: int) -> None:
    pos, seg, keep = packed_batch(seed, 3, n)
    got = block_causal_mask(pos, bs, keep, seg)
    assert got.shape == (3, 1, n, n)
    assert got.dtype == torch.bool
    for r in range(3):
        p, s, k = pos[r].tolist(), seg[r].tolist(), keep[r].tolist()
        want = [[p[j] // bs <= p[i] // bs and s[i] == s[j] and k[j] for j in range(n)] for i in range(n)]
        assert got[r, 0].tolist() == fill_brute(want)
    assert no_empty_rows(got)


def test_block_causal_mask_without_packing_is_tril_over_blocks() -> None:
    got = block_causal_mask(torch.arange(6)[None], 2)[0, 0]
    blocks = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(got, blocks.repeat_interleave(2, 0).repeat_interleave(2, 1))


# ------------------------------------------------------------------------------------------ SDAR [x_t | x_0]
def sdar_brute(pos: list[int], seg: list[int], keep: list[bool], bs: int) -> list[list[bool]]:
    """§3.2: (a) same block and same half, (b) x_t query, x_0 key, earlier block, (c) x_0 both, key block ≤."""
    n = len(pos)
    out = []
    for i in range(2 * n):
        row = []
        for j in range(2 * n):
            hi, hj = i >= n, j >= n  # False = x_t, True = x_0
            bi, bj = pos[i % n] // bs, pos[j % n] // bs
            ok = (hi == hj and bi == bj) or (not hi and hj and bj < bi) or (hi and hj and bj <= bi)
            row.append(ok and seg[i % n] == seg[j % n] and keep[j % n])
        out.append(row)
    return fill_brute(out)


@pytest.mark.parametrize(("n", "bs", "seed"), CASES)
def test_sdar_training_mask_matches_brute_force(n: int, bs: int, seed: int) -> None:
    pos, seg, keep = packed_batch(seed, 3, n)
    got = sdar_training_mask(pos, bs, keep, seg)
    assert got.shape == (3, 1, 2 * n, 2 * n)
    for r in range(3):
        assert got[r, 0].tolist() == sdar_brute(pos[r].tolist(), seg[r].tolist(), keep[r].tolist(), bs)
    assert no_empty_rows(got)


def test_sdar_mask_of_one_sample_uses_blocks_relative_to_each_half() -> None:
    # SDAR's block_diff_mask on one unpacked sample of n = 6 tokens: blocks are computed relative to each half.
    n, bs = 6, 4
    got = sdar_training_mask(torch.arange(n)[None], bs)[0, 0]
    block = [i // bs for i in range(n)]
    for i in range(2 * n):
        for j in range(2 * n):
            bi, bj = block[i % n], block[j % n]
            xt_i, xt_j = i < n, j < n
            want = (
                (xt_i == xt_j and bi == bj) or (xt_i and not xt_j and bj < bi) or (not xt_i and not xt_j and bj <= bi)
            )
            assert bool(got[i, j]) == want, (i, j)


def test_sdar_mask_keys_of_other_samples_and_padding_are_never_attended() -> None:
    pos, seg, keep = packed_batch(3, 4, 12)
    got = sdar_training_mask(pos, 3, keep, seg)[:, 0]
    seg2, keep2 = torch.cat([seg, seg], 1), torch.cat([keep, keep], 1)
    real_rows = keep2[:, :, None].expand_as(got)
    cross = seg2[:, :, None] != seg2[:, None, :]
    assert not (got & cross & real_rows).any()
    assert not (got & ~keep2[:, None, :] & real_rows).any()


# ------------------------------------------------------------------------------------------ trajectory rows
def trajectory_brute(prompt_real: list[bool], r: int, bs: int, resp_real: list[bool]) -> list[list[bool]]:
    """Our documented rule on [prompt | clean | tail | noisy], written as loops over labelled columns."""
    p_width = len(prompt_real)
    p = sum(prompt_real)
    t = min(bs - 1, p_width)
    cols: list[tuple[str, int, bool]] = []  # (kind, position, real)
    k = 0
    for real in prompt_real:
        cols.append(("prompt", k if real else 0, real))
        k += int(real)
    cols += [("clean", p + i, resp_real[i]) for i in range(r)]
    for c in range(p_width - t, p_width):
        _, pos, real = cols[c]
        cols.append(("tail", pos, real and pos // bs == p // bs))
    cols += [("noisy", p + i, resp_real[i]) for i in range(r)]
    out = []
    for qk, qp, _ in cols:
        row = []
        for kk, kp, kreal in cols:
            q_noisy, k_noisy = qk in ("tail", "noisy"), kk in ("tail", "noisy")
            bq, bk = qp // bs, kp // bs
            if not q_noisy:
                ok = not k_noisy and bk <= bq
            else:
                ok = bk == bq if k_noisy else bk < bq
            row.append(ok and kreal)
        out.append(row)
    return fill_brute(out)


def dllm_rl_brute(prompt_real: list[bool], r: int, bs: int) -> list[list[bool]]:
    """dLLM-RL's ``make_basic_block_attention`` as research §3.3 describes it, on [prompt | clean | noisy]."""
    l0 = len(prompt_real)
    n = l0 + 2 * r
    out = [[False] * n for _ in range(n)]
    for i in range(n):
        if i < l0:  # prompt rows: blocks counted backwards from the prompt end
            k = (l0 - 1 - i) // bs
            allowed = range(0, l0 - k * bs)
        elif i < l0 + r:  # clean response rows of block b
            b = (i - l0) // bs
            allowed = range(0, l0 + min((b + 1) * bs, r))
        else:  # noisy rows of block b: prompt + clean earlier blocks, own noisy block
            b = (i - l0 - r) // bs
            own = range(l0 + r + b * bs, l0 + r + min((b + 1) * bs, r))
            allowed = [*range(0, l0 + b * bs), *own]
        for j in allowed:
            out[i][j] = not (j < l0 and not prompt_real[j])  # pad keys of the prompt are masked for all
        if not any(out[i]):
            out[i][i] = True  # rows left without keys attend only to themselves
    return out


def left_padded(p_width: int, lengths: list[int]) -> torch.Tensor:
    return torch.tensor([[j >= p_width - n for j in range(p_width)] for n in lengths])


TRAJ = [
    (p_width, lengths, r, bs)
    for bs in (1, 2, 3, 4)
    for p_width, lengths in ((5, [5, 3, 1]), (7, [7, 6, 2]), (4, [0, 4, 2]))
    for r in (1, 4, 6)
]


@pytest.mark.parametrize(("p_width", "lengths", "r", "bs"), TRAJ)
def test_trajectory_mask_matches_brute_force(p_width: int, lengths: list[int], r: int, bs: int) -> None:
    prompt = left_padded(p_width, lengths)
    resp = torch.tensor([[i < r - k for i in range(r)] for k in range(len(lengths))])  # k trailing pads in row k
    got = trajectory_mask(prompt, r, bs, resp)
    t = trajectory_tail_width(p_width, bs)
    assert got.shape == (len(lengths), 1, p_width + 2 * r + t, p_width + 2 * r + t)
    for row in range(len(lengths)):
        want = trajectory_brute(prompt[row].tolist(), r, bs, resp[row].tolist())
        assert got[row, 0].tolist() == want
    assert no_empty_rows(got)


@pytest.mark.parametrize("bs", [1, 2, 3, 4])
@pytest.mark.parametrize("r", [2, 5, 8])
def test_trajectory_mask_equals_dllm_rl_when_prompts_fill_whole_blocks(bs: int, r: int) -> None:
    p_width = 3 * bs + 1  # one or more left pads; every real prompt length is a multiple of bs
    lengths = [3 * bs, 2 * bs, bs, 0]
    prompt = left_padded(p_width, lengths)
    got = trajectory_mask(prompt, r, bs)[:, 0]
    t = trajectory_tail_width(p_width, bs)
    keep_cols = [c for c in range(p_width + 2 * r + t) if not p_width + r <= c < p_width + r + t]
    for row, n_real in enumerate(lengths):
        want = torch.tensor(dllm_rl_brute(prompt[row].tolist(), r, bs))
        mine = got[row][keep_cols][:, keep_cols]
        real_rows = torch.tensor([j >= p_width - n_real for j in range(p_width)] + [True] * 2 * r)
        assert torch.equal(mine[real_rows], want[real_rows]), row
        # the tail copy is all padding here: no real query reads it
        assert not got[row][keep_cols][real_rows][:, p_width + r : p_width + r + t].any()


def test_trajectory_positions_and_ids() -> None:
    prompt_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    pos = trajectory_position_ids(prompt_mask, 3, 4)
    # P = 4, R = 3, T = 3: [prompt | clean | tail (last 3 prompt columns) | noisy]
    assert pos.tolist() == [
        [0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6],
    ]
    prompt = torch.tensor([[9, 1, 2, 3], [4, 5, 6, 7]])
    ids = trajectory_input_ids(prompt, torch.full((2, 3), 8), torch.full((2, 3), 0), 4)
    assert ids.tolist() == [[9, 1, 2, 3, 8, 8, 8, 1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 8, 8, 5, 6, 7, 0, 0, 0]]
    # row 0 (p = 3): the whole tail [1, 2, 3] shares block 0 with the first response token -> real noisy keys
    mask = trajectory_mask(prompt_mask, 3, 4)[:, 0]
    first_noisy = 4 + 3 + 3
    assert mask[0, first_noisy, 7:10].all()
    assert not mask[0, first_noisy, 1:4].any()
    # row 1 (p = 4): the response starts a new block; the tail is padding, the clean prompt is context
    assert not mask[1, first_noisy, 7:10].any()
    assert mask[1, first_noisy, 0:4].all()


# ------------------------------------------------------------------------------------------ no leak
def reachable(mask: torch.Tensor) -> torch.Tensor:
    """Transitive closure of ``[N, N]`` attention: what a query can depend on through any number of layers."""
    reach = mask.clone()
    while True:
        nxt = reach | ((reach.float() @ reach.float()) > 0)
        if torch.equal(nxt, reach):
            return reach
        reach = nxt


@pytest.mark.parametrize("bs", [2, 3, 4])
def test_no_noisy_query_can_read_its_answers_through_layers(bs: int) -> None:
    # SDAR layout: a real x_t query of block b never depends on an x_0 column of block >= b.
    pos, seg, keep = packed_batch(5, 2, 10)
    m = sdar_training_mask(pos, bs, keep, seg)[:, 0]
    for r in range(2):
        reach = reachable(m[r])
        blocks = torch.cat([pos[r], pos[r]]) // bs
        for i in range(10):
            if keep[r, i]:
                bad = (torch.arange(20) >= 10) & (blocks >= blocks[i]) & reach[i]
                assert not bad.any(), (r, i)
    # Trajectory layout: a noisy response query of block b never depends on a clean response token of block >= b
    # (not even through the x_0 prompt tail, which attends to the clean response of its own block).
    prompt = left_padded(6, [6, 5, 3])
    r_len = 5
    m = trajectory_mask(prompt, r_len, bs)[:, 0]
    pos2 = trajectory_position_ids(prompt, r_len, bs)
    n = m.shape[-1]
    cols = torch.arange(n)
    clean_response = (cols >= 6) & (cols < 6 + r_len)
    for row in range(3):
        reach = reachable(m[row])
        blocks = pos2[row] // bs
        for i in range(n - r_len, n):
            assert not (reach[i] & clean_response & (blocks >= blocks[i])).any(), (row, i)


# ------------------------------------------------------------------------------------------ general rule / SDPA
def test_block_diffusion_mask_checks_shapes() -> None:
    with pytest.raises(ValueError, match="noisy must be"):
        block_diffusion_mask(torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="block_size"):
        sdar_training_mask(torch.zeros(2, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="response_mask"):
        trajectory_mask(torch.ones(2, 3, dtype=torch.bool), 4, 2, torch.ones(2, 3, dtype=torch.bool))


def test_sdpa_over_padded_block_masks_is_finite() -> None:
    torch.manual_seed(0)
    pos, seg, keep = packed_batch(7, 3, 9)
    keep[0] = False  # a row of padding only
    masks = [
        block_causal_mask(pos, 4, keep, seg),
        sdar_training_mask(pos, 4, keep, seg),
        trajectory_mask(
            left_padded(5, [0, 2, 5]), 4, 4, torch.tensor([[False] * 4, [True, True, False, False], [True] * 4])
        ),
    ]
    for mask in masks:
        n = mask.shape[-1]
        q, k, v = (torch.randn(3, 2, n, 8) for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.isfinite(out).all()


def test_context_window_mask_is_real_context_keys_then_the_own_pattern():
    keys = torch.tensor([[True, False, True], [False, False, False]])
    own = torch.tensor([[[[True, False], [True, True]]], [[[False, False], [True, False]]]])
    mask = context_window_mask(keys, own, batch=2, context_len=3)
    brute = torch.zeros(2, 1, 2, 5, dtype=torch.bool)
    for r in range(2):
        for qi in range(2):
            for kj in range(5):
                brute[r, 0, qi, kj] = bool(keys[r, kj]) if kj < 3 else bool(own[r, 0, qi, kj - 3])
            if not brute[r, 0, qi].any():  # a query with no key attends everywhere (no NaN row)
                brute[r, 0, qi] = True
    assert torch.equal(mask, brute)
    assert mask[1, 0, 0].all()  # row 1, query 0: no real context key, no own key
    # No key mask = every cached key real; a [1, 1, Q, W] pattern broadcasts over the batch.
    assert torch.equal(context_window_mask(None, own[:1], 2, 3)[:, 0, 0], torch.tensor([[1, 1, 1, 1, 0]] * 2).bool())
