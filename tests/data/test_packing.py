from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dllm_zoo.data import (
    Arithmetic,
    BuildSequence,
    LMBuilder,
    PackSequences,
    ResumableDataLoader,
    SampleStream,
    TextDiffusionDataModule,
    collate_sequences,
    packed_sample_ids,
)
from dllm_zoo.data.stream import DROPPED_KEY, ERRORS_KEY, NEXT_KEY
from dllm_zoo.tokenizers import ByteTokenizer

EOS = ByteTokenizer().layout.eos_id


def item(ids: list[int], prompt: int = 0, truncated: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "input_ids": torch.tensor(ids),
        "prompt_mask": torch.arange(len(ids)) < prompt,
        "truncated": truncated,
        **extra,
    }


def test_first_fit_within_a_batch_and_row_fields() -> None:
    items = [
        item([1, 2, 3, 4], prompt=2, answer="a", **{NEXT_KEY: 1, ERRORS_KEY: 1}),
        item([5, 6, 7], answer="b", **{NEXT_KEY: 2}),
        item([8, 9], answer="c", **{NEXT_KEY: 3, DROPPED_KEY: 2}),  # fits back into row 0 (first fit)
        item([10, 11, 12, 13, 14, 15], truncated=True, answer="d", **{NEXT_KEY: 4}),  # fits nowhere: next batch
        item([16], answer="e", **{NEXT_KEY: 9}),
    ]
    rows = list(PackSequences(6, rows_per_batch=2, pad_id=0)(iter(items)))
    assert [r["input_ids"].tolist() for r in rows] == [
        [1, 2, 3, 4, 8, 9],
        [5, 6, 7, 0, 0, 0],
        [10, 11, 12, 13, 14, 15],
        [16, 0, 0, 0, 0, 0],
    ]
    assert [r["segment_ids"].tolist() for r in rows] == [
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, -1, -1, -1],
        [0, 0, 0, 0, 0, 0],
        [0, -1, -1, -1, -1, -1],
    ]
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 3, 0, 1]
    assert rows[1]["position_ids"].tolist() == [0, 1, 2, 0, 0, 0]
    assert rows[0]["prompt_mask"].tolist() == [True, True, False, False, False, False]
    assert rows[1]["attention_mask"].tolist() == [True, True, True, False, False, False]
    assert [r["answers"] for r in rows] == [["a", "c"], ["b"], ["d"], ["e"]]
    assert [r["truncated"] for r in rows] == [0, 0, 1, 0]
    assert [r[ERRORS_KEY] for r in rows] == [1, 0, 0, 0]
    assert [r[DROPPED_KEY] for r in rows] == [2, 0, 0, 0]
    # each batch resumes after its last sample: batch 0 ends with sample 2 (next = 3), batch 1 at the end (9)
    assert [r[NEXT_KEY] for r in rows] == [3, 3, 9, 9]

    batch = collate_sequences(rows[:2])
    assert batch["segment_ids"].shape == batch["position_ids"].shape == (2, 6)
    assert batch["answers"] == [["a", "c"], ["b"]]
    assert "answer" not in batch
    assert int(batch["data_errors"]) == 1
    assert int(batch["dropped"]) == 2
    assert packed_sample_ids(batch["segment_ids"]).tolist() == [[0, 0, 0, 0, 1, 1], [6, 6, 6, -1, -1, -1]]


def test_packer_refuses_samples_longer_than_the_row() -> None:
    with pytest.raises(ValueError, match="rows hold 3"):
        list(PackSequences(3, 1, 0)(iter([item([1, 2, 3, 4])])))


def _dm(shards: Path, pack: bool, seq_len: int = 32, **kw: Any) -> TextDiffusionDataModule:
    return TextDiffusionDataModule(train=str(shards), seq_len=seq_len, batch_size=3, shuffle_buffer=5, pack=pack, **kw)


def test_packed_rows_reproduce_the_unpacked_samples(shard_dir: Path) -> None:
    plain = list(_dm(shard_dir, pack=False).train_dataloader())
    packed = list(_dm(shard_dir, pack=True).train_dataloader())
    assert "segment_ids" not in plain[0]
    assert "position_ids" not in plain[0]
    unpacked: dict[str, tuple[list[int], list[bool]]] = {}
    order = []
    for b in plain:
        for row, ids, prompt in zip(b["answer"], b["input_ids"], b["prompt_mask"]):
            n = int((ids != EOS).sum()) + 1  # "sample i" has no EOS inside: tokens up to the first EOS
            assert (ids[n:] == EOS).all()
            unpacked[row] = (ids[:n].tolist(), prompt[:n].tolist())
            order.append(row)
    seen = []
    for b in packed:
        assert b["input_ids"].shape == (b["input_ids"].shape[0], 32)
        batch_samples = []
        for r in range(b["input_ids"].shape[0]):
            seg, pos, ids = b["segment_ids"][r], b["position_ids"][r], b["input_ids"][r]
            assert b["attention_mask"][r].tolist() == (seg >= 0).tolist()
            for k, answer in enumerate(b["answers"][r]):
                where = seg == k
                idx = where.nonzero().flatten()
                assert idx.tolist() == list(range(int(idx[0]), int(idx[-1]) + 1))  # contiguous
                assert pos[where].tolist() == list(range(len(idx)))  # positions restart at 0
                assert (ids[where].tolist(), b["prompt_mask"][r][where].tolist()) == unpacked[answer]
                batch_samples.append(answer)
        # a packed batch is a contiguous run of the stream (first fit only reorders it within the batch)
        start = len(seen)
        assert sorted(batch_samples) == sorted(order[start : start + len(batch_samples)])
        seen += batch_samples
    assert len(seen) == len(order) == 44  # nothing dropped
    assert len(packed) < len(plain)


