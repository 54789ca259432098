"""MMaDA sequence layouts, position by position (research/mmada.md §2.3), on the embedded and the MMaDA layout."""

from __future__ import annotations

import pytest
import torch

from dllm_zoo.data.multimodal import (
    BuildTaskRow,
    MMUBuilder,
    R2IBuilder,
    T2IBuilder,
    load_image_codes,
    row_length,
    t2i_prefix,
    unconditional_t2i_prefix,
)
from dllm_zoo.data.stream import SampleDropped
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.tokenizers import ByteTokenizer, PaletteTokenizer, TokenLayout
from dllm_zoo.tokenizers.text import TextTokenizer

TOK = ByteTokenizer()
LAY = TOK.layout
SOI, EOI, T2I, MMU, R2I, IPAD = (
    LAY.token_id(t) for t in ("<|soi|>", "<|eoi|>", "<|t2i|>", "<|mmu|>", "<|r2i|>", "[iPAD]")
)
SH, EH, EOT = (LAY.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
BOS, EOS = LAY.bos_id, LAY.eos_id
CODES = torch.tensor([[3, 0], [1, 2]])
IMG = [LAY.image_offset + c for c in (3, 0, 1, 2)]  # raster order


def enc(text: str) -> list[int]:
    return list(text.encode())


def chat(user: str, assistant: str) -> list[int]:
    """LLaMA-3 chat rendering: BOS, user turn, assistant turn (each ending in <|eot_id|>)."""
    return [
        BOS,
        SH,
        *enc("user"),
        EH,
        *enc("\n"),
        *enc(user),
        EOT,
        SH,
        *enc("assistant"),
        EH,
        *enc("\n"),
        *enc(assistant),
        EOT,
    ]


def test_t2i_layout_position_by_position() -> None:
    t = 8
    row = T2IBuilder()({"caption": "ab"}, TOK, CODES, t, 4)
    expected = [IPAD, IPAD, IPAD, IPAD, T2I, BOS, 97, 98, EOS, SOI, *IMG, EOI]
    assert row["input_ids"].tolist() == expected
    assert len(expected) == row_length(t, 4) == t + 4 + 3
    assert row["attention_mask"].tolist() == [False] * 4 + [True] * 11
    # prompt: the whole text part, <|soi|> and <|eoi|>; targets: the image codes only (no identity labels on soi/eoi)
    assert row["prompt_mask"].tolist() == [True] * 10 + [False] * 4 + [True]
    assert row["image_mask"].tolist() == [False] * 10 + [True] * 4 + [False]
    assert not row["truncated"]


def test_t2i_truncation_keeps_t_tokens_and_a_final_eos() -> None:
    ids, pads, truncated = t2i_prefix(enc("abcdefghij"), LAY, 5)
    assert ids == [T2I, BOS, 97, 98, 99, EOS]
    assert pads == 0
    assert truncated


def test_unconditional_prefix_has_the_conditional_length_for_any_text_length() -> None:
    for t in (3, 8, 64, 128):
        ids, pads = unconditional_t2i_prefix(LAY, t)
        assert len(ids) == t + 1
        assert ids[-3:] == [T2I, BOS, EOS]
        assert ids[:-3] == [IPAD] * (t - 2)
        assert pads == t - 2


def test_mmu_layout_position_by_position() -> None:
    t = 48
    row = MMUBuilder(prompt_field="question", response_field="cot")({"question": "q?", "cot": "ab"}, TOK, CODES, t, 4)
    text = chat("q?", "ab")
    expected = [MMU, SOI, *IMG, EOI, *text, *[EOS] * (t - len(text))]
    assert row["input_ids"].tolist() == expected
    assert len(expected) == t + 4 + 3
    # prompt: image part + chat up to and including the last <|end_header_id|>; the rest (answer, EOS pad) is target
    last_eh = len(expected) - 1 - expected[::-1].index(EH)
    assert row["prompt_mask"].tolist() == [i <= last_eh for i in range(len(expected))]
    assert row["attention_mask"].all()
    assert not row["image_mask"].any()
    assert EOT in row["input_ids"].tolist()
    assert b"<eot_id>" not in bytes(c for c in row["input_ids"].tolist() if c < 256)


def test_r2i_layout_position_by_position() -> None:
    t = 48
    row = R2IBuilder()({"prompt": "draw", "response": "<think>x</think>"}, TOK, CODES, t, 4)
    text = chat("draw", "<think>x</think>")
    expected = [R2I, *text, *[EOS] * (t - len(text)), SOI, *IMG, EOI]
    assert row["input_ids"].tolist() == expected
    last_eh = expected.index(EH, expected.index(EH) + 1)
    prompt = [i <= last_eh for i in range(len(expected))]
    prompt[t + 1] = prompt[-1] = True  # <|soi|>, <|eoi|>
    assert row["prompt_mask"].tolist() == prompt
    assert row["image_mask"].tolist() == [False] * (t + 2) + [True] * 4 + [False]


def test_rows_of_every_task_have_one_length() -> None:
    task = ShapesWorld(num_train=4, num_val=2)
    sample = next(task.generate("train"))
    lengths = set()
    for _fmt, builder in [
        ("t2i", T2IBuilder()),
        ("mmu", MMUBuilder(prompt_field="question", response_field="cot")),
        ("r2i", R2IBuilder(prompt_field="r2i_prompt", response_field="r2i_reasoning")),
    ]:
        row = BuildTaskRow(builder, TOK, PaletteTokenizer(), 224, 9)(dict(sample))
        lengths.add(row["input_ids"].numel())
    assert lengths == {224 + 81 + 3}


def test_mmada_layout_ids() -> None:
    """On the real MMaDA layout: image codes at 126349 + k, task tokens at their reserved ids."""

    class Fake(TextTokenizer):
        layout = TokenLayout.preset("mmada")

        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

        def decode(self, ids: object, skip_special_tokens: bool = False) -> str:
            return ""

    row = T2IBuilder()({"caption": "a"}, Fake(), torch.tensor([0, 8191]), 4, 2)
    assert row["input_ids"].tolist() == [126093, 126088, 126080, 97, 126081, 126084, 126349, 134540, 126085]


def test_bad_input_is_refused_with_the_flag_to_fix() -> None:
    with pytest.raises(ValueError, match="image_size"):
        T2IBuilder()({"caption": "a"}, TOK, CODES, 8, 9)
    with pytest.raises(ValueError, match="image_codebook_size"):
        T2IBuilder()({"caption": "a"}, TOK, torch.tensor([0, 1, 2, 99]), 8, 4)
    with pytest.raises(KeyError, match="caption"):
        T2IBuilder()({"text": "a"}, TOK, CODES, 8, 4)
    with pytest.raises(SampleDropped):
        MMUBuilder()({"prompt": "x" * 40, "response": "y"}, TOK, CODES, 20, 4)
    with pytest.raises(ValueError, match="--data.image_size"):
        load_image_codes({"image": [[0] * 4] * 4}, PaletteTokenizer(), "image", 9)


def test_image_forms_give_the_same_codes() -> None:
    grid = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    pal = PaletteTokenizer()
    from_grid = load_image_codes({"image": grid}, pal, "image", 3)
    assert from_grid.tolist() == grid
    assert load_image_codes({"image": grid, "image_codes": [9] * 9}, pal, "image", 3).tolist() == [9] * 9
    import io

    from PIL import Image

    rgb = (pal.render(torch.tensor([grid]))[0].permute(1, 2, 0) * 255).round().byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    assert load_image_codes({"image": buf.getvalue()}, pal, "image", 3).tolist() == grid
    with pytest.raises(ValueError, match="cannot be decoded"):
        load_image_codes({"image": b"not a png"}, pal, "image", 3)


def test_palette_grids_go_through_any_image_tokenizer() -> None:
    from dllm_zoo.tokenizers import MagvitV2Tokenizer

    torch.manual_seed(0)
    magvit = MagvitV2Tokenizer(
        base_channels=8,
        ch_mult=(1, 2),
        num_res_blocks=(1, 1),
        decoder_ch_mult=(1, 2),
        decoder_num_res_blocks=(1, 1),
        num_groups=4,
        bits=4,
    )
    grid = [[0, 1, 2, 3]] * 4
    codes = load_image_codes({"image": grid}, magvit, "image", 4)
    assert codes.shape == (2, 2)
    assert int(codes.max()) < 16
    rgb = PaletteTokenizer().render(torch.tensor([grid]))
    assert torch.equal(codes, magvit.encode(rgb)[0])
