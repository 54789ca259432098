from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dllm_zoo.data import (
    BuildSequence,
    LMBuilder,
    ResumableDataLoader,
    SampleStream,
    TextDiffusionDataModule,
    collate_sequences,
)
from dllm_zoo.tokenizers import ByteTokenizer


def _loader(shards: Path, num_workers: int, batch_size: int = 4) -> ResumableDataLoader:
    stream = SampleStream(shards, transform=BuildSequence(LMBuilder(), ByteTokenizer(), 16), shuffle_buffer=5, seed=7)
    return ResumableDataLoader(stream, batch_size, num_workers=num_workers, collate_fn=collate_sequences)


def _rows(batches: list[dict[str, Any]]) -> list[list[list[int]]]:
    return [b["input_ids"].tolist() for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(shard_dir: Path, num_workers: int) -> None:
    reference = _loader(shard_dir, num_workers)
    epoch0, epoch1 = _rows(list(reference)), _rows(list(reference))
    assert epoch0 != epoch1  # each iter() is a new epoch with its own order
    assert sorted(r for b in epoch0 for r in b) == sorted(r for b in epoch1 for r in b)
    n = len(epoch0)
    for k in (1, 4, n - 1):
        first = _loader(shard_dir, num_workers)
        it = iter(first)
        head = [next(it) for _ in range(k)]
        state = first.state_dict()
        assert state["epoch"] == 0
        assert state["batches"] == k
        resumed = _loader(shard_dir, num_workers)
        resumed.load_state_dict(state)
        assert _rows(head) + _rows(list(resumed)) == epoch0
        assert _rows(list(resumed)) == epoch1  # and the next epoch follows as in the uninterrupted run


def test_resume_twice_within_an_epoch(shard_dir: Path) -> None:
    full = _rows(list(_loader(shard_dir, 2)))
    a = _loader(shard_dir, 2)
    it = iter(a)
    part1 = [next(it) for _ in range(3)]
    b = _loader(shard_dir, 2)
    b.load_state_dict(a.state_dict())
    it = iter(b)
    part2 = [next(it) for _ in range(2)]
    c = _loader(shard_dir, 2)
    c.load_state_dict(b.state_dict())
    assert _rows(part1 + part2) + _rows(list(c)) == full


def test_end_of_epoch_state_starts_the_next_epoch(shard_dir: Path) -> None:
    reference = _loader(shard_dir, 0)
    epoch0 = _rows(list(reference))
    epoch1 = _rows(list(reference))
    first = _loader(shard_dir, 0)
    it = iter(first)
    for _ in range(len(epoch0)):  # consume every batch without hitting StopIteration
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 0)
    resumed = _loader(shard_dir, 0)
    resumed.load_state_dict(state)
    assert _rows(list(resumed)) == epoch1


def test_mark_consumed_reports_the_consumed_position(shard_dir: Path) -> None:
    loader = _loader(shard_dir, 0)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]  # a consumer that fetches one ahead
    loader.mark_consumed()
    loader.mark_consumed()
    state = loader.state_dict()
    assert state["batches"] == 2
    resumed = _loader(shard_dir, 0)
    resumed.load_state_dict(state)
    assert _rows([next(iter(resumed))]) == _rows(batches[2:3])


def test_generic_dataset_and_state_checks(shard_dir: Path) -> None:
    loader = ResumableDataLoader(list(range(10)), batch_size=3)
    it = iter(loader)
    next(it)
    again = ResumableDataLoader(list(range(10)), batch_size=3)
    again.load_state_dict(loader.state_dict())
    assert [b.tolist() for b in again] == [[3, 4, 5], [6, 7, 8], [9]]

    with pytest.raises(ValueError, match="RandomSampler"):
        ResumableDataLoader(list(range(4)), shuffle=True)
    with pytest.raises(ValueError, match="persistent_workers"):
        ResumableDataLoader(list(range(4)), num_workers=1, persistent_workers=True)
    state = _loader(shard_dir, 2).state_dict()
    with pytest.raises(ValueError, match="--data.num_workers 2"):
        _loader(shard_dir, 0).load_state_dict(state)
    with pytest.warns(UserWarning, match=r"saved by 2 rank\(s\) but this run has 1"):  # restarts the epoch
        _loader(shard_dir, 2).load_state_dict({**state, "positions": state["positions"] * 2})


