"""A streaming dataset over WebDataset shards or an HF ``datasets.Dataset``, split by rank and worker.

Every epoch, each *slot* (one DataLoader worker of one rank; ``rank * num_workers + worker``) reads its own
part of the data, so that across all ranks and workers every sample is seen exactly once:

* ``split_by="shards"`` (training default): the shard list, shuffled with ``seed + epoch``, is dealt out to
  the slots round-robin (shard ``i`` to slot ``i % slots``). Needs at least as many shards as slots.
* ``split_by="samples"``: every slot reads every shard (in the same shuffled order) and keeps the records
  ``j`` with ``j % slots == slot``. Works with any number of shards at the cost of re-reading; used for
  validation.
* an HF dataset is map-style: a seeded per-epoch permutation of its rows is dealt out the same way.

A slot then shuffles its samples with a buffer (``random.Random`` seeded from ``seed``, the epoch and the
slot), so the order is a pure function of ``(seed, epoch, rank, world_size, num_workers)``.

**Nothing is dropped silently.** An unreadable record (bad JSON, a truncated tar member, a shard that cannot
be opened, a tar without its end-of-archive marker) and a sample the ``transform`` rejects
(:class:`SampleDropped`) are *events*. Every event is owned by exactly one yielded item — the first good item
at or after it, and trailing events by the last one — and travels with it as ``item["__errors__"]`` /
``item["__dropped__"]``, so :func:`dllm_zoo.data.sequences.collate_sequences` can put the counts into each
batch. A :class:`DataWarning` naming the shard and key is emitted once per event, when its owner is
yielded. A slot whose whole stream is events raises ``RuntimeError``.

**Resume.** ``item["__next__"]`` is the position, in the slot's post-shuffle stream, from which a resumed
iteration continues after that item has been consumed (the end of the item's event window).
:class:`~dllm_zoo.data.loader.ResumableDataLoader` records it per worker and hands it back through
:meth:`SampleStream.set_resume`; skipped positions are re-read (the shuffle must be replayed) but not
transformed, and their events are not reported again.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dllm_zoo.data.shards import expand_shards

SplitBy = Literal["shards", "samples"]
Transform = Callable[[dict[str, Any]], dict[str, Any]]
Regroup = Callable[[Iterator[dict[str, Any]]], Iterator[dict[str, Any]]]

END = 2**62
"""Stream position meaning "everything consumed" (the owner of trailing events has consumed them too)."""

ERRORS_KEY = "__errors__"
DROPPED_KEY = "__dropped__"
NEXT_KEY = "__next__"


class DataWarning(UserWarning):
    """A record could not be read or was dropped; it is also counted in the batch (``data_errors``/``dropped``)."""


class SampleDropped(Exception):  # noqa: N818 - it is a control signal, not an error of the caller
    """Raised by a transform (a sequence builder) to drop one sample; the stream counts it as ``dropped``."""


# ------------------------------------------------------------------------------------------ helpers
def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class KeyedChoice:
    """Draw one of ``names`` per sample, with probabilities ∝ ``weights``, as a pure function of ``(seed, __key__)``.

    No random state: loader workers, ranks and resumed runs agree on every sample's draw without coordination.

    Args:
        weights: Name -> relative probability (> 0).
        seed: Seed of the draw.

    Example:
        >>> KeyedChoice({"a": 1.0}).choose({"__key__": "000000003"})
        'a'
    """

    def __init__(self, weights: Mapping[str, float], seed: int = 0) -> None:
        if not weights or any(float(w) <= 0 for w in weights.values()):
            raise ValueError(f"KeyedChoice needs at least one name and weights > 0, got {dict(weights)}")
        self.names = list(weights)
        total = sum(float(weights[n]) for n in self.names)
        cumulative, acc = [], 0.0
        for name in self.names:
            acc += float(weights[name]) / total
            cumulative.append(acc)
        self.cumulative = cumulative
        self.seed = seed

    def choose(self, sample: Mapping[str, Any]) -> str:
        """The name drawn for ``sample`` (from its ``__key__``, as the shard readers set it)."""
        if len(self.names) == 1:
            return self.names[0]
        key = zlib.crc32(str(sample.get("__key__", "")).encode())  # stable across processes, unlike hash()
        u = mix_seed(self.seed, 0x9A7A, key) / 2**63
        return next((n for n, c in zip(self.names, self.cumulative) if u < c), self.names[-1])


def is_hf_dataset_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``)."""
    p = Path(path)
    return p.is_dir() and (
        (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
    )


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torch.distributed`` when initialised, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class _Error:
    message: str


@dataclass
class _Events:
    errors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.errors or self.dropped)

    def merge(self, other: _Events) -> _Events:
        return _Events(self.errors + other.errors, self.dropped + other.dropped)


