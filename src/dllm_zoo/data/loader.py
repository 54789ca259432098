"""A DataLoader that knows its epoch and position, so a resumed run continues with exactly the next batch.

How Lightning uses it (checked against ``lightning/pytorch`` 2.6: ``loops/fit_loop.py``,
``utilities/combined_loader.py``, ``loops/fetchers.py``, ``loops/training_epoch_loop.py``):

* A train loader is saved and restored only if it satisfies ``lightning.fabric.utilities.types._Stateful``
  (has ``state_dict`` and ``load_state_dict``). ``CombinedLoader._state_dicts`` collects the states into the
  checkpoint's ``loops.fit_loop.state_dict.combined_loader`` (``_FitLoop.on_save_checkpoint``).
* On resume, ``_FitLoop.setup_data`` calls ``CombinedLoader._load_state_dicts`` -> ``load_state_dict`` and
  only **then** ``iter()`` on the data fetcher, and the epoch loop does not call ``iter()`` again for that
  epoch. So ``load_state_dict`` always precedes the ``__iter__`` that must resume.
* ``iter()`` is called once per epoch (``_TrainingEpochLoop.on_run_start``); ``max_size_cycle`` combined
  loaders re-``iter()`` an exhausted loader mid-epoch. Either way each ``iter()`` is a new pass, so this
  loader counts epochs itself: Lightning's ``_set_sampler_epoch`` never reaches an ``IterableDataset``.
* Lightning's ``_PrefetchDataFetcher`` (used when the length is unknown, as for every stream) fetches one
  batch ahead, so when a checkpoint is written after batch ``k`` the loader has already yielded ``k + 1``.
  Counting yielded batches would lose one batch per resume. :meth:`ResumableDataLoader.mark_consumed` fixes
  that: :class:`~dllm_zoo.data.datamodule.TextDiffusionDataModule` calls it from ``on_before_batch_transfer``
  (once per batch the training step receives), and from the first call on the state is the position after the
  last *consumed* batch. Without calls (a plain loop) it is the position after the last *yielded* batch.
* Only rank 0 writes the checkpoint, but ``dump_checkpoint`` runs on every rank, so under
  ``torch.distributed`` :meth:`ResumableDataLoader.state_dict` gathers every rank's position
  (``all_gather_object``) and each rank restores its own. It must therefore be called on all ranks together,
  as Lightning does. A run resumed on another number of ranks cannot continue each rank's stream exactly (the
  split changes): the stored epoch restarts from its beginning, with a warning that says how many batches are
  seen again.
* Streams split by shards give ranks different numbers of batches when shards differ in size; a rank that runs
  out while the others train would leave them waiting forever in the next gradient all-reduce. So under
  ``torch.distributed`` every batch is agreed on first (a one-element all-reduce over a gloo group, in the main
  process): when any rank has run out, every rank ends the epoch there, and the batches left behind are
  reported in a :class:`~dllm_zoo.data.stream.DataWarning`.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate, get_worker_info

from dllm_zoo.data.stream import END, NEXT_KEY, DataWarning, SampleStream, dist_rank_world

STATE_VERSION = 1


@dataclass(frozen=True)
class LoaderPosition:
    """Where an epoch stands.

    Attributes:
        epoch: The epoch (one full pass; the shuffle order is a function of it).
        batches: Batches of this epoch already consumed.
        next_worker: Logical worker that yields the next batch (the DataLoader serves workers round-robin).
        samples: Per logical worker, the position in its sample stream to continue from
            (:class:`~dllm_zoo.data.stream.SampleStream` only; empty otherwise).
    """

    epoch: int
    batches: int = 0
    next_worker: int = 0
    samples: tuple[int, ...] = ()

    @staticmethod
    def start(epoch: int, workers: int) -> LoaderPosition:
        """The beginning of ``epoch`` for ``workers`` logical workers."""
        return LoaderPosition(epoch, 0, 0, (0,) * workers)


class _TaggedCollate:
    """Runs in the worker: returns ``(worker id, resume position after the batch's last item, batch)``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[dict[str, Any]]) -> tuple[int, int, Any]:
        info = get_worker_info()
        return (0 if info is None else info.id), int(items[-1][NEXT_KEY]), self.collate_fn(items)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict``/``load_state_dict`` that Lightning saves in checkpoints.

    Each ``iter()`` starts the next epoch and passes it to the dataset (``set_epoch``) first, so the shuffle
    order is a function of ``seed + epoch``. After :meth:`load_state_dict`, the next ``iter()`` continues at the
    stored epoch and position and yields exactly the batches the uninterrupted run would have yielded.

    With a :class:`~dllm_zoo.data.stream.SampleStream`, each worker continues from its own stream position:
    skipped samples are re-read (the shuffle buffer must be replayed) but not tokenized or collated, and the
    workers are rotated so that the round-robin order of batches continues where it stopped. Any other
    dataset must iterate in an order fixed by its epoch; the consumed batches are then re-read and
    discarded. ``persistent_workers`` is refused (workers would keep the previous epoch's dataset copy).

    Args:
        dataset: The dataset (a :class:`~dllm_zoo.data.stream.SampleStream` for the fast path).
        batch_size: Samples per batch.
        collate_fn: Collate function (default ``torch.utils.data.default_collate``).
        **kwargs: Any other ``DataLoader`` argument (``num_workers``, ``pin_memory``, ``drop_last`` …).

    Example:
        >>> loader = ResumableDataLoader(list(range(6)), batch_size=2)
        >>> it = iter(loader); first = next(it)
        >>> state = loader.state_dict()
        >>> again = ResumableDataLoader(list(range(6)), batch_size=2)
        >>> again.load_state_dict(state)
        >>> [b.tolist() for b in again]
        [[2, 3], [4, 5]]
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = 1,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "ResumableDataLoader does not support persistent_workers=True: the workers would keep the "
                "first epoch's dataset (shuffle order and resume position)"
            )
        self._stream = isinstance(dataset, SampleStream)
        if self._stream and batch_size is None:
            raise ValueError("ResumableDataLoader over a SampleStream needs a batch_size (got None)")
        base_collate = collate_fn if collate_fn is not None else default_collate
        super().__init__(
            dataset,
            batch_size,
            collate_fn=_TaggedCollate(base_collate) if self._stream else base_collate,
            **kwargs,
        )
        if not self._stream and isinstance(self.sampler, RandomSampler):
            raise ValueError(
                "ResumableDataLoader cannot replay a RandomSampler's order; use a SampleStream (it also takes HF "
                "datasets) or a sampler with set_epoch(epoch) such as DistributedSampler(shuffle=True)"
            )
        self._workers = max(1, self.num_workers)
        self._next_epoch = 0
        self._resume: LoaderPosition | None = None
        self._base = LoaderPosition.start(0, self._workers)
        self._last_yielded: LoaderPosition | None = None
        self._completed: dict[int, int] = {}
        self._pending: deque[LoaderPosition] = deque(maxlen=4096)
        self._last_consumed: LoaderPosition | None = None
        self._consumption_tracked = False
        self._iteration_finished = True
        self.batches_left_behind = 0  # batches this rank held when another rank ran out (uneven shards)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        start = self._resume if self._resume is not None else LoaderPosition.start(self._next_epoch, self._workers)
        self._resume = None
        self._next_epoch = start.epoch + 1
        if not self._iteration_finished:
            self._pending.clear()  # an abandoned pass: its prefetched batches will never be consumed
        self._base, self._last_yielded, self._iteration_finished = start, None, False
        dataset = self.dataset
        set_epoch = getattr(dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(start.epoch)
        if isinstance(dataset, SampleStream):
            dataset.check_split(self.num_workers)
            dataset.set_resume(start.samples, start.next_worker)
        else:
            sampler_epoch = getattr(self.sampler, "set_epoch", None)
            if callable(sampler_epoch):
                sampler_epoch(start.epoch)
        return self._run(super().__iter__(), start)

    def _run(self, it: Iterator[Any], start: LoaderPosition) -> Iterator[Any]:
        batches, next_worker, samples = start.batches, start.next_worker, list(start.samples)
        if not self._stream:
            for _ in range(start.batches):  # generic datasets: re-read and discard the consumed batches
                if next(it, _EXHAUSTED) is _EXHAUSTED:
                    break
        agree = _batch_agreement()
        for out in it if agree is None else _agreed(it, agree, self, start.epoch):
            if self._stream:
                physical, next_position, batch = out
                logical = (physical + start.next_worker) % self._workers
                samples[logical] = next_position
                next_worker = (logical + 1) % self._workers
            else:
                batch = out
            batches += 1
            pos = LoaderPosition(start.epoch, batches, next_worker, tuple(samples))
            self._last_yielded = pos
            self._pending.append(pos)
            yield batch
        self._completed[start.epoch] = batches
        for old in [e for e in self._completed if e < start.epoch - 1]:
            del self._completed[old]
        self._iteration_finished = True

    # ---------------------------------------------------------------- consumption
    def mark_consumed(self) -> None:
        """Record that the consumer has used the oldest yielded, not yet consumed batch.

        Call it once per batch actually trained on when the consumer fetches ahead (Lightning's prefetching
        fetcher does); from the first call on, :meth:`state_dict` reports the position after the last consumed
        batch instead of the last yielded one.
        """
        self._consumption_tracked = True
        if self._pending:
            self._last_consumed = self._pending.popleft()
        else:
            warnings.warn("mark_consumed() called more often than batches were yielded", stacklevel=2)

    # ------------------------------------------------------------------- state
    def _position(self) -> LoaderPosition:
        if self._consumption_tracked:
            pos = self._last_consumed if self._last_consumed is not None else self._base
        elif self._last_yielded is not None:
            pos = self._last_yielded
        elif self._resume is not None:
            pos = self._resume
        else:
            pos = self._base
        exhausted = bool(pos.samples) and all(s >= END for s in pos.samples)  # every worker's stream is used up
        if exhausted or self._completed.get(pos.epoch) == pos.batches:
            return LoaderPosition.start(pos.epoch + 1, self._workers)
        return pos

    def state_dict(self) -> dict[str, Any]:
        """The data position: epoch, batches consumed in it and, for streams, every worker's stream position.

        Under ``torch.distributed`` every rank's position is gathered, so call it on all ranks.
        """
        pos = self._position()
        rank, world = self._rank_world()
        positions: list[dict[str, Any] | None] = [None] * world
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_gather_object(positions, asdict(pos))
        else:  # one process (or ranks injected for tests): only this rank's entry is known
            positions[rank] = asdict(pos)
        return {
            "version": STATE_VERSION,
            "epoch": pos.epoch,
            "batches": pos.batches,
            "num_workers": self.num_workers,
            "world_size": len(positions),
            "positions": positions,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next ``iter()`` continue at the stored position.

        Raises:
            ValueError: if the state was saved with another number of workers (streams) or ranks.
        """
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported ResumableDataLoader state version {state_dict.get('version')!r}")
        rank, world = self._rank_world()
        positions: Sequence[dict[str, Any] | None] = state_dict["positions"]
        if len(positions) != world:
            saved = [p for p in positions if p is not None]
            epoch = int(saved[0]["epoch"]) if saved else 0
            repeated = sum(int(p["batches"]) for p in saved)
            warnings.warn(
                f"the data position was saved by {len(positions)} rank(s) but this run has {world}: the split over "
                f"ranks changed, so epoch {epoch} restarts from its beginning ({repeated} batch(es) already trained "
                "on, summed over the saved ranks, are seen again). Resume on the same number of devices to "
                "continue the data exactly.",
                DataWarning,
                stacklevel=2,
            )
            self._restart(LoaderPosition.start(epoch, self._workers))
            return
        if self._stream and state_dict["num_workers"] != self.num_workers:
            raise ValueError(
                f"the data position was saved with num_workers={state_dict['num_workers']}; resume with "
                f"--data.num_workers {state_dict['num_workers']} (each worker's stream position is stored)"
            )
        raw = positions[rank]
        if raw is None:
            raise ValueError(
                f"the saved data state holds no position for rank {rank} (saved without torch.distributed)"
            )
        pos = LoaderPosition(int(raw["epoch"]), int(raw["batches"]), int(raw["next_worker"]), tuple(raw["samples"]))
        if self._stream and len(pos.samples) != self._workers:
            raise ValueError(f"stored stream positions for {len(pos.samples)} workers, loader has {self._workers}")
        if not self._stream:
            pos = LoaderPosition(pos.epoch, pos.batches, 0, (0,) * self._workers)
        self._restart(pos)

    def _restart(self, pos: LoaderPosition) -> None:
        """Make the next ``iter()`` start at ``pos`` and forget the current pass."""
        self._resume = pos
        self._base = pos
        self._next_epoch = pos.epoch
        self._last_yielded = None
        self._last_consumed = None
        self._pending.clear()
        self._iteration_finished = True

    def _rank_world(self) -> tuple[int, int]:
        if isinstance(self.dataset, SampleStream):
            return self.dataset.rank_world()
        return dist_rank_world()


_EXHAUSTED = object()
_AGREEMENT_GROUPS: dict[int, Any] = {}


def _batch_agreement() -> Any | None:
    """The process group that agrees on every batch (``None`` without ``torch.distributed`` or with one rank).

    A gloo group, so the one-element flag stays on the CPU whatever the training backend (NCCL needs CUDA
    tensors). Created on first use, which happens on every rank at the same point (the first train ``iter()``),
    as ``new_group`` requires.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _AGREEMENT_GROUPS:
        gloo = dist.get_backend() == "gloo"
        _AGREEMENT_GROUPS[key] = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
    return _AGREEMENT_GROUPS[key]


def _agreed(it: Iterator[Any], group: Any, loader: ResumableDataLoader, epoch: int) -> Iterator[Any]:
    """``it``, ending on every rank as soon as one rank has no next batch (see the module docstring)."""
    flag = torch.ones(1, dtype=torch.int32)
    while True:
        out = next(it, _EXHAUSTED)
        flag.fill_(0 if out is _EXHAUSTED else 1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
        if bool(flag[0]):
            yield out
            continue
        if out is not _EXHAUSTED:
            left = 1 + sum(1 for _ in it)  # count what this rank leaves behind, so nothing goes unreported
            loader.batches_left_behind += left
            warnings.warn(
                f"rank {torch.distributed.get_rank()} ends epoch {epoch} with {left} batch(es) unused because another "
                "rank ran out of data (shards of unequal size): write shards of equal size, or at least as many "
                "shards as ranks x workers, to use every sample",
                DataWarning,
                stacklevel=2,
            )
        return
