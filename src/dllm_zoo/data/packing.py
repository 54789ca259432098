r"""Sequence packing: several built samples share one row, with segment ids and restarting positions.

Padding every sample to ``seq_len`` wastes compute on EOS padding when samples are much shorter than the row;
packing puts several samples into one row instead (SDAR's training packs, research/tracerl_llada.md §3.2).
A packed row is

* ``input_ids`` ``[L]``: sample 0, sample 1, …, each the sample's own tokens ending in its EOS (no EOS padding),
  then a padding tail of EOS ids;
* ``segment_ids`` ``[L]``: ``0, 1, 2, …`` per sample, ``-1`` on the padding tail;
* ``position_ids`` ``[L]``: ``0..n_s-1`` within each sample (so its block grid and RoPE phases are those of the
  sample alone), 0 on the tail;
* ``attention_mask`` ``[L]``: True on sample tokens, False on the tail; ``prompt_mask`` as for padded rows;
* ``truncated`` (count of samples cut to ``L``) and ``answers`` (one per sample, in segment order) when every
  sample has an answer.

A stage must keep samples apart: attend only within a segment (the block masks of
:mod:`dllm_zoo.backbones.attention` take ``segment_ids``), use ``position_ids``, and draw noise and normalise the
loss per sample (:func:`packed_sample_ids`). Note that a packed sample's answer is its response and final EOS,
without the EOS padding an unpacked row would add.

**Order and resume.** :class:`PackSequences` packs greedily in stream order, first-fit into the rows of one
batch: each sample goes into the first of the batch's ``rows_per_batch`` rows with room for it (a new row is
opened while fewer exist); a sample that fits nowhere closes the batch and starts the next. A batch therefore
holds a contiguous run of the stream, and the stream position after its last sample is exactly where a resumed
run must continue: it is attached to every row of the batch as ``__next__``, which
:class:`~dllm_zoo.data.loader.ResumableDataLoader` records. This needs the loader's ``batch_size`` to equal
``rows_per_batch`` (the DataModule sets both). Nothing is dropped: a sample longer than ``L`` was already cut to
``L`` by the builder (and counted as ``truncated``), so it fills one row by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from dllm_zoo.data.stream import DROPPED_KEY, ERRORS_KEY, NEXT_KEY


class PackSequences:
    """Pack unpadded rows (``BuildSequence(pad=False)``) into rows of ``seq_len`` tokens, batch by batch.

    A picklable ``Iterator[row] -> Iterator[packed row]`` for :class:`~dllm_zoo.data.stream.SampleStream`'s
    ``pack`` argument (it runs in the worker, after the stream has attached its event counts and positions).

    Args:
        seq_len: Row length ``L``.
        rows_per_batch: Rows per batch; must equal the loader's ``batch_size`` for an exact resume.
        pad_id: Token id of the padding tail (EOS, as for padded rows).

    Example:
        >>> rows = [{"input_ids": torch.tensor(ids), "prompt_mask": torch.tensor([True] + [False] * (len(ids) - 1)),
        ...          "truncated": False} for ids in ([1, 2, 9], [3, 9], [4, 5, 6, 9])]
        >>> packed = list(PackSequences(6, rows_per_batch=2, pad_id=0)(iter(rows)))
        >>> [p["input_ids"].tolist() for p in packed], [p["segment_ids"].tolist() for p in packed]
        ([[1, 2, 9, 3, 9, 0], [4, 5, 6, 9, 0, 0]], [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    """

    def __init__(self, seq_len: int, rows_per_batch: int, pad_id: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if rows_per_batch < 1:
            raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
        self.seq_len = seq_len
        self.rows_per_batch = rows_per_batch
        self.pad_id = pad_id

    def __call__(self, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pack ``items`` (stream order) and yield the packed rows, ``rows_per_batch`` per batch."""
        rows: list[list[dict[str, Any]]] = []
        free: list[int] = []
        next_position = 0
        for item in items:
            n = int(item["input_ids"].shape[0])
            if n > self.seq_len:
                raise ValueError(f"a built sample has {n} tokens but rows hold {self.seq_len}; build with seq_len")
            slot = next((r for r, room in enumerate(free) if room >= n), None)
            if slot is None and len(rows) == self.rows_per_batch:
                yield from self._emit(rows, next_position)
                rows, free = [], []
            if slot is None:
                rows.append([])
                free.append(self.seq_len)
                slot = len(rows) - 1
            rows[slot].append(item)
            free[slot] -= n
            next_position = int(item.get(NEXT_KEY, 0))
        if rows:
            yield from self._emit(rows, next_position)

    def _emit(self, rows: list[list[dict[str, Any]]], next_position: int) -> Iterator[dict[str, Any]]:
        for samples in rows:
            yield self._pack(samples, next_position)

    def _pack(self, samples: list[dict[str, Any]], next_position: int) -> dict[str, Any]:
        length = self.seq_len
        used = sum(int(s["input_ids"].shape[0]) for s in samples)
        tail = length - used
        pad_bool = torch.zeros(tail, dtype=torch.bool)
        lengths = [int(s["input_ids"].shape[0]) for s in samples]
        out: dict[str, Any] = {
            "input_ids": torch.cat([*(s["input_ids"] for s in samples), torch.full((tail,), self.pad_id)]),
            "attention_mask": torch.cat([torch.ones(used, dtype=torch.bool), pad_bool]),
            "prompt_mask": torch.cat([*(s["prompt_mask"].to(torch.bool) for s in samples), pad_bool]),
            "segment_ids": torch.cat(
                [*(torch.full((n,), k, dtype=torch.long) for k, n in enumerate(lengths)), torch.full((tail,), -1)]
            ),
            "position_ids": torch.cat([*(torch.arange(n) for n in lengths), torch.zeros(tail, dtype=torch.long)]),
            "truncated": sum(int(bool(s.get("truncated", False))) for s in samples),
            ERRORS_KEY: sum(int(s.get(ERRORS_KEY, 0)) for s in samples),
            DROPPED_KEY: sum(int(s.get(DROPPED_KEY, 0)) for s in samples),
            NEXT_KEY: next_position,
        }
        if all("answer" in s for s in samples):
            out["answers"] = [str(s["answer"]) for s in samples]
        return out


def packed_sample_ids(segment_ids: Tensor) -> Tensor:
    """One index per packed sample of a batch, to draw noise and normalise losses per sample.

    Sample ``s`` of row ``b`` gets ``b·L + s``, so ids are unique in the batch and bounded by ``B·L`` without a
    host sync to count them; the padding tail (``-1``) stays ``-1``.

    Args:
        segment_ids: ``[B, L]`` long, ``0, 1, …`` per sample in each row, ``-1`` on padding.

    Returns:
        ``[B, L]`` long in ``[-1, B·L)``.

    Example:
        >>> packed_sample_ids(torch.tensor([[0, 0, 1, -1], [0, 0, 0, 0]])).tolist()
        [[0, 0, 1, -1], [4, 4, 4, 4]]
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, L], got shape {tuple(segment_ids.shape)}")
    b, length = segment_ids.shape
    offsets = torch.arange(b, device=segment_ids.device)[:, None] * length
    return torch.where(segment_ids >= 0, segment_ids + offsets, torch.full_like(segment_ids, -1))
