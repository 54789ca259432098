"""Pretraining on packed rows: samples never attend to each other and restart their positions."""

from __future__ import annotations

import torch

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.backbones.attention import packed_mask
from dllm_zoo.stages import MaskedDiffusionPretraining


def test_packed_row_equals_its_samples_run_alone() -> None:
    torch.manual_seed(0)
    model = LLaDABackbone("tiny").eval()
    a, b = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 7))
    row = torch.cat([a, b, torch.full((1, 4), 257)], dim=1)
    segments = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 4])
    positions = torch.tensor([list(range(5)) + list(range(7)) + [0] * 4])
    real = segments >= 0
    with torch.no_grad():
        packed = model(row, attention_mask=packed_mask(segments, real), position_ids=positions).logits
        alone_a, alone_b = model(a).logits, model(b).logits
    torch.testing.assert_close(packed[:, :5], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 5:12], alone_b, atol=1e-5, rtol=0)


def test_pretraining_stage_loss_on_a_packed_batch_is_per_sample() -> None:
    torch.manual_seed(0)
    stage = MaskedDiffusionPretraining(backbone=LLaDABackbone("tiny"))
    ids = torch.randint(0, 256, (2, 12))
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(2, 12, dtype=torch.bool),
        "prompt_mask": torch.zeros(2, 12, dtype=torch.bool),
        "segment_ids": segments,
        "position_ids": positions,
    }
    noised = stage.corrupt(batch, stage.schedule, torch.Generator().manual_seed(1))
    # one t per packed sample: ids 0, 1 (row 0) and 12 (row 1) hold the three samples' times
    assert noised.t.shape == (24,)
    out = stage.forward_loss(batch, 0)
    assert torch.isfinite(out.loss)
    lengths, sample_ids = stage.answer_lengths(batch)
    assert sample_ids is not None
    assert lengths[[0, 1, 12]].tolist() == [5, 7, 12]
