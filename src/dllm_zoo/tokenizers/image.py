"""Image tokenizers: images ``[B, 3, H, W]`` in ``[0, 1]`` <-> code grids ``[B, h, w]`` (DESIGN.md §3 "Tokenizers").

A masked-diffusion model over text and images sees an image as ``h·w`` codes in raster (row-major) order, each
code ``k`` written as token id ``layout.image_offset + k`` (:meth:`~dllm_zoo.tokenizers.layout.TokenLayout.image_ids`).
:class:`ImageTokenizer` is the contract; :class:`PaletteTokenizer` is the lossless embedded default for the synthetic
images of :class:`~dllm_zoo.data.synthetic.ShapesWorld`; :class:`~dllm_zoo.tokenizers.magvit.MagvitV2Tokenizer` is
MMaDA's MAGVIT-v2.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# (name, RGB) of the embedded palette; index 0 is the background. ShapesWorld draws with these indices.
DEFAULT_PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (0, 0, 0)),
    ("red", (230, 25, 25)),
    ("green", (40, 180, 60)),
    ("blue", (40, 80, 230)),
    ("yellow", (245, 220, 30)),
    ("magenta", (220, 40, 200)),
    ("cyan", (40, 210, 220)),
    ("white", (255, 255, 255)),
    ("orange", (245, 130, 20)),
    ("purple", (120, 50, 180)),
    ("gray", (128, 128, 128)),
    ("pink", (250, 160, 190)),
    ("brown", (130, 80, 30)),
    ("lime", (170, 240, 60)),
    ("navy", (20, 30, 120)),
    ("teal", (20, 128, 128)),
)


class ImageTokenizer(nn.Module, ABC):
    """Base class: a (usually frozen) map between images and grids of discrete codes.

    Attributes:
        codebook_size: Number of distinct codes; the token layout's ``image_codebook_size`` must be at least this.
        downsample: Pixels per code along each side (MAGVIT-v2: 16; palette: its ``patch``).
    """

    codebook_size: int
    downsample: int

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Codes of ``images``.

        Args:
            images: ``[B, 3, H, W]`` float in ``[0, 1]``, ``H`` and ``W`` multiples of :attr:`downsample`.

        Returns:
            ``[B, H / downsample, W / downsample]`` int64 codes in ``[0, codebook_size)``.
        """

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """Images of ``codes`` ``[B, h, w]`` int64: ``[B, 3, h·downsample, w·downsample]`` float in ``[0, 1]``."""

    def check_codes(self, codes: Tensor) -> None:
        """Raise ``ValueError`` if ``codes`` is not a ``[B, h, w]`` grid of codes in ``[0, codebook_size)``."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be a [B, h, w] grid, got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]; "
                "map token ids to codes with layout.image_codes() first"
            )

    def check_images(self, images: Tensor) -> None:
        """Raise ``ValueError`` if ``images`` is not ``[B, 3, H, W]`` with sides divisible by :attr:`downsample`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] RGB in [0, 1], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the tokenizer's downsample {self.downsample}")


