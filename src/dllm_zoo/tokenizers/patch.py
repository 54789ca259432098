"""Patch-codebook tokenizers: one code per ``patch × patch`` block, looked up in a fixed codebook of palette patches.

A VQ tokenizer whose codebook is known rather than learned: code ``k`` is the ``k``-th palette-index patch of
:attr:`PatchCodebookTokenizer.patches`. On images made only of codebook patches it is lossless, and an image is
``(H / patch)²`` tokens instead of ``H·W`` (:class:`~dllm_zoo.tokenizers.image.PaletteTokenizer`).

:class:`ShapeSlotTokenizer` is the codebook of :class:`~dllm_zoo.data.synthetic.ShapesWorld`: one code per slot,
the empty slot or one (colour, shape). A 9×9 ShapesWorld image is then 9 tokens of 17 codes (4 colours × 4
shapes + empty), the granularity of a VQ tokenizer's patch (MAGVIT-v2 turns a 16×16 patch into one code): every
sampled image is well formed, so a tiny model's errors are about *what* it draws, which is what ParaBench's
alignment axes measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dllm_zoo.tokenizers.image import ImageTokenizer, PaletteTokenizer


class PatchCodebookTokenizer(ImageTokenizer):
    """Lossless tokenizer of palette images made of a fixed set of ``patch × patch`` patches.

    Args:
        patches: ``[K, patch, patch]`` palette indices (tensor or nested lists): code ``k`` is patch ``k``. The
            patches must be distinct and square.
        palette: The palette of the indices (see :class:`PaletteTokenizer`); default its 16 colours.
        tolerance: Largest per-channel difference (0–255 units) still read as a palette colour.

    Example:
        >>> blank, dot = [[0, 0], [0, 0]], [[0, 0], [0, 1]]
        >>> tok = PatchCodebookTokenizer([blank, dot])
        >>> grid = torch.tensor([[[0, 0, 0, 0], [0, 1, 0, 0]]])
        >>> tok.encode_indices(grid).tolist()
        [[[1, 0]]]
    """

    def __init__(
        self,
        patches: Tensor | Sequence[Sequence[Sequence[int]]],
        palette: Sequence[tuple[int, int, int]] | Sequence[tuple[str, tuple[int, int, int]]] | None = None,
        tolerance: float = 2.0,
    ) -> None:
        super().__init__()
        self.palette = PaletteTokenizer(palette, patch=1, tolerance=tolerance)
        book = torch.as_tensor(patches, dtype=torch.long)
        if book.dim() != 3 or book.shape[0] < 1 or book.shape[1] != book.shape[2]:
            raise ValueError(f"patches must be [K, patch, patch] palette indices with K >= 1, got {tuple(book.shape)}")
        if int(book.min()) < 0 or int(book.max()) >= self.palette.codebook_size:
            raise ValueError(f"patch values must be palette indices in [0, {self.palette.codebook_size})")
        flat = book.flatten(1)
        if len({tuple(row) for row in flat.tolist()}) != len(flat):
            raise ValueError("patches must be distinct (two codes would decode to the same patch)")
        self.register_buffer("patches", book, persistent=False)  # [K, p, p]
        self.codebook_size = int(book.shape[0])
        self.downsample = int(book.shape[1])

    def encode_indices(self, grids: Tensor | Sequence[Sequence[Sequence[int]]]) -> Tensor:
        """Codes of palette-index grids ``[B, H, W]`` -> ``[B, H / patch, W / patch]`` int64.

        Raises:
            ValueError: if a block is not a codebook patch; the message gives the first one.
        """
        idx = torch.as_tensor(grids, dtype=torch.long)
        if idx.dim() != 3:
            raise ValueError(f"palette grids must be [B, H, W], got shape {tuple(idx.shape)}")
        p = self.downsample
        b, h, w = idx.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the tokenizer's patch {p}")
        book: Tensor = self.patches  # type: ignore[assignment]
        blocks = idx.to(book.device).view(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, h // p, w // p, -1)
        hit = (blocks[..., None, :] == book.flatten(1)).all(dim=-1)  # [B, h, w, K]
        found = hit.any(dim=-1)
        if not bool(found.all()):
            bad = (~found).nonzero()[0].tolist()
            raise ValueError(
                f"image {bad[0]}, block (row {bad[1]}, col {bad[2]}) of {p}x{p} pixels is no patch of the "
                f"{self.codebook_size}-code codebook; this tokenizer is lossless only for images made of its patches "
                "(for ShapesWorld: ShapeSlotTokenizer with the task's colors, shapes and cell_size)"
            )
        return hit.long().argmax(dim=-1)

    def encode(self, images: Tensor) -> Tensor:
        """See :meth:`ImageTokenizer.encode` (raises ``ValueError`` on a block that is no codebook patch)."""
        self.check_images(images)
        return self.encode_indices(self.palette.encode(images))

    def decode_indices(self, codes: Tensor) -> Tensor:
        """Palette-index grids ``[B, h·patch, w·patch]`` of codes ``[B, h, w]``."""
        self.check_codes(codes)
        book: Tensor = self.patches  # type: ignore[assignment]
        b, h, w = codes.shape
        p = self.downsample
        return book[codes.to(book.device)].permute(0, 1, 3, 2, 4).reshape(b, h * p, w * p)

    def decode(self, codes: Tensor) -> Tensor:
        """See :meth:`ImageTokenizer.decode`."""
        return self.palette.render(self.decode_indices(codes))


class ShapeSlotTokenizer(PatchCodebookTokenizer):
    """The ShapesWorld codebook: one code per slot — code 0 the empty slot, then each (colour, shape) object.

    Code ``1 + i·len(shapes) + j`` is a slot holding ``shapes[j]`` in ``colors[i]``. The arguments must be those of
    the :class:`~dllm_zoo.data.synthetic.ShapesWorld` task it reads (its defaults are); an image of another task is
    refused by :meth:`encode` with the block it cannot read.

    Args:
        colors: Shape colours (names from ``COLOR_NAMES``), in the task's order.
        shapes: Shape names (from ``SHAPE_NAMES``), in the task's order.
        cell_size: Pixels per slot side (the task's ``cell_size``).

    Example:
        >>> from dllm_zoo.data.synthetic import ShapesWorld
        >>> task, tok = ShapesWorld(), ShapeSlotTokenizer()
        >>> tok.codebook_size, tok.encode_indices([task.sample("val", 0)["image"]]).shape
        (17, torch.Size([1, 3, 3]))
    """

    def __init__(
        self,
        colors: Sequence[str] = ("red", "green", "blue", "yellow"),
        shapes: Sequence[str] = ("square", "ring", "plus", "x"),
        cell_size: int = 3,
    ) -> None:
        # Imported here: the data package imports the tokenizers at its own import time.
        from dllm_zoo.data.synthetic.shapes import COLOR_NAMES, render_pattern

        unknown = [c for c in colors if c not in COLOR_NAMES[1:]]
        if unknown or not colors:
            raise ValueError(f"colors must be names from {COLOR_NAMES[1:]} (black is the background), got {colors}")
        masks = [torch.tensor(render_pattern(s, cell_size), dtype=torch.long) for s in shapes]
        if not masks:
            raise ValueError("shapes must name at least one shape")
        patches = [torch.zeros(cell_size, cell_size, dtype=torch.long)]
        patches += [mask * COLOR_NAMES.index(c) for c in colors for mask in masks]
        super().__init__(torch.stack(patches))
        self.colors = tuple(colors)
        self.shapes = tuple(shapes)
