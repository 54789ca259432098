"""Confidence scores and transfer rules as pure functions on hand-made tensors (expected masks computed by hand)."""

from __future__ import annotations

import math

import torch

from dllm_zoo.samplers import (
    Dynamic,
    Factor,
    LowConfidence,
    Margin,
    NegEntropy,
    RandomConfidence,
    StaticQuota,
    Threshold,
    confidence_ranks,
    top_k_mask,
)

T, F = True, False


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_ranks_and_top_k_per_row():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.8, 0.4]])
    cand = _mask([[T, T, T, T], [T, T, F, T]])
    # ties broken by position: the first 0.9 ranks before the second
    assert confidence_ranks(conf, cand)[0].tolist() == [3, 0, 2, 1]
    # the non-candidate (0.8) ranks after every candidate
    assert confidence_ranks(conf, cand)[1].tolist() == [1, 2, 3, 0]
    got = top_k_mask(conf, cand, torch.tensor([2, 5]))
    assert got.tolist() == [[F, T, F, T], [T, T, F, T]]
    assert top_k_mask(conf, cand, torch.tensor([0, 1])).tolist() == [[F, F, F, F], [F, F, F, T]]


def test_candidate_with_minus_inf_confidence_still_ranks_before_non_candidates():
    conf = torch.tensor([[-math.inf, 0.5, 0.9]])
    cand = _mask([[T, T, F]])
    assert top_k_mask(conf, cand, torch.tensor([2])).tolist() == [[T, T, F]]


def test_static_quota():
    conf = torch.tensor([[0.2, 0.7, 0.6, 0.1]])
    cand = _mask([[T, F, T, T]])
    assert StaticQuota().select(conf, cand, torch.tensor([2])).tolist() == [[T, F, T, F]]


def test_threshold_reveals_confident_plus_top1():
    conf = torch.tensor([[0.2, 0.6, 0.55, 0.1], [0.2, 0.3, 0.1, 0.25], [0.9, 0.9, 0.9, 0.9]])
    cand = _mask([[T, T, F, T], [T, T, T, T], [F, F, F, F]])
    quota = torch.zeros(3, dtype=torch.long)
    got = Threshold(0.5).select(conf, cand, quota)
    # row 0: 0.6 >= 0.5 (0.55 is not a candidate); row 1: nothing clears 0.5 -> top-1 only; row 2: no candidates
    assert got.tolist() == [[F, T, F, F], [F, T, F, F], [F, F, F, F]]
    assert Threshold(0.2).select(conf, cand, quota)[1].tolist() == [T, T, F, T]  # >= is inclusive
    assert Threshold(0.0).select(conf, cand, quota)[1].tolist() == [T, T, T, T]


def test_factor_rule_hand_computed():
    conf = torch.tensor([[0.7, 0.9, 0.3, 0.8], [0.3, 0.2, 0.99, 0.1]])
    cand = _mask([[T, T, T, T], [T, T, F, T]])
    quota = torch.zeros(2, dtype=torch.long)
    # row 0 sorted 0.9, 0.8, 0.7, 0.3: (n+1)(1-c) = 0.2, 0.6, 1.2, 3.5 -> n = 2 for f = 1 and n = 3 for f = 2
    # row 1 sorted (candidates) 0.3, 0.2, 0.1: 1.4, 2.4, 3.6 -> nothing admissible -> at least 1
    assert Factor(1.0).select(conf, cand, quota).tolist() == [[F, T, F, T], [T, F, F, F]]
    assert Factor(2.0).select(conf, cand, quota).tolist() == [[T, T, F, T], [T, F, F, F]]
    assert Factor(3.0).select(conf, cand, quota).tolist() == [[T, T, F, T], [T, T, F, F]]


