"""Step-level returns / GAE over denoising steps, reward placement and the clipped value loss (TraceRL §2.5-2.6)."""

from __future__ import annotations

import random

import pytest
import torch

from dllm_zoo.rl import (
    clipped_value_loss,
    outcome_token_rewards,
    process_token_rewards,
    response_mask,
    step_returns_and_gae,
    trace_rows,
)

MASK = 99
PAD = 0


# ------------------------------------------------------------------------------------------ brute force
def brute_gae(
    r: list[float], v: list[float], steps: list[int], gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """Research §2.5 written out with Python loops for one response (steps 0 = not trainable)."""
    ids = sorted({s for s in steps if s > 0})
    n_s = len(ids)
    r_star = [sum(r[j] for j in range(len(r)) if steps[j] == t) / steps.count(t) for t in ids] + [0.0]
    v_star = [sum(v[j] for j in range(len(v)) if steps[j] == t) / steps.count(t) for t in ids] + [0.0]
    big_r = [0.0] * (n_s + 1)
    big_a = [0.0] * (n_s + 1)
    for t in reversed(range(n_s)):
        big_r[t] = r_star[t] + gamma * big_r[t + 1]
        delta = r_star[t] - v_star[t] + gamma * v_star[t + 1]
        big_a[t] = delta + gamma * lam * big_a[t + 1]
    ret, adv = [], []
    for j, s in enumerate(steps):
        if s == 0:
            ret.append(0.0)
            adv.append(0.0)
            continue
        t = ids.index(s)
        ret.append(r[j] + gamma * big_r[t + 1])
        adv.append(r[j] - v[j] + gamma * v_star[t + 1] + gamma * lam * big_a[t + 1])
    return ret, adv


def random_batch(seed: int, n: int = 4, width: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, 8, (n, width), generator=g)
    steps[torch.rand(n, width, generator=g) < 0.25] = 0  # untrainable tokens
    steps[-1] = 0  # a response without trainable tokens
    values = torch.randn(n, width, generator=g, dtype=torch.float64)
    rewards = torch.randn(n, width, generator=g, dtype=torch.float64)
    return steps, values, rewards


# ------------------------------------------------------------------------------------------ GAE
def test_pinned_hand_computed_example() -> None:
    steps = torch.tensor([[1, 2, 2, 3, 0]])
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 5.0]])  # the last token is not trainable: its reward is ignored
    v = torch.tensor([[0.5, 0.2, 0.4, 0.8, 9.0]])
    out = step_returns_and_gae(r, v, steps, gamma=0.5, lam=0.5)
    # r* = [0, 0, 1], V* = [0.5, 0.3, 0.8]; R* = [0.25, 0.5, 1]; δ = [-0.35, 0.1, 0.2]; A* = [-0.3125, 0.15, 0.2]
    assert out.step_ids.tolist() == [[1, 2, 3]]
    assert torch.allclose(out.step_values, torch.tensor([[0.5, 0.3, 0.8]]))
    assert torch.allclose(out.step_returns, torch.tensor([[0.25, 0.5, 1.0]]))
    assert torch.allclose(out.step_advantages, torch.tensor([[-0.3125, 0.15, 0.2]]))
    assert torch.allclose(out.returns, torch.tensor([[0.25, 0.5, 0.5, 1.0, 0.0]]))
    assert torch.allclose(out.advantages, torch.tensor([[-0.3125, 0.25, 0.05, 0.2, 0.0]]))
    assert out.advantages.dtype == torch.float32


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 1.0), (0.9, 0.5), (1.0, 0.0), (0.0, 0.7)])
def test_matches_brute_force_on_random_batches(seed: int, gamma: float, lam: float) -> None:
    steps, values, rewards = random_batch(seed)
    out = step_returns_and_gae(rewards, values, steps, gamma, lam)
    for i in range(steps.shape[0]):
        ret, adv = brute_gae(rewards[i].tolist(), values[i].tolist(), steps[i].tolist(), gamma, lam)
        assert torch.allclose(out.returns[i], torch.tensor(ret, dtype=torch.float64)), i
        assert torch.allclose(out.advantages[i], torch.tensor(adv, dtype=torch.float64)), i
    # the step advantage is the mean of its tokens' advantages
    for i in range(steps.shape[0] - 1):
        for k, t in enumerate(out.step_ids[i].tolist()):
            if t:
                assert torch.isclose(out.step_advantages[i, k], out.advantages[i][steps[i] == t].mean())


