"""Shared fixtures for the data tests: small shard sets with uneven sizes, and a corrupted shard set."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from dllm_zoo.data import write_shards


def _chunked_shards(root: Path, sizes: list[int]) -> Path:
    """Shards of the given sizes; sample ``i`` is ``{"i": i, "text": "sample i"}`` (running over all shards)."""
    start = 0
    for n, size in enumerate(sizes):
        write_shards(
            ({"i": i, "text": f"sample {i}", "answer": str(i)} for i in range(start, start + size)),
            root,
            prefix=f"part{n:02d}",
        )
        start += size
    return root


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Six shards with 7, 9, 4, 8, 6 and 10 samples (44 in all): uneven, so workers end at different times."""
    return _chunked_shards(tmp_path / "shards", [7, 9, 4, 8, 6, 10])


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members (used to plant bad JSON)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def raw_tar() -> Callable[[Path, list[tuple[str, bytes]]], None]:
    """:func:`write_raw_tar`, for tests that plant broken members."""
    return write_raw_tar


@pytest.fixture
def corrupt_dir(tmp_path: Path) -> Path:
    """Three shards: clean (i = 0..7), bad JSON at i = 11 and 13, and one truncated inside i = 21 (key 000000005).

    Good samples: 0..10, 12, 14..15 and 16..20 (the truncated shard keeps its first five). Error events: 2 bad
    JSON + 1 truncated member = 3.
    """
    root = tmp_path / "corrupt"
    write_shards(({"i": i, "text": f"sample {i}"} for i in range(8)), root, prefix="a")
    members = []
    for i in range(8, 16):
        data = b"{not json" if i in (11, 13) else f'{{"i": {i}, "text": "sample {i}"}}'.encode()
        members.append((f"{i:09d}.json", data))
    write_raw_tar(root / "b-000000.tar", members)
    (path,) = write_shards(({"i": i, "text": f"sample {i}"} for i in range(16, 24)), root, prefix="c")
    data = path.read_bytes()
    path.write_bytes(data[: 1024 * 5 + 600])  # member 5 (i = 21): header complete, data cut
    return root