def test_factor_stops_at_first_failure():
    conf = torch.tensor([[0.5, 1.0]])  # sorted 1.0, 0.5: 2*0 = 0 < 1 ok; 3*0.5 = 1.5 fails -> n = 1
    assert Factor(1.0).select(conf, _mask([[T, T]]), torch.zeros(1, dtype=torch.long)).tolist() == [[F, T]]


def test_dynamic_rule_hand_computed():
    conf = torch.tensor([[0.95, 0.875, 0.5, 0.75], [0.75, 0.9, 0.1, 0.2]])
    cand = _mask([[T, T, T, T], [T, T, T, T]])
    rule = Dynamic(0.75)
    # row 0: > 0.75 strictly -> {0.95, 0.875} (0.75 itself is not > 0.75); quota 2 met -> those two
    # row 1: > 0.75 -> {0.9}; quota 2 not met -> top-2 = {0.9, 0.75}
    assert rule.select(conf, cand, torch.tensor([2, 2])).tolist() == [[T, T, F, F], [T, T, F, F]]
    assert rule.select(conf, cand, torch.tensor([1, 1])).tolist() == [[T, T, F, F], [F, T, F, F]]
    assert rule.select(conf, cand, torch.tensor([3, 1])).tolist() == [[T, T, F, T], [F, T, F, F]]
    # a zero quota still reveals at least the top-1
    low = torch.tensor([[0.1, 0.3]])
    assert rule.select(low, _mask([[T, T]]), torch.tensor([0])).tolist() == [[F, T]]


def test_low_confidence_is_probability_of_x0():
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    x0 = torch.tensor([[1, 2]])
    p = torch.softmax(logits, -1)
    got = LowConfidence()(logits, x0)
    assert torch.allclose(got, torch.stack([p[0, 0, 1], p[0, 1, 2]])[None])
    assert got.dtype == logits.dtype
    assert LowConfidence()(logits.double(), x0).dtype == torch.float64


def test_margin_sign_and_value():
    logits = torch.tensor([[[5.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0]]])
    x0 = torch.zeros(1, 3, dtype=torch.long)
    got = Margin()(logits, x0)[0]
    p = torch.softmax(logits, -1)[0]
    assert torch.allclose(got[0], p[0, 0] - p[0, 1])
    assert got[1].abs() < 1e-7  # two equal top probabilities -> margin 0
    assert torch.allclose(got[2], p[2, 1] - p[2, 2])  # uses the distribution's top-2, not x0
    assert got[0] > got[2] > got[1]


def test_neg_entropy_sign():
    v = 4
    logits = torch.tensor([[[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -math.inf]]])
    got = NegEntropy()(logits, torch.zeros(1, 3, dtype=torch.long))[0]
    assert torch.allclose(got[1], torch.tensor(-math.log(v)))  # uniform: -log V
    assert got[2] == 0.0  # one-hot: zero entropy, no NaN from 0 * log 0
    assert got[2] > got[0] > got[1]  # higher = more confident


def test_random_confidence_is_seeded_uniform():
    x0 = torch.zeros(3, 5, dtype=torch.long)
    a = RandomConfidence()(torch.zeros(3, 5, 2), x0, generator=torch.Generator().manual_seed(0))
    b = RandomConfidence()(torch.zeros(3, 5, 2), x0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.shape == (3, 5)
    assert bool(((a >= 0) & (a < 1)).all())


def test_top1_mask_equals_rank_zero_including_ties_and_empty_rows() -> None:
    from dllm_zoo.samplers.transfer import confidence_ranks, top1_mask

    gen = torch.Generator().manual_seed(0)
    conf = torch.randint(0, 4, (64, 8), generator=gen).float() / 4  # many exact ties
    conf[0, 3] = float("nan")
    cand = torch.rand(64, 8, generator=gen) < 0.6
    cand[1] = False  # a row with no candidate selects nothing
    expected = (confidence_ranks(conf, cand) == 0) & cand
    assert torch.equal(top1_mask(conf, cand), expected)
    assert not top1_mask(conf, cand)[1].any()