class _CheckedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that records on the archive why its header stream ended.

    ``tarfile`` treats a truncated or garbage header after the first member as a silent end of archive, which
    would lose the remaining members unnoticed; a proper end is a zero block (``EOFHeaderError``).
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]  # noqa: D102
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError as exn:
            tar._dllm_bad_end = exn  # type: ignore[attr-defined]
            raise


def _split_member(name: str) -> tuple[str, str]:
    """``dir/key.ext.gz`` -> (``dir/key``, ``ext.gz``) as WebDataset groups members."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def _decode(url: str, key: str, members: Mapping[str, bytes]) -> dict[str, Any] | _Error:
    if "json" in members:
        try:
            value = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exn:
            return _Error(f"{url}: sample {key!r}: invalid JSON ({exn})")
        if not isinstance(value, dict):
            return _Error(f"{url}: sample {key!r}: JSON is a {type(value).__name__}, expected an object")
        sample = value
    elif "txt" in members:
        try:
            sample = {"text": members["txt"].decode("utf-8")}
        except UnicodeDecodeError as exn:
            return _Error(f"{url}: sample {key!r}: invalid UTF-8 text ({exn})")
    else:
        return _Error(f"{url}: sample {key!r} has no .json or .txt member (has {sorted(members)})")
    sample["__key__"] = key
    sample["__url__"] = url
    return sample


def read_shard(url: str) -> Iterator[dict[str, Any] | _Error]:
    """Records of one shard in file order: decoded samples, or an error record for anything unreadable.

    Opening goes through ``webdataset.gopen`` (local paths, ``file://``, ``pipe:``, ``http(s)://`` …).
    A ``.json`` member is decoded as the sample; a lone ``.txt`` member becomes ``{"text": …}``. A truncated
    member ends the shard with one error record (the rest of that shard is unreadable).
    """
    from webdataset.gopen import gopen

    try:
        stream: IO[bytes] = gopen(url, "rb")
    except Exception as exn:  # noqa: BLE001 - any failure to open is an error record, never a crash
        yield _Error(f"{url}: cannot open shard ({type(exn).__name__}: {exn})")
        return
    key: str | None = None
    members: dict[str, bytes] = {}
    close_error: Exception | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for info in tar:
                if not info.isreg():
                    continue
                base, ext = _split_member(info.name)
                if base.rsplit("/", 1)[-1].startswith("__"):
                    continue  # WebDataset metadata members
                if key is not None and base != key:
                    yield _decode(url, key, members)
                    members = {}
                key = base
                handle = tar.extractfile(info)
                assert handle is not None  # a regular member
                members[ext] = handle.read()
            bad_end = getattr(tar, "_dllm_bad_end", None)
    except (tarfile.TarError, OSError, EOFError) as exn:
        where = f"sample {key!r}" if key is not None else "the first sample"
        yield _Error(f"{url}: unreadable from {where} on ({type(exn).__name__}: {exn})")
        return
    finally:
        try:
            stream.close()
        except Exception as exn:  # noqa: BLE001 - a failing pipe reports its exit status on close
            close_error = exn
    if key is not None:
        yield _decode(url, key, members)
    if bad_end is not None:
        yield _Error(f"{url}: archive ends without an end-of-archive marker after sample {key!r} ({bad_end})")
    if close_error is not None:
        yield _Error(f"{url}: closing the stream failed ({type(close_error).__name__}: {close_error})")


# ------------------------------------------------------------------------------------------ dataset
class SampleStream(IterableDataset):
    """Samples from WebDataset shards or an HF dataset, split by rank and worker, shuffled per epoch.

    Args:
        source: A shard spec (see :func:`~dllm_zoo.data.shards.expand_shards`) or list of shard paths/URLs,
            a ``datasets.Dataset`` object, or a ``datasets.save_to_disk`` directory.
        transform: Applied to each sample in the worker (e.g. a sequence builder); may raise
            :class:`SampleDropped`. ``None`` yields the raw dicts (with ``__key__`` and ``__url__``).
        shuffle: Shuffle the shard order / row permutation and the samples (buffer) every epoch.
        shuffle_buffer: Size of the sample shuffle buffer (shards only; an HF permutation is a full shuffle).
        seed: Base seed; the order is a function of ``seed``, the epoch and the slot.
        split_by: ``"shards"`` or ``"samples"`` (see the module docstring). HF datasets always split rows.
        rank: This process's rank; ``None`` reads ``torch.distributed`` (injectable for tests).
        world_size: Number of ranks; ``None`` reads ``torch.distributed``.
        flag: The command-line flag of ``source``, named in error messages.
        pack: Optional ``Iterator[item] -> Iterator[item]`` applied after ``transform`` in the worker, e.g.
            :class:`~dllm_zoo.data.packing.PackSequences`. It must keep the ``__errors__``/``__dropped__`` counts
            and give every output item the ``__next__`` from which a resumed stream rebuilds the following items
            (for the loader, the last item of each batch matters).

    Yields:
        The transformed sample dicts, each with ``__errors__`` (int), ``__dropped__`` (int) and ``__next__``
        (int, the resume position after it) added.

    Example:
        >>> import tempfile
        >>> from dllm_zoo.data.shards import write_shards
        >>> d = tempfile.mkdtemp()
        >>> _ = write_shards(({"text": str(i)} for i in range(4)), d, samples_per_shard=2)
        >>> sorted(s["text"] for s in SampleStream(d, shuffle=False))
        ['0', '1', '2', '3']
    """

    def __init__(
        self,
        source: str | Path | Sequence[str] | Any,
        *,
        transform: Transform | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        split_by: SplitBy = "shards",
        rank: int | None = None,
        world_size: int | None = None,
        flag: str = "--data.train",
        pack: Regroup | None = None,
    ) -> None:
        super().__init__()
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if split_by not in ("shards", "samples"):
            raise ValueError(f"split_by must be 'shards' or 'samples', got {split_by!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
        if world_size is not None and rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
        self.transform = transform
        self.pack = pack
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.split_by: SplitBy = split_by
        self.flag = flag
        self._rank = rank
        self._world_size = world_size
        self.epoch = 0
        self._skip: tuple[int, ...] | None = None
        self._rotation = 0
        self.urls: list[str] | None = None
        self.hf: Any = None
        self.name: str
        if isinstance(source, (str, Path)) and is_hf_dataset_dir(source):
            self.hf = _load_hf_dir(Path(source), flag)
            self.name = str(source)
        elif isinstance(source, (str, Path, list, tuple)):
            self.urls = expand_shards(source, flag)  # type: ignore[arg-type]
            self.name = str(source)
        elif _is_hf_dataset(source):
            self.hf = source
            self.name = f"datasets.Dataset({getattr(source, 'num_rows', '?')} rows)"
        else:
            raise TypeError(
                f"{flag}: expected a shard spec, a datasets.save_to_disk directory or a datasets.Dataset, "
                f"got {type(source).__name__}"
            )

    # ------------------------------------------------------------------ control
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the shard order, row permutation and shuffle buffer depend on it."""
        self.epoch = int(epoch)

    def set_resume(self, skip: Sequence[int] | None, rotation: int = 0) -> None:
        """Resume plan for the next iteration (set by :class:`~dllm_zoo.data.loader.ResumableDataLoader`).

        Args:
            skip: Per logical worker, the stream position to continue from (``None``: from the start).
            rotation: DataLoader worker ``j`` plays logical worker ``(j + rotation) % num_workers``, so that
                the first batch after a resume comes from the worker that was next in line.
        """
        self._skip = None if skip is None else tuple(int(s) for s in skip)
        self._rotation = int(rotation)

    def rank_world(self) -> tuple[int, int]:
        """``(rank, world_size)`` this stream splits over (injected or from ``torch.distributed``)."""
        if self._rank is not None and self._world_size is not None:
            return self._rank, self._world_size
        return dist_rank_world()

    @property
    def num_units(self) -> int:
        """Number of shards, or rows of an HF dataset."""
        return len(self.urls) if self.urls is not None else len(self.hf)

    def check_split(self, num_workers: int) -> None:
        """Raise ``ValueError`` if the data cannot give every (rank, worker) slot a part.

        Args:
            num_workers: DataLoader workers per rank (0 counts as 1).
        """
        _, world = self.rank_world()
        slots = world * max(1, num_workers)
        if self.urls is not None and self.split_by == "shards" and len(self.urls) < slots:
            raise ValueError(
                f"{self.flag}: {len(self.urls)} shard(s) cannot be split over {world} rank(s) x "
                f"{max(1, num_workers)} worker(s) = {slots} readers; write more, smaller shards "
                "(write_shards(samples_per_shard=...)), lower --data.num_workers, or split by samples"
            )
        if self.hf is not None and len(self.hf) < slots:
            raise ValueError(
                f"{self.flag}: {len(self.hf)} row(s) cannot be split over {slots} readers "
                f"({world} rank(s) x {max(1, num_workers)} worker(s)); lower --data.num_workers"
            )

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = self.rank_world()
        info = get_worker_info()
        physical, workers = (0, 1) if info is None else (info.id, info.num_workers)
        logical = (physical + self._rotation) % workers
        self.check_split(workers)
        skip = 0
        if self._skip is not None:
            if len(self._skip) != workers:
                raise ValueError(
                    f"resume plan has positions for {len(self._skip)} worker(s) but the loader runs {workers}"
                )
            skip = self._skip[logical]
        slot, slots = rank * workers + logical, world * workers
        # Everything the generator needs is bound now: later set_epoch/set_resume calls do not leak in.
        return self._generate(self.epoch, slot, slots, skip)

    def _generate(self, epoch: int, slot: int, slots: int, skip: int) -> Iterator[dict[str, Any]]:
        if self.hf is not None:
            positions = self._hf_positions(epoch, slot, slots, skip)
        else:
            rng = random.Random(mix_seed(self.seed, epoch, slot, slots, 1))
            buffer = self.shuffle_buffer if self.shuffle else 0
            positions = _shuffled(self._shard_records(epoch, slot, slots), buffer, rng)
        items = _emit(positions, self.transform, skip)
        return items if self.pack is None else self.pack(items)

    def _shard_order(self, epoch: int) -> list[str]:
        assert self.urls is not None
        order = list(self.urls)
        if self.shuffle:
            random.Random(mix_seed(self.seed, epoch, 0)).shuffle(order)
        return order

    def _shard_records(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any] | _Error]:
        order = self._shard_order(epoch)
        if self.split_by == "shards":
            for url in order[slot::slots]:
                yield from read_shard(url)
            return
        j = 0
        for url in order:
            for record in read_shard(url):
                if j % slots == slot:
                    yield record
                j += 1

    def _hf_positions(
        self, epoch: int, slot: int, slots: int, skip: int
    ) -> Iterator[tuple[int, dict[str, Any] | None, list[str]]]:
        n = len(self.hf)
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0) % (2**63 - 1))
            order = torch.randperm(n, generator=gen)[slot::slots].tolist()
        else:
            order = list(range(slot, n, slots))
        for k in range(min(skip, len(order)), len(order)):
            idx = order[k]
            row = dict(self.hf[idx])
            row["__key__"] = str(idx)
            row["__url__"] = self.name
            yield k, row, []


