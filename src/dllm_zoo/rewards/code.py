"""Code-execution reward: run each completion's Python program against the sample's test cases in a child process.

The verifiable reward of code RL: TraceRL scores code completions by running their tests (Gen-Verse/dLLM-RL
``reward/rl_execute.py`` + ``rl_code_reward.py``, research/tracerl_llada.md; "sandboxed execution", research/peers.md
§1.7), as does ESPO (code sandboxes, E2B or local; research/peers.md). Here each program runs in a fresh
``python -I`` child process with resource limits, in a temporary directory, and is killed (with its whole process
group) at a wall-clock timeout; every failure mode becomes a score of 0 and a counter in
:meth:`CodeExecution.stats`, never an exception in the training process.

What is isolated, and what is NOT (read before pointing this at untrusted code):

* Isolated: a separate process (a crash, ``os._exit``, a segfault or an infinite loop cannot take the trainer down);
  limits on address space (``RLIMIT_AS``), CPU time (``RLIMIT_CPU``), file size (``RLIMIT_FSIZE``, which also caps
  the captured stdout/stderr), core dumps (``RLIMIT_CORE`` = 0) and optionally processes (``RLIMIT_NPROC``); a
  wall-clock kill of the whole process group (grandchildren included); a fresh working directory that is deleted
  afterwards; a minimal environment (no secrets from the trainer's environment variables); stdin at EOF; isolated
  mode (``-I``: no user site-packages, no ``PYTHON*`` variables, no current directory on ``sys.path``).
* NOT isolated: this is **not a security sandbox**. There is no network namespace (the program can open sockets),
  no seccomp filter, no filesystem jail (it can read, and write, anything the trainer's user can, by absolute path),
  no user namespace (it runs as the trainer's user; ``RLIMIT_NPROC`` does not apply to root). A program that
  deliberately attacks the grader (inspecting the runner's frames for the nonce, monkeypatching the runner's helpers,
  ``setsid`` to escape the process-group kill) is not stopped, nor is the classic RL reward hack of returning an
  object whose ``__eq__`` is always true (``assert f(x) == y`` then passes): watch for it in the completions.
  For hostile code run this inside a container / gVisor / nsjail / firejail, or a remote executor.

What the nonce guards against is the *accidental* fake pass: the score is computed only from a result record that the
runner writes, after the tests, to a file outside the program's working directory, and that must carry a random
per-run nonce the program never sees in its namespace; printing a look-alike line, ``sys.exit(0)``, ``os._exit(0)`` or
dying before the tests run all score 0.

POSIX only (``resource``, process groups).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from dllm_zoo.rewards.base import Reward, field

Outcome = Literal["passed", "failed", "syntax_error", "error", "timeout", "memory_error", "crash"]

# Outcome -> stats() counter; every run lands in exactly one of these (so they sum to ``runs``).
_COUNTER: dict[str, str] = {
    "passed": "passed",
    "failed": "failed",
    "syntax_error": "syntax_errors",
    "error": "errors",
    "timeout": "timeouts",
    "memory_error": "memory_errors",
    "crash": "crashes",
}
_STATS_KEYS = ("runs", *_COUNTER.values(), "tests_total", "tests_passed")

# Fenced blocks: ```lang\n ... ``` (an unterminated last block, e.g. a generation cut off, runs to the end).
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_LANGS = frozenset({"", "python", "python3", "py", "py3"})

# Signs in stderr that a child without a result record died of memory (allocation failure inside C code).
_MEMORY_SIGNS = ("MemoryError", "Cannot allocate memory", "out of memory", "std::bad_alloc")

# The child's program. It runs in ``python -I -c``; everything it needs is bound before the completion's code runs, so
# a program that rebinds ``json``/``os`` in its own namespace cannot change the record. Limits are set here rather
# than in ``preexec_fn``, which is unsafe in a multi-threaded parent (the trainer, and our thread pool).
_RUNNER = r"""
import json, os, resource, signal, sys