def test_truncation_is_counted_per_sample(tmp_path: Path) -> None:
    from dllm_zoo.data import write_shards

    write_shards(
        ({"text": "x" * (30 if i % 3 == 0 else 3), "answer": str(i)} for i in range(9)), tmp_path / "s", prefix="a"
    )
    plain = list(TextDiffusionDataModule(train=str(tmp_path / "s"), seq_len=12, batch_size=3).train_dataloader())
    packed = list(
        TextDiffusionDataModule(train=str(tmp_path / "s"), seq_len=12, batch_size=3, pack=True).train_dataloader()
    )
    assert sum(int(b["truncated"]) for b in plain) == sum(int(b["truncated"]) for b in packed) == 3
    assert sum(len(a) for b in packed for a in b["answers"]) == 9
    alone = [r for b in packed for r in b["segment_ids"] if (r == 0).all()]
    assert len(alone) == 3  # each truncated sample fills its row alone


def _loader(shards: Path, num_workers: int, batch_size: int = 3, seq_len: int = 30) -> ResumableDataLoader:
    stream = SampleStream(
        shards,
        transform=BuildSequence(LMBuilder(), ByteTokenizer(), seq_len, pad=False),
        shuffle_buffer=5,
        seed=7,
        pack=PackSequences(seq_len, batch_size, EOS),
    )
    return ResumableDataLoader(stream, batch_size, num_workers=num_workers, collate_fn=collate_sequences)


def _rows(batches: list[dict[str, Any]]) -> list[list[list[int]]]:
    return [b["input_ids"].tolist() + b["segment_ids"].tolist() for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_packed_resume_continues_exactly(shard_dir: Path, num_workers: int) -> None:
    reference = _loader(shard_dir, num_workers)
    epoch0, epoch1 = _rows(list(reference)), _rows(list(reference))
    n = len(epoch0)
    for k in (1, 3, n - 1):
        first = _loader(shard_dir, num_workers)
        it = iter(first)
        head = [next(it) for _ in range(k)]
        resumed = _loader(shard_dir, num_workers)
        resumed.load_state_dict(first.state_dict())
        assert _rows(head) + _rows(list(resumed)) == epoch0, k
        assert _rows(list(resumed)) == epoch1


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[Any] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append((batch["input_ids"].tolist(), batch["segment_ids"].tolist(), batch["answers"]))
        return (self.w**2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(ckpt_dir: Path, cache: Path, ckpt_path: str | None = None) -> list[Any]:
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)],
    )
    task = Arithmetic(num_train=24, num_val=4, seed=2)
    dm = TextDiffusionDataModule(
        task=task, format="lm_chat", seq_len=256, batch_size=2, cache_dir=str(cache), pack=True
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_lightning_resume_with_packing_is_exact(tmp_path: Path) -> None:
    full = _fit(tmp_path / "ref", tmp_path / "cache")
    assert len(full) == 10
    per_epoch = sum(1 for _ in _dm_epoch(tmp_path / "cache"))
    for step in (2, per_epoch, per_epoch + 1):  # mid-epoch, epoch end, into the next epoch
        (ckpt,) = (tmp_path / "ref").glob(f"*-step={step}.ckpt")
        resumed = _fit(tmp_path / f"resume{step}", tmp_path / "cache", ckpt_path=str(ckpt))
        assert full[:step] + resumed == full, step


def _dm_epoch(cache: Path) -> list[dict[str, Any]]:
    task = Arithmetic(num_train=24, num_val=4, seed=2)
    dm = TextDiffusionDataModule(
        task=task, format="lm_chat", seq_len=256, batch_size=2, cache_dir=str(cache), pack=True
    )
    return list(dm.train_dataloader())


def test_packed_validation_batches(tmp_path: Path) -> None:
    task = Arithmetic(num_train=8, num_val=10, seed=2)
    dm = TextDiffusionDataModule(
        task=task, format="lm_chat", seq_len=160, batch_size=2, cache_dir=str(tmp_path), pack=True
    )
    dm.prepare_data()
    val = list(dm.val_dataloader())  # type: ignore[arg-type]
    answers = [a for b in val for row in b["answers"] for a in row]
    assert sorted(answers) == sorted(s["answer"] for s in task.generate("val"))
    assert max(len(row) for b in val for row in b["answers"]) > 1  # rows really hold several samples
