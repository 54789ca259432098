"""Rewards: plain, picklable callables ``(prompts, completions, **fields) -> list[float | None]`` (DESIGN.md §3).

A user's own :class:`Reward` subclass in their own module works from YAML by its full ``class_path``.
"""

from dllm_zoo.rewards.alignment import ShapesAlignment
from dllm_zoo.rewards.base import Reward
from dllm_zoo.rewards.clip import ClipScore
from dllm_zoo.rewards.code import CodeExecution
from dllm_zoo.rewards.correctness import ArithmeticCorrectness, ShapesAnswerCorrectness
from dllm_zoo.rewards.format import ThinkFormat, after_think
from dllm_zoo.rewards.partial import PartialAlignment
from dllm_zoo.rewards.routing import ForTasks

__all__ = [
    "ArithmeticCorrectness",
    "ClipScore",
    "CodeExecution",
    "ForTasks",
    "PartialAlignment",
    "Reward",
    "ShapesAlignment",
    "ShapesAnswerCorrectness",
    "ThinkFormat",
    "after_think",
]