@pytest.mark.parametrize("seed", range(5))
def test_gamma_lambda_one_gives_reward_minus_value(seed: int) -> None:
    steps, values, _ = random_batch(seed)
    reward = torch.randn(steps.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    r = outcome_token_rewards(reward, steps)
    out = step_returns_and_gae(r, values, steps, 1.0, 1.0)
    train = steps > 0
    assert torch.allclose(out.returns[train], reward[:, None].expand_as(steps)[train])  # R_j = sequence reward
    assert torch.allclose(out.advantages[train], (out.returns - values)[train])  # A_j = R_j - V_j
    assert not out.returns[~train].any()
    assert not out.advantages[~train].any()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_lambda_zero_gives_the_one_step_td_error(seed: int, gamma: float) -> None:
    steps, values, rewards = random_batch(seed)
    out = step_returns_and_gae(rewards, values, steps, gamma, 0.0)
    for i in range(steps.shape[0]):
        ids = out.step_ids[i].tolist()
        for j in range(steps.shape[1]):
            s = int(steps[i, j])
            if not s:
                continue
            k = ids.index(s)
            v_next = float(out.step_values[i, k + 1]) if k + 1 < len(ids) and ids[k + 1] else 0.0
            want = float(rewards[i, j] - values[i, j]) + gamma * v_next
            assert out.advantages[i, j].item() == pytest.approx(want)


def test_order_is_the_decoding_order_not_the_position() -> None:
    # full-attention decoding: the right end decoded first
    steps = torch.tensor([[3, 2, 1]])
    r = torch.tensor([[1.0, 0.0, 0.0]])
    out = step_returns_and_gae(r, torch.zeros(1, 3), steps, gamma=0.5, lam=1.0)
    assert out.returns.tolist() == [[1.0, 0.5, 0.25]]


# ------------------------------------------------------------------------------------------ rewards
def test_outcome_reward_sits_on_the_last_step() -> None:
    steps = torch.tensor([[0, 1, 3, 3, 2], [2, 2, 0, 0, 0], [0, 0, 0, 0, 0]])
    got = outcome_token_rewards(torch.tensor([2.0, -1.0, 5.0]), steps)
    assert got.tolist() == [[0, 0, 2, 2, 0], [-1, -1, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_process_reward_pinned_placement() -> None:
    # 9 response tokens after a prompt of 2, chunks of 4: [0, 4), [4, 8), [8, 9)
    steps = torch.tensor([[0, 0, 2, 1, 4, 3, 6, 5, 6, 8, 7]])
    got = process_token_rewards(torch.tensor([[1.0, 10.0, 100.0]]), steps, chunk_length=4, start=2)
    # chunk 0's prefix completes at step 4 (col 4); chunk 1's at step 8 (col 9); the final chunk's prefix is the
    # whole response, also completed at step 8 -> both land on col 9 and add up
    assert got.tolist() == [[0, 0, 0, 0, 1.0, 0, 0, 0, 0, 110.0, 0]]
    nan = process_token_rewards(torch.tensor([[1.0, float("nan"), 100.0, 7.0]]), steps, chunk_length=4, start=2)
    assert nan.tolist() == [[0, 0, 0, 0, 1.0, 0, 0, 0, 0, 100.0, 0]]  # NaN and empty chunks are skipped


def block_decode(p: int, g: int, bs: int, rng: random.Random) -> list[int]:
    """Block-by-block decoding on the absolute grid (random order and counts inside a block)."""
    out, step = [0] * g, 0
    for b0 in range(p // bs * bs, p + g, bs):
        cols = [c - p for c in range(max(b0, p), min(b0 + bs, p + g))]
        rng.shuffle(cols)
        while cols:
            k = rng.randint(1, len(cols))
            step += 1
            for c in cols[:k]:
                out[c] = step
            cols = cols[k:]
    return out


def ref_process_rewards(chunk_r: list[float], steps: list[int], chunk_len: int, bs: int) -> list[float]:
    """§2.6 as released: non-final chunk -> max step within the last B tokens before its end; final -> global max."""
    out = [0.0] * len(steps)
    n_chunks = -(-len(steps) // chunk_len)
    for c in range(n_chunks):
        end = min((c + 1) * chunk_len, len(steps))
        window = range(len(steps)) if c == n_chunks - 1 else range(max(0, end - bs), end)
        top = max(steps[j] for j in window)
        for j in window:
            if steps[j] == top:
                out[j] += chunk_r[c]
    return out


@pytest.mark.parametrize("seed", range(8))
def test_process_reward_equals_the_reference_rule_for_block_decoding(seed: int) -> None:
    rng = random.Random(seed)
    bs = rng.choice([2, 4])
    p = bs * rng.randint(0, 2)  # chunk ends fall on block ends, as in the reference (response-start grid)
    g = rng.randint(5, 23)
    chunk_len = bs * rng.randint(1, 3)
    resp = block_decode(p, g, bs, rng)
    n_chunks = -(-g // chunk_len)
    chunk_r = [rng.uniform(-1, 1) for _ in range(n_chunks)]
    steps = torch.tensor([[0] * p + resp])
    got = process_token_rewards(torch.tensor([chunk_r + [float("nan")]], dtype=torch.float64), steps, chunk_len, p)
    assert torch.allclose(
        got[0, p:], torch.tensor(ref_process_rewards(chunk_r, resp, chunk_len, bs), dtype=torch.float64)
    )


def test_difference_process_reward_padding_is_zero_not_max_plus_one() -> None:
    # The reference pads a process-reward vector shorter than the response width with max + 1 (the step-map
    # padding rule), so a trainable padding token (post_num = 1) gets a reward nobody gave. Here it gets 0.
    answer_steps = [1, 2, 3, 4]
    steps = torch.tensor([answer_steps + [5]])  # the trainable padding token after the answer, revealed last
    chunk_rewards = [0.5]  # one chunk covering the 4 answer tokens
    ref_vector = [0.0, 0.0, 0.0, 0.5]  # the judged chunk's reward on its last step
    ref_padded = ref_vector + [max(ref_vector) + 1]
    assert ref_padded[-1] == 1.5
    ours = process_token_rewards(torch.tensor([chunk_rewards]), steps, chunk_length=4)
    assert ours.tolist() == [[0.0, 0.0, 0.0, 0.5, 0.0]]


# ------------------------------------------------------------------------------------------ with trace rows
def test_values_from_rows_and_advantages_back_to_rows() -> None:
    rng = random.Random(0)
    p, bs = 3, 4
    resp = block_decode(p, 11, bs, rng)
    steps = torch.tensor([[0] * p + resp])
    tokens = torch.arange(steps.shape[1])[None] + 10
    rows = trace_rows(tokens, steps, steps > 0, MASK, block_size=bs, positions=torch.arange(steps.shape[1])[None])
    per_row_values = torch.randn(rows.target_mask.shape, generator=torch.Generator().manual_seed(0))
    values = rows.to_rollout(per_row_values)  # V_j read at the row where j is a target
    out = step_returns_and_gae(outcome_token_rewards(torch.tensor([1.0]), rows.steps), values, rows.steps)
    adv_rows = rows.from_rollout(out.advantages)
    assert torch.allclose(adv_rows[rows.target_mask], (1.0 - per_row_values)[rows.target_mask])


def test_difference_reference_trains_padding_its_gae_ignores() -> None:
    # Reference with post_num unset: the row builder trains every padding token, but its GAE treats padding as
    # untrainable (return and advantage 0), so the γ = λ = 1 identity A = R − V fails on those targets.
    resp_steps = [1, 2, 3, 4, 5, 6]
    is_pad = [False, False, False, False, True, True]
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    reward = 1.0
    ref_targets = set(range(6))  # no post_num filter: every response token is a target of some row
    gae_steps = [s if not pad else 0 for s, pad in zip(resp_steps, is_pad)]  # GAE: non-pad or first 0 pads
    r = [reward if s == max(gae_steps) else 0.0 for s in gae_steps]
    ref_ret, ref_adv = brute_gae(r, values, gae_steps, 1.0, 1.0)
    broken = [j for j in ref_targets if abs(ref_adv[j] - (reward - values[j])) > 1e-9]
    assert broken == [4, 5]  # trained with advantage 0 instead of R − V
    assert ref_ret[4] == 0.0

    # Ours: one response_mask decides both the targets and the GAE, so every target satisfies the identity.
    tokens = torch.tensor([[7, 8, 9, 10, PAD, PAD]])
    steps = torch.tensor([resp_steps])
    for post_num in (0, 1, 2):
        train = response_mask(tokens, PAD, post_num)
        rows = trace_rows(tokens, steps, train, MASK, block_size=8)
        v = torch.tensor([values]) * train
        out = step_returns_and_gae(outcome_token_rewards(torch.tensor([reward]), rows.steps), v, rows.steps)
        targets = rows.target_mask.any(dim=0)
        assert torch.equal(targets, train[0])
        assert torch.allclose(out.advantages[0][targets], (reward - v[0])[targets])


# ------------------------------------------------------------------------------------------ value loss
def test_clipped_value_loss_pinned_and_reference_aggregation() -> None:
    v = torch.tensor([[1.0, 0.0, 0.5], [0.3, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    ret = torch.tensor([[1.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # row 0: t0 max(0, 0.64) -> 0.32; t1 max(1, 1) -> 0.5; t2 max(2.25, 1.44) -> 1.125; row 1: max(0.09, 0.04) -> 0.045
    per_tok = torch.tensor([[0.32, 0.5, 1.125], [0.045, 0.0, 0.0]])
    assert clipped_value_loss(v, old, ret, mask).item() == pytest.approx(per_tok.sum().item() / 4)
    ref = clipped_value_loss(v, old, ret, mask, aggregation="sequence_sum", scale=1 / 3)  # release: Σ_row / L1
    assert ref.item() == pytest.approx(per_tok.sum(dim=1).div(3).mean().item())
    assert clipped_value_loss(v, old, ret, mask, clip=None).item() == pytest.approx((0 + 0.5 + 1.125 + 0.045) / 4)
    ref.backward()
    assert v.grad is not None
    assert v.grad[0, 0].item() == 0.0  # the clipped branch is active and flat there
    assert v.grad[0, 2].item() != 0.0
    assert v.grad[1, 1].item() == 0.0  # not a target


def test_bad_input_is_rejected() -> None:
    steps = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="values must be"):
        step_returns_and_gae(torch.zeros(2, 3), torch.zeros(2, 4), steps)
    with pytest.raises(ValueError, match="gamma and lam"):
        step_returns_and_gae(torch.zeros(2, 3), torch.zeros(2, 3), steps, gamma=1.5)
    with pytest.raises(ValueError, match="chunk_length"):
        process_token_rewards(torch.zeros(2, 1), steps, 0)
    with pytest.raises(ValueError, match="share a shape"):
        clipped_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))
    empty = step_returns_and_gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    assert empty.step_ids.shape == (2, 0)
    assert not empty.advantages.any()
