"""ShapesWorld: coloured shapes on a grid, with captions, questions, reasoning-to-image prompts and edits.

The embedded multimodal default (DESIGN.md §4), the toy-scale stand-in for CLIP scores and ParaBench: an image is
a small palette-index grid of ``grid_size x grid_size`` slots of ``cell_size x cell_size`` pixels, each slot empty
or holding one shape in one colour. Captions and answers are fully regular, and an exact checker reads an image
back into objects, so image-text alignment, instruction following and answer accuracy are exact numbers.

The default image is 9x9 pixels (81 image tokens), a caption is at most 74 bytes (an edit's output caption, with
up to three objects, 104), a question with its ``<think>`` answer at most 122, and the whole image space holds 9,360
images: small enough that a tiny masked-diffusion model learns text-to-image, image understanding
and reasoning-to-image on two CPU cores in minutes.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dllm_zoo.data.stream import mix_seed
from dllm_zoo.data.synthetic.base import Split, SyntheticTask

COLOR_NAMES: tuple[str, ...] = (
    "black",
    "red",
    "green",
    "blue",
    "yellow",
    "magenta",
    "cyan",
    "white",
    "orange",
    "purple",
    "gray",
    "pink",
    "brown",
    "lime",
    "navy",
    "teal",
)
"""Palette colour names; a pixel's value is its colour's index here (0, black, is the background).

The same names, in the same order, as ``dllm_zoo.tokenizers.image.DEFAULT_PALETTE``.
"""

Obj = tuple[str, str, int, int]
"""One object: ``(color, shape, row, col)``, with 0-based slot coordinates."""

Pattern = tuple[tuple[bool, ...], ...]
"""A shape's ``cell_size x cell_size`` pixel mask."""


