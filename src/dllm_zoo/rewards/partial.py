"""Alignment of a partially denoised (reasoning, image) pair: ParaRL's per-step semantic reward.

MMaDA-Parallel's ParaRL (research/mmada.md §6.2) scores the state of a rollout after intermediate denoising steps:
the partially decoded reasoning text (masked text tokens dropped) against the partial image, with CLIP. The raw
score is normalised by the stage (dataset statistics, clipped, mapped to ``[0, 1]``); this reward only measures.

Inputs (the :class:`~dllm_zoo.rewards.base.Reward` contract): ``completions`` are the partial reasoning texts with
the still-masked tokens dropped; the field ``images`` holds the partial images as palette-index grids ``[H, W]``
(nested lists or integer tensors) in which every pixel of a still-masked image code is :data:`MASKED_PIXEL`. The
:class:`~dllm_zoo.stages.pararl.ParaRL` stage builds both from its canvases
(:func:`~dllm_zoo.stages.pararl.decode_outputs`).

Choices the paper leaves open, with our defaults:

* **Scorer.** On the toy task, ShapesWorld's checker stands in for CLIP: ``metric="f1"`` (default) the exact
  object-set F1 (:meth:`~dllm_zoo.data.synthetic.ShapesWorld.alignment_score`), ``metric="pixels"`` the
  foreground-pixel F1 against the caption's rendering
  (:meth:`~dllm_zoo.data.synthetic.ShapesWorld.pixel_alignment_score`). Both are 1 exactly when the image is the
  caption's; the object F1 of a one-object image is 0 until its shape is complete, so most partial states score 0
  under it, while the pixel F1 grades every drawn pixel (CLIP's cosine is graded as well). With ``clip=`` a
  :class:`~dllm_zoo.rewards.clip.ClipScore`, the raw cosine of the CLIP embeddings (the paper's ``c``: neither
  clamped at 0 nor scaled, since ParaRL normalises it with dataset statistics).
* **Text.** ``"caption"``: the caption the reasoning ends with (:func:`~dllm_zoo.parabench.reasoning_caption`:
  the think content after its last ``Result:``), which the F1 parser needs; ``"reasoning"``: the whole think
  content (the paper's ``text(τ_i(t))`` for CLIP).
* **Still-masked image codes.** ``"background"`` (default): drawn as the background colour, i.e. "nothing drawn
  there yet" — a slot whose shape is complete except for masked background pixels already reads correctly.
  ``"unknown"``: every slot with a masked pixel is unreadable (counts as a wrong object in the object F1). CLIP
  has no notion of unknown pixels, so it always sees the background rendering; the pixel F1 counts masked pixels
  as not drawn, which is the background reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor

from dllm_zoo.data.synthetic.shapes import ShapesWorld, _think_content
from dllm_zoo.parabench import reasoning_caption
from dllm_zoo.rewards.base import Reward, field
from dllm_zoo.rewards.clip import ClipScore

MASKED_PIXEL = -1
"""The value of a pixel whose image code is still masked in a partial image (outside every palette)."""

PartialText = Literal["caption", "reasoning"]
MaskedImage = Literal["background", "unknown"]
PartialMetric = Literal["f1", "pixels"]


def fill_masked(image: Any, value: int = 0) -> Any:
    """``image`` with every :data:`MASKED_PIXEL` replaced by ``value`` (a tensor stays a tensor, lists stay lists)."""
    if isinstance(image, Tensor):
        return image.masked_fill(image == MASKED_PIXEL, value)
    return [[value if v == MASKED_PIXEL else v for v in row] for row in image]


class PartialAlignment(Reward):
    """Image–text alignment of a partially decoded reasoning and image (see the module docstring).

    Args:
        task: The ShapesWorld that parses captions and reads images (default ``ShapesWorld()``: 9x9 images).
        clip: Score with CLIP instead (the raw cosine); ``None`` = ShapesWorld's checker (``metric``).
        metric: ShapesWorld's ``"f1"`` (object-set F1) or ``"pixels"`` (foreground-pixel F1); not with ``clip``.
        text: ``"caption"`` (the reasoning's final caption) or ``"reasoning"`` (its whole think content).
        masked_image: Still-masked image codes drawn as ``"background"`` or left ``"unknown"`` (F1 only).
        name: Metric key.
        image_field: Per-sample field with the partial images.

    Raises:
        ValueError: for an unknown ``text`` / ``masked_image`` / ``metric``, ``masked_image="unknown"`` with CLIP or
            the pixel F1, or ``metric="pixels"`` with CLIP.

    Example:
        >>> task = ShapesWorld()
        >>> image = task.render([("red", "x", 0, 0)])
        >>> partial = [row[:] for row in image]
        >>> partial[0][0] = MASKED_PIXEL  # a red pixel of the x is still masked
        >>> reasoning = "<think>Result: a red x at the top left.</think>"
        >>> PartialAlignment(task)(["", "", ""], [reasoning, reasoning, "<think>Result: a red x at th"],
        ...                        images=[image, partial, image])
        [1.0, 0.0, 0.0]
        >>> PartialAlignment(task, metric="pixels")([""], [reasoning], images=[partial])  # 4 of the x's 5 pixels
        [0.8888888888888888]
    """

    def __init__(
        self,
        task: ShapesWorld | None = None,
        clip: ClipScore | None = None,
        text: PartialText = "caption",
        masked_image: MaskedImage = "background",
        metric: PartialMetric = "f1",
        name: str = "partial_alignment",
        image_field: str = "images",
    ) -> None:
        if text not in ("caption", "reasoning"):
            raise ValueError(f"text must be 'caption' or 'reasoning', got {text!r}")
        if masked_image not in ("background", "unknown"):
            raise ValueError(f"masked_image must be 'background' or 'unknown', got {masked_image!r}")
        if metric not in ("f1", "pixels"):
            raise ValueError(f"metric must be 'f1' or 'pixels', got {metric!r}")
        if masked_image == "unknown" and (clip is not None or metric != "f1"):
            raise ValueError(
                "masked_image='unknown' needs metric='f1' without clip: CLIP and the pixel F1 see masked codes as "
                "background"
            )
        if clip is not None and metric != "f1":
            raise ValueError("metric='pixels' is ShapesWorld's checker: leave it 'f1' when scoring with clip")
        self.task = task if task is not None else ShapesWorld()
        self.clip = clip
        self.text = text
        self.masked_image = masked_image
        self.metric = metric
        self.name = name
        self.image_field = image_field

    def _text(self, completion: str) -> str:
        return reasoning_caption(completion) if self.text == "caption" else _think_content(completion)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """See :meth:`Reward.__call__`; needs ``image_field`` (partial images, :data:`MASKED_PIXEL` = masked)."""
        n = len(completions)
        images = field(fields, self.image_field, self, n)
        keep = [i for i in range(n) if images[i] is not None]
        out: list[float | None] = [None] * n
        if not keep:
            return out
        texts = [self._text(completions[i]) for i in keep]
        if self.clip is not None:
            cos = self.clip.similarities([fill_masked(images[i]) for i in keep], texts)
            scores = cos.tolist()
        else:
            shown = [images[i] if self.masked_image == "unknown" else fill_masked(images[i]) for i in keep]
            scorer = self.task.pixel_alignment_score if self.metric == "pixels" else self.task.alignment_score
            scores = [scorer(t, im) for t, im in zip(texts, shown)]
        for i, score in zip(keep, scores):
            out[i] = float(score)
        return out

    def __repr__(self) -> str:
        scorer = self.metric if self.clip is None else repr(self.clip)
        return (
            f"{type(self).__name__}(scorer={scorer}, text={self.text!r}, masked_image={self.masked_image!r}, "
            f"name={self.name!r})"
        )


__all__ = ["MASKED_PIXEL", "MaskedImage", "PartialAlignment", "PartialMetric", "PartialText", "fill_masked"]