def _main():
    job_path = sys.argv[1]
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    os.remove(job_path)  # the program never sees the job file (tests, nonce)
    nonce, tests = job["nonce"], job["tests"]
    write, truncate, dumps, exit_now = os.pwrite, os.ftruncate, json.dumps, os._exit
    fd = os.open(job["result"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the file-size limit: OSError (EFBIG), not a silent kill
    for name, soft, hard in job["limits"]:
        res = getattr(resource, name)
        cur_hard = resource.getrlimit(res)[1]
        if cur_hard != resource.RLIM_INFINITY:  # cannot raise above the inherited hard limit
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        try:
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            pass

    def describe(exc):
        try:
            return (type(exc).__name__ + ": " + str(exc))[:500]
        except BaseException:
            return type(exc).__name__

    record = {"nonce": nonce, "outcome": "ok", "passed": 0, "total": len(tests), "error": None, "memory": False}
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(job["code"], "solution.py", "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in the source
        record.update(outcome="syntax_error", error=describe(exc))
        code = None
    except MemoryError as exc:
        record.update(outcome="memory_error", error=describe(exc))
        code = None
    if code is not None:
        try:
            exec(code, ns)
        except MemoryError as exc:
            ns.clear()  # free what the program holds so the record can still be written
            record.update(outcome="memory_error", error=describe(exc))
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the program did not finish
            record.update(outcome="error", error=describe(exc))
    if record["outcome"] == "ok":
        passed = 0
        for i, test in enumerate(tests):
            try:
                exec(compile(test, "test_%d" % i, "exec"), ns)
                passed += 1
            except MemoryError as exc:
                ns.clear()  # scores 0 anyway; free the memory so the record can be written
                record["memory"] = True
                record["error"] = describe(exc)
                break
            except BaseException as exc:
                record["error"] = record["error"] or "test %d: %s" % (i, describe(exc))
        record["passed"] = passed
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        truncate(fd, 0)  # whatever the program wrote to the file is dropped (it lacks the nonce anyway)
        write(fd, dumps(record).encode(), 0)
    except BaseException:
        exit_now(3)
    exit_now(0)  # skip atexit handlers and non-daemon threads the program may have left behind

_main()
"""


@dataclass(frozen=True)
class ExecutionResult:
    """What one program run did.

    Attributes:
        outcome: ``passed`` (all tests), ``failed`` (ran, some test failed), ``syntax_error``, ``error`` (the program
            raised, ``sys.exit`` included), ``timeout`` (wall or CPU limit), ``memory_error`` (``MemoryError``
            anywhere, or died of an allocation failure) or ``crash`` (died without a valid result record:
            ``os._exit``, a signal, a failed spawn).
        passed: Tests that passed (0 unless the program ran to the end).
        total: Tests given.
        returncode: The child's exit status (negative: killed by that signal); ``None`` if it never started.
        error: The first exception seen (``"ZeroDivisionError: division by zero"``), or why the run failed.
        stdout: The child's stdout (its tail, at most ``max_output`` bytes, decoded).
        stderr: The child's stderr (likewise).
        seconds: Wall time of the run.
    """

    outcome: Outcome
    passed: int
    total: int
    returncode: int | None
    error: str | None
    stdout: str
    stderr: str
    seconds: float


def extract_code(completion: str) -> str:
    r"""The code of the last fenced block labelled ``python``/``py`` (or unlabelled), else the whole completion.

    An unterminated last block (a generation that stopped mid-block) runs to the end of the text.

    Example:
        >>> extract_code("Plan.\n```python\ndef f():\n    return 1\n```\nDone.")
        'def f():\n    return 1\n'
        >>> extract_code("x = 1")
        'x = 1'
    """
    code: str | None = None
    for match in _FENCE.finditer(completion):
        if match.group(1).strip().lower() in _PYTHON_LANGS:
            code = match.group(2)
    return completion if code is None else code


def _tail(path: str, limit: int) -> str:
    """The last ``limit`` bytes of the file at ``path``, decoded (``""`` if it is missing)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return f"[... {size - limit} bytes cut]\n{text}" if size > limit else text


def _remove_tree(path: str) -> None:
    """``rm -rf path``, also when the program made its files read-only (``chmod`` then retry)."""

    def retry(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


class CodeExecution(Reward):
    r"""``score`` when the completion's Python program passes the sample's tests (run in a child process), else 0.

    Per sample the code is :func:`extract_code` of the completion (with ``extract``; else the whole completion) and
    the tests are the per-sample field ``tests_field``: a list of test snippets (typically ``assert`` statements),
    each run separately and counted, or one string of test code (a single test). ``None`` tests mean not applicable
    (``None``). The program runs first in a fresh namespace (``__name__ == "__main__"``), then each test in that
    namespace; see the module docstring for how the child is limited and what is *not* isolated.

    Every run lands in one outcome (:class:`ExecutionResult`); only ``passed`` (and ``failed`` with ``partial``) score
    above 0. Crashes, hangs, exceptions, memory blow-ups, syntax errors and ``sys.exit`` are counted in
    :meth:`stats`, never raised. The batch runs concurrently on up to ``max_workers`` threads, each waiting on one child
    process. Each run starts a Python interpreter (tens of ms of start-up, counted in the timeout).

    Sources: TraceRL / dLLM-RL code rewards (``rl_execute.py``, research/tracerl_llada.md); ESPO's code sandboxes
    (research/peers.md).

    Args:
        timeout: Wall-clock seconds per program, interpreter start-up included; the process group is killed after.
        memory_mb: Address-space limit (``RLIMIT_AS``) in MiB; ``None`` for none. It limits *virtual* memory, so
            thread-heavy libraries need more than their resident size.
        score: Reward of a program that passes all tests.
        partial: ``False``: ``score`` only when all tests pass. ``True``: ``score`` times the fraction passed.
        tests_field: Name of the per-sample field with the tests.
        name: Metric key (``reward/<name>``).
        max_workers: Programs run at the same time.
        extract: Take the code from the last python fenced block of the completion when there is one.
        file_size_mb: Largest file the program may write (``RLIMIT_FSIZE``; stdout/stderr are files, so this caps
            them too).
        max_processes: ``RLIMIT_NPROC`` for the child, or ``None`` (default) to leave it. Linux counts *all*
            processes and threads of the user against it (the trainer's included) and ignores it for root, so it is a
            fork-bomb brake only when the reward runs as a dedicated user.
        max_output: Bytes of the tail of stdout/stderr kept in :class:`ExecutionResult`.
        python: Interpreter to run; default ``None``: the current one (``sys.executable``, looked up where the reward
            runs, so a pickled reward uses its worker's interpreter).

    Raises:
        KeyError: (on call) when the batch has no ``tests_field`` field.
        ValueError: (on call) when a sample's tests are neither ``None``, a non-empty string, nor a non-empty list of
            strings.

    Example:
        >>> r = CodeExecution(timeout=5.0)
        >>> r(["Write add(a, b)."] * 2, ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b): 0"],
        ...   tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"]] * 2)
        [1.0, 0.0]
        >>> r.stats()["passed"], r.stats()["failed"]
        (1, 1)
    """

    def __init__(
        self,
        timeout: float = 5.0,
        memory_mb: int | None = 512,
        score: float = 1.0,
        partial: bool = False,
        tests_field: str = "tests",
        name: str = "code",
        max_workers: int = 2,
        extract: bool = True,
        file_size_mb: int = 16,
        max_processes: int | None = None,
        max_output: int = 4096,
        python: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if memory_mb is not None and memory_mb < 32:
            raise ValueError(f"memory_mb={memory_mb} is too small for a Python interpreter (use >= 32, or None)")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.score = float(score)
        self.partial = partial
        self.tests_field = tests_field
        self.name = name
        self.max_workers = max_workers
        self.extract = extract
        self.file_size_mb = file_size_mb
        self.max_processes = max_processes
        self.max_output = max_output
        self.python = python
        if python is not None and not os.access(python, os.X_OK):  # else it would show up only as crashes
            raise FileNotFoundError(f"reward {name!r}: no executable Python interpreter at {python!r}")
        self._stats: dict[str, int] = dict.fromkeys(_STATS_KEYS, 0)

    # ------------------------------------------------------------------------------------------------- the reward

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """See :meth:`Reward.__call__`; needs the per-sample field ``tests_field``."""
        all_tests = field(fields, self.tests_field, self, len(completions))
        jobs: list[tuple[int, str, list[str]]] = []
        for i, (completion, tests) in enumerate(zip(completions, all_tests)):
            if tests is not None:
                jobs.append((i, extract_code(completion) if self.extract else completion, self._tests(tests)))
        out: list[float | None] = [None] * len(completions)
        if not jobs:
            return out
        if self.max_workers == 1 or len(jobs) == 1:
            results = [self.execute(code, tests) for _, code, tests in jobs]
        else:
            # Threads only wait on child processes, so the GIL is no bottleneck; the pool is not kept (picklable).
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs))) as pool:
                results = list(pool.map(lambda job: self.execute(job[1], job[2]), jobs))
        for (i, _, _), result in zip(jobs, results):
            self._count(result)  # here, on the calling thread: no lock needed (a lock would not pickle)
            out[i] = self._score(result)
        return out

    def execute(self, code: str, tests: str | Sequence[str]) -> ExecutionResult:
        """Run ``code`` and then ``tests`` in a limited child process; never raises for anything the code does.

        Does not touch :meth:`stats` (only calls of the reward are counted). Thread-safe.

        Args:
            code: The program (already extracted).
            tests: One string of test code, or a list of test snippets each counted separately.

        Returns:
            The run's :class:`ExecutionResult`.
        """
        tests = self._tests(tests)
        start = time.monotonic()
        try:
            root = tempfile.mkdtemp(prefix="dllm_code_")
        except OSError as exc:
            return ExecutionResult("crash", 0, len(tests), None, f"no temporary directory: {exc}", "", "", 0.0)
        try:
            return self._run(root, code, tests, start)
        finally:
            _remove_tree(root)

    # ------------------------------------------------------------------------------------------------- statistics

    def stats(self) -> dict[str, int]:
        """Counts since the last :meth:`reset_stats`.

        ``runs`` (programs run) is the sum of the outcome counters ``passed``, ``failed``, ``syntax_errors``,
        ``errors``, ``timeouts``, ``memory_errors`` and ``crashes``; ``tests_total`` / ``tests_passed`` count test
        cases (a run that does not reach its tests passes none of them).
        """
        return dict(self._stats)

    def reset_stats(self) -> None:
        """Zero all counters of :meth:`stats`."""
        self._stats = dict.fromkeys(_STATS_KEYS, 0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(timeout={self.timeout}, memory_mb={self.memory_mb}, score={self.score}, "
            f"partial={self.partial}, tests_field={self.tests_field!r}, name={self.name!r}, "
            f"max_workers={self.max_workers})"
        )

    # ------------------------------------------------------------------------------------------------- internals

    def _tests(self, tests: Any) -> list[str]:
        """``tests`` as a list of snippets, checked (a dataset error is raised, unlike anything the code does)."""
        if isinstance(tests, str):
            if not tests.strip():
                raise ValueError(f"reward {self.name!r}: empty test code; use None where the reward does not apply")
            return [tests]
        if isinstance(tests, Sequence) and tests and all(isinstance(t, str) for t in tests):
            return list(tests)
        raise ValueError(
            f"reward {self.name!r}: field {self.tests_field!r} must be None, a string of test code or a non-empty "
            f"list of strings, got {tests!r:.200}"
        )

    def _limits(self) -> list[tuple[str, int, int]]:
        """``(resource name, soft, hard)`` limits for the child's runner."""
        cpu = math.ceil(self.timeout) + 1  # backstop only: the wall-clock kill comes first
        limits = [
            ("RLIMIT_CPU", cpu, cpu + 1),  # soft: SIGXCPU, hard: SIGKILL
            ("RLIMIT_FSIZE", self.file_size_mb << 20, self.file_size_mb << 20),
            ("RLIMIT_CORE", 0, 0),  # a crash must not leave (or pipe to a handler) a core dump
        ]
        if self.memory_mb is not None:
            limits.append(("RLIMIT_AS", self.memory_mb << 20, self.memory_mb << 20))
        if self.max_processes is not None:
            limits.append(("RLIMIT_NPROC", self.max_processes, self.max_processes))
        return limits

    def _env(self, home: str, tmp: str) -> dict[str, str]:
        """A minimal environment: nothing of the trainer's (tokens, CUDA settings) leaks into the child."""
        return {
            "PATH": os.defpath,
            "HOME": home,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            # One thread per numeric library: smaller virtual size under RLIMIT_AS, no oversubscription of the cores.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2",
        }

    def _run(self, root: str, code: str, tests: list[str], start: float) -> ExecutionResult:
        """One run inside the private directory ``root`` (``work/`` is the program's cwd; the rest it is not told)."""
        work = os.path.join(root, "work")
        job_path, result_path = os.path.join(root, "job.json"), os.path.join(root, "result.json")
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        nonce = secrets.token_hex(16)
        job = {"nonce": nonce, "tests": tests, "code": code, "result": result_path, "limits": self._limits()}
        try:
            os.mkdir(work)
            with open(job_path, "w", encoding="utf-8") as f:
                json.dump(job, f)
            returncode, timed_out = self._spawn_and_wait(job_path, work, out_path, err_path, start)
        except OSError as exc:  # disk full, spawn failed (EAGAIN) ...: counted, not raised
            seconds = time.monotonic() - start
            return ExecutionResult("crash", 0, len(tests), None, f"could not run: {exc}", "", "", seconds)
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out_path, self.max_output), _tail(err_path, self.max_output)
        record = None if timed_out else self._record(result_path, nonce, len(tests))
        outcome: Outcome
        passed = 0
        error: str | None
        if timed_out:
            outcome, error = "timeout", f"killed after {self.timeout:g} s of wall time"
        elif record is not None:
            error = record["error"]
            if record["outcome"] == "ok":
                passed = record["passed"]
                outcome = "memory_error" if record["memory"] else "passed" if passed == len(tests) else "failed"
            else:
                outcome = record["outcome"]
        elif returncode == -signal.SIGXCPU:  # CPU-time limit (before the wall clock when multi-threaded)
            outcome, error = "timeout", "killed at the CPU-time limit"
        elif any(sign in stderr for sign in _MEMORY_SIGNS):
            outcome, error = "memory_error", f"died of an allocation failure (exit status {returncode})"
        else:
            outcome, error = "crash", f"no result record (exit status {returncode})"
        return ExecutionResult(outcome, passed, len(tests), returncode, error, stdout, stderr, seconds)

    def _spawn_and_wait(self, job_path: str, work: str, out_path: str, err_path: str, start: float) -> tuple[int, bool]:
        """Start the runner on ``job_path`` and wait; returns ``(exit status, timed out)``.

        The process group is killed in any case once the child is done, so background processes do not outlive it.
        """
        # stdout/stderr go to files (capped by RLIMIT_FSIZE), not pipes: no reader thread, no unbounded buffering.
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [self.python or sys.executable, "-I", "-B", "-X", "utf8", "-c", _RUNNER, job_path],
                stdin=subprocess.DEVNULL,  # reads see EOF at once (input() raises EOFError)
                stdout=out,
                stderr=err,
                cwd=work,
                env=self._env(home=work, tmp=work),
                start_new_session=True,  # its own process group, so the kill reaches grandchildren
                close_fds=True,  # none of the trainer's files or sockets
            )
        timed_out = False
        try:
            proc.wait(timeout=max(0.0, self.timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode, timed_out

    @staticmethod
    def _record(path: str, nonce: str, total: int) -> dict[str, Any] | None:
        """The runner's result record, or ``None`` when missing, malformed or without this run's nonce."""
        try:
            with open(path, encoding="utf-8") as f:
                record = json.loads(f.read(1 << 16))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("nonce") != nonce or record.get("total") != total:
            return None
        passed = record.get("passed")
        outcomes = ("ok", "syntax_error", "error", "memory_error")
        if not isinstance(passed, int) or not 0 <= passed <= total or record.get("outcome") not in outcomes:
            return None
        record["error"] = record["error"] if isinstance(record.get("error"), str) else None
        record["memory"] = record.get("memory") is True
        return record

    def _score(self, result: ExecutionResult) -> float:
        """The sample's score from its run: only ``passed`` / ``failed`` can be above 0."""
        if result.outcome == "passed":
            return self.score
        if result.outcome == "failed" and self.partial:
            return self.score * result.passed / result.total
        return 0.0

    def _count(self, result: ExecutionResult) -> None:
        self._stats["runs"] += 1
        self._stats[_COUNTER[result.outcome]] += 1
        self._stats["tests_total"] += result.total
        self._stats["tests_passed"] += result.passed
