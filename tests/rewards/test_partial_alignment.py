"""PartialAlignment: ParaRL's reward of partially decoded (reasoning, image) pairs, F1 and CLIP scorers."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.rewards import ClipScore, PartialAlignment
from dllm_zoo.rewards.partial import MASKED_PIXEL, fill_masked

TASK = ShapesWorld()
EDIT = (
    "<think>the red x is at the top left; moving it right puts it at the top. "
    "Result: a red x at the top and a blue ring at the center.</think>"
)


def masked(image: list[list[int]], *pixels: tuple[int, int]) -> list[list[int]]:
    out = [row[:] for row in image]
    for r, c in pixels:
        out[r][c] = MASKED_PIXEL
    return out


def test_f1_of_partial_states_with_masked_codes_as_background_or_unknown() -> None:
    image = TASK.render([("red", "x", 0, 1), ("blue", "ring", 1, 1)])
    reward = PartialAlignment(TASK)
    unknown = PartialAlignment(TASK, masked_image="unknown")
    states = [
        image,  # complete and aligned
        masked(image, (1, 4)),  # the x's centre pixel masked: the x reads as another pattern -> unreadable
        masked(image, (0, 0)),  # a background pixel of an empty slot masked: nothing changes as background
        masked(image, (4, 4)),  # the ring's hole (background) masked
    ]
    captions = [EDIT] * 4
    # background: 1, 2·1/(2+2) (one hit of two objects, one unreadable slot), 1, 1
    assert reward([""] * 4, captions, images=states) == pytest.approx([1.0, 0.5, 1.0, 1.0])
    # unknown: a slot with a masked pixel is unreadable wherever the pixel is (an empty slot counts as a wrong object)
    assert unknown([""] * 4, captions, images=states) == pytest.approx([1.0, 0.5, 2 * 2 / 5, 0.5])
    # masked text tokens dropped: the caption does not parse -> 0; the whole reasoning is not a caption -> 0
    assert reward([""] * 2, [EDIT.replace("blue", "bue"), EDIT], images=[image, None]) == [0.0, None]
    assert PartialAlignment(TASK, text="reasoning")([""], [EDIT], images=[image]) == [0.0]
    r2i = "<think>a red x at the top and a blue ring at the center</think>"
    assert PartialAlignment(TASK, text="reasoning")([""], [r2i], images=[torch.tensor(image)]) == [1.0]


def test_pixel_f1_grades_partial_and_wrong_shapes() -> None:
    image = TASK.render([("red", "x", 0, 1), ("blue", "ring", 1, 1)])  # 5 + 8 drawn pixels
    reward = PartialAlignment(TASK, metric="pixels")
    states = [
        image,
        masked(image, (1, 4)),  # one of 13 drawn pixels still masked: 2·12 / (12 + 13)
        masked(image, (0, 0)),  # a background pixel masked: nothing changes
        [[2 if v == 1 else v for v in row] for row in image],  # the x in the wrong colour: 2·8 / (13 + 13)
    ]
    assert reward([""] * 4, [EDIT] * 4, images=states) == pytest.approx([1.0, 24 / 25, 1.0, 16 / 26])
    # the object F1 of the same states: the masked centre makes the x unreadable, the recolour a wrong object
    assert PartialAlignment(TASK)([""] * 4, [EDIT] * 4, images=states) == pytest.approx([1.0, 0.5, 1.0, 0.5])
    # an unparsed caption scores 0; an empty image and "nothing" align
    blank = TASK.render([])
    assert reward(
        [""] * 3, [EDIT.replace("blue", "bue"), "<think>Result: nothing.</think>", EDIT], images=[image, blank, blank]
    ) == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="image must be 9x9"):
        TASK.pixel_alignment_score("a red x at the top", [[0] * 3] * 3)
    with pytest.raises(ValueError, match="needs metric='f1' without clip"):
        PartialAlignment(metric="pixels", masked_image="unknown")
    with pytest.raises(ValueError, match="metric must be"):
        PartialAlignment(metric="exact")  # type: ignore[arg-type]
    assert "pixels" in repr(reward)


def test_fill_masked_keeps_the_container_type() -> None:
    grid = [[1, MASKED_PIXEL], [MASKED_PIXEL, 0]]
    assert fill_masked(grid) == [[1, 0], [0, 0]]
    assert torch.equal(fill_masked(torch.tensor(grid), 7), torch.tensor([[1, 7], [7, 0]]))


class FakeClip(ClipScore):
    """A ClipScore whose cosine is recorded and returned as given (no transformers model)."""

    def __init__(self, path: str, cosines: Sequence[float]) -> None:
        super().__init__(path)
        self.cosines = list(cosines)
        self.seen: list[tuple[Any, str]] = []

    def similarities(self, images: Sequence[Any], texts: Sequence[str]) -> torch.Tensor:
        self.seen += list(zip(images, texts))
        return torch.tensor(self.cosines[: len(texts)])


def test_clip_scorer_gives_the_raw_cosine_of_the_background_rendering(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    clip = FakeClip(str(tmp_path), [0.31, -0.2])
    reward = PartialAlignment(TASK, clip=clip, text="reasoning")
    image = TASK.render([("red", "x", 0, 1)])
    out = reward(["", "", ""], [EDIT, "<think>a red x", EDIT], images=[masked(image, (0, 3)), image, None])
    assert out == pytest.approx([0.31, -0.2, None])  # neither clamped at 0 nor scaled: ParaRL normalises
    (im0, t0), (_, t1) = clip.seen
    assert im0[0][3] == 0  # the masked pixel is drawn as background
    assert t0 == EDIT[len("<think>") : -len("</think>")]
    assert t1 == "a red x"
    with pytest.raises(ValueError, match="masked_image=.unknown. needs metric=.f1. without clip"):
        PartialAlignment(clip=clip, masked_image="unknown")
    with pytest.raises(ValueError, match="leave it 'f1' when scoring with clip"):
        PartialAlignment(clip=clip, metric="pixels")


def test_bad_arguments_and_pickling() -> None:
    with pytest.raises(ValueError, match="text must be"):
        PartialAlignment(text="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="masked_image must be"):
        PartialAlignment(masked_image="black")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="needs the per-sample field 'images'"):
        PartialAlignment()([""], [EDIT])
    reward = pickle.loads(pickle.dumps(PartialAlignment(TASK, name="pa")))
    assert reward.name == "pa"
    assert "f1" in repr(reward)
