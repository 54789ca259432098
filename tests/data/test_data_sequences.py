from __future__ import annotations

import pytest
import torch

from dllm_zoo.data import LMBuilder, LMChatBuilder, SampleDropped, collate_sequences, make_builder
from dllm_zoo.tokenizers import ByteTokenizer

BOS, EOS, EOT, SH, EH = 256, 257, 259, 260, 261  # the default byte layout
IM_START, IM_END, QWEN_EOS = 151644, 151645, 151643  # the sdar (ChatML) layout


def test_lm_row_exact_ids() -> None:
    row = LMBuilder()({"text": "2+3=?", "__key__": "k"}, ByteTokenizer(), 10)
    assert row["input_ids"].tolist() == [BOS, 50, 43, 51, 61, 63, EOS, EOS, EOS, EOS]
    assert row["input_ids"].dtype == torch.long
    assert row["attention_mask"].dtype == torch.bool
    assert row["attention_mask"].all()
    assert row["prompt_mask"].dtype == torch.bool
    assert not row["prompt_mask"].any()
    assert row["truncated"] is False
    assert "answer" not in row


def test_lm_row_from_prompt_and_response_and_truncation() -> None:
    row = LMBuilder()({"prompt": "1+1=?", "response": "2", "answer": "2"}, ByteTokenizer(), 9)
    assert row["input_ids"].tolist() == [BOS, *b"1+1=? 2", EOS]
    assert row["answer"] == "2"
    cut = LMBuilder()({"text": "abcdefghij"}, ByteTokenizer(), 6)
    assert cut["input_ids"].tolist() == [BOS, *b"abcd", EOS]  # a final EOS is kept
    assert cut["truncated"] is True


def test_lm_chat_row_exact_ids_and_prompt_boundary() -> None:
    row = LMChatBuilder()({"prompt": "1+1", "response": "2"}, ByteTokenizer(), 32)
    prompt = [BOS, SH, *b"user", EH, 10, *b"1+1", EOT, SH, *b"assistant", EH]
    answer = [10, *b"2", EOT, EOS]  # the real <|eot_id|> token, then EOS
    assert row["input_ids"].tolist() == prompt + answer + [EOS] * (32 - len(prompt) - len(answer))
    assert len(prompt) == 23
    assert row["prompt_mask"].tolist() == [True] * 23 + [False] * 9  # through the last <|end_header_id|>
    assert row["input_ids"][22].item() == EH
    assert row["attention_mask"].all()
    assert row["truncated"] is False


def test_lm_chat_boundary_ignores_headers_inside_the_response() -> None:
    row = LMChatBuilder()({"prompt": "q", "response": "a<|end_header_id|>b"}, ByteTokenizer(), 40)
    assert int(row["prompt_mask"].sum()) == 21  # not moved to the header string in the response


def test_lm_chat_chatml_layout() -> None:
    tok = ByteTokenizer("sdar")
    row = LMChatBuilder()({"prompt": "1+1", "response": "2"}, tok, 30)
    prompt = [IM_START, *b"user\n1+1", IM_END, 10, IM_START, *b"assistant\n"]
    answer = [*b"2", IM_END, 10, QWEN_EOS]
    assert row["input_ids"].tolist() == prompt + answer + [QWEN_EOS] * (30 - len(prompt) - len(answer))
    assert int(row["prompt_mask"].sum()) == len(prompt) == 22


def test_lm_chat_truncation_and_drop() -> None:
    sample = {"prompt": "1+1", "response": "2", "__key__": "000000007"}
    cut = LMChatBuilder()(sample, ByteTokenizer(), 25)  # prompt 23 + one response token + EOS
    assert cut["truncated"] is True
    assert cut["input_ids"].tolist()[23:] == [10, EOS]
    assert int(cut["prompt_mask"].sum()) == 23
    with pytest.raises(SampleDropped, match="prompt is 23 tokens; seq_len=24"):
        LMChatBuilder()(sample, ByteTokenizer(), 24)


def test_missing_field_names_field_and_key() -> None:
    with pytest.raises(KeyError, match=r"sample '000000042'.*no field 'question'"):
        LMChatBuilder(prompt_field="question")(
            {"prompt": "x", "response": "y", "__key__": "000000042"}, ByteTokenizer(), 8
        )
    with pytest.raises(KeyError, match="'prompt'"):
        LMBuilder()({"body": "x"}, ByteTokenizer(), 8)
    assert make_builder("lm_chat", prompt_field="q").prompt_field == "q"
    with pytest.raises(ValueError, match="--data.format"):
        make_builder("t2i")  # type: ignore[arg-type]


def test_collate_stacks_and_counts() -> None:
    tok = ByteTokenizer()
    rows = [
        {**LMBuilder()({"text": "abc", "answer": "1"}, tok, 8), "__errors__": 2, "__dropped__": 0},
        {**LMBuilder()({"text": "abcdefghijk", "answer": "2"}, tok, 8), "__errors__": 0, "__dropped__": 1},
        {**LMBuilder()({"text": "z", "answer": "3"}, tok, 8), "__errors__": 1, "__dropped__": 0},
    ]
    batch = collate_sequences(rows)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (3, 8)
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["prompt_mask"].shape == (3, 8)
    assert batch["prompt_mask"].dtype == torch.bool
    assert batch["data_errors"].item() == 3
    assert batch["data_errors"].dtype == torch.long
    assert batch["dropped"].item() == 1
    assert batch["truncated"].item() == 1
    assert batch["data_errors"].shape == ()
    assert batch["answer"] == ["1", "2", "3"]
    plain = collate_sequences([LMBuilder()({"text": "a"}, tok, 4)])
    assert "answer" not in plain
    assert plain["data_errors"].item() == 0
