"""The token layout: the one source of truth for every id a model, tokenizer, sampler or loss uses.

A masked-diffusion model over text and image tokens shares one embedding matrix between text ids, special
ids (mask, pad, task tokens) and image codes. Every component reads those ids from a :class:`TokenLayout`
instead of hard-coding them (the released MMaDA/LLaDA code hard-codes 126336, 126081, 126348 … in dozens
of places; research/reference-semantics.md, "LLaDA generate").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

ChatFormat = Literal["llama3", "chatml"]

# Canonical special-token strings. Layouts map the ones they have to ids.
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class TokenLayout:
    """Ids of one vocabulary: text, special tokens, mask and the image-code segment.

    Attributes:
        name: Preset name or a user label; shown in error messages.
        text_vocab_size: Number of ids reserved for text, special tokens included (LLaDA: 126464 rows).
        vocab_size: Rows of the embedding matrix; at least ``image_offset + image_codebook_size``.
        mask_id: The ``[MASK]`` id that masked-diffusion corruption writes.
        bos_id: Beginning-of-sequence id.
        eos_id: End-of-sequence id (LLaDA pads with it: padding is a predicted target).
        pad_id: Padding id. Must differ from ``mask_id`` (the LLaDA sampler finds the prompt as ``x != mask``).
        special_tokens: Token string -> id for every other special token (chat headers, task tokens, …).
        image_offset: Id of image code 0, or ``None`` for text-only layouts.
        image_codebook_size: Number of image codes (MAGVIT-v2: 8192).
        chat_format: How the tokenizer renders chat turns: LLaMA-3 headers (LLaDA/MMaDA) or ChatML (SDAR/Qwen3).
    """

    name: str
    text_vocab_size: int
    vocab_size: int
    mask_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_tokens: Mapping[str, int] = field(default_factory=dict)
    image_offset: int | None = None
    image_codebook_size: int = 0
    chat_format: ChatFormat = "llama3"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field if the ids are inconsistent."""
        problems: list[str] = []
        if self.text_vocab_size <= 0 or self.vocab_size < self.text_vocab_size:
            problems.append(f"vocab_size={self.vocab_size} must be >= text_vocab_size={self.text_vocab_size} > 0")
        named = {"mask_id": self.mask_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
        named.update({f"special_tokens[{k!r}]": v for k, v in self.special_tokens.items()})
        for key, value in named.items():
            if not 0 <= value < self.text_vocab_size:
                problems.append(f"{key}={value} is outside the text segment [0, {self.text_vocab_size})")
        if self.pad_id == self.mask_id:
            problems.append(f"pad_id == mask_id == {self.mask_id}: the sampler could not tell prompt from canvas")
        if self.mask_id in self.special_tokens.values():
            problems.append(f"mask_id={self.mask_id} is also used by a special token")
        if self.image_offset is not None:
            if self.image_codebook_size <= 0:
                problems.append("image_offset is set but image_codebook_size is 0")
            if self.image_offset < 0 or self.image_offset + self.image_codebook_size > self.vocab_size:
                problems.append(
                    f"image codes [{self.image_offset}, {self.image_offset + self.image_codebook_size}) "
                    f"do not fit in vocab_size={self.vocab_size}"
                )
        elif self.image_codebook_size:
            problems.append("image_codebook_size is set but image_offset is None")
        if problems:
            raise ValueError(f"TokenLayout {self.name!r} is inconsistent: " + "; ".join(problems))

    # --------------------------------------------------------------- lookups
    def token_id(self, token: str) -> int:
        """Id of a special token string such as ``"<|soi|>"``.

        Raises:
            KeyError: if this layout has no such token; the message lists the ones it has.
        """
        builtin = {"<|mask|>": self.mask_id, "<|bos|>": self.bos_id, "<|eos|>": self.eos_id, "<|pad|>": self.pad_id}
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in builtin:
            return builtin[token]
        raise KeyError(f"layout {self.name!r} has no special token {token!r}; it has {sorted(self.special_tokens)}")

    @property
    def has_images(self) -> bool:
        """Whether this layout reserves an image-code segment."""
        return self.image_offset is not None

    def image_ids(self, codes: Tensor) -> Tensor:
        """Map image codes ``[...]`` in ``[0, codebook)`` to token ids ``[...]``."""
        if self.image_offset is None:
            raise ValueError(f"layout {self.name!r} has no image segment (image_offset is None)")
        return codes + self.image_offset

    def image_codes(self, ids: Tensor) -> Tensor:
        """Inverse of :meth:`image_ids`: token ids ``[...]`` to codes ``[...]``."""
        if self.image_offset is None:
            raise ValueError(f"layout {self.name!r} has no image segment (image_offset is None)")
        return ids - self.image_offset

    def is_image(self, ids: Tensor) -> Tensor:
        """Bool tensor ``[...]``: which ids are image codes."""
        if self.image_offset is None:
            return torch.zeros_like(ids, dtype=torch.bool)
        return (ids >= self.image_offset) & (ids < self.image_offset + self.image_codebook_size)

    def special_ids(self) -> list[int]:
        """Every special id of the layout (mask, bos, eos, pad and the named ones), sorted and unique."""
        return sorted({self.mask_id, self.bos_id, self.eos_id, self.pad_id, *self.special_tokens.values()})

    def replace(self, **changes: object) -> TokenLayout:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # --------------------------------------------------------------- presets
    @staticmethod
    def preset_names() -> list[str]:
        """Names accepted by :meth:`preset`."""
        return sorted(_PRESETS)

    @staticmethod
    def preset(name: str) -> TokenLayout:
        """One of the named layouts: ``default``, ``words``, ``llada``, ``mmada``, ``sdar``.

        ``default`` is byte-level and embedded; ``words`` is ``default`` with 240 more text ids for
        :class:`~dllm_zoo.tokenizers.WordTokenizer`.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown token layout {name!r}; choose one of {sorted(_PRESETS)}")
        return _PRESETS[name]()

    @staticmethod
    def resolve(layout: TokenLayout | str) -> TokenLayout:
        """Accept either a layout or a preset name (the form YAML configs use)."""
        return layout if isinstance(layout, TokenLayout) else TokenLayout.preset(layout)


# MMaDA's task/sentinel tokens reuse LLaDA's reserved ids (research/mmada.md §2.2), no tokenizer edit.
_LLADA_CHAT = {START_HEADER: 126346, END_HEADER: 126347, EOT: 126348}
_MMADA_TASKS = {
    "<|soi|>": 126084,
    "<|eoi|>": 126085,
    "<|sov|>": 126086,
    "<|eov|>": 126087,
    "<|t2i|>": 126088,
    "<|mmu|>": 126089,
    "<|t2v|>": 126090,
    "<|v2v|>": 126091,
    "<|lvg|>": 126092,
    "[iPAD]": 126093,
    "<|r2i|>": 126094,
    "<|interleave|>": 126095,
    "<|t2it|>": 126096,
}

# The embedded default: 256 byte ids, then the special tokens, then a small image-code segment for the
# palette tokenizer of the synthetic images. Same token names as MMaDA so every sequence builder works on both.
_DEFAULT_SPECIALS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "<|mdm_mask|>",
    EOT,
    START_HEADER,
    END_HEADER,
    "<|soi|>",
    "<|eoi|>",
    "<|t2i|>",
    "<|mmu|>",
    "[iPAD]",
    "<|r2i|>",
    "<|interleave|>",
    "<|t2it|>",
]
DEFAULT_TEXT_VOCAB = 272  # 256 bytes + 14 specials, rounded up to a multiple of 16
DEFAULT_IMAGE_CODEBOOK = 64


def _default() -> TokenLayout:
    ids = {tok: 256 + i for i, tok in enumerate(_DEFAULT_SPECIALS)}
    named = {k: v for k, v in ids.items() if k not in ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>")}
    return TokenLayout(
        name="default",
        text_vocab_size=DEFAULT_TEXT_VOCAB,
        vocab_size=DEFAULT_TEXT_VOCAB + DEFAULT_IMAGE_CODEBOOK,
        mask_id=ids["<|mdm_mask|>"],
        bos_id=ids["<|startoftext|>"],
        eos_id=ids["<|endoftext|>"],
        pad_id=ids["<|endoftext|>"],
        special_tokens=named,
        image_offset=DEFAULT_TEXT_VOCAB,
        image_codebook_size=DEFAULT_IMAGE_CODEBOOK,
    )


def _llada() -> TokenLayout:
    return TokenLayout(
        name="llada",
        text_vocab_size=126464,
        vocab_size=126464,
        mask_id=126336,
        bos_id=126080,
        eos_id=126081,
        pad_id=126081,
        special_tokens=dict(_LLADA_CHAT),
    )


def _mmada() -> TokenLayout:
    # Image code k is token 126349 + k (126349 = len(LLaDA tokenizer)); rows resized 126464 -> 134656.
    return TokenLayout(
        name="mmada",
        text_vocab_size=126349,
        vocab_size=134656,
        mask_id=126336,
        bos_id=126080,
        eos_id=126081,
        pad_id=126081,
        special_tokens={**_LLADA_CHAT, **_MMADA_TASKS},
        image_offset=126349,
        image_codebook_size=8192,
    )


def _sdar() -> TokenLayout:
    # Qwen3 vocabulary with SDAR's added mask token (research/tracerl_llada.md §3.1).
    return TokenLayout(
        name="sdar",
        text_vocab_size=151936,
        vocab_size=151936,
        mask_id=151669,
        bos_id=151643,
        eos_id=151643,
        pad_id=151643,
        special_tokens={IM_START: 151644, IM_END: 151645, "<think>": 151667, "</think>": 151668},
        chat_format="chatml",
    )


WORDS_TEXT_VOCAB = 512  # the default's 272 ids, then 240 more for whole words


def _words() -> TokenLayout:
    # The default layout with a larger text segment: ids 270-511 are free for a closed word vocabulary
    # (dllm_zoo.tokenizers.WordTokenizer), so a caption is a few tokens instead of ~30 bytes.
    base = _default()
    return dataclasses.replace(
        base,
        name="words",
        text_vocab_size=WORDS_TEXT_VOCAB,
        vocab_size=WORDS_TEXT_VOCAB + DEFAULT_IMAGE_CODEBOOK,
        image_offset=WORDS_TEXT_VOCAB,
    )


_PRESETS = {"default": _default, "words": _words, "llada": _llada, "mmada": _mmada, "sdar": _sdar}