def _is_hf_dataset(obj: object) -> bool:
    mod = type(obj).__module__
    return mod.startswith("datasets.") and hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _load_hf_dir(path: Path, flag: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        raise ValueError(
            f"{flag}={str(path)!r} is a DatasetDict with splits {sorted(loaded)}; point {flag} at one split's "
            f"directory, e.g. {str(path / next(iter(loaded)))!r}"
        )
    return loaded


def _shuffled(
    records: Iterator[dict[str, Any] | _Error], buffer_size: int, rng: random.Random
) -> Iterator[tuple[int, dict[str, Any] | None, list[str]]]:
    """Post-shuffle stream ``(position, sample, errors read since the previous position)``.

    Trailing errors (read after the last sample left the buffer) come as a final ``(END - 1, None, errors)``.
    """
    buf: list[dict[str, Any]] = []
    pending: list[str] = []
    k = 0
    for rec in records:
        if isinstance(rec, _Error):
            pending.append(rec.message)
            continue
        buf.append(rec)
        if len(buf) > buffer_size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield k, buf.pop(), pending
            pending, k = [], k + 1
    while buf:
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield k, buf.pop(), pending
        pending, k = [], k + 1
    if pending:
        yield END - 1, None, pending


def _emit(
    positions: Iterator[tuple[int, dict[str, Any] | None, list[str]]], transform: Transform | None, skip: int
) -> Iterator[dict[str, Any]]:
    """Transform the positions from ``skip`` on and attach every event to exactly one yielded item.

    Events before the first good item belong to it; events after item ``g`` and before the next good item
    belong to ``g``. An item is released when the next good item (or the end) is seen, with ``__next__`` =
    the position of that next good item (``END`` for the last one).
    """
    held: dict[str, Any] | None = None
    held_events = _Events()
    acc = _Events()
    for k, sample, errors in positions:
        if k < skip:
            continue
        if sample is None:
            acc.errors.extend(errors)
            continue
        try:
            item = sample if transform is None else transform(sample)
        except SampleDropped as exn:
            acc.errors.extend(errors)
            acc.dropped.append(f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r} dropped: {exn}")
            continue
        if held is None:
            acc.errors.extend(errors)
            held_events, acc = acc, _Events()
        else:
            yield _release(held, held_events.merge(acc), k)
            held_events, acc = _Events(errors=list(errors)), _Events()
        held = item
    if held is not None:
        yield _release(held, held_events.merge(acc), END)
    elif acc:
        shown = "; ".join((acc.errors + acc.dropped)[:5])
        raise RuntimeError(
            f"no usable sample in this reader's part of the data: {len(acc.errors)} unreadable record(s) and "
            f"{len(acc.dropped)} dropped sample(s), e.g. {shown}"
        )


def _release(item: dict[str, Any], events: _Events, next_position: int) -> dict[str, Any]:
    for message in events.errors:
        warnings.warn(f"data error: {message}", DataWarning, stacklevel=2)
    for message in events.dropped:
        warnings.warn(message, DataWarning, stacklevel=2)
    out = dict(item)
    out[ERRORS_KEY] = len(events.errors)
    out[DROPPED_KEY] = len(events.dropped)
    out[NEXT_KEY] = next_position
    return out