class PaletteTokenizer(ImageTokenizer):
    """Lossless tokenizer of palette images: one code per ``patch × patch`` block of one palette colour.

    Code ``k`` is the ``k``-th palette colour. :meth:`encode` refuses (rather than rounds) a block that is not one
    palette colour, so a code grid always decodes back to exactly the image it came from. With the default
    ``patch=1`` a ShapesWorld image of ``H × W`` pixels is ``H·W`` tokens, and its palette-index grid *is* the code
    grid (:meth:`encode_indices`).

    Args:
        palette: RGB triples (0–255) or ``(name, RGB)`` pairs; default :data:`DEFAULT_PALETTE` (16 colours).
        patch: Pixels per code along each side.
        tolerance: Largest per-channel difference (in 0–255 units) still read as a palette colour (JPEG-free
            synthetic images need 0; a little slack absorbs float round trips).

    Example:
        >>> tok = PaletteTokenizer()
        >>> codes = torch.tensor([[[0, 1], [2, 3]]])
        >>> torch.equal(tok.encode(tok.decode(codes)), codes)
        True
    """

    def __init__(
        self,
        palette: Sequence[tuple[int, int, int]] | Sequence[tuple[str, tuple[int, int, int]]] | None = None,
        patch: int = 1,
        tolerance: float = 2.0,
    ) -> None:
        super().__init__()
        entries = list(palette) if palette is not None else list(DEFAULT_PALETTE)
        if not entries:
            raise ValueError("PaletteTokenizer needs at least one palette colour")
        rgb = [e[1] if isinstance(e[0], str) else e for e in entries]
        colors = torch.tensor(rgb, dtype=torch.float32)
        if colors.dim() != 2 or colors.shape[1] != 3 or colors.min() < 0 or colors.max() > 255:
            raise ValueError(f"palette entries must be RGB triples in 0..255, got {rgb!r}")
        if patch < 1:
            raise ValueError(f"PaletteTokenizer patch must be >= 1, got {patch}")
        self.register_buffer("colors", colors / 255.0, persistent=False)  # [K, 3] in [0, 1]
        self.codebook_size = len(rgb)
        self.downsample = patch
        self.tolerance = tolerance / 255.0

    def encode(self, images: Tensor) -> Tensor:
        """See :meth:`ImageTokenizer.encode`.

        Raises:
            ValueError: if a block is not a single palette colour (within ``tolerance``); the message gives the
                first offending block.
        """
        self.check_images(images)
        p = self.downsample
        b, _, h, w = images.shape
        colors: Tensor = self.colors  # type: ignore[assignment]
        dist = (images.float().permute(0, 2, 3, 1)[..., None, :] - colors).abs().amax(dim=-1)  # [B, H, W, K]
        best = dist.argmin(dim=-1)  # [B, H, W]
        ok = dist.gather(-1, best[..., None])[..., 0] <= self.tolerance
        blocks = best.view(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, h // p, w // p, p * p)
        uniform = (blocks == blocks[..., :1]).all(dim=-1) & ok.view(b, h // p, p, w // p, p).all(dim=(2, 4))
        if not bool(uniform.all()):
            bad = (~uniform).nonzero()[0].tolist()
            raise ValueError(
                f"image {bad[0]}, block (row {bad[1]}, col {bad[2]}) of {p}x{p} pixels is not one palette colour; "
                "PaletteTokenizer is lossless only for palette images (use MagvitV2Tokenizer for natural images)"
            )
        return blocks[..., 0]

    def decode(self, codes: Tensor) -> Tensor:
        """See :meth:`ImageTokenizer.decode`."""
        self.check_codes(codes)
        colors: Tensor = self.colors  # type: ignore[assignment]
        rgb = colors[codes].permute(0, 3, 1, 2)  # [B, 3, h, w]
        p = self.downsample
        return rgb.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3) if p > 1 else rgb

    def encode_indices(self, grids: Tensor | Sequence[Sequence[Sequence[int]]]) -> Tensor:
        """Codes of palette-index grids (ShapesWorld's stored form), without rendering them.

        Args:
            grids: ``[B, H, W]`` palette indices (tensor or nested lists); ``H, W`` multiples of ``patch``.

        Returns:
            ``[B, H / patch, W / patch]`` int64 codes.
        """
        idx = torch.as_tensor(grids, dtype=torch.long)
        if idx.dim() != 3:
            raise ValueError(f"palette grids must be [B, H, W], got shape {tuple(idx.shape)}")
        return self.encode(self.render(idx))

    def nearest_indices(self, images: Tensor) -> Tensor:
        """Palette index of the nearest colour of every pixel: ``[B, 3, H, W]`` -> ``[B, H, W]`` (a lossy read).

        Reads images decoded by another tokenizer (e.g. MAGVIT-v2 on ShapesWorld) back into palette grids for the
        task's checker.
        """
        colors: Tensor = self.colors  # type: ignore[assignment]
        dist = (images.float().permute(0, 2, 3, 1)[..., None, :] - colors.to(images.device)).abs().amax(dim=-1)
        return dist.argmin(dim=-1)

    def render(self, grids: Tensor) -> Tensor:
        """RGB images ``[B, 3, H, W]`` in ``[0, 1]`` of palette-index grids ``[B, H, W]`` (pixel = palette colour)."""
        colors: Tensor = self.colors  # type: ignore[assignment]
        if grids.numel() and (int(grids.min()) < 0 or int(grids.max()) >= self.codebook_size):
            raise ValueError(f"palette indices must lie in [0, {self.codebook_size})")
        return colors[grids.to(colors.device)].permute(0, 3, 1, 2)
