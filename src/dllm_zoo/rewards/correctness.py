"""Answer-correctness rewards: exact match of a completion's final answer with the sample's ``answer``.

The verifiable-answer term of UniGRPO (MMaDA: correctness **2.0** on GSM8K and multimodal math, research/mmada.md
§4.3) and of d1's GSM8K reward (``correctness_reward_func``: 2.0 on an exact match, ``diffu-grpo/reward_func.py``).
The synthetic tasks are the stand-ins: :class:`ArithmeticCorrectness` for GSM8K/MATH,
:class:`ShapesAnswerCorrectness` for visual question answering on ShapesWorld.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dllm_zoo.data.synthetic.arithmetic import extract_answer

# Private on purpose in shapes.py (one normalisation shared by ShapesWorld.check and this reward, never two copies).
from dllm_zoo.data.synthetic.shapes import _final_answer, _normalise
from dllm_zoo.rewards.base import Reward, field


def _integer(answer: Any, reward: Reward) -> str:
    """``answer`` as a normalised integer string (``"085"`` -> ``"85"``), as :meth:`Arithmetic.check` compares."""
    if isinstance(answer, int):
        return str(answer)
    try:
        return str(int(str(answer).strip()))
    except ValueError:
        raise ValueError(
            f"reward {reward.name!r} ({type(reward).__name__}) compares integers, but the field 'answer' holds "
            f"{answer!r}; use an integer answer (or None where the reward does not apply)"
        ) from None


class ArithmeticCorrectness(Reward):
    """``score`` when the completion's integer answer equals the sample's ``answer``, else 0.

    The completion's answer is :func:`~dllm_zoo.data.synthetic.arithmetic.extract_answer` (the first integer after
    the last ``</think>``; without a think block, the last integer of the text); the sample's ``answer`` (an ``int``
    or an integer string) is normalised the same way, exactly as :meth:`Arithmetic.check` does. A sample whose
    ``answer`` is ``None`` is not applicable (``None``).

    Sources: MMaDA UniGRPO correctness 2.0 (research/mmada.md §4.3); d1 GSM8K ``correctness_reward_func`` (2.0).

    Args:
        score: Reward of a correct answer (MMaDA and d1 use 2.0).
        name: Metric key (``reward/<name>``).

    Raises:
        KeyError: (on call) when the batch has no ``answer`` field.
        ValueError: (on call) when an ``answer`` is neither ``None`` nor an integer.

    Example:
        >>> r = ArithmeticCorrectness(score=2.0)
        >>> r(["47+38=?"] * 3, ["<think>7+8=15 carry 1, 4+3+1=8</think> 85", "<think></think> 84", "85"],
        ...   answer=["85", "85", None])
        [2.0, 0.0, None]
    """

    def __init__(self, score: float = 1.0, name: str = "correctness") -> None:
        self.score = float(score)
        self.name = name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """See :meth:`Reward.__call__`; needs the per-sample field ``answer``."""
        answers = field(fields, "answer", self, len(completions))
        out: list[float | None] = []
        for completion, answer in zip(completions, answers):
            if answer is None:
                out.append(None)
                continue
            target = _integer(answer, self)
            out.append(self.score if extract_answer(completion) == target else 0.0)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score={self.score}, name={self.name!r})"


class ShapesAnswerCorrectness(Reward):
    """``score`` when the completion's final answer equals the sample's ``answer`` (ShapesWorld VQA), else 0.

    The same rule as :meth:`ShapesWorld.check <dllm_zoo.data.synthetic.ShapesWorld.check>`: the answer is the text
    after the last ``</think>`` (all of it without one); case, runs of spaces and a trailing period do not matter
    (``"<think>…</think> Top Left."`` matches ``"top left"``). A sample whose ``answer`` is ``None`` is not
    applicable (``None``).

    Sources: MMaDA UniGRPO correctness on multimodal math / VQA (GeoQA, CLEVR; research/mmada.md §4.3).

    Args:
        score: Reward of a correct answer (MMaDA uses 2.0).
        name: Metric key (``reward/<name>``).

    Raises:
        KeyError: (on call) when the batch has no ``answer`` field.

    Example:
        >>> r = ShapesAnswerCorrectness()
        >>> r(["What color is the shape at the center?"] * 2, ["<think>center: red x.</think> Red.", "blue"],
        ...   answer=["red", "red"])
        [1.0, 0.0]
    """

    def __init__(self, score: float = 1.0, name: str = "correctness") -> None:
        self.score = float(score)
        self.name = name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """See :meth:`Reward.__call__`; needs the per-sample field ``answer``."""
        answers = field(fields, "answer", self, len(completions))
        return [
            None if answer is None else self.score if _final_answer(completion) == _normalise(str(answer)) else 0.0
            for completion, answer in zip(completions, answers)
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score={self.score}, name={self.name!r})"
