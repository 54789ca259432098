from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dllm_zoo.data import Arithmetic, ResumableDataLoader, TextDiffusionDataModule
from dllm_zoo.tokenizers import ByteTokenizer, TokenLayout


def test_synthetic_default_batches(tmp_path: Path) -> None:
    dm = TextDiffusionDataModule(task=Arithmetic(num_train=64, num_val=12), batch_size=8, cache_dir=str(tmp_path))
    assert dm.layout == ByteTokenizer().layout == TokenLayout.preset("default")
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    assert dm.train_dataloader() is loader
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (8, 64)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].all()
    assert not batch["prompt_mask"].any()
    assert (batch["input_ids"][:, 0] == 256).all()  # BOS
    assert batch["truncated"].item() == 0
    assert batch["data_errors"].item() == 0
    assert batch["dropped"].item() == 0
    assert len(batch["answer"]) == 8
    val = list(dm.val_dataloader())  # type: ignore[arg-type]
    assert [b["input_ids"].shape[0] for b in val] == [8, 4]
    assert [a for b in val for a in b["answer"]] == [
        s["answer"] for s in Arithmetic(num_train=64, num_val=12).generate("val")
    ]


def test_default_task_is_arithmetic() -> None:
    dm = TextDiffusionDataModule()
    assert isinstance(dm.task, Arithmetic)
    assert dm.task.settings() == Arithmetic().settings()
    assert TextDiffusionDataModule(train="x").task is None


def test_lm_chat_format_marks_the_prompt(tmp_path: Path) -> None:
    dm = TextDiffusionDataModule(
        task=Arithmetic(num_train=16, num_val=4), format="lm_chat", seq_len=96, batch_size=4, cache_dir=str(tmp_path)
    )
    dm.prepare_data()
    batch = next(iter(dm.val_dataloader()))  # type: ignore[call-overload]
    n_prompt = batch["prompt_mask"].sum(dim=1)
    assert (n_prompt > 20).all()
    assert (n_prompt < 40).all()
    eh = dm.layout.token_id("<|end_header_id|>")
    rows = torch.arange(4)
    assert (batch["input_ids"][rows, n_prompt - 1] == eh).all()  # the boundary is the last <|end_header_id|>


def test_missing_paths_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--data\.train"):
        TextDiffusionDataModule(train=str(tmp_path / "train-{000000..000003}.tar")).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"--data\.val"):
        TextDiffusionDataModule(
            task=Arithmetic(num_train=8, num_val=2), val=str(tmp_path / "nope"), cache_dir=str(tmp_path)
        ).prepare_data()
    TextDiffusionDataModule(train="https://example.com/shard-{0..3}.tar").prepare_data()  # remote: not checked


def test_hf_dataset_as_train_without_val() -> None:
    import datasets

    rows = [{"prompt": f"{i}+1=?", "response": str(i + 1)} for i in range(10)]
    dm = TextDiffusionDataModule(train=datasets.Dataset.from_list(rows), format="lm_chat", seq_len=48, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.val_dataloader() == []
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert "answer" not in batches[0]


def test_cli_help_shows_the_arguments() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDiffusionDataModule, "data")
    text = parser.format_help()
    for flag in ("--data.train", "--data.seq_len", "--data.format", "--data.task", "--data.tokenizer"):
        assert flag in text
    assert "Row length" in text
    assert "save_to_disk" in text
    cfg = parser.parse_args(["--data.train", "/data/s-{0..9}.tar", "--data.seq_len", "128", "--data.format", "lm_chat"])
    assert cfg.data.seq_len == 128
    assert cfg.data.format == "lm_chat"
