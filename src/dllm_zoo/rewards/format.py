"""The ``<think>…</think>`` format reward (MMaDA UniGRPO: format **0.5**, research/mmada.md §4.3)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dllm_zoo.rewards.base import Reward

# One think block at the very start (after optional whitespace); its content holds no think tag, so exactly one.
_THINK = re.compile(r"\s*<think>((?:(?!</?think>).)*)</think>(.*)", re.DOTALL)
_TAG = re.compile(r"</?think>")


def after_think(completion: str) -> str:
    """The final-answer part of a completion: the text after its last ``</think>`` (all of it without one), stripped.

    Args:
        completion: A generated text.

    Returns:
        The answer text.

    Example:
        >>> after_think("<think>1+1=2</think> 2"), after_think("a red x at the top")
        ('2', 'a red x at the top')
    """
    return completion.rsplit("</think>", 1)[-1].strip()


class ThinkFormat(Reward):
    r"""``score`` when the completion is one ``<think>…</think>`` block followed by a final answer, else 0.

    The exact rule: the completion fully matches ``\s*<think>(C)</think>(A)`` with ``.`` matching newlines, where

    * only whitespace may precede ``<think>``;
    * the reasoning ``C`` may be empty and holds no ``<think>`` or ``</think>`` (so there is exactly one block);
    * the answer ``A`` holds no ``<think>`` or ``</think>`` either, and with ``require_answer`` it must have a
      non-whitespace character (``"<think>…</think>"`` alone scores 0).

    The answer's content is not judged here (that is a correctness reward's job). Never ``None``: every completion
    has a format.

    Sources: MMaDA UniGRPO format reward 0.5 "if the output follows ``<think>…</think>``" (research/mmada.md §4.3);
    the regex style of TRL's ``think_format_reward`` and d1's ``strict_format_reward_func`` (0.5).

    Args:
        score: Reward of a well-formed completion (MMaDA and d1 use 0.5).
        name: Metric key (``reward/<name>``).
        require_answer: Whether a non-empty answer must follow ``</think>``.

    Example:
        >>> r = ThinkFormat(score=0.5)
        >>> r([""] * 4, ["<think>7+8=15</think> 15", "15", "<think>a</think><think>b</think> 1", "<think>a</think>"])
        [0.5, 0.0, 0.0, 0.0]
    """

    def __init__(self, score: float = 1.0, name: str = "format", require_answer: bool = True) -> None:
        self.score = float(score)
        self.name = name
        self.require_answer = require_answer

    def matches(self, completion: str) -> bool:
        """Whether ``completion`` follows the format (see the class docstring)."""
        match = _THINK.fullmatch(completion)
        if match is None:
            return False
        answer = match.group(2)
        if _TAG.search(answer):
            return False
        return bool(answer.strip()) or not self.require_answer

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """See :meth:`Reward.__call__`; uses only the completions."""
        return [self.score if self.matches(c) else 0.0 for c in completions]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score={self.score}, name={self.name!r}, require_answer={self.require_answer})"