def _middle(n: int) -> tuple[int, ...]:
    """The central line(s) of ``n`` pixels: one for odd ``n``, the two central ones for even ``n`` (symmetric)."""
    return (n // 2,) if n % 2 else (n // 2 - 1, n // 2)


_PATTERNS: dict[str, Callable[[int, int, int], bool]] = {
    "square": lambda r, c, n: True,
    "ring": lambda r, c, n: r in (0, n - 1) or c in (0, n - 1),
    "plus": lambda r, c, n: r in _middle(n) or c in _middle(n),
    "x": lambda r, c, n: r == c or r + c == n - 1,
    "dot": lambda r, c, n: r in _middle(n) and c in _middle(n),
    "hbar": lambda r, c, n: r in _middle(n),
    "vbar": lambda r, c, n: c in _middle(n),
}

SHAPE_NAMES: tuple[str, ...] = tuple(_PATTERNS)
"""Every known shape (the ``shapes`` knob picks from these); pairwise distinct for every ``cell_size >= 3``."""

_TEMPLATE_WORDS: tuple[str, ...] = (
    *("<think>", "</think>", "Draw", "How", "Result", "What", "Where", "a", "above", "add", "an", "and", "are"),
    *("at", "below", "bottom", "center", "color", "column", "corner", "count", "directly", "down", "empties"),
    *("empty", "gives", "goes", "in", "into", "is", "it", "left", "make", "making", "many", "mirroring", "move"),
    *("moving", "nothing", "of", "opposite", "puts", "recolor", "remove", "removing", "reshape", "right", "row"),
    *("shape", "shapes", "the", "there", "to", "top", "turn", "turning", "up", "where"),
)
"""Every word of the text templates besides colour and shape names (a test checks the generator uses no others)."""

_NAMED_SLOTS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
_SLOT_BY_NAME = {name: (r, c) for r, row in enumerate(_NAMED_SLOTS) for c, name in enumerate(row)}
_NUMBERED_SLOT = re.compile(r"row (\d+) column (\d+)")
_MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
_QUESTION_KINDS = ("color", "shape", "count", "where")
_EDIT_KINDS = ("move", "recolor", "reshape", "remove", "add")
_TARGETS = {"image": "caption", "output_image": "output_caption"}
_HOLDOUT_FRACTION = 0.1


# --------------------------------------------------------------------------------------------------------- text


def _normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or trailing periods."""
    return " ".join(text.lower().split()).rstrip(". ").strip()


def _article(word: str) -> str:
    """``"an"`` before a vowel sound (``"an orange"``, ``"an x"``), else ``"a"``."""
    return "an" if word[0] in "aeiou" or word == "x" else "a"


def slot_name(row: int, col: int, grid_size: int) -> str:
    """The name of a slot: ``"top left"`` … ``"bottom right"`` on a 3x3 grid, else ``"row R column C"`` (1-based).

    Args:
        row: 0-based row.
        col: 0-based column.
        grid_size: Slots per side.

    Returns:
        The slot's name.

    Raises:
        ValueError: if the slot is off the grid.

    Example:
        >>> slot_name(0, 0, 3), slot_name(1, 1, 3), slot_name(0, 3, 4)
        ('top left', 'center', 'row 1 column 4')
    """
    if not (0 <= row < grid_size and 0 <= col < grid_size):
        raise ValueError(f"slot ({row}, {col}) is off the {grid_size}x{grid_size} grid")
    if grid_size == 3:
        return _NAMED_SLOTS[row][col]
    return f"row {row + 1} column {col + 1}"


def parse_slot(name: str, grid_size: int) -> tuple[int, int]:
    """The inverse of :func:`slot_name`: ``(row, col)`` of a slot name (case and spaces do not matter).

    ``"row R column C"`` is accepted for every grid size (also 3x3); the named slots only on a 3x3 grid.

    Args:
        name: A slot name.
        grid_size: Slots per side.

    Returns:
        The 0-based ``(row, col)``.

    Raises:
        ValueError: if ``name`` names no slot of the grid.

    Example:
        >>> parse_slot("Bottom  Right", 3), parse_slot("row 1 column 4", 4)
        ((2, 2), (0, 3))
    """
    text = _normalise(name)
    if grid_size == 3 and text in _SLOT_BY_NAME:
        return _SLOT_BY_NAME[text]
    match = _NUMBERED_SLOT.fullmatch(text)
    if match is not None:
        row, col = int(match.group(1)) - 1, int(match.group(2)) - 1
        if 0 <= row < grid_size and 0 <= col < grid_size:
            return row, col
    raise ValueError(f"{name!r} names no slot of the {grid_size}x{grid_size} grid")


def _the(row: int, col: int, grid_size: int) -> str:
    """A slot as a noun phrase: ``"the top left"``, ``"row 1 column 2"``."""
    name = slot_name(row, col, grid_size)
    return f"the {name}" if grid_size == 3 else name


def _join(phrases: Sequence[str]) -> str:
    """``"A"``, ``"A and B"``, ``"A, B and C"``."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _reading_order(objects: Sequence[Sequence[Any]]) -> list[Obj]:
    """Objects as tuples, sorted row-major by slot."""
    return sorted(((str(o[0]), str(o[1]), int(o[2]), int(o[3])) for o in objects), key=lambda o: (o[2], o[3]))


def caption_of(objects: Sequence[Sequence[Any]], grid_size: int = 3) -> str:
    """The explicit caption of objects, in reading order; ``"nothing"`` for no objects.

    Args:
        objects: ``(color, shape, row, col)`` items, in any order.
        grid_size: Slots per side.

    Returns:
        E.g. ``"a red square at the top left and a blue plus at the center"``.

    Example:
        >>> caption_of([("blue", "plus", 1, 1), ("red", "square", 0, 0), ("green", "x", 2, 1)])
        'a red square at the top left, a blue plus at the center and a green x at the bottom'
    """
    phrases = [
        f"{_article(color)} {color} {shape} at {_the(row, col, grid_size)}"
        for color, shape, row, col in _reading_order(objects)
    ]
    return _join(phrases) if phrases else "nothing"


_SPLIT_PHRASES = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
_OBJECT_PHRASE = re.compile(r"an? ([a-z]+) ([a-z]+) at (?:the )?(.+)")


def _split_phrases(text: str) -> list[str]:
    """``"A, B and C"`` (or with an Oxford comma) -> ``[A, B, C]``; an empty part (a dangling "and") stays empty."""
    return _SPLIT_PHRASES.split(text)


def _valid_objects(objects: list[Obj]) -> list[Obj] | None:
    """``objects`` in reading order, or ``None`` if two share a slot (a slot holds one shape)."""
    if len({(o[2], o[3]) for o in objects}) != len(objects):
        return None
    return _reading_order(objects)


def _color_shape(color: str, shape: str) -> bool:
    return color in COLOR_NAMES[1:] and shape in SHAPE_NAMES


def parse_caption(text: str, grid_size: int = 3) -> list[Obj] | None:
    """The objects of an explicit caption (the inverse of :func:`caption_of`).

    Robust to case, extra spaces, a trailing period, ``"an"`` for ``"a"`` and an Oxford comma.

    Args:
        text: A caption.
        grid_size: Slots per side.

    Returns:
        The objects in reading order (``[]`` for ``"nothing"``), or ``None`` if the text does not parse, names an
        unknown colour, shape or slot, or puts two shapes in one slot.

    Example:
        >>> parse_caption("A red square at the top left and a blue plus at the  Center.")
        [('red', 'square', 0, 0), ('blue', 'plus', 1, 1)]
        >>> parse_caption("a red blob at the top") is None
        True
    """
    text = _normalise(text)
    if text == "nothing":
        return []
    objects: list[Obj] = []
    for phrase in _split_phrases(text):
        match = _OBJECT_PHRASE.fullmatch(phrase)
        if match is None or not _color_shape(match.group(1), match.group(2)):
            return None
        try:
            row, col = parse_slot(match.group(3), grid_size)
        except ValueError:
            return None
        objects.append((match.group(1), match.group(2), row, col))
    return _valid_objects(objects)


_LISTING_ITEM = re.compile(r"(.+?): ([a-z]+) ([a-z]+)")


def parse_listing(text: str, grid_size: int = 3) -> list[Obj] | None:
    """The objects of a slot listing, the think part of an image-understanding answer (inverse of its rendering).

    Args:
        text: E.g. ``"top left: red square; center: blue plus."`` (case, spaces and the final period do not
            matter); ``"<think>…</think>"`` tags around it are removed.
        grid_size: Slots per side.

    Returns:
        The objects in reading order, or ``None`` if an item does not parse, names an unknown colour, shape or slot,
        or two items share a slot.

    Example:
        >>> parse_listing("<think>Top left: red square; center: blue plus.</think>")
        [('red', 'square', 0, 0), ('blue', 'plus', 1, 1)]
        >>> parse_listing("top left: a red square") is None
        True
    """
    text = _normalise(_think_content(text))
    objects: list[Obj] = []
    for item in text.split(";"):
        match = _LISTING_ITEM.fullmatch(item.strip())
        if match is None or not _color_shape(match.group(2), match.group(3)):
            return None
        try:
            row, col = parse_slot(match.group(1), grid_size)
        except ValueError:
            return None
        objects.append((match.group(2), match.group(3), row, col))
    return _valid_objects(objects)


# --------------------------------------------------------------------------------------------- r2i references


def _references(row: int, col: int, grid_size: int) -> list[str]:
    """Every indirect description of a slot that resolves to it, and only it (a reasoning step each)."""
    g, refs = grid_size, []
    last = g - 1
    if row in (0, last) and col in (0, last):
        refs.append(f"in the corner opposite {_the(last - row, last - col, g)}")
    if row > 0:
        refs.append(f"directly below {_the(row - 1, col, g)}")
    if row < last:
        refs.append(f"directly above {_the(row + 1, col, g)}")
    if col < last:
        refs.append(f"directly left of {_the(row, col + 1, g)}")
    if col > 0:
        refs.append(f"directly right of {_the(row, col - 1, g)}")
    if 2 * col != last:
        refs.append(f"mirroring {_the(row, last - col, g)} left to right")
    if 2 * row != last:
        refs.append(f"mirroring {_the(last - row, col, g)} top to bottom")
    return refs


_R2I_PHRASE = re.compile(
    r"an? (?P<color>[a-z]+) (?P<shape>[a-z]+) (?:"
    r"in the corner opposite (?:the )?(?P<corner>.+)"
    r"|directly (?P<rel>below|above|left of|right of) (?:the )?(?P<anchor>.+)"
    r"|mirroring (?:the )?(?P<mirrored>.+) (?P<axis>left to right|top to bottom))"
)
_REL = {"below": (1, 0), "above": (-1, 0), "left of": (0, -1), "right of": (0, 1)}


def _resolve_reference(match: re.Match[str], grid_size: int) -> tuple[int, int] | None:
    last = grid_size - 1
    try:
        if match.group("corner") is not None:
            row, col = parse_slot(match.group("corner"), grid_size)
            return (last - row, last - col) if row in (0, last) and col in (0, last) else None
        if match.group("anchor") is not None:
            row, col = parse_slot(match.group("anchor"), grid_size)
            dr, dc = _REL[match.group("rel")]
            row, col = row + dr, col + dc
            return (row, col) if 0 <= row <= last and 0 <= col <= last else None
        row, col = parse_slot(match.group("mirrored"), grid_size)
    except ValueError:
        return None
    if match.group("axis") == "left to right":
        return None if 2 * col == last else (row, last - col)
    return None if 2 * row == last else (last - row, col)


def parse_r2i_prompt(text: str, grid_size: int = 3) -> list[Obj] | None:
    """Resolve a reasoning-to-image prompt (``"Draw a red square in the corner opposite the bottom right."``).

    Args:
        text: An ``r2i_prompt``.
        grid_size: Slots per side.

    Returns:
        The objects it describes, in reading order, or ``None`` if it does not parse or resolve (off the grid, not a
        corner, a mirror of the middle line, two shapes in one slot).

    Example:
        >>> parse_r2i_prompt("Draw a red square in the corner opposite the bottom right and a blue plus directly "
        ...                  "below the top.")
        [('red', 'square', 0, 0), ('blue', 'plus', 1, 1)]
    """
    text = _normalise(text)
    if not text.startswith("draw "):
        return None
    objects: list[Obj] = []
    for phrase in _split_phrases(text[len("draw ") :]):
        match = _R2I_PHRASE.fullmatch(phrase)
        if match is None or not _color_shape(match.group("color"), match.group("shape")):
            return None
        slot = _resolve_reference(match, grid_size)
        if slot is None:
            return None
        objects.append((match.group("color"), match.group("shape"), *slot))
    return _valid_objects(objects) if objects else None


# ------------------------------------------------------------------------------------------------------- images


def render_pattern(shape: str, cell_size: int) -> list[list[bool]]:
    """The pixel mask of a shape on a ``cell_size x cell_size`` slot.

    Even sizes use the two central lines as the middle, so every shape stays symmetric.

    Args:
        shape: One of :data:`SHAPE_NAMES`.
        cell_size: Pixels per slot side (at least 3, where all shapes are distinct).

    Returns:
        ``cell_size`` rows of ``cell_size`` booleans.

    Raises:
        ValueError: for an unknown shape or ``cell_size < 3``.

    Example:
        >>> ["".join("#" if p else "." for p in row) for row in render_pattern("plus", 3)]
        ['.#.', '###', '.#.']
    """
    if shape not in _PATTERNS:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {SHAPE_NAMES}")
    if cell_size < 3:
        raise ValueError(f"cell_size must be >= 3 (smaller slots cannot tell the shapes apart), got {cell_size}")
    inside = _PATTERNS[shape]
    return [[inside(r, c, cell_size) for c in range(cell_size)] for r in range(cell_size)]


def _pattern(shape: str, cell_size: int) -> Pattern:
    return tuple(tuple(row) for row in render_pattern(shape, cell_size))


def draw(objects: Sequence[Sequence[Any]], grid_size: int = 3, cell_size: int = 3) -> list[list[int]]:
    """The palette-index image of objects: black background, each shape in its colour's :data:`COLOR_NAMES` index.

    Args:
        objects: ``(color, shape, row, col)`` items in distinct slots.
        grid_size: Slots per side.
        cell_size: Pixels per slot side.

    Returns:
        ``grid_size * cell_size`` rows of as many palette indices.

    Raises:
        ValueError: for an unknown or black colour, an unknown shape, a slot off the grid or a shared slot.

    Example:
        >>> draw([("red", "x", 0, 0)], grid_size=1, cell_size=3)
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    side = grid_size * cell_size
    image = [[0] * side for _ in range(side)]
    used: set[tuple[int, int]] = set()
    for color, shape, row, col in objects:
        if color not in COLOR_NAMES[1:]:
            raise ValueError(f"unknown or background colour {color!r}; colours: {COLOR_NAMES[1:]}")
        if not (0 <= row < grid_size and 0 <= col < grid_size):
            raise ValueError(f"slot ({row}, {col}) is off the {grid_size}x{grid_size} grid")
        if (row, col) in used:
            raise ValueError(f"two objects in slot ({row}, {col})")
        used.add((row, col))
        index = COLOR_NAMES.index(color)
        for r, mask in enumerate(render_pattern(shape, cell_size)):
            for c, on in enumerate(mask):
                if on:
                    image[row * cell_size + r][col * cell_size + c] = index
    return image


@dataclass
class ImageReading:
    """What :func:`read_image` sees in an image."""

    objects: list[Obj] = field(default_factory=list)
    """The slots that hold exactly one known shape in one non-black colour, as ``(color, shape, row, col)``."""
    unreadable: int = 0
    """Non-empty slots that are not exactly one known shape in one colour."""

    @property
    def clean(self) -> bool:
        """Whether every non-empty slot was read as an object."""
        return self.unreadable == 0


def read_image(image: Any, grid_size: int = 3, cell_size: int = 3, shapes: Sequence[str] = SHAPE_NAMES) -> ImageReading:
    """Read an image's slots back into objects (the exact checker).

    A slot whose pixels are all 0 is empty; one whose non-zero pixels have one palette colour and form exactly one
    of ``shapes`` is an object; any other slot (stray pixels, two colours, a partial shape, values outside the
    palette) is unreadable.

    Args:
        image: ``list[list[int]]``, or a 2-D integer ``torch.Tensor`` / ``numpy.ndarray`` of palette indices.
        grid_size: Slots per side.
        cell_size: Pixels per slot side.
        shapes: The shapes to recognise.

    Returns:
        The objects (in reading order) and the count of unreadable slots.

    Raises:
        ValueError: if the image is not ``grid_size * cell_size`` pixels square.

    Example:
        >>> read_image(draw([("red", "ring", 1, 2)]))
        ImageReading(objects=[('red', 'ring', 1, 2)], unreadable=0)
    """
    rows = image.tolist() if hasattr(image, "tolist") else image
    side = grid_size * cell_size
    if len(rows) != side or any(len(row) != side for row in rows):
        raise ValueError(f"image must be {side}x{side} pixels (grid_size={grid_size}, cell_size={cell_size})")
    patterns = {_pattern(shape, cell_size): shape for shape in shapes}
    reading = ImageReading()
    for row in range(grid_size):
        for col in range(grid_size):
            block = [
                [int(v) for v in rows[row * cell_size + r][col * cell_size : (col + 1) * cell_size]]
                for r in range(cell_size)
            ]
            colors = {v for line in block for v in line if v != 0}
            if not colors:
                continue
            shape = patterns.get(tuple(tuple(v != 0 for v in line) for line in block))
            color = colors.pop() if len(colors) == 1 else -1
            if shape is None or not 0 < color < len(COLOR_NAMES):
                reading.unreadable += 1
            else:
                reading.objects.append((COLOR_NAMES[color], shape, row, col))
    return reading


def _think_content(text: str) -> str:
    """The last ``<think>…</think>`` block's content; the text after ``<think>`` if unclosed; else the whole text."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[0]
    return text.rsplit("<think>", 1)[-1]


def _final_answer(completion: str) -> str:
    return _normalise(completion.rsplit("</think>", 1)[-1])


# --------------------------------------------------------------------------------------------------------- task


class ShapesWorld(SyntheticTask):
    """Coloured shapes on a grid: text-to-image, image understanding, reasoning-to-image and editing, checked exactly.

    Every sample is one dict (all fields JSON-serialisable):

    * ``image``: the palette-index grid (:func:`draw` of ``objects``); ``objects``: ``[color, shape, row, col]``
      items in reading order; ``caption``: their explicit caption (:func:`caption_of`).
    * Image understanding: ``question`` and its short ``answer`` (colour at a slot, shape at a slot, count, or
      where a shape is), and ``cot`` = ``"<think>top left: red square; center: blue plus.</think> red"``, which
      lists the image's slots, then the answer. ``prompt`` = ``question``, ``response`` = ``cot`` and ``text`` =
      prompt + ``" "`` + response, so the text DataModule and :func:`~dllm_zoo.evaluation.evaluate_task` can use
      the task as a chat task (text only; the image is the multimodal recipes' business).
    * Reasoning-to-image: ``r2i_prompt`` describes each object's slot indirectly, with one answer (``"Draw a red
      square in the corner opposite the bottom right."``), and ``r2i_reasoning`` = ``"<think>{caption}</think>"``.
    * Editing (MMaDA-Parallel's quadruplet): ``edit_instruction`` (move / recolor / reshape / remove / add),
      ``edit_reasoning`` (``"<think>…. Result: {output_caption}.</think>"``), ``output_image``,
      ``output_objects`` and ``output_caption``; ``edit_brief`` = ``"<think>Result: {output_caption}.</think>"``
      is the reasoning without its step (a shorter target for small models: ``--data.fields``). Edits are always
      valid (no move off the grid or onto a shape; one object at least remains; adds go to empty slots, so an output
      may hold ``max_objects + 1`` shapes).
    * ``question_kind`` and ``edit_kind``, for per-kind metrics.

    Generation: a sample draws its object count uniformly from ``1..max_objects``, then one image uniformly from
    the images with that many objects, then its question, r2i references and edit, all from a seed derived from
    ``(seed, split, index)``. Train and val never share an image: in each object count's set of images, a seeded
    scramble holds out 10% (at least one) for validation, and training draws only from the rest. Val samples may
    repeat an image (the one-object set of the defaults has 144 images, 14 held out), with other questions and
    edits. Only a set of a single image (e.g. four objects on a 2x2 grid with one colour and one shape) is shared
    by both splits.

    Args:
        grid_size: Slots per side (at least 2, so that every image has a valid edit).
        cell_size: Pixels per slot side (at least 3, so that the shapes are distinct).
        max_objects: Most objects per image (``1..grid_size**2``).
        colors: Shape colours, distinct names from :data:`COLOR_NAMES` other than ``"black"``.
        shapes: Shapes, distinct names from :data:`SHAPE_NAMES`.
        num_train: Training samples.
        num_val: Validation samples.
        seed: Seed of the generator.

    Example:
        >>> task = ShapesWorld(num_train=4, num_val=2)
        >>> sample = next(task.generate("val"))
        >>> task.check(sample["cot"], sample), task.alignment(sample["caption"], sample["image"])
        (True, True)
        >>> task.check_image(sample["output_image"], sample, target="output_image")
        True
    """

    name = "shapes"
    version = 2  # 2: edit_brief

    def __init__(
        self,
        grid_size: int = 3,
        cell_size: int = 3,
        max_objects: int = 2,
        colors: Sequence[str] = ("red", "green", "blue", "yellow"),
        shapes: Sequence[str] = ("square", "ring", "plus", "x"),
        num_train: int = 20000,
        num_val: int = 512,
        seed: int = 0,
    ) -> None:
        colors, shapes = tuple(colors), tuple(shapes)
        if grid_size < 2:
            raise ValueError(f"grid_size must be >= 2 (a 1x1 grid has no valid edits), got {grid_size}")
        if cell_size < 3:
            raise ValueError(f"cell_size must be >= 3 (smaller slots cannot tell the shapes apart), got {cell_size}")
        if not 1 <= max_objects <= grid_size**2:
            raise ValueError(f"max_objects must be in 1..{grid_size**2} (grid_size**2), got {max_objects}")
        if not colors or len(set(colors)) != len(colors) or any(c not in COLOR_NAMES[1:] for c in colors):
            raise ValueError(
                f"colors must be distinct names from {COLOR_NAMES[1:]} (black is the background), got {colors}"
            )
        if not shapes or len(set(shapes)) != len(shapes) or any(s not in SHAPE_NAMES for s in shapes):
            raise ValueError(f"shapes must be distinct names from {SHAPE_NAMES}, got {shapes}")
        if num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {num_train}")
        if num_val < 1:
            raise ValueError(f"num_val must be >= 1, got {num_val}")
        self.grid_size = grid_size
        self.cell_size = cell_size
        self.max_objects = max_objects
        self.colors = colors
        self.shapes = shapes
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self._scrambles = [self._scramble(k) for k in range(1, max_objects + 1)]

    # ------------------------------------------------------------------------------------------ SyntheticTask

    def settings(self) -> dict[str, Any]:
        """See :meth:`SyntheticTask.settings`."""
        return {
            "grid_size": self.grid_size,
            "cell_size": self.cell_size,
            "max_objects": self.max_objects,
            "colors": list(self.colors),
            "shapes": list(self.shapes),
            "num_train": self.num_train,
            "num_val": self.num_val,
            "seed": self.seed,
        }

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every word ShapesWorld text uses, for any settings: template words, colour and shape names."""
        return (*_TEMPLATE_WORDS, *COLOR_NAMES[1:], *SHAPE_NAMES)

    def num_samples(self, split: Split) -> int:
        """See :meth:`SyntheticTask.num_samples`."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.num_train if split == "train" else self.num_val

    def generate(self, split: Split) -> Iterator[dict[str, Any]]:
        """See :meth:`SyntheticTask.generate`; sample ``i`` is :meth:`sample` ``(split, i)``."""
        for index in range(self.num_samples(split)):
            yield self.sample(split, index)

    def check(self, completion: str, sample: dict[str, Any]) -> bool:
        """Whether the answer of ``completion`` (after its last ``</think>``, else all of it) is ``sample["answer"]``.

        Case, spaces and a trailing period do not matter.
        """
        return _final_answer(completion) == _normalise(str(sample["answer"]))

    # ----------------------------------------------------------------------------------------------- images

    @property
    def image_side(self) -> int:
        """Pixels per image side (``grid_size * cell_size``)."""
        return self.grid_size * self.cell_size

    @property
    def num_image_tokens(self) -> int:
        """Pixels per image (one image token each)."""
        return self.image_side**2

    def render(self, objects: Sequence[Sequence[Any]]) -> list[list[int]]:
        """:func:`draw` with this task's sizes."""
        return draw(objects, self.grid_size, self.cell_size)

    def read(self, image: Any) -> ImageReading:
        """:func:`read_image` with this task's sizes and shapes."""
        return read_image(image, self.grid_size, self.cell_size, self.shapes)

    def caption(self, objects: Sequence[Sequence[Any]]) -> str:
        """:func:`caption_of` with this task's grid size."""
        return caption_of(objects, self.grid_size)

    def parse(self, caption: str) -> list[Obj] | None:
        """:func:`parse_caption` with this task's grid size."""
        return parse_caption(caption, self.grid_size)

    def alignment(self, caption: str, image: Any) -> bool:
        """Exact image-text alignment: the image reads cleanly and holds exactly the caption's objects."""
        return self.objects_match(self.parse(caption), image)

    def alignment_score(self, caption: str, image: Any) -> float:
        """F1 between the caption's objects and the image's (0 if the caption does not parse).

        Unreadable slots count as wrong objects (they lower the precision); a caption ``"nothing"`` and an empty
        image score 1.
        """
        return self.objects_f1(self.parse(caption), image)

    def objects_match(self, objects: Sequence[Obj] | None, image: Any) -> bool:
        """Whether ``image`` reads cleanly and holds exactly ``objects`` (``None``, an unparsed text: False)."""
        if objects is None:
            return False
        reading = self.read(image)
        return reading.clean and set(reading.objects) == set(objects)

    def objects_f1(self, objects: Sequence[Obj] | None, image: Any) -> float:
        """Object-level F1 of ``objects`` against ``image`` (see :meth:`alignment_score`; ``None`` scores 0)."""
        if objects is None:
            return 0.0
        reading = self.read(image)
        found = len(reading.objects) + reading.unreadable
        if not objects and not found:
            return 1.0
        hits = len(set(objects) & set(reading.objects))
        return 2 * hits / (len(objects) + found)

    def pixel_alignment_score(self, caption: str, image: Any) -> float:
        """Foreground-pixel F1 between the caption's rendering and ``image`` (0 if the caption does not parse).

        A pixel of ``image`` is a hit when it is drawn (non-zero) in the colour the caption's rendering
        (:meth:`render`) has there; ``F1 = 2·hits / (drawn pixels of image + drawn pixels of the rendering)``. It is
        1 exactly when the image is the caption's rendering (then :meth:`alignment` holds too), and unlike the
        object F1 it grades a shape that is partly drawn, in part the wrong colour or off by a pixel: the dense
        view ParaRL's partial states need. Pixels outside the palette (e.g.
        :data:`~dllm_zoo.rewards.partial.MASKED_PIXEL`) count as not drawn. ``"nothing"`` and an empty image score 1.
        """
        objects = self.parse(caption)
        if objects is None:
            return 0.0
        target = self.render(objects)
        rows = image.tolist() if hasattr(image, "tolist") else image
        if len(rows) != len(target) or any(len(row) != len(target) for row in rows):
            raise ValueError(f"image must be {self.image_side}x{self.image_side} pixels")
        palette = len(COLOR_NAMES)
        drawn = hits = 0
        for row, want_row in zip(rows, target):
            for v, want in zip(row, want_row):
                if 0 < v < palette:
                    drawn += 1
                    hits += v == want
        total = drawn + sum(v > 0 for row in target for v in row)
        return 1.0 if total == 0 else 2 * hits / total

    def parse_listing(self, text: str) -> list[Obj] | None:
        """:func:`parse_listing` with this task's grid size."""
        return parse_listing(text, self.grid_size)

    def _target_objects(self, sample: dict[str, Any], target: str) -> list[Obj]:
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {tuple(_TARGETS)}, got {target!r}")
        objects = self.parse(sample[_TARGETS[target]])
        if objects is None:
            raise ValueError(
                f"sample[{_TARGETS[target]!r}] is not a caption of this task: {sample[_TARGETS[target]]!r}"
            )
        return objects

    def check_image(self, image: Any, sample: dict[str, Any], target: str = "image") -> bool:
        """Whether a generated image holds exactly the objects of ``sample[target]``'s caption (t2i / r2i / edit).

        Args:
            image: The generated palette-index image.
            sample: A sample of this task.
            target: ``"image"`` (compare with ``caption``: text-to-image and reasoning-to-image) or
                ``"output_image"`` (compare with ``output_caption``: editing).
        """
        return self.alignment(caption_of(self._target_objects(sample, target), self.grid_size), image)

    def check_reasoning(self, text: str, sample: dict[str, Any], target: str = "image") -> bool:
        """Whether a reasoning's final explicit caption describes the target objects exactly.

        The caption is the think content (the last ``<think>…</think>`` block; the whole text without one) after
        its last ``"Result:"``, or all of it without one.

        Args:
            text: A generated ``r2i_reasoning`` (``target="image"``) or ``edit_reasoning``
                (``target="output_image"``).
            sample: A sample of this task.
            target: As in :meth:`check_image`.
        """
        content = _think_content(text)
        index = content.lower().rfind("result:")
        if index >= 0:
            content = content[index + len("result:") :]
        objects = self.parse(content)
        return objects is not None and set(objects) == set(self._target_objects(sample, target))

    # ----------------------------------------------------------------------------------------------- generation

    def _space(self, k: int) -> int:
        """Number of images with ``k`` objects."""
        return math.comb(self.grid_size**2, k) * (len(self.colors) * len(self.shapes)) ** k

    def _scramble(self, k: int) -> tuple[int, int, int, int]:
        """``(size, held_out, a, b)``: image ``(a * j + b) % size`` of the ``k``-object set; ``j < held_out`` is val."""
        size = self._space(k)
        rng = random.Random(mix_seed(self.seed, 2, k))
        a = rng.randrange(1, size) if size > 1 else 1
        while math.gcd(a, size) != 1:  # a bijection of 0..size-1
            a = rng.randrange(1, size)
        held_out = 0 if size < 2 else min(size - 1, max(1, round(size * _HOLDOUT_FRACTION)))
        return size, held_out, a, rng.randrange(size)

    def _unrank(self, k: int, rank: int) -> list[Obj]:
        """The ``rank``-th image with ``k`` objects: a combination of slots (colex order), then their kinds."""
        kinds = len(self.colors) * len(self.shapes)
        rank, combo = divmod(rank, math.comb(self.grid_size**2, k))
        slots = []
        for i in range(k, 0, -1):  # the largest slot s with comb(s, i) <= combo, for i = k..1
            s = i - 1
            while math.comb(s + 1, i) <= combo:
                s += 1
            slots.append(s)
            combo -= math.comb(s, i)
        objects = []
        for slot in sorted(slots):
            rank, kind = divmod(rank, kinds)
            color, shape = self.colors[kind // len(self.shapes)], self.shapes[kind % len(self.shapes)]
            objects.append((color, shape, *divmod(slot, self.grid_size)))
        return objects

    def _draw_objects(self, split: Split, rng: random.Random) -> list[Obj]:
        k = rng.randint(1, self.max_objects)
        size, held_out, a, b = self._scrambles[k - 1]
        if split == "val":
            j = rng.randrange(held_out) if held_out else rng.randrange(size)
        else:
            j = rng.randrange(held_out, size)
        return self._unrank(k, (a * j + b) % size)

    def sample(self, split: Split, index: int) -> dict[str, Any]:
        """Sample ``index`` of ``split`` (deterministic, random access).

        Args:
            split: ``"train"`` or ``"val"``.
            index: Any non-negative integer (``generate`` yields ``0..num_samples(split) - 1``).

        Returns:
            The sample dict (see the class docstring).
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        rng = random.Random(mix_seed(self.seed, 0 if split == "train" else 1, index))
        return self.make_sample(self._draw_objects(split, rng), rng)

    def make_sample(self, objects: Sequence[Sequence[Any]], rng: random.Random) -> dict[str, Any]:
        """The sample of an image's objects; ``rng`` draws its question, r2i references and edit.

        Args:
            objects: ``(color, shape, row, col)`` items in distinct slots (at least one).
            rng: The random generator.

        Returns:
            The sample dict (see the class docstring).
        """
        objs = _reading_order(objects)
        if not objs:
            raise ValueError("a sample needs at least one object")
        caption = self.caption(objs)
        question_kind, question, answer = self._question(objs, rng)
        cot = f"<think>{self._listing(objs)}</think> {answer}"
        edit_kind, instruction, reasoning, output = self._edit(objs, rng)
        return {
            "image": self.render(objs),
            "caption": caption,
            "objects": [list(o) for o in objs],
            "question": question,
            "answer": answer,
            "cot": cot,
            "prompt": question,
            "response": cot,
            "text": f"{question} {cot}",
            "r2i_prompt": self._r2i_prompt(objs, rng),
            "r2i_reasoning": f"<think>{caption}</think>",
            "edit_instruction": instruction,
            "edit_reasoning": reasoning,
            "edit_brief": f"<think>Result: {self.caption(output)}.</think>",
            "output_image": self.render(output),
            "output_caption": self.caption(output),
            "output_objects": [list(o) for o in output],
            "question_kind": question_kind,
            "edit_kind": edit_kind,
        }

    def _listing(self, objects: list[Obj]) -> str:
        """``"top left: red square; center: blue plus."``: the think part of an answer."""
        g = self.grid_size
        return "; ".join(f"{slot_name(r, c, g)}: {color} {shape}" for color, shape, r, c in objects) + "."

    def _question(self, objects: list[Obj], rng: random.Random) -> tuple[str, str, str]:
        """``(kind, question, answer)``; "where" only asks about a colour-shape pair the image holds once."""
        unique = [o for o in objects if sum(p[:2] == o[:2] for p in objects) == 1]
        kind = rng.choice([k for k in _QUESTION_KINDS if k != "where" or unique])
        g = self.grid_size
        if kind == "count":
            return kind, "How many shapes are there?", str(len(objects))
        if kind == "where":
            color, shape, row, col = rng.choice(unique)
            return kind, f"Where is the {color} {shape}?", slot_name(row, col, g)
        color, shape, row, col = rng.choice(objects)
        if kind == "color":
            return kind, f"What color is the shape at {_the(row, col, g)}?", color
        return kind, f"What shape is at {_the(row, col, g)}?", shape

    def _r2i_prompt(self, objects: list[Obj], rng: random.Random) -> str:
        phrases = [
            f"{_article(color)} {color} {shape} {rng.choice(_references(row, col, self.grid_size))}"
            for color, shape, row, col in objects
        ]
        return f"Draw {_join(phrases)}."

    def _edit(self, objects: list[Obj], rng: random.Random) -> tuple[str, str, str, list[Obj]]:
        """``(kind, instruction, reasoning, output objects)`` of one valid edit.

        The kind is uniform among those possible for this image (``grid_size >= 2`` makes remove or add possible).
        """
        g = self.grid_size
        taken = {(o[2], o[3]) for o in objects}
        empty = [(r, c) for r in range(g) for c in range(g) if (r, c) not in taken]
        moves = [
            (i, direction)
            for i, (_, _, r, c) in enumerate(objects)
            for direction, (dr, dc) in _MOVES.items()
            if 0 <= r + dr < g and 0 <= c + dc < g and (r + dr, c + dc) not in taken
        ]
        possible = {
            "move": bool(moves),
            "recolor": len(self.colors) > 1,
            "reshape": len(self.shapes) > 1,
            "remove": len(objects) > 1,
            "add": bool(empty),
        }
        kind = rng.choice([k for k in _EDIT_KINDS if possible[k]])
        output = list(objects)
        if kind == "add":
            row, col = rng.choice(empty)
            color, shape = rng.choice(self.colors), rng.choice(self.shapes)
            output.append((color, shape, row, col))
            where = _the(row, col, g)
            instruction = f"add {_article(color)} {color} {shape} at {where}"
            step = f"{where} is empty; {_article(color)} {color} {shape} goes there"
        else:
            if kind == "move":
                i, direction = rng.choice(moves)
            else:
                i = rng.randrange(len(objects))
            color, shape, row, col = objects[i]
            ref = f"the {color} {shape}"
            if sum(o[:2] == (color, shape) for o in objects) > 1:  # name the slot too, so the reference is unique
                ref += f" at {_the(row, col, g)}"
            step = f"the {color} {shape} is at {_the(row, col, g)}; "
            if kind == "move":
                dr, dc = _MOVES[direction]
                output[i] = (color, shape, row + dr, col + dc)
                instruction = f"move {ref} {direction}"
                step += f"moving it {direction} puts it at {_the(row + dr, col + dc, g)}"
            elif kind == "recolor":
                new = rng.choice([c for c in self.colors if c != color])
                output[i] = (new, shape, row, col)
                instruction = f"make {ref} {new}"
                step += f"making it {new} gives {_article(new)} {new} {shape} there"
            elif kind == "reshape":
                new = rng.choice([s for s in self.shapes if s != shape])
                output[i] = (color, new, row, col)
                instruction = f"turn {ref} into {_article(new)} {new}"
                step += f"turning it into {_article(new)} {new} gives {_article(color)} {color} {new} there"
            else:
                del output[i]
                instruction = f"remove {ref}"
                step += f"removing it empties {_the(row, col, g)}"
        output = _reading_order(output)
        return kind, instruction, f"<think>{step}. Result: {self.caption(output)}.</think>", output
