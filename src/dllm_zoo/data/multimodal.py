r"""Sequence builders for MMaDA's multimodal rows: ``t2i``, ``mmu``, ``r2i`` (research/mmada.md §2.3).

Every multimodal row has the same length ``L = T + N + 3`` (``T`` = ``text_len``, MMaDA's ``max_seq_length``;
``N`` = image tokens), so the rows of all tasks, text-only ``lm``/``lm_chat`` rows built at length ``L`` included,
stack into one batch and run in one forward (MMaDA concatenates its t2i, lm and mmu batches along the batch
dimension). Image code ``k`` is token ``layout.image_offset + k``.

* **t2i** (:class:`T2IBuilder`): ``[iPAD]×k <|t2i|> BOS caption EOS <|soi|> img₁…img_N <|eoi|>``. The text part
  before ``<|soi|>`` is LEFT-padded with ``[iPAD]`` to exactly ``T + 1`` tokens (attention mask 0 on the pads);
  a longer caption keeps ``T`` tokens ending in EOS (flagged ``truncated``). Only the ``N`` image tokens are
  targets (the released code also puts identity labels on ``<|soi|>``/``<|eoi|>``; we do not). Classifier-free
  guidance's caption dropout replaces the text part by ``<|t2i|> BOS EOS`` (:func:`unconditional_t2i_prefix`);
  the stage does it per step, so every epoch drops other captions.
* **mmu** (:class:`MMUBuilder`): ``<|mmu|> <|soi|> img <|eoi|>`` then the chat rendering of
  ``[user: question, assistant: answer]`` (``BOS <|start_header_id|>user<|end_header_id|>\n q <|eot_id|>
  <|start_header_id|>assistant<|end_header_id|>\n answer <|eot_id|>`` + EOS) padded with EOS to ``T``. The prompt
  is everything up to and including the last ``<|end_header_id|>``; the answer and the EOS padding are targets.
  The end of turn is the real ``<|eot_id|>`` special token (the released data writes the literal string
  ``<eot_id>``, research/mmada.md §1.1).
* **r2i** (:class:`R2IBuilder`): ``<|r2i|>`` + the chat rendering of ``[user: prompt, assistant: reasoning]``
  padded with EOS to ``T``, then ``<|soi|> img <|eoi|>``. Prompt = the task token, the chat prompt, ``<|soi|>`` and
  ``<|eoi|>``; the reasoning text (with its EOS padding) and the image are targets.

Rows carry ``image_mask`` ``[L]`` (True at the image-code targets): the stages mask text targets with the text
schedule (i.i.d., ``p = (1−ε)t + ε``) and image targets with the image schedule (MaskGIT cosine count).
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from dllm_zoo.data.sequences import LMBuilder, LMChatBuilder, SequenceBuilder, _field
from dllm_zoo.data.stream import SampleDropped
from dllm_zoo.tokenizers.image import ImageTokenizer, PaletteTokenizer
from dllm_zoo.tokenizers.layout import TokenLayout
from dllm_zoo.tokenizers.text import TextTokenizer

TaskFormat = Literal["t2i", "mmu", "r2i", "lm", "lm_chat"]
TASK_FORMATS: tuple[str, ...] = ("t2i", "mmu", "r2i", "lm", "lm_chat")


def row_length(text_len: int, num_image_tokens: int) -> int:
    """``L = T + N + 3``: the length every multimodal (and text) row of a multi-task batch has."""
    return text_len + num_image_tokens + 3


def image_tokens_for(image_size: int, image_tokenizer: ImageTokenizer) -> int:
    """``N = (image_size / downsample)²``, the image tokens of one image, after checking the size divides.

    Raises:
        ValueError: naming ``--data.image_size`` when it is not a positive multiple of the tokenizer's downsample.
    """
    if image_size < 1 or image_size % image_tokenizer.downsample:
        raise ValueError(
            f"--data.image_size={image_size} must be a positive multiple of the image tokenizer's downsample "
            f"factor {image_tokenizer.downsample}"
        )
    return (image_size // image_tokenizer.downsample) ** 2


def t2i_prefix(caption_ids: Sequence[int], layout: TokenLayout, text_len: int) -> tuple[list[int], int, bool]:
    """The t2i text part ``[iPAD]×k <|t2i|> BOS caption EOS`` of exactly ``text_len + 1`` tokens.

    Args:
        caption_ids: Caption token ids (no BOS/EOS).
        layout: Token layout (``[iPAD]``, ``<|t2i|>``, BOS, EOS).
        text_len: ``T``; the BOS…EOS part holds at most ``T`` tokens.

    Returns:
        ``(ids, pads, truncated)``: ``T + 1`` ids, the number ``k`` of leading ``[iPAD]`` and whether the caption
        was cut.
    """
    if text_len < 2:
        raise ValueError(f"text_len must be >= 2 (BOS, EOS), got {text_len} (--data.text_len)")
    text = [layout.bos_id, *caption_ids, layout.eos_id]
    truncated = len(text) > text_len
    if truncated:
        text = text[: text_len - 1] + [layout.eos_id]
    pads = text_len - len(text)
    return [layout.token_id("[iPAD]")] * pads + [layout.token_id("<|t2i|>"), *text], pads, truncated


def unconditional_t2i_prefix(layout: TokenLayout, text_len: int) -> tuple[list[int], int]:
    """The empty-caption prefix ``[iPAD]×(T−2) <|t2i|> BOS EOS`` of ``T + 1`` tokens and its pad count (CFG)."""
    ids, pads, _ = t2i_prefix([], layout, text_len)
    return ids, pads


def mmu_prompt_ids(tokenizer: TextTokenizer, image_ids: Sequence[int], question: str) -> list[int]:
    """An image question's generation prompt: ``<|mmu|> <|soi|> img <|eoi|>`` + the chat prompt of ``question``.

    The answer the model writes after it is the assistant turn of an :class:`MMUBuilder` row.

    Args:
        tokenizer: Text tokenizer (its layout has the mmu tokens).
        image_ids: The image's ``N`` token ids (codes + ``image_offset``).
        question: The question text.
    """
    lay = tokenizer.layout
    head = [lay.token_id("<|mmu|>"), lay.token_id("<|soi|>"), *image_ids, lay.token_id("<|eoi|>")]
    return head + tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)


def image_token_ids(codes: Tensor, layout: TokenLayout, num_image_tokens: int, key: Any) -> list[int]:
    """The ``N`` token ids of an image's codes (code + ``image_offset``), after checking count and codebook.

    Args:
        codes: The image's codes (any shape, ``N`` in all).
        layout: The model's layout.
        num_image_tokens: ``N``.
        key: The sample's key, named in errors.
    """
    flat = codes.reshape(-1)
    if flat.numel() != num_image_tokens:
        raise ValueError(
            f"sample {key!r}: its image has {flat.numel()} codes but the rows hold {num_image_tokens} image tokens; "
            "set --data.image_size to the images' size (or resize them)"
        )
    if layout.image_offset is None:
        raise ValueError(f"layout {layout.name!r} has no image segment; multimodal rows need one")
    if flat.numel() and int(flat.max()) >= layout.image_codebook_size:
        raise ValueError(
            f"sample {key!r}: image code {int(flat.max())} >= the layout's image_codebook_size "
            f"{layout.image_codebook_size}; the image tokenizer and the layout disagree"
        )
    return (flat + layout.image_offset).tolist()


class MultimodalBuilder(ABC):
    """Turn one sample and its image codes into one row of ``L = T + N + 3`` tokens.

    Args:
        prompt_field: Field with the question / instruction (mmu, r2i).
        response_field: Field with the answer / reasoning (mmu, r2i).
        caption_field: Field with the caption (t2i).
        answer_field: Field with a reference answer, passed through as ``answer`` when present.
    """

    uses_image: bool = True

    def __init__(
        self,
        prompt_field: str = "prompt",
        response_field: str = "response",
        caption_field: str = "caption",
        answer_field: str = "answer",
    ) -> None:
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.caption_field = caption_field
        self.answer_field = answer_field

    @abstractmethod
    def build(
        self, sample: Mapping[str, Any], tokenizer: TextTokenizer, image_ids: list[int], text_len: int
    ) -> tuple[list[int], list[bool], list[bool], list[bool], bool]:
        """``(ids, attention, prompt, image_target, truncated)`` lists of length ``L``."""

    def __call__(
        self,
        sample: Mapping[str, Any],
        tokenizer: TextTokenizer,
        codes: Tensor,
        text_len: int,
        num_image_tokens: int,
    ) -> dict[str, Any]:
        """Build one row.

        Args:
            sample: The sample dict.
            tokenizer: Text tokenizer; its layout gives every special id.
            codes: ``[h, w]`` (or ``[N]``) int64 image codes of the sample.
            text_len: ``T``.
            num_image_tokens: ``N``.

        Returns:
            ``input_ids`` ``[L]`` long, ``attention_mask``, ``prompt_mask``, ``image_mask`` ``[L]`` bool, ``truncated``
            bool, and ``answer`` (str) when the sample has the answer field.

        Raises:
            SampleDropped: when the prompt leaves no room for a response in ``T`` text tokens.
            KeyError: when a field is missing (the message names it and the flag to set).
        """
        layout = tokenizer.layout
        image = image_token_ids(codes, layout, num_image_tokens, sample.get("__key__", "?"))
        ids, attention, prompt, image_target, truncated = self.build(sample, tokenizer, image, text_len)
        length = row_length(text_len, num_image_tokens)
        assert len(ids) == length, (len(ids), length)  # a builder bug, not bad input
        out: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.bool),
            "prompt_mask": torch.tensor(prompt, dtype=torch.bool),
            "image_mask": torch.tensor(image_target, dtype=torch.bool),
            "truncated": truncated,
        }
        if self.answer_field in sample:
            out["answer"] = str(sample[self.answer_field])
        return out

    def chat_part(
        self, sample: Mapping[str, Any], tokenizer: TextTokenizer, text_len: int
    ) -> tuple[list[int], int, bool]:
        """The chat rendering of ``[user: prompt, assistant: response]`` + EOS padding, exactly ``T`` tokens.

        Returns:
            ``(ids, prompt_len, truncated)``.
        """
        chat = LMChatBuilder(prompt_field=self.prompt_field, response_field=self.response_field)
        ids, prompt_len, truncated = chat.build_ids(sample, tokenizer, text_len)
        return ids + [tokenizer.layout.eos_id] * (text_len - len(ids)), prompt_len, truncated


class T2IBuilder(MultimodalBuilder):
    """MMaDA ``t2i`` rows; see the module docstring.

    Example:
        >>> from dllm_zoo.tokenizers import ByteTokenizer
        >>> tok = ByteTokenizer()
        >>> row = T2IBuilder()({"caption": "hi"}, tok, torch.tensor([1, 2]), text_len=6, num_image_tokens=2)
        >>> row["input_ids"].tolist()  # [iPAD]x2 <|t2i|> BOS h i EOS <|soi|> code1 code2 <|eoi|>
        [266, 266, 264, 256, 104, 105, 257, 262, 273, 274, 263]
    """

    def build(
        self, sample: Mapping[str, Any], tokenizer: TextTokenizer, image_ids: list[int], text_len: int
    ) -> tuple[list[int], list[bool], list[bool], list[bool], bool]:
        """See :meth:`MultimodalBuilder.build`."""
        lay = tokenizer.layout
        caption = str(_field(sample, self.caption_field))
        prefix, pads, truncated = t2i_prefix(tokenizer.encode(caption), lay, text_len)
        n = len(image_ids)
        ids = [*prefix, lay.token_id("<|soi|>"), *image_ids, lay.token_id("<|eoi|>")]
        attention = [False] * pads + [True] * (len(ids) - pads)
        prompt = [True] * (len(prefix) + 1) + [False] * n + [True]
        image_target = [False] * (len(prefix) + 1) + [True] * n + [False]
        return ids, attention, prompt, image_target, truncated


class MMUBuilder(MultimodalBuilder):
    """MMaDA ``mmu`` rows (image understanding); see the module docstring."""

    def build(
        self, sample: Mapping[str, Any], tokenizer: TextTokenizer, image_ids: list[int], text_len: int
    ) -> tuple[list[int], list[bool], list[bool], list[bool], bool]:
        """See :meth:`MultimodalBuilder.build`."""
        lay = tokenizer.layout
        head = [lay.token_id("<|mmu|>"), lay.token_id("<|soi|>"), *image_ids, lay.token_id("<|eoi|>")]
        text, prompt_len, truncated = self.chat_part(sample, tokenizer, text_len)
        ids = head + text
        prompt = [True] * (len(head) + prompt_len) + [False] * (text_len - prompt_len)
        return ids, [True] * len(ids), prompt, [False] * len(ids), truncated


class R2IBuilder(MultimodalBuilder):
    """Reasoning-to-image rows (MMaDA mixed long-CoT SFT); see the module docstring."""

    def build(
        self, sample: Mapping[str, Any], tokenizer: TextTokenizer, image_ids: list[int], text_len: int
    ) -> tuple[list[int], list[bool], list[bool], list[bool], bool]:
        """See :meth:`MultimodalBuilder.build`."""
        lay = tokenizer.layout
        text, prompt_len, truncated = self.chat_part(sample, tokenizer, text_len)
        n = len(image_ids)
        ids = [lay.token_id("<|r2i|>"), *text, lay.token_id("<|soi|>"), *image_ids, lay.token_id("<|eoi|>")]
        prompt = [True] * (1 + prompt_len) + [False] * (text_len - prompt_len) + [True] + [False] * n + [True]
        image_target = [False] * (2 + text_len) + [True] * n + [False]
        return ids, [True] * len(ids), prompt, image_target, truncated


def load_image_codes(
    sample: Mapping[str, Any],
    image_tokenizer: ImageTokenizer,
    image_field: str,
    image_size: int,
) -> Tensor:
    """The image codes ``[h, w]`` of a sample.

    Accepted forms, in order: a precomputed ``{image_field}_codes`` field (a list of codes, pre-tokenised shards);
    a palette-index grid (``list[list[int]]``, ShapesWorld's form), rendered with :data:`DEFAULT_PALETTE` unless the
    tokenizer is a :class:`PaletteTokenizer` (which reads it directly); encoded image bytes (PNG/JPEG, decoded with
    Pillow, resized on the shorter side and centre-cropped to ``image_size``).

    Raises:
        KeyError: if the sample has neither field.
        ValueError: if the image does not have ``image_size`` pixels per side (palette grids) or cannot be decoded.
    """
    pre = sample.get(f"{image_field}_codes")
    if pre is not None:
        return torch.as_tensor(pre, dtype=torch.long)
    value = _field(sample, image_field)
    key = sample.get("__key__", "?")
    if isinstance(value, (bytes, bytearray)):
        images = _decode_image_bytes(bytes(value), image_size, key)
    else:
        grid = torch.as_tensor(value, dtype=torch.long)
        if grid.dim() != 2 or grid.shape[0] != image_size or grid.shape[1] != image_size:
            raise ValueError(
                f"sample {key!r}: field {image_field!r} is a {tuple(grid.shape)} grid; --data.image_size is "
                f"{image_size} (set it to the images' side)"
            )
        if isinstance(image_tokenizer, PaletteTokenizer):
            return image_tokenizer.encode_indices(grid[None])[0]
        images = _default_palette().render(grid[None])
    device = next((b.device for b in image_tokenizer.buffers()), torch.device("cpu"))
    with torch.no_grad():
        return image_tokenizer.encode(images.to(device))[0].cpu()


_PALETTE: PaletteTokenizer | None = None


def _default_palette() -> PaletteTokenizer:
    global _PALETTE
    if _PALETTE is None:
        _PALETTE = PaletteTokenizer()
    return _PALETTE


def _decode_image_bytes(data: bytes, size: int, key: Any) -> Tensor:
    """PNG/JPEG bytes -> ``[1, 3, size, size]`` float in ``[0, 1]`` (shorter side resized, centre crop)."""
    from PIL import Image  # Pillow comes with torchvision/tensorboard stacks; imported only for real images

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exn:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise ValueError(f"sample {key!r}: its image bytes cannot be decoded ({exn})") from exn
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1)[None].float() / 255.0


def make_task_builder(
    fmt: str,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    caption_field: str = "caption",
    text_field: str = "text",
    answer_field: str = "answer",
) -> MultimodalBuilder | SequenceBuilder:
    """The builder of a task format (``t2i``, ``mmu``, ``r2i``, ``lm``, ``lm_chat``)."""
    if fmt == "lm":
        return LMBuilder(text_field, prompt_field, response_field, answer_field)
    if fmt == "lm_chat":
        return LMChatBuilder(text_field, prompt_field, response_field, answer_field)
    builders: dict[str, type[MultimodalBuilder]] = {"t2i": T2IBuilder, "mmu": MMUBuilder, "r2i": R2IBuilder}
    if fmt not in builders:
        raise ValueError(f"unknown task format {fmt!r}; choose one of {list(TASK_FORMATS)}")
    return builders[fmt](prompt_field, response_field, caption_field, answer_field)


class BuildTaskRow:
    """A picklable ``sample -> row`` transform for one task of a multi-task batch (runs in loader workers).

    Args:
        builder: The task's builder.
        tokenizer: Text tokenizer.
        image_tokenizer: Image tokenizer (unused by text formats).
        text_len: ``T``.
        image_size: Image side in pixels.
        image_field: Sample field holding the image.
    """

    def __init__(
        self,
        builder: MultimodalBuilder | SequenceBuilder,
        tokenizer: TextTokenizer,
        image_tokenizer: ImageTokenizer,
        text_len: int,
        image_size: int,
        image_field: str = "image",
    ) -> None:
        self.builder = builder
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.text_len = text_len
        self.image_size = image_size
        self.image_field = image_field
        self.num_image_tokens = (image_size // image_tokenizer.downsample) ** 2

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Build the row of ``sample``; text rows get an all-False ``image_mask``."""
        length = row_length(self.text_len, self.num_image_tokens)
        if isinstance(self.builder, SequenceBuilder):
            row = self.builder(sample, self.tokenizer, length)
            row["image_mask"] = torch.zeros(length, dtype=torch.bool)
            return row
        codes = load_image_codes(sample, self.image_tokenizer, self.image_field, self.image_size)
        return self.builder(sample, self.tokenizer, codes, self.text_len, self.num_image_tokens)


def collate_task_rows(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """:func:`~dllm_zoo.data.sequences.collate_sequences` plus ``image_mask`` ``[B, L]``."""
    from dllm_zoo.data.sequences import collate_sequences

    batch = collate_sequences(items)
    batch["image_mask"] = torch.stack([it["image_mask"] for it in items])
    return batch


__all__ = [
    "BuildTaskRow",
    "MMUBuilder",
    "MultimodalBuilder",
    "R2IBuilder",
    "SampleDropped",
    "T2IBuilder",
    "TASK_FORMATS",
    "TaskFormat",
    "collate_task_rows",
    "load_image_codes",
    "image_token_ids",
    "image_tokens_for",
    "make_task_builder",
    "mmu_prompt_ids",
    "row_length",
    "t2i_prefix",
    "unconditional_t2i_prefix",
]
