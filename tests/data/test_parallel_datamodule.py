"""ParallelDataModule: interleaved edit/generate rows mixed per sample, defaults, val rows, exact resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from dllm_zoo.data import ParallelDataModule, ResumableDataLoader
from dllm_zoo.data.interleave import BuildInterleaveRow, InterleaveSpans
from dllm_zoo.data.parallel import BuildParallelRow, collate_parallel_rows
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.tokenizers import ByteTokenizer, PaletteTokenizer, TokenLayout

INTERLEAVE, T2IT, IPAD = 268, 269, 266  # the `default` layout's ids


def small(tmp_path: Path, **kwargs: object) -> ParallelDataModule:
    args: dict[str, object] = {
        "task": ShapesWorld(num_train=48, num_val=10),
        "batch_size": 4,
        "text_len": 64,
        "shuffle_buffer": 8,
        "cache_dir": str(tmp_path),
    }
    args.update(kwargs)
    dm = ParallelDataModule(**args)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_defaults_fit_shapesworld_without_truncation() -> None:
    dm = ParallelDataModule()
    assert isinstance(dm.task, ShapesWorld)
    assert dm.task.settings() == ShapesWorld().settings()
    assert dm.layout == TokenLayout.preset("default") == ByteTokenizer().layout
    assert isinstance(dm.image_tokenizer, PaletteTokenizer)
    assert dm.tasks == {"edit": 2.0, "generate": 1.0}  # the paper's 100K edit : 50K generation
    assert (dm.text_len, dm.image_size, dm.num_image_tokens) == (192, 9, 81)
    assert dm.spans == InterleaveSpans(192, 81)
    assert dm.seq_len == dm.spans.length == 2 * 81 + 2 * 192 + 5 == 551
    assert dm.task_of("edit") is dm.task
    assert dm.task_of("generate") is dm.task
    assert dm.task_of("t2i") is None
    # every default val sample fits as an edit row (the longest text: edit reasoning, at most 189 bytes)...
    edit = BuildInterleaveRow("edit", dm.tokenizer, dm.image_tokenizer, 192, 9)
    samples = list(ShapesWorld().generate("val"))
    assert sum(edit(s)["truncated"] for s in samples) == 0
    # ...while T = 160 cuts 89 of the 512 reasonings
    short = BuildInterleaveRow("edit", dm.tokenizer, dm.image_tokenizer, 160, 9)
    assert sum(short(s)["truncated"] for s in samples) == 89


def test_batches_mix_both_tasks_in_one_row_length(tmp_path: Path) -> None:
    dm = small(tmp_path)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    assert dm.train_dataloader() is loader
    batches = list(loader)
    assert len(batches) == 12
    length = 2 * 81 + 2 * 64 + 5
    tasks: list[str] = []
    for b in batches:
        assert b["input_ids"].shape == (4, length)
        assert b["data_errors"].item() == 0
        assert b["dropped"].item() == 0
        first = b["input_ids"][:, 0]
        is_edit = torch.tensor([t == "edit" for t in b["task"]])
        assert torch.equal(first == INTERLEAVE, is_edit)
        assert torch.equal(first == T2IT, ~is_edit)
        im = dm.spans.input_image
        # generation rows: no input image ([iPAD], out of attention); edit rows: image codes, attended
        assert (b["input_ids"][~is_edit][:, im] == IPAD).all()
        assert not b["attention_mask"][~is_edit][:, im].any()
        assert (b["input_ids"][is_edit][:, im] >= dm.layout.image_offset).all()
        assert b["attention_mask"][is_edit].all()
        assert torch.equal(b["prompt_mask"], ~(b["image_mask"] | b["text_mask"]))
        assert (b["image_mask"].sum(1) == 81).all()
        assert (b["text_mask"].sum(1) == 63).all()
        tasks += b["task"]
    assert Counter(tasks) == {"edit": 34, "generate": 14}  # pinned: seed 0, keys 0..47
    assert sum(int(b["truncated"]) for b in batches) == 38  # T = 64 cuts most edit reasonings and long r2i prompts


def test_task_draw_is_a_function_of_seed_and_key() -> None:
    tok, img = ByteTokenizer(), PaletteTokenizer()
    builders = {n: BuildInterleaveRow(n, tok, img, 8, 9) for n in ("edit", "generate")}  # type: ignore[arg-type]
    keys = [{"__key__": f"{i:09d}"} for i in range(4000)]
    draw = BuildParallelRow(builders, {"edit": 3.0, "generate": 1.0}, seed=0)
    counts = Counter(draw.task_for(k) for k in keys)
    assert counts["edit"] / 4000 == pytest.approx(0.75, abs=0.02)
    again = BuildParallelRow(builders, {"edit": 3.0, "generate": 1.0}, seed=0)
    assert [draw.task_for(k) for k in keys[:50]] == [again.task_for(k) for k in keys[:50]]
    other = BuildParallelRow(builders, {"edit": 3.0, "generate": 1.0}, seed=1)
    assert [draw.task_for(k) for k in keys[:50]] != [other.task_for(k) for k in keys[:50]]
    only = BuildParallelRow({"edit": builders["edit"]}, {"edit": 1.0})
    assert {only.task_for(k) for k in keys[:20]} == {"edit"}
    with pytest.raises(ValueError, match="one weight per builder"):
        BuildParallelRow(builders, {"edit": 1.0})


def test_validation_rows_are_the_val_split(tmp_path: Path) -> None:
    dm = small(tmp_path, tasks={"edit": 1.0, "generate": 1.0})
    batches = list(dm.val_dataloader())  # type: ignore[arg-type]
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    raw = list(dm.task.generate("val"))  # type: ignore[union-attr]  # what an evaluation callback scores
    rows = torch.cat([b["input_ids"] for b in batches])
    tasks = [t for b in batches for t in b["task"]]
    for i, sample in enumerate(raw):
        name = dm.task_for({**sample, "__key__": f"{i:09d}"})
        assert tasks[i] == name
        want = BuildInterleaveRow(name, dm.tokenizer, dm.image_tokenizer, 64, 9)(sample)  # type: ignore[arg-type]
        assert torch.equal(rows[i], want["input_ids"])
    assert set(tasks) == {"edit", "generate"}


def test_datamodule_state_resumes_exactly(tmp_path: Path) -> None:
    dm = small(tmp_path)
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):
        next(it)
        loader.mark_consumed()
    state = dm.state_dict()
    expected = [next(it) for _ in range(4)]
    dm2 = small(tmp_path)
    dm2.load_state_dict(state)  # before the loader exists: applied when it is created
    got = list(iter(dm2.train_dataloader()))[:4]
    for a, b in zip(expected, got):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert a["task"] == b["task"]


def test_collate_counts_stream_events() -> None:
    tok, img = ByteTokenizer(), PaletteTokenizer()
    sample = next(ShapesWorld(num_train=1, num_val=1).generate("train"))
    row = BuildInterleaveRow("edit", tok, img, 8, 9)(sample)
    batch = collate_parallel_rows([{**row, "__errors__": 2}, {**row, "__dropped__": 1}])
    assert (batch["data_errors"].item(), batch["dropped"].item(), batch["truncated"].item()) == (2, 1, 2)
    assert batch["task"] == ["edit", "edit"]
    assert batch["text_mask"].shape == (2, 2 * 81 + 2 * 8 + 5)


def test_bad_configuration_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data.tasks has unknown"):
        ParallelDataModule(tasks={"t2i": 1.0})
    with pytest.raises(ValueError, match="at least one task"):
        ParallelDataModule(tasks={"edit": 0.0})
    with pytest.raises(ValueError, match="--data.image_size"):
        ParallelDataModule(image_size=0)
    with pytest.raises(ValueError, match="--data.text_len"):
        ParallelDataModule(text_len=1)
    with pytest.raises(ValueError, match="--data.fields"):
        ParallelDataModule(fields={"lm": {}})
    with pytest.raises(TypeError):
        ParallelDataModule(fields={"edit": {"nope_field": "x"}})
