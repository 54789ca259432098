"""MaskedDiffusionLoss with ``sample_ids``: weights and answer-length normalisation per packed sample."""

import math

import pytest
import torch

from dllm_zoo.losses import MaskedDiffusionLoss


def test_packed_row_equals_the_same_samples_unpacked() -> None:
    # Unpacked: the two rows of the SFT case in test_masked_diffusion.py. Packed: both samples in one row of 6,
    # sample 0 = positions 0..2 (masked 0, 2), sample 1 = positions 3..4 (masked 4), position 5 padding.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 0, 1])
    unpacked = MaskedDiffusionLoss.sft()(
        logits,
        targets,
        torch.tensor([[True, False, True], [False, True, False]]),
        p_mask=torch.tensor([0.5, 0.25]),
        answer_length=torch.tensor([3, 2]),
    )
    sample_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    packed = MaskedDiffusionLoss.sft()(
        logits,
        targets,
        torch.tensor([[True, False, True, False, True, False]]),
        p_mask=torch.tensor([0.5, 0.25, 1.0, 1.0, 1.0, 1.0]),  # [S] = [B·L]; unused slots never read
        answer_length=torch.tensor([3, 2, 0, 0, 0, 0]),
        sample_ids=sample_ids,
    )
    ln2, ln43 = math.log(2), math.log(4 / 3)
    terms = [(ln2 + ln43) / 0.5 / 3, ln2 / 0.25 / 2]
    assert unpacked.per_sample is not None
    assert packed.per_sample is not None
    assert unpacked.per_sample.tolist() == pytest.approx(terms, rel=1e-6)
    assert packed.per_sample[:2].tolist() == pytest.approx(terms, rel=1e-6)
    assert packed.per_sample[2:].abs().sum() == 0
    # the batch mean is over the 2 samples present, not over the 6 id slots
    assert packed.loss.item() == pytest.approx(sum(terms) / 2, rel=1e-6)
    assert packed.loss.item() == pytest.approx(unpacked.loss.item(), rel=1e-6)
    assert packed.ce.item() == pytest.approx(unpacked.ce.item(), rel=1e-6)


def test_sample_ids_with_other_normalisations_and_errors() -> None:
    logits = torch.zeros(2, 4)  # CE = ln 4 each
    masked = torch.tensor([[True, False, False, True]])
    ids = torch.tensor([[0, 0, 1, 1]])
    out = MaskedDiffusionLoss.pretraining()(
        logits, torch.tensor([1, 2]), masked, p_mask=torch.tensor([0.5, 0.25, 1, 1]), sample_ids=ids
    )
    assert out.loss.item() == pytest.approx(math.log(4) * (2 + 4) / 4, rel=1e-6)  # Σ CE/p ÷ B·L
    assert out.per_sample is None
    with pytest.raises(ValueError, match="all be"):
        MaskedDiffusionLoss.sft()(
            logits, torch.tensor([1, 2]), masked, p_mask=torch.ones(4), answer_length=torch.ones(3), sample_ids=ids
        )
    with pytest.raises(ValueError, match="sample_ids must be"):
        MaskedDiffusionLoss.sft()(logits, torch.tensor([1, 2]), masked, p_mask=torch.ones(4), sample_ids=ids[:, :3])
