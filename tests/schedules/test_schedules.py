import math

import pytest
import torch

from dllm_zoo.schedules import CosineSchedule, LinearSchedule, NoiseSchedule


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()])
@pytest.mark.parametrize("steps", [1, 3, 8, 32])
def test_reveal_counts_contract(schedule: NoiseSchedule, steps: int) -> None:
    n = torch.tensor([0, 1, 7, 32, 100])
    counts = schedule.reveal_counts(n, steps)
    assert counts.shape == (5, steps)
    assert counts.dtype == torch.int64
    assert (counts >= 0).all()
    assert counts.sum(dim=1).tolist() == n.tolist()


def test_linear_reveal_counts_are_llada_get_num_transfer_tokens() -> None:
    # m = 10 over S = 4: floor(10/4) = 2, and the first 10 mod 4 = 2 steps get one more.
    assert LinearSchedule().reveal_counts(torch.tensor([10, 3, 8]), 4).tolist() == [
        [3, 3, 2, 2],
        [1, 1, 1, 0],
        [2, 2, 2, 2],
    ]


def test_cosine_reveal_counts_pinned() -> None:
    # remaining after step k = floor(16·cos(πk/8)), forced down by at least one per step.
    assert CosineSchedule().reveal_counts(torch.tensor([16]), 4).tolist() == [[2, 3, 5, 6]]
    expected_remaining = [math.floor(16 * math.cos(math.pi * k / 8)) for k in range(5)]
    assert expected_remaining == [16, 14, 11, 6, 0]


def test_linear_mask_prob_and_iid_masking() -> None:
    sched = LinearSchedule(eps=1e-3)
    assert torch.allclose(sched.mask_prob(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([1e-3, 0.5005, 1.0]))
    tokens = torch.arange(4000).reshape(2, 2000)
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    maskable[:, :500] = False
    gen = torch.Generator().manual_seed(0)
    out = sched.add_noise(tokens, maskable, mask_id=-1, t=torch.tensor([0.25, 0.75]), generator=gen)
    assert not out.masked[:, :500].any()
    frac = out.masked[:, 500:].float().mean(dim=1)
    assert abs(frac[0].item() - 0.25075) < 0.03
    assert abs(frac[1].item() - 0.75025) < 0.03
    assert (out.noisy[out.masked] == -1).all()
    assert torch.equal(out.noisy[~out.masked], tokens[~out.masked])
    torch.testing.assert_close(out.p_mask, torch.tensor([0.25075, 0.75025]))


def test_at_least_one_and_determinism() -> None:
    sched = LinearSchedule(eps=0.0)
    tokens = torch.zeros(3, 10, dtype=torch.long)
    maskable = torch.ones(3, 10, dtype=torch.bool)
    maskable[2] = False  # nothing maskable: stays unmasked
    out = sched.add_noise(
        tokens, maskable, 9, t=torch.zeros(3), at_least_one=True, generator=torch.Generator().manual_seed(1)
    )
    assert out.masked.sum(dim=1).tolist() == [1, 1, 0]
    a = sched.add_noise(tokens, maskable, 9, generator=torch.Generator().manual_seed(5))
    b = sched.add_noise(tokens, maskable, 9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.masked, b.masked)
    assert torch.equal(a.t, b.t)


def test_cosine_masks_exact_count() -> None:
    sched = CosineSchedule()
    tokens = torch.zeros(2, 64, dtype=torch.long)
    maskable = torch.ones(2, 64, dtype=torch.bool)
    maskable[1, 32:] = False
    t = torch.tensor([1 / 3, 1.0])
    out = sched.add_noise(tokens, maskable, 1, t=t, generator=torch.Generator().manual_seed(0))
    # row 0: round(64·cos(π/6)) = 55; row 1: cos(π/2) ≈ 0 → max(1, 0) = 1
    assert out.masked.sum(dim=1).tolist() == [55, 1]
    assert not out.masked[1, 32:].any()
