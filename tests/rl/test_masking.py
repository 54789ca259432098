import pytest
import torch

from dllm_zoo.rl.masking import (
    CoupledMasking,
    RandomMasking,
    UniformlySpacedMasking,
    mask_bernoulli,
    mask_count,
    uniformly_spaced_ratios,
)


def _response() -> torch.Tensor:
    resp = torch.zeros(4, 12, dtype=torch.bool)
    resp[0, 3:12] = True
    resp[1, 5:9] = True
    resp[2, 2:3] = True  # a one-token response
    # row 3: no response at all
    return resp


def test_uniformly_spaced_ratios_follow_the_paper_formula() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.rand(3, generator=g)
    t1 = torch.floor(r * 1000)
    expected = [torch.floor((n / 4) * (1000 - t1) + t1) / 1000 for n in range(5)]
    got = uniformly_spaced_ratios(3, 5, 1000, generator=torch.Generator().manual_seed(0))
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, torch.stack(expected).float())
    assert torch.all(got[-1] == 1.0)  # n = μ masks the whole response
    assert torch.all(got[1:] >= got[:-1])  # ratios rise across the inner iterations
    single = uniformly_spaced_ratios(3, 1, 1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(single[0], t1 / 1000)


def test_mask_count_masks_exactly_round_ratio_times_length_inside_the_response() -> None:
    resp = _response()
    masked = mask_count(resp, torch.tensor([0.5, 0.5, 0.0, 0.7]), torch.Generator().manual_seed(1))
    assert not (masked & ~resp).any()
    assert masked.sum(dim=1).tolist() == [4, 2, 1, 0]  # round(4.5)=4 (half to even), 2, at least 1, nothing to mask


def test_mask_bernoulli_rate_and_at_least_one() -> None:
    resp = torch.ones(2000, 50, dtype=torch.bool)
    masked = mask_bernoulli(resp, torch.full((2000,), 0.3), torch.Generator().manual_seed(0))
    assert abs(masked.float().mean().item() - 0.3) < 0.01
    tiny = mask_bernoulli(_response(), torch.zeros(4), torch.Generator().manual_seed(0))
    assert tiny.sum(dim=1).tolist() == [1, 1, 1, 0]


def test_uniformly_spaced_masking_shapes_and_last_iteration_masks_everything() -> None:
    resp = _response()
    masks = UniformlySpacedMasking()(resp, 3, torch.Generator().manual_seed(0))
    assert masks.shape == (3, 1, 4, 12)
    assert not (masks & ~resp).any()
    assert torch.equal(masks[-1, 0], resp)


def test_random_masking_copies_and_bounds() -> None:
    resp = torch.ones(500, 400, dtype=torch.bool)
    masks = RandomMasking(low=0.2, high=0.4, copies=2)(resp, 3, torch.Generator().manual_seed(0))
    assert masks.shape == (3, 2, 500, 400)
    rate = masks.float().mean(dim=-1)
    assert rate.min() > 0.1
    assert rate.max() < 0.5
    assert abs(rate.mean().item() - 0.3) < 0.01
    with pytest.raises(ValueError, match="low <= high"):
        RandomMasking(low=0.9, high=0.1)


def test_coupled_masking_is_a_mask_and_its_complement() -> None:
    resp = _response()
    masks = CoupledMasking()(resp, 2, torch.Generator().manual_seed(0))
    assert masks.shape == (2, 2, 4, 12)
    first, second = masks[:, 0], masks[:, 1]
    assert not (first & second).any()
    assert torch.equal(first | second, resp.expand_as(first))
