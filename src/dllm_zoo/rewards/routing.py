"""Diversified rewards: apply a reward only to the samples of some task types (MMaDA UniGRPO, research/mmada.md §4.3).

MMaDA scores text reasoning with correctness + format, multimodal reasoning with the same plus CLIP alignment, and
text-to-image with alignment only. In one mixed batch this is each reward returning ``None`` (not applicable) outside
its task types; :class:`ForTasks` adds that to any reward, keyed by a per-sample ``task`` field
(:class:`~dllm_zoo.data.prompts.PromptDataModule` fills it with the synthetic task's name when the data has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dllm_zoo.rewards.base import Reward, field


class ForTasks(Reward):
    """``reward`` on the samples whose ``task_field`` is one of ``tasks``; ``None`` on the others.

    Only the applicable samples are passed to the inner reward (so a correctness reward never sees a caption task's
    answers). The metric key is the inner reward's name.

    Args:
        reward: The reward to route.
        tasks: Task types it applies to (values of ``task_field``).
        task_field: The per-sample field holding the task type.

    Example:
        >>> from dllm_zoo.rewards import ArithmeticCorrectness
        >>> r = ForTasks(ArithmeticCorrectness(), tasks=["arithmetic"])
        >>> r(["1+1=?", "what colour?"], ["2", "red"], answer=["2", "red"], task=["arithmetic", "shapes"])
        [1.0, None]
    """

    def __init__(self, reward: Reward, tasks: Sequence[str], task_field: str = "task") -> None:
        if not tasks:
            raise ValueError("ForTasks needs at least one task type in `tasks`")
        self.reward = reward
        self.tasks = [str(t) for t in tasks]
        self.task_field = task_field
        self.name = reward.name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """See :meth:`Reward.__call__`; needs the per-sample field ``task_field``."""
        kinds = field(fields, self.task_field, self, len(completions))
        keep = [i for i, kind in enumerate(kinds) if kind in self.tasks]
        out: list[float | None] = [None] * len(completions)
        if not keep:
            return out
        sub = {k: [v[i] for i in keep] for k, v in fields.items()}
        scores = self.reward([prompts[i] for i in keep], [completions[i] for i in keep], **sub)
        if len(scores) != len(keep):
            raise ValueError(f"reward {self.name!r} returned {len(scores)} scores for {len(keep)} completions")
        for i, s in zip(keep, scores):
            out[i] = s
        return out

    def __repr__(self) -> str:
        return f"ForTasks({self.reward!r}, tasks={self.tasks})"
