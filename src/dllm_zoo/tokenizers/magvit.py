"""MAGVIT-v2 image tokenizer of Show-o / MMaDA (lookup-free quantisation, 13 bits = 8192 codes, 16 px per code).

A VQGAN-style convolutional encoder maps an RGB image in ``[-1, 1]`` to ``bits`` channels per ``16 × 16`` block;
lookup-free quantisation (LFQ) takes the sign of each channel and reads the signs as a binary number (channel 0 =
most significant bit); a mirrored decoder maps the ``±1`` vectors back to pixels. The module names equal those of
the original implementation, so the Hugging Face ``showlab/magvitv2`` checkpoint (``config.json`` +
``pytorch_model.safetensors``) loads unchanged and :meth:`MagvitV2Tokenizer.save_pretrained` writes a file the
original code reads.

State-dict layout (``{l}`` = level, ``{b}`` = block; ``nin_shortcut`` only where a block changes the width)::

    encoder.conv_in                          decoder.post_quant_conv
    encoder.down.{l}.block.{b}.*             decoder.conv_in
    encoder.down.{l}.downsample.conv         decoder.mid.{block_1,attn_1,block_2}.*
    encoder.mid.{block_1,attn_1,block_2}.*   decoder.up.{l}.block.{b}.*
    encoder.norm_out, encoder.conv_out       decoder.up.{l}.upsample.conv
    encoder.quant_conv                       decoder.norm_out, decoder.conv_out
    quantize.embedding [2^bits, bits]        quantize.power_vals [bits] (buffers)

with ResNet blocks ``{norm1, conv1, norm2, conv2, nin_shortcut}`` and attention ``{norm, q, k, v, proj_out}``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from dllm_zoo.backbones.checkpoint import (
    CONFIG_NAME,
    check_keys,
    load_state_dict,
    read_json,
    read_shapes,
    save_file_atomic,
    write_json_atomic,
)
from dllm_zoo.tokenizers.image import ImageTokenizer

#: Weight file names accepted by :meth:`MagvitV2Tokenizer.from_pretrained`, in order of preference; the first is
#: the one the original loader uses and the one :meth:`MagvitV2Tokenizer.save_pretrained` writes.
WEIGHTS_NAMES: tuple[str, ...] = (
    "pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
)
#: Buffers a checkpoint may omit (they are functions of ``bits``); when present they must equal the computed ones.
BUFFER_KEYS: tuple[str, ...] = ("quantize.embedding", "quantize.power_vals")
#: ``config.json`` fields read by :meth:`MagvitV2Tokenizer.from_pretrained` (all optional; defaults = the release).
CONFIG_FIELDS: tuple[str, ...] = (
    "base_channels",
    "ch_mult",
    "num_res_blocks",
    "decoder_ch_mult",
    "decoder_num_res_blocks",
    "num_groups",
    "bits",
)


# ------------------------------------------------------------------------------------------------- building blocks
class ResnetBlock(nn.Module):
    """``x + conv2(drop(swish(norm2(conv1(swish(norm1(x)))))))``, no time embedding.

    The residual goes through a 1×1 ``nin_shortcut`` when the width changes.

    Args:
        in_channels: Input width.
        out_channels: Output width.
        num_groups: GroupNorm groups (eps 1e-6).
        dropout: Dropout probability between the two convolutions (0 in the release).
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C_in, H, W] -> [B, C_out, H, W]``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 ``q, k, v, proj_out`` and a residual connection.

    Args:
        channels: Width (also the head dimension; scores are scaled by ``channels ** -0.5``).
        num_groups: GroupNorm groups of the pre-norm.
    """

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H, W]``; every position attends to every position."""
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (conv(n).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C], scale C ** -0.5
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one pixel, then a 3×3 convolution with stride 2: ``[B,C,H,W] -> [B,C,H/2,W/2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """Halve the resolution."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Double the resolution."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _blocks(in_channels: int, out_channels: int, n: int, num_groups: int, dropout: float) -> nn.ModuleList:
    """``n`` ResNet blocks; the first maps ``in_channels -> out_channels``, the others keep ``out_channels``."""
    widths = [(in_channels if b == 0 else out_channels, out_channels) for b in range(n)]
    return nn.ModuleList(ResnetBlock(i, o, num_groups, dropout) for i, o in widths)


class _DownLevel(nn.Module):
    """Encoder level: ``block`` (ResNet blocks), then ``downsample`` unless it is the last level."""

    def __init__(self, block: nn.ModuleList, downsample: Downsample | None) -> None:
        super().__init__()
        self.block = block
        self.downsample = downsample

    def forward(self, h: Tensor) -> Tensor:
        for block in self.block:
            h = block(h)
        return self.downsample(h) if self.downsample is not None else h


class _UpLevel(nn.Module):
    """Decoder level: ``block`` (ResNet blocks), then ``upsample`` unless it is level 0."""

    def __init__(self, block: nn.ModuleList, upsample: Upsample | None) -> None:
        super().__init__()
        self.block = block
        self.upsample = upsample

    def forward(self, h: Tensor) -> Tensor:
        for block in self.block:
            h = block(h)
        return self.upsample(h) if self.upsample is not None else h


class _Mid(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution."""

    def __init__(self, channels: int, num_groups: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, num_groups, dropout)
        self.attn_1 = AttnBlock(channels, num_groups)
        self.block_2 = ResnetBlock(channels, channels, num_groups, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class VQGANEncoder(nn.Module):
    """Pixels ``[B, 3, H, W]`` in ``[-1, 1]`` -> latents ``[B, z_channels, H / f, W / f]``, ``f = 2^(levels-1)``.

    ``conv_in`` (3 -> ``base``); level ``l`` has ``num_res_blocks[l]`` ResNet blocks of width
    ``base · ch_mult[l]`` (the first takes the previous level's width, ``base`` for level 0) and, except for the
    last level, a ``downsample``; ``mid``; ``norm_out -> swish -> conv_out`` (3×3 to ``z_channels``);
    1×1 ``quant_conv``. No attention inside the levels (the release's ``attn_resolutions=[5]`` never matches).

    Args:
        base_channels: Width of ``conv_in``.
        ch_mult: Width multiplier per level.
        num_res_blocks: ResNet blocks per level.
        z_channels: Latent channels (= LFQ bits).
        num_groups: GroupNorm groups.
        dropout: Dropout inside the ResNet blocks.
    """

    def __init__(
        self,
        base_channels: int,
        ch_mult: Sequence[int],
        num_res_blocks: Sequence[int],
        z_channels: int,
        num_groups: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        width = base_channels
        for level, (mult, n_blocks) in enumerate(zip(ch_mult, num_res_blocks)):
            block = _blocks(width, base_channels * mult, n_blocks, num_groups, dropout)
            width = base_channels * mult
            self.down.append(_DownLevel(block, Downsample(width) if level != len(ch_mult) - 1 else None))
        self.mid = _Mid(width, num_groups, dropout)
        self.norm_out = nn.GroupNorm(num_groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> ``[B, z_channels, H / f, W / f]`` (after ``quant_conv``)."""
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class VQGANDecoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> pixels ``[B, 3, h·f, w·f]`` in (roughly) ``[-1, 1]``.

    Level/key mapping (VQGAN convention): ``up.{l}`` is level ``l`` with **level 0 the highest resolution**, so
    the modules are indexed like the encoder's ``down.{l}`` but run from the last level to level 0. Level ``l``
    has width ``base · ch_mult[l]`` and ``num_res_blocks[l]`` ResNet blocks, and every level except level 0 ends
    with ``upsample`` (nearest ×2 + 3×3 conv). The first block of a level takes the width of the level run
    before it (``l + 1``; ``conv_in``'s ``base · ch_mult[-1]`` for the last level). With the release's
    ``ch_mult (1,1,2,2,4)`` and ``num_res_blocks (4,4,3,4,3)`` that is: ``conv_in`` 13 -> 512; mid at 512;
    ``up.4``: 3 blocks at 512 + upsample; ``up.3``: 4 blocks 512 -> 256 (``block.0.nin_shortcut``) + upsample;
    ``up.2``: 3 blocks at 256 + upsample; ``up.1``: 4 blocks 256 -> 128 (``block.0.nin_shortcut``) + upsample;
    ``up.0``: 4 blocks at 128, no upsample; ``conv_out`` 128 -> 3.

    Args:
        base_channels: Width of level 0.
        ch_mult: Width multiplier per level (level 0 first).
        num_res_blocks: ResNet blocks per level (level 0 first).
        z_channels: Latent channels (= LFQ bits).
        num_groups: GroupNorm groups.
        dropout: Dropout inside the ResNet blocks.
    """

    def __init__(
        self,
        base_channels: int,
        ch_mult: Sequence[int],
        num_res_blocks: Sequence[int],
        z_channels: int,
        num_groups: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = base_channels * ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _Mid(width, num_groups, dropout)
        stages: list[_UpLevel] = []
        for level in reversed(range(len(ch_mult))):  # built from the lowest resolution up, as it runs
            block = _blocks(width, base_channels * ch_mult[level], num_res_blocks[level], num_groups, dropout)
            width = base_channels * ch_mult[level]
            stages.append(_UpLevel(block, Upsample(width) if level != 0 else None))
        self.up = nn.ModuleList(reversed(stages))  # up[l] = level l, level 0 = highest resolution
        self.norm_out = nn.GroupNorm(num_groups, width, eps=1e-6)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """``[B, z_channels, h, w]`` (before ``post_quant_conv``) -> ``[B, 3, h·f, w·f]``."""
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for stage in reversed(self.up):
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LookupFreeQuantizer(nn.Module):
    """LFQ: sign per channel, signs read as a binary number with channel 0 the most significant bit.

    ``q_k = +1 if z_k > 0 else -1`` (so ``z_k = 0`` maps to ``-1``), ``index = Σ_k [q_k > 0] · 2^(bits-1-k)``.

    Buffers (persistent, as in the original): ``embedding [2^bits, bits]`` float, row ``i`` = the ``±1`` vector of
    code ``i``; ``power_vals [bits]`` int64, ``2^(bits-1-k)``. The training losses of the original (commitment,
    entropy) are not implemented: MMaDA keeps the tokenizer frozen.

    Args:
        bits: Channels per position; the codebook has ``2^bits`` entries.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        embedding, power_vals = self.codebook(bits)
        self.register_buffer("embedding", embedding)
        self.register_buffer("power_vals", power_vals)

    @staticmethod
    def codebook(bits: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(embedding [2^bits, bits] float32 ±1, power_vals [bits] int64)`` in index order."""
        power_vals = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.long, device=device)
        codes = torch.arange(2**bits, dtype=torch.long, device=device)
        embedding = ((codes[:, None] // power_vals) % 2).float() * 2 - 1
        return embedding, power_vals

    def indices(self, z: Tensor) -> Tensor:
        """Codes of latents ``z [B, bits, h, w]`` -> ``[B, h, w]`` int64."""
        power_vals: Tensor = self.power_vals  # type: ignore[assignment]
        return ((z > 0).long() * power_vals.to(z.device).view(1, -1, 1, 1)).sum(dim=1)

    def vectors(self, indices: Tensor) -> Tensor:
        """``±1`` vectors of codes ``[B, h, w]`` -> ``[B, bits, h, w]`` (dtype of ``embedding``)."""
        embedding: Tensor = self.embedding  # type: ignore[assignment]
        return embedding[indices.to(embedding.device)].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Quantise latents ``z [B, bits, h, w]``.

        Returns:
            ``(quantized, indices)``: ``[B, bits, h, w]`` with values ``±1`` in the forward pass and the identity
            gradient to ``z`` (straight-through), and ``[B, h, w]`` int64 codes.
        """
        q = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
        return z + (q - z).detach(), self.indices(z)


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"MagvitV2Tokenizer {name} must be a non-empty sequence of positive ints, got {value!r}")
    return tuple(value)


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MagvitV2Tokenizer {name} must be a positive int, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------------ tokenizer
class MagvitV2Tokenizer(ImageTokenizer):
    """Show-o's MAGVIT-v2 (as used, frozen, by MMaDA): images in ``[0, 1]`` <-> ``[B, H/16, W/16]`` codes < 8192.

    The defaults are the architecture of the ``showlab/magvitv2`` release; smaller widths build test-sized models
    with the same structure. Frozen by default (``requires_grad_(False)`` and eval mode; dropout is 0 so train
    mode computes the same thing).

    Args:
        base_channels: Width of the encoder's ``conv_in`` and of the decoder's level 0 (128).
        ch_mult: Encoder width multiplier per level (``(1, 2, 2, 4, 4)``); ``downsample = 2^(len - 1)``.
        num_res_blocks: Encoder ResNet blocks per level (``(4, 3, 4, 3, 4)``).
        decoder_ch_mult: Decoder width multiplier per level, level 0 = highest resolution (``(1, 1, 2, 2, 4)``);
            must have as many levels as ``ch_mult``.
        decoder_num_res_blocks: Decoder ResNet blocks per level, level 0 first (``(4, 4, 3, 4, 3)``).
        num_groups: GroupNorm groups (32); must divide every width.
        bits: LFQ bits = latent channels (13); ``codebook_size = 2^bits``.
        dropout: Dropout inside ResNet blocks (0.0 in the release).
        frozen: Freeze the parameters and switch to eval mode.
        pretrained: A ``showlab/magvitv2``-layout directory to load (the YAML form of :meth:`from_pretrained`; the
            widths then come from its ``config.json``).

    Example:
        >>> tok = MagvitV2Tokenizer(base_channels=8, ch_mult=(1, 2), num_res_blocks=(1, 1),
        ...                         decoder_ch_mult=(1, 2), decoder_num_res_blocks=(1, 1), num_groups=4, bits=4)
        >>> codes = tok.encode(torch.rand(1, 3, 4, 4))
        >>> codes.shape, tok.decode(codes).shape
        (torch.Size([1, 2, 2]), torch.Size([1, 3, 4, 4]))
    """

    def __init__(
        self,
        base_channels: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4),
        num_res_blocks: Sequence[int] = (4, 3, 4, 3, 4),
        decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        decoder_num_res_blocks: Sequence[int] = (4, 4, 3, 4, 3),
        num_groups: int = 32,
        bits: int = 13,
        dropout: float = 0.0,
        frozen: bool = True,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if pretrained is not None:  # YAML form of from_pretrained: the widths come from the directory's config.json
            cfg = type(self).read_config(Path(pretrained))
            base_channels = cfg.get("base_channels", base_channels)
            ch_mult = cfg.get("ch_mult", ch_mult)
            num_res_blocks = cfg.get("num_res_blocks", num_res_blocks)
            decoder_ch_mult = cfg.get("decoder_ch_mult", decoder_ch_mult)
            decoder_num_res_blocks = cfg.get("decoder_num_res_blocks", decoder_num_res_blocks)
            num_groups = cfg.get("num_groups", num_groups)
            bits = cfg.get("bits", bits)
        base_channels = _positive_int("base_channels", base_channels)
        num_groups = _positive_int("num_groups", num_groups)
        bits = _positive_int("bits", bits)
        ch_mult = _int_tuple("ch_mult", ch_mult)
        num_res_blocks = _int_tuple("num_res_blocks", num_res_blocks)
        decoder_ch_mult = _int_tuple("decoder_ch_mult", decoder_ch_mult)
        decoder_num_res_blocks = _int_tuple("decoder_num_res_blocks", decoder_num_res_blocks)
        if len(num_res_blocks) != len(ch_mult) or len(decoder_num_res_blocks) != len(decoder_ch_mult):
            raise ValueError(
                "MagvitV2Tokenizer needs one num_res_blocks entry per level: encoder "
                f"{len(num_res_blocks)} vs {len(ch_mult)} levels, decoder {len(decoder_num_res_blocks)} vs "
                f"{len(decoder_ch_mult)} levels"
            )
        if len(decoder_ch_mult) != len(ch_mult):
            raise ValueError(
                f"encoder and decoder must have the same number of levels (same downsampling), got {len(ch_mult)} "
                f"and {len(decoder_ch_mult)}"
            )
        widths = {base_channels * m for m in (1, *ch_mult, *decoder_ch_mult)}
        if any(w % num_groups for w in widths):
            raise ValueError(f"num_groups {num_groups} must divide every width, got widths {sorted(widths)}")
        self.config: dict[str, Any] = {
            "base_channels": base_channels,
            "ch_mult": list(ch_mult),
            "num_res_blocks": list(num_res_blocks),
            "decoder_ch_mult": list(decoder_ch_mult),
            "decoder_num_res_blocks": list(decoder_num_res_blocks),
            "num_groups": num_groups,
            "bits": bits,
        }
        self.encoder = VQGANEncoder(base_channels, ch_mult, num_res_blocks, bits, num_groups, dropout)
        self.decoder = VQGANDecoder(base_channels, decoder_ch_mult, decoder_num_res_blocks, bits, num_groups, dropout)
        self.quantize = LookupFreeQuantizer(bits)
        self.bits = bits
        self.codebook_size = 2**bits
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.pretrained_from: str | None = None
        if pretrained is not None:
            loaded = type(self).from_pretrained(pretrained, frozen=frozen)
            self.load_state_dict(loaded.state_dict())
            self.pretrained_from = loaded.pretrained_from
        if frozen:
            self.requires_grad_(False)
            self.eval()

    # ------------------------------------------------------------------------------------------------ coding
    def _weight(self) -> Tensor:
        return self.encoder.conv_in.weight

    def encode_latents(self, images: Tensor) -> Tensor:
        """Continuous latents before quantisation.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``, sides multiples of :attr:`downsample`.

        Returns:
            ``[B, bits, H / downsample, W / downsample]`` (after ``quant_conv``), in the model's dtype.
        """
        self.check_images(images)
        w = self._weight()
        return self.encoder(images.to(device=w.device, dtype=w.dtype) * 2 - 1)

    def quantize_latents(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """LFQ of latents ``z [B, bits, h, w]``.

        Returns:
            ``(quantized [B, bits, h, w], indices [B, h, w] int64)``; ``quantized`` is ``±1`` with a
            straight-through gradient to ``z``.
        """
        if z.dim() != 4 or z.shape[1] != self.bits:
            raise ValueError(f"latents must be [B, {self.bits}, h, w], got shape {tuple(z.shape)}")
        return self.quantize(z)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """See :meth:`ImageTokenizer.encode`: ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, H/16, W/16]`` int64."""
        return self.quantize.indices(self.encode_latents(images))

    def decode_code(self, indices: Tensor) -> Tensor:
        """``±1`` vectors of codes: ``[B, h, w]`` int64 -> ``[B, bits, h, w]`` (the decoder's input)."""
        self.check_codes(indices)
        return self.quantize.vectors(indices.long())

    def decode(self, codes: Tensor) -> Tensor:
        """See :meth:`ImageTokenizer.decode`: ``[B, h, w]`` -> ``[B, 3, 16h, 16w]`` in ``[0, 1]`` (model dtype)."""
        w = self._weight()
        x = self.decoder(self.decode_code(codes).to(device=w.device, dtype=w.dtype))
        return ((x + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def read_config(cls, path: str | Path) -> dict[str, Any]:
        """Constructor arguments from ``path/config.json`` (absent file -> ``{}``, i.e. the release defaults).

        Fields of :data:`CONFIG_FIELDS` are used; keys starting with ``_`` (diffusers' ``_class_name``,
        ``_diffusers_version``) are ignored silently, any other unknown key with a warning.

        Raises:
            ValueError: naming the file when it is not a JSON object.
        """
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            return {}
        data = read_json(file)
        unknown = sorted(k for k in data if k not in CONFIG_FIELDS and not k.startswith("_"))
        if unknown:
            warnings.warn(f"{file}: ignoring unknown MAGVIT-v2 config keys {unknown}", stacklevel=2)
        return {k: data[k] for k in CONFIG_FIELDS if k in data}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        frozen: bool = True,
        **overrides: Any,
    ) -> MagvitV2Tokenizer:
        """Load a ``showlab/magvitv2``-layout directory (or one written by :meth:`save_pretrained`).

        The module is built on the meta device and the loaded tensors are assigned to it. Keys and shapes are
        checked from the file header before any data is read. ``quantize.embedding`` / ``quantize.power_vals``
        may be absent (they are recomputed); when present they must equal the ``bits``-bit codebook.

        Args:
            path: Directory with an optional ``config.json`` and one of :data:`WEIGHTS_NAMES`.
            dtype: Cast floating weights to this dtype (``None`` keeps the stored dtype).
            device: Where the weights are created.
            frozen: Freeze and switch to eval mode (MMaDA never trains the tokenizer).
            **overrides: Constructor arguments replacing ``config.json`` fields (e.g. ``num_groups``).

        Raises:
            FileNotFoundError: naming the directory, or listing the weight file names tried.
            ValueError: on a corrupt file (named), on missing / unexpected / mis-shaped keys (all listed), or on
                stored LFQ buffers that differ from the computed ones.
        """
        root = Path(path)
        kwargs = {**cls.read_config(root), **overrides}
        with torch.device("meta"):
            model = cls(**kwargs, frozen=frozen)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        shapes, where = read_shapes(root, weights_names=WEIGHTS_NAMES, index_name=None)
        source = next(iter(where.values()), root)
        for key in BUFFER_KEYS:
            if key not in shapes:
                expected.pop(key)
        check_keys(expected, shapes, source)
        state = load_state_dict(root, None, device=device, dtype=dtype, weights_names=WEIGHTS_NAMES, index_name=None)
        embedding, power_vals = LookupFreeQuantizer.codebook(model.bits, device=device)
        for key, ref in zip(BUFFER_KEYS, (embedding, power_vals)):
            if key in state and not torch.equal(state[key].to(ref.dtype), ref):
                raise ValueError(
                    f"checkpoint {source}: {key} differs from the {model.bits}-bit LFQ codebook (channel 0 = most "
                    "significant bit); the file was not written for this quantiser"
                )
        state["quantize.embedding"] = embedding.to(dtype) if dtype is not None else embedding
        state["quantize.power_vals"] = power_vals
        model.load_state_dict(state, strict=True, assign=True)
        if frozen:
            model.requires_grad_(False)
            model.eval()
        model.pretrained_from = str(root)
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``pytorch_model.safetensors`` (original key names, buffers included).

        The config holds ``_class_name: "MAGViTv2"`` plus the width fields of :data:`CONFIG_FIELDS`, so both
        :meth:`from_pretrained` and the original loader read the directory. Files are written atomically.

        Args:
            path: Output directory (created if needed; other files in it are left alone).
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        config: Mapping[str, Any] = {"_class_name": "MAGViTv2", **self.config}
        write_json_atomic(config, root / CONFIG_NAME)
        save_file_atomic(self.state_dict(), root / WEIGHTS_NAMES[0])
