"""MultiTaskDataModule: per-task batch sizes, max_size_cycle, per-source probabilities, exact resume."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from dllm_zoo.data import DataSource, MultiTaskDataModule, SourceMixture, TaskData
from dllm_zoo.data.synthetic import Arithmetic, ShapesWorld


def shapes(n: int = 48, seed: int = 0) -> ShapesWorld:
    return ShapesWorld(num_train=n, num_val=8, seed=seed)


def small_dm(tmp_path: Path, **overrides: object) -> MultiTaskDataModule:
    tasks = {
        "t2i": TaskData("t2i", 4, [DataSource(task=shapes())]),
        "lm": TaskData("lm_chat", 2, [DataSource(task=Arithmetic(num_train=64, num_val=8))]),
        "mmu": TaskData("mmu", 3, [DataSource(task=shapes())]),
    }
    kwargs: dict = {"tasks": tasks, "text_len": 128, "cache_dir": str(tmp_path), "shuffle_buffer": 16}
    kwargs.update(overrides)
    dm = MultiTaskDataModule(**kwargs)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_combined_batches_have_each_task_at_its_batch_size_and_one_row_length(tmp_path: Path) -> None:
    dm = small_dm(tmp_path)
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {"t2i", "lm", "mmu"}
    assert {k: tuple(b["input_ids"].shape) for k, b in batch.items()} == {
        "t2i": (4, 212),
        "lm": (2, 212),
        "mmu": (3, 212),
    }
    assert dm.seq_len == 212
    assert dm.num_image_tokens == 81
    assert batch["t2i"]["image_mask"].sum(1).tolist() == [81] * 4
    assert not batch["lm"]["image_mask"].any()
    assert not batch["mmu"]["image_mask"].any()
    lay = dm.layout
    assert (batch["mmu"]["input_ids"][:, 0] == lay.token_id("<|mmu|>")).all()


def test_max_size_cycle_restarts_the_shorter_task(tmp_path: Path) -> None:
    tasks = {
        "long": TaskData("t2i", 4, [DataSource(task=shapes(48))]),  # 12 batches
        "short": TaskData("mmu", 4, [DataSource(task=shapes(16, seed=1))]),  # 4 batches, cycled 3 times
    }
    dm = small_dm(tmp_path, tasks=tasks)
    loader = dm.train_dataloader()
    steps = list(loader)
    assert len(steps) == 12
    short = [tuple(map(tuple, b["short"]["input_ids"].tolist())) for b, _, _ in steps]
    cycles = [sorted(row for batch in short[i : i + 4] for row in batch) for i in (0, 4, 8)]
    assert cycles[0] == cycles[1] == cycles[2]  # each cycle is one full pass over the short task's 16 samples
    assert short[0:4] != short[4:8]  # reshuffled for its next epoch
    min_dm = small_dm(tmp_path, tasks=tasks, mode="min_size")
    assert len(list(min_dm.train_dataloader())) == 4


def test_source_mixture_draws_sources_in_proportion_and_resumes_exactly(tmp_path: Path) -> None:
    a, b = Arithmetic(num_train=64, num_val=8, seed=1), Arithmetic(num_train=64, num_val=8, seed=2)
    tasks = {"lm": TaskData("lm_chat", 2, [DataSource(task=a, weight=3.0), DataSource(task=b, weight=1.0)])}
    dm = small_dm(tmp_path, tasks=tasks)
    mixture = dm.train_loaders()["lm"]
    assert isinstance(mixture, SourceMixture)
    choices = [mixture.choice(i) for i in range(4000)]
    assert abs(choices.count(0) / 4000 - 0.75) < 0.03
    it = iter(mixture)
    for _ in range(5):
        next(it)
        mixture.mark_consumed()
    state = mixture.state_dict()
    expected = [next(it)["input_ids"] for _ in range(40)]  # runs through both sources' epoch ends
    dm2 = small_dm(tmp_path, tasks=tasks)
    again = dm2.train_loaders()["lm"]
    again.load_state_dict(state)
    got = list(itertools.islice(iter(again), 40))
    assert all(torch.equal(x, y["input_ids"]) for x, y in zip(expected, got))


def test_datamodule_state_round_trip(tmp_path: Path) -> None:
    dm = small_dm(tmp_path)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
        for loader in dm.train_loaders().values():
            loader.mark_consumed()
    state = dm.state_dict()
    nxt = next(it)[0]
    dm2 = small_dm(tmp_path)
    dm2.load_state_dict(state)
    got = next(iter(dm2.train_dataloader()))[0]
    assert all(torch.equal(nxt[k]["input_ids"], got[k]["input_ids"]) for k in nxt)
    dm3 = small_dm(tmp_path, tasks={"t2i": TaskData("t2i", 4, [DataSource(task=shapes())])})
    dm3.load_state_dict(state)
    with pytest.raises(ValueError, match="same tasks"):
        dm3.train_loaders()


def test_validation_combines_every_task(tmp_path: Path) -> None:
    dm = small_dm(tmp_path)
    batches = [b for b, _, _ in dm.val_dataloader()]
    assert batches
    assert set(batches[0]) == {"t2i", "lm", "mmu"}


def test_bad_configuration_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data.tasks.x.format"):
        MultiTaskDataModule(tasks={"x": TaskData("nope", 2, [DataSource(task=shapes())])})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sources is empty"):
        MultiTaskDataModule(tasks={"x": TaskData("t2i", 2, [])})
    with pytest.raises(ValueError, match="image_size"):
        MultiTaskDataModule(image_size=0)
    with pytest.raises(ValueError, match="weight"):
        SourceMixture([object(), object()], [1.0, 0.0])  # type: ignore[list-item]
    from dllm_zoo.tokenizers import ByteTokenizer, TokenLayout

    text_only = ByteTokenizer(TokenLayout.preset("default").replace(image_offset=None, image_codebook_size=0))
    with pytest.raises(ValueError, match="no image segment"):
        MultiTaskDataModule(tokenizer=text_only)
