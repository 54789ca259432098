from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from dllm_zoo.data import (
    BuildSequence,
    DataWarning,
    LMBuilder,
    ResumableDataLoader,
    SampleStream,
    collate_sequences,
    write_shards,
)
from dllm_zoo.tokenizers import ByteTokenizer

CORRUPT_GOOD = [*range(0, 11), 12, *range(14, 21)]
CORRUPT_ERRORS = 3


def _ids(stream: Any, num_workers: int = 0) -> list[int]:
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [int(item["i"]) for item in loader]


@pytest.mark.parametrize(("split_by", "num_workers"), [("shards", 0), ("shards", 2), ("samples", 0), ("samples", 2)])
def test_rank_and_worker_split_covers_every_sample_once(shard_dir: Path, split_by: str, num_workers: int) -> None:
    parts = [
        _ids(SampleStream(shard_dir, seed=1, split_by=split_by, rank=r, world_size=2), num_workers)  # type: ignore[arg-type]
        for r in range(2)
    ]
    assert sorted(parts[0] + parts[1]) == list(range(44))  # union: everything, nothing twice
    assert not set(parts[0]) & set(parts[1])  # ranks are disjoint
    assert all(len(p) > 0 for p in parts)


def test_shard_split_is_by_whole_shards(shard_dir: Path) -> None:
    s = SampleStream(shard_dir, shuffle=False, rank=1, world_size=3)
    # unshuffled shard order; rank 1 of 3 gets shards 1 and 4 (9 and 6 samples)
    assert sorted(_ids(s)) == [*range(7, 16), *range(28, 34)]


def test_too_few_shards_for_ranks_times_workers(shard_dir: Path) -> None:
    stream = SampleStream(shard_dir, rank=0, world_size=4, flag="--data.train")
    with pytest.raises(ValueError, match=r"6 shard\(s\) cannot be split over 4 rank\(s\) x 2 worker\(s\) = 8"):
        stream.check_split(2)
    loader = ResumableDataLoader(stream, 4, num_workers=2)
    with pytest.raises(ValueError, match="--data.num_workers"):
        iter(loader)
    SampleStream(shard_dir, rank=0, world_size=4, split_by="samples").check_split(2)  # fine when splitting samples


def test_shuffle_is_deterministic_per_seed_and_epoch(shard_dir: Path) -> None:
    def order(seed: int, epoch: int, buffer: int = 8) -> list[int]:
        s = SampleStream(shard_dir, seed=seed, shuffle_buffer=buffer)
        s.set_epoch(epoch)
        return _ids(s)

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(44))
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    unshuffled = SampleStream(shard_dir, shuffle=False)
    assert _ids(unshuffled) == list(range(44))


def test_corrupt_samples_are_counted_and_warned(corrupt_dir: Path) -> None:
    stream = SampleStream(corrupt_dir, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(stream)
    assert [int(it["i"]) for it in items] == CORRUPT_GOOD
    assert sum(it["__errors__"] for it in items) == CORRUPT_ERRORS
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == CORRUPT_ERRORS  # one warning per error, naming shard and key
    assert sum("b-000000.tar" in m and "'000000011'" in m and "invalid JSON" in m for m in messages) == 1
    assert sum("b-000000.tar" in m and "'000000013'" in m for m in messages) == 1
    assert sum("c-000000.tar" in m and "'000000005'" in m and "unreadable" in m for m in messages) == 1
    # the errors ride on the next good sample: bad 11 -> 12, bad 13 -> 14, truncated shard end -> last item 20
    assert {int(it["i"]): it["__errors__"] for it in items if it["__errors__"]} == {12: 1, 14: 1, 20: 1}


def test_corrupt_counts_reach_the_batch_and_survive_resume(corrupt_dir: Path) -> None:
    def loader() -> ResumableDataLoader:
        stream = SampleStream(corrupt_dir, transform=BuildSequence(LMBuilder(), ByteTokenizer(), 16), seed=3)
        return ResumableDataLoader(stream, 3, collate_fn=collate_sequences)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        full = list(loader())
        assert sum(int(b["data_errors"]) for b in full) == CORRUPT_ERRORS
        assert sum(b["input_ids"].shape[0] for b in full) == len(CORRUPT_GOOD)
        for k in range(len(full)):
            first = loader()
            it = iter(first)
            head = [next(it) for _ in range(k)]
            resumed = loader()
            resumed.load_state_dict(first.state_dict())
            tail = list(resumed)
            assert sum(int(b["data_errors"]) for b in head + tail) == CORRUPT_ERRORS  # never counted twice
            assert [b["input_ids"].tolist() for b in head + tail] == [b["input_ids"].tolist() for b in full]


def test_a_stream_of_only_errors_raises(tmp_path: Path, raw_tar: Callable[..., None]) -> None:
    raw_tar(tmp_path / "bad.tar", [("000000000.json", b"{"), ("000000001.json", b"[1]")])
    stream = SampleStream(tmp_path, shuffle=False)
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(stream)


def test_unopenable_shard_is_an_error_event(tmp_path: Path) -> None:
    write_shards(({"i": i} for i in range(3)), tmp_path)
    stream = SampleStream([str(tmp_path / "shard-000000.tar"), "pipe:exit 3"], shuffle=False, flag="--data.train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(stream)
    assert [it["i"] for it in items] == [0, 1, 2]
    assert sum(it["__errors__"] for it in items) == 1
    assert any("pipe:exit 3" in str(w.message) for w in caught)


def test_hf_dataset_object_and_directory(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"i": i, "text": f"row {i}"} for i in range(23)])
    for source in (ds, str(tmp_path / "hf")):
        if isinstance(source, str):
            ds.save_to_disk(source)
        parts = [_ids(SampleStream(source, seed=2, rank=r, world_size=2), 0) for r in range(2)]
        assert sorted(parts[0] + parts[1]) == list(range(23))
        assert not set(parts[0]) & set(parts[1])
        again = _ids(SampleStream(source, seed=2, rank=0, world_size=2))
        assert again == parts[0]
    assert _ids(SampleStream(ds, shuffle=False)) == list(range(23))
    items = list(SampleStream(ds, shuffle=False))
    assert items[3]["__key__"] == "3"
    assert items[3]["text"] == "row 3"

    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict"):
        SampleStream(str(tmp_path / "dd"))


def test_transform_output_and_bad_source(shard_dir: Path) -> None:
    stream = SampleStream(shard_dir, transform=BuildSequence(LMBuilder(), ByteTokenizer(), 12), shuffle=False)
    first = next(iter(stream))
    assert first["input_ids"].tolist() == [256, *b"sample 0", 257, 257, 257]
    assert first["__next__"] == 1
    assert first["__errors__"] == 0
    assert first["__dropped__"] == 0
    with pytest.raises(TypeError, match="--data.train"):
        SampleStream(torch.zeros(3))


@pytest.mark.parametrize("split_by", ["shards", "samples"])
def test_errors_are_counted_once_across_ranks(corrupt_dir: Path, split_by: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        parts = [list(SampleStream(corrupt_dir, split_by=split_by, rank=r, world_size=3)) for r in range(3)]  # type: ignore[arg-type]
    assert sorted(int(it["i"]) for p in parts for it in p) == CORRUPT_GOOD
    assert sum(it["__errors__"] for p in parts for it in p) == CORRUPT_ERRORS
