"""The reveal curve ``masked_fraction`` of every schedule, and the sigmoid schedule."""

from __future__ import annotations

import math

import pytest
import torch

from dllm_zoo.schedules import CosineSchedule, LinearSchedule, NoiseSchedule, SigmoidSchedule, reveals_from_remaining


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _gamma(r: float, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> float:
    hi, lo = _sigmoid(end / tau), _sigmoid(start / tau)
    return (hi - _sigmoid((r * (end - start) + start) / tau)) / (hi - lo)


SCHEDULES = [LinearSchedule(), CosineSchedule(), SigmoidSchedule(), SigmoidSchedule(start=-2, end=4, tau=0.5)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_masked_fraction_endpoints_and_monotone(schedule: NoiseSchedule) -> None:
    floor = schedule.eps if isinstance(schedule, LinearSchedule) else 0.0
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    frac = schedule.masked_fraction(grid)
    assert frac.shape == grid.shape
    assert frac[0].item() == pytest.approx(1.0, abs=1e-12)
    assert frac[-1].item() == pytest.approx(floor, abs=1e-12)
    assert (frac[1:] < frac[:-1]).all()  # strictly decreasing
    assert ((frac >= floor - 1e-12) & (frac <= 1 + 1e-12)).all()


def test_masked_fraction_pinned_values() -> None:
    r = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    lin = LinearSchedule(eps=1e-3).masked_fraction(r)
    torch.testing.assert_close(lin, torch.tensor([0.75025, 0.5005, 0.25075], dtype=torch.float64))
    cos = CosineSchedule(min_mask_rate=0.3).masked_fraction(r)  # the training clip does not touch the curve
    expected_cos = [math.cos(math.pi * x / 2) for x in (0.25, 0.5, 0.75)]
    torch.testing.assert_close(cos, torch.tensor(expected_cos, dtype=torch.float64))
    assert expected_cos[0] == pytest.approx(0.9238795325112867)
    sig = SigmoidSchedule().masked_fraction(r)
    torch.testing.assert_close(sig, torch.tensor([0.8508535479296672, 0.5, 0.149146452070333], dtype=torch.float64))
    torch.testing.assert_close(sig, torch.tensor([_gamma(x) for x in (0.25, 0.5, 0.75)], dtype=torch.float64))
    custom = SigmoidSchedule(start=-2, end=4, tau=0.5).masked_fraction(r)
    expected = [_gamma(x, -2, 4, 0.5) for x in (0.25, 0.5, 0.75)]
    torch.testing.assert_close(custom, torch.tensor(expected, dtype=torch.float64))


def test_default_masked_fraction_is_mask_prob_of_one_minus_progress() -> None:
    sched = LinearSchedule(eps=0.01)
    r = torch.rand(7, dtype=torch.float64)
    torch.testing.assert_close(sched.masked_fraction(r), sched.mask_prob(1 - r))


def test_sigmoid_mask_prob_convention_and_noise() -> None:
    sched = SigmoidSchedule(min_mask_rate=0.05)
    t = torch.tensor([0.0, 0.5, 1.0])
    # MaskGIT convention (t = 0 fully masked, like CosineSchedule), clipped below for training only.
    torch.testing.assert_close(sched.mask_prob(t), torch.tensor([1.0, 0.5, 0.05]))
    torch.testing.assert_close(sched.masked_fraction(t), torch.tensor([1.0, 0.5, 0.0]))
    tokens = torch.zeros(2, 4000, dtype=torch.long)
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    out = sched.add_noise(tokens, maskable, 7, t=torch.tensor([0.25, 0.75]), generator=torch.Generator().manual_seed(0))
    frac = out.masked.float().mean(dim=1)
    assert abs(frac[0].item() - _gamma(0.25)) < 0.03
    assert abs(frac[1].item() - _gamma(0.75)) < 0.03


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": 1.0, "end": 1.0}, "end must exceed start"),
        ({"tau": 0.0}, "tau"),
        ({"min_mask_rate": 1.5}, "min_mask"),
    ],
)
def test_sigmoid_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SigmoidSchedule(**kwargs)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("steps", [1, 2, 5, 15, 40])
def test_reveal_counts_sum(schedule: NoiseSchedule, steps: int) -> None:
    n = torch.tensor([0, 1, 3, 9, 16, 256, 1024])
    counts = schedule.reveal_counts(n, steps)
    assert counts.shape == (7, steps)
    assert counts.dtype == torch.int64
    assert (counts >= 0).all()
    assert counts.sum(dim=1).tolist() == n.tolist()
    if not isinstance(schedule, LinearSchedule):
        # At least one reveal per step while tokens remain.
        left = n[:, None] - counts.cumsum(dim=1) + counts  # masked before each step
        assert ((counts >= 1) | (left == 0)).all()


def test_sigmoid_reveal_counts_pinned() -> None:
    # remaining after step k = floor(16·γ(k/5)) = 16, 14, 10, 5, 1, 0.
    assert [math.floor(16 * _gamma(k / 5)) for k in range(6)] == [16, 14, 10, 5, 1, 0]
    assert SigmoidSchedule().reveal_counts(torch.tensor([16]), 5).tolist() == [[2, 4, 5, 4, 1]]
    # Tiny counts: the floor plan is pushed down to one reveal per step.
    assert SigmoidSchedule().reveal_counts(torch.tensor([3]), 5).tolist() == [[1, 1, 1, 0, 0]]


def test_sigmoid_reveal_counts_follow_the_curve() -> None:
    sched = SigmoidSchedule()
    n, steps = torch.tensor([256, 1000]), 12
    k = torch.arange(steps + 1, dtype=torch.float64) / steps
    remaining = torch.floor(n[:, None].double() * sched.masked_fraction(k)).long()
    torch.testing.assert_close(sched.reveal_counts(n, steps), remaining[:, :-1] - remaining[:, 1:])


def test_reveals_from_remaining_enforces_one_per_step() -> None:
    # r + idx = [5, 6, 7, 3] -> cummin [5, 5, 5, 3] -> minus idx [5, 4, 3, 0].
    assert reveals_from_remaining(torch.tensor([[5, 5, 5, 0]])).tolist() == [[1, 1, 3]]
    # The last column is forced to zero; already-decreasing plans are unchanged.
    assert reveals_from_remaining(torch.tensor([[6, 4, 1, 1]])).tolist() == [[2, 3, 1]]
    assert reveals_from_remaining(torch.tensor([[2, 2, 2, 2, 2]])).tolist() == [[1, 1, 0, 0]]
