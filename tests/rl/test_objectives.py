"""Group advantages and the clipped-surrogate objective, pinned against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dllm_zoo.rl import ClippedSurrogate, aggregate, group_advantages, group_mean_std, informative_groups, k3_kl


def test_group_advantages_population_std_and_zero_without_spread() -> None:
    rewards = torch.tensor([2.0, 0.0, 0.0, 0.0, 1.0, 1.0, 3.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = group_advantages(rewards, group)
    # group 0: mean 0.5, population std sqrt((1.5² + 3·0.5²)/4) = sqrt(0.75)
    sd = math.sqrt(0.75)
    assert adv.tolist() == pytest.approx([1.5 / sd, -0.5 / sd, -0.5 / sd, -0.5 / sd, 0.0, 0.0, 0.0])
    _, sample_sd = group_mean_std(rewards, group, std="sample")
    assert float(sample_sd[0]) == pytest.approx(math.sqrt(3.0 / 3))  # Σ(r − mean)² = 3, n − 1 = 3
    assert group_advantages(rewards, group, eps=1.0)[0].item() == pytest.approx(1.5 / (sd + 1.0))
    # groups need not be contiguous or sorted
    perm = torch.tensor([6, 3, 0, 5, 1, 4, 2])
    assert torch.allclose(group_advantages(rewards[perm], group[perm]), adv[perm])


def test_informative_groups_drop_all_right_and_all_wrong() -> None:
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0])
    group = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    keep = informative_groups(correct, group)
    assert keep.tolist() == [False] * 8 + [True] * 4
    assert informative_groups(correct, group, low=0.3).tolist() == [False] * 12  # group 2 has accuracy 0.25


def test_aggregations() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx((1 + 2 + 4) / 3)
    assert aggregate(values, mask, "sequence_mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(values, mask, "sequence_sum").item() == pytest.approx((3 + 4) / 2)


def test_clipped_surrogate_by_hand() -> None:
    # two sequences, two tokens each; ratios e^{0.5}, e^{-0.5} | 1, e^{0.1}
    new = torch.tensor([[0.5, -0.5], [0.0, 0.1]], requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = ClippedSurrogate(eps=0.2)(new, old, adv, mask)
    r = [math.exp(0.5), math.exp(-0.5), 1.0, math.exp(0.1)]
    # A>0: min(r, clip(r)) -> 1.2 (r=1.65 clipped), 0.607 (below 0.8: unclipped branch is smaller);
    # A<0: min(-2r, -2clip(r)) -> -2, -2·1.105
    tok = [min(r[0], 1.2), min(r[1], 0.8), -2.0, -2 * r[3]]
    want = ((tok[0] + tok[1]) / 2 + (tok[2] + tok[3]) / 2) / 2
    assert out.surrogate.item() == pytest.approx(want, rel=1e-6)
    assert out.loss.item() == pytest.approx(-want, rel=1e-6)
    assert out.clip_fraction.item() == pytest.approx(1 / 4)  # only token 0 is bounded by the clip
    assert out.ratio_mean.item() == pytest.approx(sum(r) / 4, rel=1e-6)
    out.loss.backward()
    assert new.grad is not None
    assert new.grad[0, 0].item() == 0.0  # clipped: no gradient
    assert new.grad[0, 1].item() == pytest.approx(-r[1] / 4, rel=1e-6)


def test_clip_higher_and_token_mean() -> None:
    new = torch.tensor([[0.2, 0.0, 0.0]])  # ratio e^0.2 = 1.221: above 1 + 0.2, below 1 + 0.28
    args = (new, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[True, True, False]]))
    symmetric = ClippedSurrogate(eps=0.2, aggregation="token_mean")(*args)
    higher = ClippedSurrogate(eps=0.2, eps_high=0.28, aggregation="token_mean")(*args)
    assert symmetric.surrogate.item() == pytest.approx((1.2 + 1.0) / 2)
    assert symmetric.clip_fraction.item() == pytest.approx(1 / 2)
    assert higher.surrogate.item() == pytest.approx((math.exp(0.2) + 1.0) / 2)
    assert higher.clip_fraction.item() == 0.0


def test_k3_kl_against_reference_or_old_and_token_advantages() -> None:
    new = torch.tensor([[0.0, -1.0]])
    old = torch.tensor([[0.0, -1.5]])
    ref = torch.tensor([[-0.5, -1.0]])
    mask = torch.tensor([[True, True]])
    d = -0.5
    assert k3_kl(new, ref)[0, 0].item() == pytest.approx(math.exp(d) - d - 1)
    assert k3_kl(new, new).abs().max().item() == 0.0
    against_ref = ClippedSurrogate(beta=0.1, aggregation="sequence_mean")(new, old, torch.zeros(1), mask, ref)
    assert against_ref.kl.item() == pytest.approx((math.exp(d) - d - 1) / 2)
    assert against_ref.loss.item() == pytest.approx(0.1 * (math.exp(d) - d - 1) / 2)
    against_old = ClippedSurrogate(beta=0.1, kl_against="old", kl_aggregation="sequence_sum")(
        new, old, torch.zeros(1), mask
    )
    assert against_old.kl.item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    token_adv = torch.tensor([[1.0, -1.0]])
    out = ClippedSurrogate()(new, new.detach(), token_adv, mask)
    assert out.surrogate.item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="logp_ref"):
        ClippedSurrogate(beta=0.1)(new, old, torch.zeros(1), mask)
    with pytest.raises(ValueError, match="eps"):
        ClippedSurrogate(eps=1.5)


def test_log_ratio_clamp_and_unmasked_tokens_do_not_count() -> None:
    new = torch.tensor([[20.0, 5.0]])
    out = ClippedSurrogate(log_ratio_clamp=10.0)(
        new, torch.zeros(1, 2), torch.tensor([-1.0]), torch.tensor([[True, False]])
    )
    assert out.surrogate.item() == pytest.approx(-math.exp(10.0))
    assert out.ratio_mean.item() == pytest.approx(math.exp(10.0))
