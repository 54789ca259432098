from __future__ import annotations

import os
from pathlib import Path

import pytest

from dllm_zoo.data import Arithmetic, SampleStream, SyntheticTask, expand_shards, extract_answer
from dllm_zoo.data.synthetic.arithmetic import add_trace, mul_trace, sub_trace
from dllm_zoo.data.synthetic.base import default_cache_dir


def test_sample_format() -> None:
    task = Arithmetic()
    assert task.make_sample(47, "+", 38) == {
        "prompt": "47+38=?",
        "response": "<think>7+8=15 carry 1, 4+3+1=8</think> 85",
        "answer": "85",
        "text": "47+38=? <think>7+8=15 carry 1, 4+3+1=8</think> 85",
    }
    assert task.make_sample(38, "-", 47)["response"] == "<think>swap, 7+10-8=9 borrow 1, 4-3-1=0</think> -9"


def test_traces() -> None:
    assert add_trace(99, 99) == "9+9=18 carry 1, 9+9+1=19 carry 1"
    assert add_trace(5, 38) == "5+8=13 carry 1, 0+3+1=4"
    assert add_trace(3, 4) == "3+4=7"
    assert sub_trace(47, 38) == "7+10-8=9 borrow 1, 4-3-1=0"
    assert sub_trace(90, 11) == "0+10-1=9 borrow 1, 9-1-1=7"
    assert sub_trace(5, 5) == "5-5=0"
    assert mul_trace(47, 38) == "47*8=376, 47*3=141, 376+1410=1786"
    assert mul_trace(47, 8) == "47*8=376"


def test_every_two_digit_sample_fits_64_tokens() -> None:
    task = Arithmetic(ops=("+", "-", "*"))
    longest = max(
        len(task.make_sample(a, op, b)["text"].encode()) for a in range(100) for b in range(100) for op in "+-*"
    )
    assert longest + 2 <= 64  # + BOS and EOS


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>7+8=15 carry 1, 4+3+1=8</think> 85", "85"),
        ("<think>swap, 7+10-8=9</think> -9<|endoftext|>", "-9"),
        ("<think>a</think> x <think>b</think> 012 and 7", "12"),
        ("no think block, the answer is 41 or 42", "42"),
        ("<think>1+1=2</think> two", None),
        ("nothing", None),
        ("", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_check_is_exact() -> None:
    task = Arithmetic()
    pos, neg = task.make_sample(47, "+", 38), task.make_sample(3, "-", 50)
    assert task.check(pos["response"], pos)
    assert task.check("<think>whatever</think> 85", pos)
    assert not task.check("<think>7+8=15</think> 84", pos)  # wrong
    assert not task.check("<think>7+8=15 carry 1, 4+3+1=8</think>", pos)  # missing
    assert not task.check("<think>7+8</think> 850", pos)
    assert neg["answer"] == "-47"
    assert task.check(neg["response"], neg)
    assert task.check("-47", neg)
    assert not task.check("<think></think> 47", neg)  # the sign matters


def test_generation_is_seeded_and_train_val_disjoint() -> None:
    task = Arithmetic(num_train=3000, num_val=60, max_operand=9, ops=("+", "-", "*"), seed=5)
    train, val = list(task.generate("train")), list(task.generate("val"))
    assert len(train) == 3000
    assert len(val) == 60
    assert len({s["prompt"] for s in val}) == 60  # distinct val questions
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in val}
    assert train == list(task.generate("train"))
    assert list(Arithmetic(num_train=50, seed=6).generate("train")) != list(
        Arithmetic(num_train=50, seed=5).generate("train")
    )
    for s in train[:200] + val:
        assert task.check(s["response"], s)
        assert s["text"] == f"{s['prompt']} {s['response']}"
    assert {s["prompt"][1] for s in train if s["prompt"][1] in "+-*"} == {"+", "-", "*"}


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="ops"):
        Arithmetic(ops=("/",))
    with pytest.raises(ValueError, match="more than half"):
        Arithmetic(num_val=101, max_operand=9, ops=("+", "-"))  # 200 questions in all


def test_fingerprint_tracks_settings() -> None:
    assert Arithmetic().fingerprint() == Arithmetic().fingerprint()
    assert Arithmetic(seed=1).fingerprint() != Arithmetic().fingerprint()
    assert Arithmetic(ops=["+", "-"]).fingerprint() == Arithmetic().fingerprint()
    assert issubclass(Arithmetic, SyntheticTask)


def test_ensure_shards_writes_once_and_reuses(tmp_path: Path) -> None:
    task = Arithmetic(num_train=160, num_val=20, seed=3)
    specs = task.ensure_shards(tmp_path)
    folder = tmp_path / f"arithmetic-{task.fingerprint()}"
    assert specs["train"] == str(folder / "train" / "train-{000000..000015}.tar")
    files = sorted(folder.rglob("*.tar"))
    stamps = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    assert task.ensure_shards(tmp_path) == specs
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(folder.rglob("*.tar"))] == stamps  # not rewritten
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp folder left behind
    read = [
        {k: s[k] for k in ("prompt", "response", "answer", "text")} for s in SampleStream(specs["val"], shuffle=False)
    ]
    assert read == list(task.generate("val"))
    assert len(expand_shards(specs["train"])) == 16


def test_incomplete_cache_is_never_trusted(tmp_path: Path) -> None:
    task = Arithmetic(num_train=40, num_val=8)
    stale = tmp_path / f".arithmetic-{task.fingerprint()}.tmp-dead-"  # a crashed writer's temp folder
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "train-000000.tar").write_bytes(b"partial")
    specs = task.ensure_shards(tmp_path)
    assert ".tmp" not in specs["train"]
    folder = task.cache_path(tmp_path)
    (folder / "val" / "val-000003.tar").unlink()  # a damaged cache is not used …
    other = tmp_path / "other"
    bad = task.cache_path(other)
    bad.mkdir(parents=True)  # … and neither is a folder without a manifest: both are refused with a clear error
    (bad / "notes.txt").write_text("not a cache")
    with pytest.raises(RuntimeError, match="no valid manifest.json"):
        task.ensure_shards(other)
    with pytest.raises(RuntimeError, match="missing shards.*--data.cache_dir"):
        task.ensure_shards(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [stale.name]  # ours cleaned up


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DLLM_ZOO_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert Arithmetic().cache_path().parent == tmp_path / "c"
    monkeypatch.delenv("DLLM_ZOO_CACHE")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "dllm_zoo"


def test_arithmetic_worked_fraction_keeps_questions_and_mixes_direct_answers() -> None:
    full = list(Arithmetic(num_train=400, num_val=8).generate("train"))
    mixed = list(Arithmetic(num_train=400, num_val=8, worked_fraction=0.3).generate("train"))
    assert [s["prompt"] for s in full] == [s["prompt"] for s in mixed]  # the questions do not depend on it
    direct = [s for s in mixed if s["response"].startswith("<think></think> ")]
    assert len(direct) == 273  # pinned: ~70% answer directly
    task = Arithmetic(num_train=400, num_val=8, worked_fraction=0.3)
    assert all(task.check(s["response"], s) for s in mixed)
    assert all(s["response"] != "<think></think> " + s["answer"] for s in task.generate("val"))  # val is worked
    with pytest.raises(ValueError, match="worked_fraction"):
        Arithmetic(worked_fraction=1.5)
