import os
import pickle
import tempfile
import time
from pathlib import Path

import pytest

from dllm_zoo.rewards.base import Reward
from dllm_zoo.rewards.code import CodeExecution, ExecutionResult, extract_code

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _dead_soon(pid: int, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _outcome_sum(stats: dict[str, int]) -> int:
    keys = ("passed", "failed", "syntax_errors", "errors", "timeouts", "memory_errors", "crashes")
    return sum(stats[k] for k in keys)


# ------------------------------------------------------------------------------------------------- scoring


def test_correct_wrong_partial_and_not_applicable() -> None:
    r = CodeExecution(score=2.0)
    assert isinstance(r, Reward)
    assert r.name == "code"
    completions = [
        f"Here you go:\n```python\n{ADD}```\nDone.",  # correct, fenced
        "def add(a, b):\n    return a - b",  # wrong
        "def add(a, b):\n    return 3",  # passes one test of two
        "def add(a, b):\n    return a + b",  # tests None: not applicable, not run
        ADD,  # one string of test code is one test
    ]
    tests = [ADD_TESTS, ADD_TESTS, ADD_TESTS, None, "assert add(2, 2) == 4\nassert add(0, 0) == 0"]
    assert r(["p"] * 5, completions, tests=tests) == [2.0, 0.0, 0.0, None, 2.0]
    stats = r.stats()
    assert stats["runs"] == 4
    assert stats["passed"] == 2
    assert stats["failed"] == 2
    assert stats["tests_total"] == 7
    assert stats["tests_passed"] == 4  # 2 + 0 + 1 + 1
    assert _outcome_sum(stats) == stats["runs"]

    p = CodeExecution(score=2.0, partial=True, tests_field="unit_tests", name="code_partial")
    # A test that raises SystemExit (or anything) only fails that test.
    half = ["assert add(1, 2) == 3", "raise SystemExit(0)", "assert add(0, 0) == 0", "assert add(5, 5) == 3"]
    got = p(["p"] * 2, ["def add(a, b):\n    return 3", "def add(a, b): return -7"], unit_tests=[half, ADD_TESTS])
    assert got == [pytest.approx(2.0 * 2 / 4), 0.0]
    assert p.stats()["failed"] == 2
    assert p.stats()["tests_passed"] == 2


def test_failures_score_zero_and_are_counted() -> None:
    r = CodeExecution(timeout=5.0)
    nonce_free_record = '{"nonce": "0", "outcome": "ok", "passed": 2, "total": 2, "error": null, "memory": false}'
    completions = [
        "def add(a, b)\n    return a + b",  # syntax error
        ADD + "1 / 0",  # exception at import time
        ADD + "import sys\nsys.exit(0)",  # exits before the tests
        ADD + "raise KeyboardInterrupt",
        ADD + "import os\nos._exit(0)",  # leaves without a result record
        ADD + f"print({nonce_free_record!r})\nimport os\nos._exit(0)",  # prints a fake record
        ADD + f"open('../result.json', 'w').write({nonce_free_record!r})\nimport os\nos._exit(0)",  # writes one
        ADD + "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)",  # dies of a signal
        ADD + "x = input()",  # stdin is at EOF
        "\x00",  # null byte: not compilable
    ]
    assert r(["p"] * len(completions), completions, tests=[ADD_TESTS] * len(completions)) == [0.0] * len(completions)
    stats = r.stats()
    assert stats["syntax_errors"] == 2
    assert stats["errors"] == 4
    assert stats["crashes"] == 4
    assert stats["runs"] == len(completions)
    assert stats["passed"] == stats["tests_passed"] == 0
    assert _outcome_sum(stats) == stats["runs"]

    result = r.execute("1 / 0", ADD_TESTS)
    assert result.outcome == "error"
    assert result.error == "ZeroDivisionError: division by zero"
    assert r.stats() == stats  # execute() does not count
    r.reset_stats()
    assert set(r.stats().values()) == {0}


def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    r = CodeExecution(timeout=1.0, max_workers=2)
    pid_file = tmp_path / "grandchild.pid"
    sleeper = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    assert r(["p"] * 2, ["while True:\n    pass", sleeper], tests=[["assert True"]] * 2) == [0.0, 0.0]
    assert r.stats()["timeouts"] == 2
    assert r.stats()["runs"] == 2
    assert _dead_soon(int(pid_file.read_text()))  # the grandchild went with its process group


def test_leftovers_after_the_tests_do_not_matter(tmp_path: Path) -> None:
    pid_file = tmp_path / "background.pid"
    program = ADD + (
        "import atexit, subprocess, sys, threading, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()  # non-daemon: would block shutdown\n"
        "atexit.register(time.sleep, 60)\n"
    )
    # The runner exits right after its record, skipping atexit handlers and thread joins (else: a timeout).
    result = CodeExecution(timeout=5.0).execute(program, ADD_TESTS)
    assert result.outcome == "passed"
    assert result.passed == 2
    assert _dead_soon(int(pid_file.read_text()))  # background processes are killed after a normal exit too


def test_memory_bombs_score_zero_and_are_counted() -> None:
    r = CodeExecution(memory_mb=256, timeout=10.0)
    bombs = [
        ADD + "x = bytearray(10**10)",
        ADD + "x = []\nwhile True:\n    x.append(bytearray(10**6))",
        ADD,  # the bomb is in a test: still a memory error, and 0
    ]
    tests = [ADD_TESTS, ADD_TESTS, ["assert add(1, 2) == 3", "y = [0] * 10**10"]]
    assert r(["p"] * 3, bombs, tests=tests) == [0.0, 0.0, 0.0]
    assert r.stats()["memory_errors"] == 3
    assert r.stats()["runs"] == 3


def test_files_land_in_a_deleted_temp_dir() -> None:
    program = (
        "import os\n"
        "os.makedirs('sub', exist_ok=True)\n"
        "open('sub/out.txt', 'w').write('hello')\n"
        "os.chmod('sub/out.txt', 0o400); os.chmod('sub', 0o500)  # read-only: cleanup must cope\n"
        "print(os.path.abspath('sub/out.txt'))\n"
        "print(os.environ.get('HOME'), sorted(os.environ))\n"
    )
    result = CodeExecution().execute(program, ["assert open('sub/out.txt').read() == 'hello'"])
    assert result.outcome == "passed", result
    written, env_line = result.stdout.splitlines()
    assert written.startswith(os.path.realpath(tempfile.gettempdir())) or written.startswith(tempfile.gettempdir())
    assert not written.startswith(os.getcwd())
    assert not Path(written).exists()
    assert not Path(written).parent.parent.exists()
    assert "DLLM_ZOO_CACHE" not in env_line  # the trainer's environment does not leak in


# ------------------------------------------------------------------------------------------------- extraction


def test_extract_code() -> None:
    assert extract_code("x = 1") == "x = 1"
    two = "```python\na = 1\n```\nthen\n```py\nb = 2\n```\n```text\nnot code\n```"
    assert extract_code(two) == "b = 2\n"  # the last python block; a ```text block is skipped
    assert extract_code("<think>plan</think>\n```\nc = 3\n```") == "c = 3\n"  # unlabelled counts
    assert extract_code("```python\nd = 4\nprint(d)") == "d = 4\nprint(d)"  # cut off mid-block

    fenced = f"Answer:\n```python\n{ADD}```"
    assert CodeExecution()(["p"], [fenced], tests=[ADD_TESTS]) == [1.0]
    off = CodeExecution(extract=False)
    assert off(["p"], [fenced], tests=[ADD_TESTS]) == [0.0]
    assert off.stats()["syntax_errors"] == 1


# ------------------------------------------------------------------------------------------------- contract


def test_not_applicable_and_bad_fields() -> None:
    r = CodeExecution()
    assert r(["p", "p"], [ADD, ADD], tests=[None, None]) == [None, None]
    assert r.stats()["runs"] == 0
    with pytest.raises(KeyError, match="'tests'"):
        r(["p"], [ADD], answer=["3"])
    with pytest.raises(ValueError, match="1 entries for 2 completions"):
        r(["p", "p"], [ADD, ADD], tests=[ADD_TESTS])
    with pytest.raises(ValueError, match="non-empty"):
        r(["p"], [ADD], tests=[[]])
    with pytest.raises(ValueError, match="empty test code"):
        r(["p"], [ADD], tests=["  "])
    with pytest.raises(ValueError, match="must be None"):
        r(["p"], [ADD], tests=[[1, 2]])
    with pytest.raises(ValueError, match="timeout"):
        CodeExecution(timeout=0)
    with pytest.raises(FileNotFoundError):
        CodeExecution(python="/nonexistent/python")


def test_pickle_round_trip() -> None:
    r = CodeExecution(timeout=3.0, memory_mb=None, partial=True, name="mbpp")
    r(["p"], [ADD], tests=[ADD_TESTS])
    clone = pickle.loads(pickle.dumps(r))
    assert repr(clone) == repr(r)
    assert clone.stats() == r.stats()
    assert clone.name == "mbpp"
    assert clone(["p"], ["def add(a, b): return 3"], tests=[ADD_TESTS]) == [0.5]
    assert clone.stats()["runs"] == 2
    assert r.stats()["runs"] == 1
    result = clone.execute(ADD, ADD_TESTS)
    assert isinstance(result, ExecutionResult)
    assert pickle.loads(pickle.dumps(result)) == result


def test_batch_runs_concurrently(tmp_path: Path) -> None:
    # Two programs that each wait for the other's marker file: they pass only if they run at the same time.
    def rendezvous(me: str, other: str, wait: float) -> str:
        return (
            "import pathlib, time\n"
            f"d = pathlib.Path({str(tmp_path)!r})\n"
            f"(d / {me!r}).touch()\n"
            "t = time.monotonic()\n"
            f"while not (d / {other!r}).exists():\n"
            f"    if time.monotonic() - t > {wait}:\n"
            "        raise TimeoutError('alone')\n"
            "    time.sleep(0.01)\n"
        )

    together = [rendezvous("a", "b", 5.0), rendezvous("b", "a", 5.0)]
    assert CodeExecution(timeout=10.0, max_workers=2)(["p"] * 2, together, tests=[["pass"]] * 2) == [1.0, 1.0]

    for marker in tmp_path.iterdir():
        marker.unlink()
    one_by_one = CodeExecution(timeout=10.0, max_workers=1)
    alone = [rendezvous("a", "b", 0.3), rendezvous("b", "a", 0.3)]
    assert one_by_one(["p"] * 2, alone, tests=[["pass"]] * 2) == [0.0, 1.0]  # the first waited alone
    assert one_by_one.stats()["errors"] == 1
