"""Arithmetic with a digit-by-digit ``<think>`` trace and an exact verifier (the stand-in for GSM8K/MATH)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

from dllm_zoo.data.stream import mix_seed
from dllm_zoo.data.synthetic.base import Split, SyntheticTask

_INT = re.compile(r"-?\d+")
OPS = ("+", "-", "*")


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion, normalised as an integer string (``"085"`` -> ``"85"``).

    The first integer after the last ``</think>``; without a think block, the last integer of the text.

    Args:
        completion: The generated response text.

    Returns:
        The answer, or ``None`` if there is no integer where one is expected.

    Example:
        >>> extract_answer("<think>7+8=15 carry 1, 4+3+1=8</think> 85")
        '85'
        >>> extract_answer("it is -9.") , extract_answer("<think>1+1=2</think>") is None
        ('-9', True)
    """
    if "</think>" in completion:
        match = _INT.search(completion.rsplit("</think>", 1)[1])
        return None if match is None else str(int(match.group()))
    found = _INT.findall(completion)
    return str(int(found[-1])) if found else None


def _digits(n: int, width: int) -> list[int]:
    """Least significant first, zero-padded to ``width``."""
    return [(n // 10**i) % 10 for i in range(width)]


def add_trace(a: int, b: int) -> str:
    """Column addition from the right: ``47+38`` -> ``"7+8=15 carry 1, 4+3+1=8"``."""
    width = max(len(str(a)), len(str(b)))
    parts, carry = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        s = da + db + carry
        term = f"{da}+{db}{'+1' if carry else ''}={s}"
        carry = s // 10
        parts.append(term + (" carry 1" if carry else ""))
    return ", ".join(parts)


def sub_trace(a: int, b: int) -> str:
    """Column subtraction with borrows; ``a < b`` is written as ``swap,`` and ``b - a``.

    ``47-38`` -> ``"7+10-8=9 borrow 1, 4-3-1=0"``; ``38-47`` -> ``"swap, 7+10-8=9 borrow 1, 4-3-1=0"``.
    """
    prefix = ""
    if a < b:
        a, b, prefix = b, a, "swap, "
    width = len(str(a))
    parts, borrow = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        d = da - db - borrow
        less = "-1" if borrow else ""
        if d < 0:
            parts.append(f"{da}+10-{db}{less}={d + 10} borrow 1")
            borrow = 1
        else:
            parts.append(f"{da}-{db}{less}={d}")
            borrow = 0
    return prefix + ", ".join(parts)


def mul_trace(a: int, b: int) -> str:
    """One partial product per digit of ``b``, then their shifted sum.

    ``47*38`` -> ``"47*8=376, 47*3=141, 376+1410=1786"``; ``47*8`` -> ``"47*8=376"``.
    """
    digits = _digits(b, len(str(b)))
    parts = [f"{a}*{d}={a * d}" for d in digits]
    if len(digits) > 1:
        parts.append("+".join(str(a * d * 10**i) for i, d in enumerate(digits)) + f"={a * b}")
    return ", ".join(parts)


_TRACES = {"+": add_trace, "-": sub_trace, "*": mul_trace}
_RESULTS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class Arithmetic(SyntheticTask):
    """Integer ``+``, ``-`` and ``*`` questions with a short, regular, digit-by-digit reasoning trace.

    A sample: ``prompt`` ``"47+38=?"``, ``response`` ``"<think>7+8=15 carry 1, 4+3+1=8</think> 85"``,
    ``answer`` ``"85"`` and ``text`` = prompt + ``" "`` + response (49 bytes; every sample with operands up to 99 is at
    most 61 bytes, so it fits ``seq_len=64`` with BOS and EOS in the ``lm`` format). Operands are uniform in
    ``[0, max_operand]``. The validation questions are distinct; training questions are drawn with replacement
    from all the others, so train and val never share a question.

    Args:
        num_train: Training samples.
        num_val: Validation samples (distinct questions; at most half of all questions).
        max_operand: Largest operand (difficulty: 9 = one digit, 99 = two digits, …).
        ops: Operators, any of ``"+"``, ``"-"``, ``"*"``.
        seed: Seed of the generator.
        worked_fraction: Fraction of *training* responses that carry the worked trace; the others answer directly,
            ``"<think></think> 85"``. Below 1 the task makes a policy that mostly answers directly but can reason:
            the warm start of the RL recipes, where RL must discover that reasoning pays (validation responses
            always carry the trace).

    Example:
        >>> task = Arithmetic(num_train=2, num_val=1, seed=0)
        >>> sample = next(task.generate("val"))
        >>> task.check(sample["response"], sample), task.check("<think></think> 1000", sample)
        (True, False)
    """

    name = "arithmetic"
    version = 1

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 256,
        max_operand: int = 99,
        ops: Sequence[str] = ("+", "-"),
        seed: int = 0,
        worked_fraction: float = 1.0,
    ) -> None:
        ops = tuple(ops)
        if not 0.0 <= worked_fraction <= 1.0:
            raise ValueError(f"worked_fraction must be in [0, 1], got {worked_fraction}")
        if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be distinct operators from {OPS}, got {ops}")
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}")
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
        space = (max_operand + 1) ** 2 * len(ops)
        if num_val > space // 2:
            raise ValueError(
                f"num_val={num_val} would take more than half of the {space} distinct questions "
                f"(max_operand={max_operand}, ops={ops}); lower num_val or raise max_operand"
            )
        self.num_train = num_train
        self.num_val = num_val
        self.max_operand = max_operand
        self.ops = ops
        self.seed = seed
        self.worked_fraction = float(worked_fraction)
        self._space = space

    def settings(self) -> dict[str, Any]:
        """See :meth:`SyntheticTask.settings`."""
        return {
            "num_train": self.num_train,
            "num_val": self.num_val,
            "max_operand": self.max_operand,
            "ops": list(self.ops),
            "seed": self.seed,
            "worked_fraction": self.worked_fraction,
        }

    def num_samples(self, split: Split) -> int:
        """See :meth:`SyntheticTask.num_samples`."""
        return self.num_train if split == "train" else self.num_val

    def _question(self, q: int) -> tuple[int, str, int]:
        rest, op_index = divmod(q, len(self.ops))
        a, b = divmod(rest, self.max_operand + 1)
        return a, self.ops[op_index], b

    def _val_questions(self) -> list[int]:
        return random.Random(mix_seed(self.seed, 0)).sample(range(self._space), self.num_val)

    def make_sample(self, a: int, op: str, b: int, worked: bool = True) -> dict[str, Any]:
        """The sample dict of the question ``a op b`` (with an empty think block unless ``worked``)."""
        result = _RESULTS[op](a, b)
        prompt = f"{a}{op}{b}=?"
        response = f"<think>{_TRACES[op](a, b) if worked else ''}</think> {result}"
        return {"prompt": prompt, "response": response, "answer": str(result), "text": f"{prompt} {response}"}

    def generate(self, split: Split) -> Iterator[dict[str, Any]]:
        """See :meth:`SyntheticTask.generate`."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        val = self._val_questions()
        if split == "val":
            for q in val:
                yield self.make_sample(*self._question(q))
            return
        held_out = set(val)
        rng = random.Random(mix_seed(self.seed, 1))
        # A stream of its own, so the questions are the same whatever the fraction.
        style = random.Random(mix_seed(self.seed, 2))
        for _ in range(self.num_train):
            q = rng.randrange(self._space)
            while q in held_out:
                q = rng.randrange(self._space)
            worked = self.worked_fraction >= 1.0 or style.random() < self.worked_fraction
            yield self.make_sample(*self._question(q), worked=worked)

    def check(self, completion: str, sample: dict[str, Any]) -> bool:
        """Exact match of :func:`extract_answer` with ``sample["answer"]``."""
        answer = extract_answer(completion)
        return answer is not None and answer == str(int(sample["answer"]))
