"""Exact image–text alignment on ShapesWorld: the toy-scale, checkable stand-in for MMaDA's 0.1·CLIP reward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from dllm_zoo.data.synthetic.shapes import ShapesWorld
from dllm_zoo.rewards.base import Reward, field
from dllm_zoo.rewards.format import after_think

_METRICS = ("exact", "f1")


class ShapesAlignment(Reward):
    """Whether an image holds exactly the objects a caption names, read back by ShapesWorld's exact checker.

    Two uses:

    * **text-to-image** (default): the generated image is in the field ``images`` (the rollout's palette grids) and
      the caption is the sample's ``caption``;
    * **captioning** (image understanding): ``ShapesAlignment(image_field="image", caption_field=None)`` scores the
      completion as a caption of the sample's input ``image``. The caption is the completion's text after its last
      ``</think>`` (all of it without one); case, spaces and a trailing period do not matter.
    * **multimodal reasoning** (MMaDA's "correctness + format + alignment" on image questions):
      ``ShapesAlignment(image_field="image", caption_field=None, completion_part="listing")`` scores the think block
      of the answer, a slot listing ``"top left: red square; center: blue plus."`` (:func:`parse_listing`), against
      the input image: does the reasoning describe what the image shows.

    An image is a palette-index grid ``[H][W]`` (nested lists, or an integer tensor / array ``[H, W]``) of the
    task's size (``task.image_side`` pixels square). ``None`` in the image or caption field means not applicable.

    Metrics: ``"exact"`` scores ``score`` when :meth:`ShapesWorld.alignment` holds (the image reads cleanly and holds
    exactly the caption's objects), else 0; ``"f1"`` scores ``score`` times :meth:`ShapesWorld.alignment_score`
    (object-level F1, unreadable slots counting as wrong objects), a denser signal for RL. A caption that does not
    parse scores 0 under both.

    Sources: MMaDA UniGRPO 0.1·CLIP(image, text) on captioning and text-to-image (research/mmada.md §4.3), replaced
    by an exact checker on the synthetic task (DESIGN.md §4).

    Args:
        task: The ShapesWorld whose sizes and shapes read the images; default ``ShapesWorld()`` (9x9 images).
        metric: ``"exact"`` or ``"f1"``.
        score: Reward of a perfectly aligned pair.
        name: Metric key (``reward/<name>``).
        caption_field: Per-sample field holding the caption, or ``None`` to score the completion text as the caption.
        image_field: Per-sample field holding the image (``"images"``: generated; ``"image"``: the sample's input).
        completion_part: With ``caption_field=None``: ``"answer"`` reads the completion's answer as a caption,
            ``"listing"`` reads its think block as a slot listing.

    Raises:
        ValueError: for an unknown ``metric``; (on call) when an image is not the task's size.
        KeyError: (on call) when the batch lacks the image or caption field.

    Example:
        >>> task = ShapesWorld()
        >>> image = task.render([("red", "x", 0, 0)])
        >>> ShapesAlignment(task)([""] * 3, [""] * 3, images=[image, image, None],
        ...                       caption=["a red x at the top left", "a blue x at the top left", "a red x at the top"])
        [1.0, 0.0, None]
    """

    def __init__(
        self,
        task: ShapesWorld | None = None,
        metric: Literal["exact", "f1"] = "exact",
        score: float = 1.0,
        name: str = "alignment",
        caption_field: str | None = "caption",
        image_field: str = "images",
        completion_part: Literal["answer", "listing"] = "answer",
    ) -> None:
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        if completion_part not in ("answer", "listing"):
            raise ValueError(f"completion_part must be 'answer' or 'listing', got {completion_part!r}")
        if completion_part == "listing" and caption_field is not None:
            raise ValueError("completion_part='listing' reads the completion: set caption_field=None")
        self.task = task if task is not None else ShapesWorld()
        self.metric = metric
        self.score = float(score)
        self.name = name
        self.caption_field = caption_field
        self.image_field = image_field
        self.completion_part = completion_part

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """See :meth:`Reward.__call__`; needs ``image_field`` (and ``caption_field`` unless it is ``None``)."""
        n = len(completions)
        images = field(fields, self.image_field, self, n)
        if self.caption_field is None:
            whole = self.completion_part == "listing"
            captions: Sequence[str | None] = [c if whole else after_think(c) for c in completions]
        else:
            captions = field(fields, self.caption_field, self, n)
        out: list[float | None] = []
        for image, caption in zip(images, captions):
            if image is None or caption is None:
                out.append(None)
                continue
            text = str(caption)
            objects = self.task.parse_listing(text) if self.completion_part == "listing" else self.task.parse(text)
            if self.metric == "exact":
                out.append(self.score if self.task.objects_match(objects, image) else 0.0)
            else:
                out.append(self.score * self.task.objects_f1(objects, image))
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(metric={self.metric!r}, score={self.score}, name={self.name!r}, "
            f"caption_field={self.caption_field!r}, image_field={self.image_field!r}, "
            f"completion_part={self.completion_part!r})"
        )
