from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from dllm_zoo.data import expand_braces, expand_shards, is_remote, write_shards


def _members(path: Path) -> list[tuple[str, dict]]:
    with tarfile.open(path) as tar:
        return [(m.name, json.loads(tar.extractfile(m).read())) for m in tar]  # type: ignore[union-attr]


def test_write_shards_round_trip(tmp_path: Path) -> None:
    samples = [{"text": f"t{i}", "n": i, "__key__": "dropped"} for i in range(7)]
    paths = write_shards(samples, tmp_path, prefix="x", samples_per_shard=3)
    assert [p.name for p in paths] == ["x-000000.tar", "x-000001.tar", "x-000002.tar"]
    members = [m for p in paths for m in _members(p)]
    assert [name for name, _ in members] == [f"{i:09d}.json" for i in range(7)]  # running key over shards
    assert [obj for _, obj in members] == [{"text": f"t{i}", "n": i} for i in range(7)]  # "__" fields not written
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp files left


def test_write_shards_is_deterministic_and_guards_existing(tmp_path: Path) -> None:
    a = write_shards(({"i": i} for i in range(5)), tmp_path / "a", samples_per_shard=2)
    b = write_shards(({"i": i} for i in range(5)), tmp_path / "b", samples_per_shard=2)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards([{"i": 0}], tmp_path / "a")
    again = write_shards([{"i": 0}], tmp_path / "a", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["shard-000000.tar"]  # stale shards removed
    assert _members(again[0]) == [("000000000.json", {"i": 0})]
    assert write_shards([], tmp_path / "empty") == []


def test_write_shards_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sample 1 is not JSON-serialisable"):
        write_shards([{"a": 1}, {"a": object()}], tmp_path)
    assert list(tmp_path.glob("*.tar")) == []  # the failed shard was never moved into place
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards([{"a": 1}], tmp_path, samples_per_shard=0)


def test_expand_braces() -> None:
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_expand_shards_forms(tmp_path: Path) -> None:
    paths = [str(p) for p in write_shards(({"i": i} for i in range(10)), tmp_path, samples_per_shard=2)]
    assert expand_shards(str(tmp_path / "shard-{000000..000004}.tar")) == paths
    assert expand_shards(str(tmp_path / "shard-00000[13].tar")) == [paths[1], paths[3]]
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(paths[2]) == [paths[2]]
    assert expand_shards("file://" + paths[2]) == [paths[2]]
    assert expand_shards([paths[0], str(tmp_path / "shard-00000{3,4}.tar")]) == [paths[0], paths[3], paths[4]]


def test_expand_shards_remote_passes_through() -> None:
    assert expand_shards("https://host/d-{0..2}.tar") == [f"https://host/d-{i}.tar" for i in range(3)]
    assert expand_shards("pipe:curl -s https://host/a.tar") == ["pipe:curl -s https://host/a.tar"]
    assert expand_shards("gs://bucket/a.tar") == ["gs://bucket/a.tar"]
    assert is_remote("s3://b/x.tar")
    assert not is_remote("file:///x.tar")
    assert not is_remote("/x.tar")


@pytest.mark.parametrize(
    "spec",
    ["{root}/missing-{{000000..000003}}.tar", "{root}/nothing-*.tar", "{root}/emptydir", "{root}/nope.tar"],
)
def test_missing_local_spec_names_the_flag(tmp_path: Path, spec: str) -> None:
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--data\.val") as info:
        expand_shards(spec.format(root=tmp_path), flag="--data.val")
    assert "Set --data.val to" in str(info.value)


def test_partially_missing_brace_pattern_is_an_error(tmp_path: Path) -> None:
    write_shards(({"i": i} for i in range(4)), tmp_path, samples_per_shard=2)
    with pytest.raises(FileNotFoundError, match="shard-000002.tar"):
        expand_shards(str(tmp_path / "shard-{000000..000002}.tar"))