# ------------------------------------------------------------------------------------------ Lightning
class _Recorder(L.LightningModule):
    def __init__(self, use_estimated_steps: bool = False) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[list[int]]] = []
        self.use_estimated_steps = use_estimated_steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].tolist())
        return (self.w**2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.use_estimated_steps:
            _ = self.trainer.estimated_stepping_batches  # requests the train loader before the restore
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    shards: Path, ckpt_dir: Path, num_workers: int, ckpt_path: str | None = None, by_epochs: bool = False
) -> list[list[list[int]]]:
    model = _Recorder(use_estimated_steps=by_epochs)
    limits: dict[str, Any] = {"max_epochs": 2} if by_epochs else {"max_steps": 20}
    trainer = L.Trainer(
        **limits,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)],
    )
    dm = TextDiffusionDataModule(train=str(shards), seq_len=12, batch_size=4, num_workers=num_workers, shuffle_buffer=5)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize(("num_workers", "by_epochs"), [(0, False), (2, False), (0, True)])
def test_lightning_resume_trains_on_exactly_the_remaining_batches(
    shard_dir: Path, tmp_path: Path, num_workers: int, by_epochs: bool
) -> None:
    full = _fit(shard_dir, tmp_path / "ref", num_workers, by_epochs=by_epochs)
    per_epoch = 11 if num_workers == 0 else 12  # 44 samples; with 2 workers each ends on a partial batch
    assert len(full) in (20, 2 * per_epoch)
    for step in (3, per_epoch, per_epoch + 2):  # mid-epoch (Lightning has prefetched a batch), epoch end, epoch 1
        (ckpt,) = (tmp_path / "ref").glob(f"*-step={step}.ckpt")
        resumed = _fit(shard_dir, tmp_path / f"resume{step}", num_workers, ckpt_path=str(ckpt), by_epochs=by_epochs)
        assert full[:step] + resumed == full, f"resume from step {step}"


def test_injected_rank_state_round_trip(shard_dir: Path) -> None:
    def loader() -> ResumableDataLoader:
        stream = SampleStream(
            shard_dir, transform=BuildSequence(LMBuilder(), ByteTokenizer(), 16), rank=1, world_size=2
        )
        return ResumableDataLoader(stream, 3, collate_fn=collate_sequences)

    full = _rows(list(loader()))
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    assert state["positions"][0] is None  # without torch.distributed only the own rank is known
    assert state["positions"][1]["batches"] == 2
    resumed = loader()
    resumed.load_state_dict(state)
    assert _rows(head) + _rows(list(resumed)) == full


def _ddp_rank(rank: int, world: int, init_file: str, shards: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:

        def loader() -> ResumableDataLoader:
            stream = SampleStream(shards, transform=BuildSequence(LMBuilder(), ByteTokenizer(), 16), seed=4)
            return ResumableDataLoader(stream, 3, collate_fn=collate_sequences)

        full = _rows(list(loader()))
        first = loader()
        it = iter(first)
        head = [next(it) for _ in range(2)]
        state = first.state_dict()  # a collective: every rank's position is gathered
        if rank == 0:
            torch.save(state, f"{out}/state.pt")
        torch.distributed.barrier()
        resumed = loader()
        resumed.load_state_dict(torch.load(f"{out}/state.pt"))  # every rank restores rank 0's file, like Lightning
        torch.save({"ok": _rows(head) + _rows(list(resumed)) == full, "n": len(full)}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_state_is_gathered_from_every_rank(shard_dir: Path, tmp_path: Path) -> None:
    torch.multiprocessing.start_processes(
        _ddp_rank,
        args=(2, str(tmp_path / "init"), str(shard_dir), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["ok"] for r in results)
    assert sum(r["n"] for r in results) > 0
    state = torch.load(tmp_path / "state.pt")
    assert all(p is not None for p in state["positions"])
