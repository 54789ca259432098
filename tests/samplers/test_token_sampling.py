"""Temperature / top-k / top-p filtering and the entropy-bounded transfer rule, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dllm_zoo.samplers import EntropyBounded, NegEntropy, filter_logits, sample_tokens

T, F = True, False


def test_filter_top_k_keeps_k_largest() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = filter_logits(logits, 1.0, top_k=2)
    assert torch.isinf(out).tolist() == [[T, F, F, T]]
    assert out[0, 1] == 3.0


def test_filter_top_p_keeps_smallest_set_reaching_mass() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 < 0.7 -> keep the second; 0.5 + 0.3 = 0.8 >= 0.7 -> the third is dropped
    assert torch.isinf(filter_logits(logits, 1.0, top_p=0.7)).tolist() == [[F, F, T, T]]
    # a mass reached by the top token alone keeps exactly one token
    assert torch.isinf(filter_logits(logits, 1.0, top_p=0.4)).tolist() == [[F, T, T, T]]


def test_filter_temperature_scales_before_filtering() -> None:
    logits = torch.tensor([[2.0, 1.0]])
    assert torch.allclose(filter_logits(logits, 0.5), torch.tensor([[4.0, 2.0]]))
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, 0.0)


def test_greedy_is_argmax_of_raw_logits() -> None:
    logits = torch.tensor([[[0.1, 2.0, 1.9], [3.0, 0.0, -1.0]]])
    tokens, scored = sample_tokens(logits, temperature=0.0, top_k=1, top_p=0.1)
    assert tokens.tolist() == [[1, 0]]
    assert scored is logits  # confidence is scored on the unfiltered distribution


def test_sampling_is_seeded_and_respects_the_filter() -> None:
    logits = torch.zeros(64, 10)
    logits[:, 3] = 1.0
    logits[:, 7] = 1.0
    a, scored = sample_tokens(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    b, _ = sample_tokens(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert set(a.tolist()) == {3, 7}
    probs = torch.softmax(scored, dim=-1)
    assert torch.allclose(probs[:, 3], torch.full((64,), 0.5))


def test_entropy_bounded_hand_computed() -> None:
    # entropies 0.1, 0.3, 0.05, 0.2 (scores are negative entropies); candidates all but position 3
    conf = -torch.tensor([[0.1, 0.3, 0.05, 0.2], [0.5, 0.6, 0.7, 0.8]])
    cand = torch.tensor([[T, T, T, F], [T, T, T, T]])
    got = EntropyBounded(0.35).select(conf, cand, torch.tensor([1, 1]))
    # row 0: sorted 0.05, 0.1, 0.3 -> cumsum 0.05, 0.15, 0.45 -> two under 0.35
    # row 1: the lowest entropy already exceeds the budget -> at least one
    assert got.tolist() == [[T, F, T, F], [T, F, F, F]]


def test_entropy_bounded_with_neg_entropy_scores() -> None:
    logits = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    conf = NegEntropy()(logits, logits.argmax(-1))
    got = EntropyBounded(0.1).select(conf, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]))
    ent = -conf[0]
    assert ent[1] == pytest.approx(math.log(3), rel=1e-5)
    assert float(ent[0] + ent[2]) == pytest.approx(0.0810, abs=1e-3)  # < 0.1: both peaked positions fit
    assert got.tolist() == [[T, F, T]]
