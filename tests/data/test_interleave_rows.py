"""MMaDA-Parallel's interleaved rows: layout, masks, truncation, condition dropout."""

from __future__ import annotations

import pytest
import torch

from dllm_zoo.data.interleave import (
    BuildInterleaveRow,
    InterleaveSpans,
    collate_interleave_rows,
    drop_conditions,
    interleave_row,
)
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.tokenizers import ByteTokenizer
from dllm_zoo.tokenizers.image import PaletteTokenizer


def test_edit_row_layout_and_masks() -> None:
    tok = ByteTokenizer()
    lay = tok.layout
    spans = InterleaveSpans(text_len=5, num_image_tokens=2)
    row = interleave_row(
        "edit",
        [104, 105],
        [111, 107],
        [lay.image_offset, lay.image_offset + 1],
        [lay.image_offset + 2, lay.image_offset + 3],
        lay,
        spans,
    )
    soi, eoi = lay.token_id("<|soi|>"), lay.token_id("<|eoi|>")
    img = lay.image_offset
    bos, eos = lay.bos_id, lay.eos_id
    assert row["input_ids"].tolist() == [
        lay.token_id("<|interleave|>"),
        soi,
        img,
        img + 1,
        eoi,
        bos,
        104,
        105,
        eos,
        eos,
        soi,
        img + 2,
        img + 3,
        eoi,
        bos,
        111,
        107,
        eos,
        eos,
    ]
    assert spans.length == 19
    assert not row["truncated"]
    assert row["attention_mask"].all()
    assert row["image_mask"].nonzero().squeeze(1).tolist() == [11, 12]
    assert row["text_mask"].nonzero().squeeze(1).tolist() == [15, 16, 17, 18]  # BOS is not a target
    assert (row["prompt_mask"] == ~(row["image_mask"] | row["text_mask"])).all()


def test_generate_row_pads_the_input_image_and_truncation_is_flagged() -> None:
    tok = ByteTokenizer()
    lay = tok.layout
    spans = InterleaveSpans(text_len=4, num_image_tokens=2)
    out = [lay.image_offset] * 2
    row = interleave_row("generate", [1, 2, 3, 4, 5], [6], None, out, lay, spans)
    assert row["input_ids"][0] == lay.token_id("<|t2it|>")
    assert row["input_ids"][spans.input_image].tolist() == [lay.token_id("[iPAD]")] * 2
    assert row["attention_mask"].tolist().count(False) == 2
    assert not row["attention_mask"][spans.input_image].any()
    assert row["input_ids"][spans.input_text].tolist() == [lay.bos_id, 1, 2, lay.eos_id]
    assert row["truncated"]
    with pytest.raises(ValueError, match="needs no input image"):
        interleave_row("generate", [1], [2], out, out, lay, spans)
    with pytest.raises(ValueError, match="needs an input image"):
        interleave_row("edit", [1], [2], None, out, lay, spans)
    with pytest.raises(ValueError, match="num_image_tokens"):
        interleave_row("edit", [1], [2], out[:1], out, lay, spans)
    with pytest.raises(ValueError, match="text_len"):
        InterleaveSpans(text_len=1, num_image_tokens=2)


def test_shapes_rows_and_condition_dropout() -> None:
    task = ShapesWorld(num_train=4, num_val=2)
    sample = task.sample("train", 0)
    tok, image_tok = ByteTokenizer(), PaletteTokenizer()
    edit = BuildInterleaveRow("edit", tok, image_tok, text_len=192, image_size=9)
    gen = BuildInterleaveRow("generate", tok, image_tok, text_len=192, image_size=9)
    spans = edit.spans
    batch = collate_interleave_rows([edit(sample), gen(sample)])
    assert batch["input_ids"].shape == (2, 2 * 81 + 2 * 192 + 5)
    assert batch["task"] == ["edit", "generate"]
    assert int(batch["truncated"]) == 0
    # the edit row's output image is the sample's output image; the generation row draws the input image
    codes = image_tok.encode_indices(torch.tensor([sample["output_image"], sample["image"]]))
    assert (batch["input_ids"][0, spans.output_image] - tok.layout.image_offset == codes[0].flatten()).all()
    assert (batch["input_ids"][1, spans.output_image] - tok.layout.image_offset == codes[1].flatten()).all()
    reasoning = tok.decode(batch["input_ids"][0, spans.output_text].tolist(), skip_special_tokens=True)
    assert reasoning == sample["edit_reasoning"]
    ids, att = drop_conditions(
        batch["input_ids"],
        batch["attention_mask"],
        torch.tensor([True, False]),
        torch.tensor([True, False]),
        tok.layout,
        spans,
    )
    assert ids[0, spans.input_text].tolist() == [tok.layout.bos_id] + [tok.layout.eos_id] * 191
    assert not att[0, spans.input_image].any()
    assert att[0, spans.input_text].all()
    assert torch.equal(ids[1], batch["input_ids"][1])
    assert torch.equal(att[1], batch["attention_mask"][1])
    assert torch.equal(ids[:, spans.prompt_len :], batch["input_ids"][:, spans.prompt_len :])  # output untouched
    # dropping the image of an edit row gives the input part of a generation row (up to the task token)
    both, both_att = drop_conditions(
        batch["input_ids"][:1],
        batch["attention_mask"][:1],
        torch.tensor([False]),
        torch.tensor([True]),
        tok.layout,
        spans,
    )
    assert torch.equal(both[0, 1 : spans.input_text.start], batch["input_ids"][1, 1 : spans.input_text.start])
    assert torch.equal(both_att[0, : spans.prompt_len], batch["attention_mask"][1, : spans.prompt_len])
