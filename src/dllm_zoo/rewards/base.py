"""The reward contract (DESIGN.md §3 "Rewards"; research/aesthetics.md (b)7).

A reward is a plain, picklable callable ``reward(prompts, completions, **fields) -> list[float | None]``:

* ``prompts`` / ``completions`` are the decoded texts of one rollout batch (``B`` each; a completion that is an image
  is given as ``""`` and the image arrives in a field);
* ``fields`` are per-sample lists of length ``B``: every column of the prompt samples (``answer``, ``caption``,
  ``image``, ``task`` …) plus what the rollout adds (``completion_ids``: token ids, ``images``: generated palette
  grids ``[H][W]`` or tensors). A reward takes what it needs by name and ignores the rest (``**fields``);
* ``None`` means "not applicable to this sample" (e.g. an image reward on a text task): it is neither a zero nor
  counted in that reward's mean.

``name`` becomes the metric key (``reward/<name>``). Parameterised rewards are small classes with typed ``__init__``
arguments (so YAML can build them by ``class_path``), never closures, so they pickle for worker processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any


class Reward(ABC):
    """Base class of rewards: ``(prompts, completions, **fields) -> list[float | None]``.

    Subclasses set ``name`` (class attribute, or per instance through ``__init__``) and implement ``__call__``.
    A user's own subclass in their own module works from YAML by its full ``class_path``; no registration.

    Example:
        >>> class Length(Reward):
        ...     name = "length"
        ...     def __call__(self, prompts, completions, **fields):
        ...         return [float(len(c)) for c in completions]
        >>> Length()(["q"], ["abc"])
        [3.0]
    """

    name: str = "reward"

    @abstractmethod
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """Score a batch.

        Args:
            prompts: ``B`` prompt texts.
            completions: ``B`` completion texts (``""`` for image completions).
            **fields: Per-sample lists of length ``B`` (sample columns and rollout extras); unknown ones ignored.

        Returns:
            ``B`` scores; ``None`` where the reward does not apply.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def field(fields: dict[str, Any], key: str, reward: Reward, size: int) -> Sequence[Any]:
    """The per-sample list ``fields[key]`` checked to have ``size`` entries.

    Raises:
        KeyError: naming the reward and the missing field (and the fields that were given).
        ValueError: when the list has the wrong length.
    """
    if key not in fields:
        raise KeyError(
            f"reward {reward.name!r} ({type(reward).__name__}) needs the per-sample field {key!r}; the batch has "
            f"{sorted(fields)} — add {key!r} to the prompt samples (or choose another reward)"
        )
    values = fields[key]
    if len(values) != size:
        raise ValueError(f"reward {reward.name!r}: field {key!r} has {len(values)} entries for {size} completions")
    return values
