r"""MMaDA-Parallel's interleaved rows: input (image, instruction) and output (image, reasoning) in one sequence.

The layout (research/mmada.md §2.3, "MMaDA-Parallel-M interleave"; the issue's order), ``T`` = ``text_len``,
``N`` = image tokens::

    input  (P = N + T + 3):  [task] <|soi|> in_img×N <|eoi|> BOS instruction EOS [EOS…]
    output (N + T + 2):      <|soi|> out_img×N <|eoi|> BOS reasoning EOS [EOS…]

so every row has ``L = 2N + 2T + 5`` tokens. Each text part is exactly ``T`` tokens, ``BOS text EOS`` padded with
EOS (a longer text keeps ``T − 1`` tokens and a final EOS and is flagged ``truncated``). The task token is
``<|interleave|>`` for editing (the paper's ``<|thinkedit|>``) and ``<|t2it|>`` for generation from text alone
(``<|thinkgen|>``).

**Generation rows have no input image.** The released code feeds an all-zero image (token id 0, a real text id) as
a placeholder; we fill the slot with ``[iPAD]`` and attention 0, so the model never attends a fake image and the
rows of both tasks keep one length and stack into one batch.

Targets: the ``N`` output image codes (``image_mask``) and the ``T − 1`` output text positions after its BOS,
EOS padding included (``text_mask``), as LLaDA predicts padding. Everything else is the prompt (``prompt_mask``);
the output's ``<|soi|>``, ``<|eoi|>`` and BOS are fixed tokens the sampler writes, never predicted.

Condition dropout and the classifier-free-guidance branch (:func:`drop_conditions`): a dropped instruction becomes
``BOS EOS EOS…`` (attended); a dropped input image becomes ``[iPAD]×N`` with attention 0 — the same form as a
generation row, so "no image" has one meaning everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dllm_zoo.data.multimodal import image_token_ids, load_image_codes
from dllm_zoo.data.sequences import _field
from dllm_zoo.tokenizers.image import ImageTokenizer
from dllm_zoo.tokenizers.layout import TokenLayout
from dllm_zoo.tokenizers.text import TextTokenizer

InterleaveTask = Literal["edit", "generate"]
TASK_TOKENS: dict[str, str] = {"edit": "<|interleave|>", "generate": "<|t2it|>"}


@dataclass(frozen=True)
class InterleaveSpans:
    """Positions of the parts of an interleaved row of ``text_len`` ``T`` and ``num_image_tokens`` ``N``.

    Example:
        >>> s = InterleaveSpans(text_len=4, num_image_tokens=2)
        >>> s.length, s.prompt_len, s.input_image, s.input_text, s.output_image, s.output_text
        (17, 9, slice(2, 4, None), slice(5, 9, None), slice(10, 12, None), slice(13, 17, None))
    """

    text_len: int
    num_image_tokens: int

    def __post_init__(self) -> None:
        if self.text_len < 2:
            raise ValueError(f"text_len must be >= 2 (BOS, EOS), got {self.text_len} (--data.text_len)")
        if self.num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {self.num_image_tokens}")

    @property
    def prompt_len(self) -> int:
        """``P = N + T + 3``: the input part (task token, image, instruction)."""
        return self.num_image_tokens + self.text_len + 3

    @property
    def length(self) -> int:
        """``L = 2N + 2T + 5``."""
        return self.prompt_len + self.num_image_tokens + self.text_len + 2

    @property
    def input_image(self) -> slice:
        """The input image codes."""
        return slice(2, 2 + self.num_image_tokens)

    @property
    def input_text(self) -> slice:
        """The instruction part ``BOS instruction EOS [EOS…]`` (``T`` tokens)."""
        return slice(self.num_image_tokens + 3, self.prompt_len)

    @property
    def output_image(self) -> slice:
        """The output image codes."""
        start = self.prompt_len + 1
        return slice(start, start + self.num_image_tokens)

    @property
    def output_text(self) -> slice:
        """The reasoning part ``BOS reasoning EOS [EOS…]`` (``T`` tokens; targets are all but its BOS)."""
        start = self.prompt_len + self.num_image_tokens + 2
        return slice(start, start + self.text_len)

    def output_tail(self, layout: TokenLayout, mask: bool = True) -> list[int]:
        """The output part as the sampler starts it: ``<|soi|> [MASK]×N <|eoi|> BOS [MASK]×(T−1)``.

        With ``mask=False`` the masks are left out (``<|soi|>``, ``<|eoi|>`` and BOS only, for templates).
        """
        m = [layout.mask_id] if mask else []
        return [
            layout.token_id("<|soi|>"),
            *(m * self.num_image_tokens),
            layout.token_id("<|eoi|>"),
            layout.bos_id,
            *(m * (self.text_len - 1)),
        ]


def text_part(ids: Sequence[int], layout: TokenLayout, text_len: int) -> tuple[list[int], bool]:
    """``BOS ids EOS`` padded with EOS to exactly ``text_len`` tokens, and whether ``ids`` was cut."""
    text = [layout.bos_id, *ids, layout.eos_id]
    truncated = len(text) > text_len
    if truncated:
        text = text[: text_len - 1] + [layout.eos_id]
    return text + [layout.eos_id] * (text_len - len(text)), truncated


def interleave_row(
    task: InterleaveTask,
    instruction_ids: Sequence[int],
    reasoning_ids: Sequence[int],
    input_image_ids: Sequence[int] | None,
    output_image_ids: Sequence[int],
    layout: TokenLayout,
    spans: InterleaveSpans,
) -> dict[str, Any]:
    """One interleaved row from token ids (see the module docstring).

    Args:
        task: ``"edit"`` (needs ``input_image_ids``) or ``"generate"`` (no input image).
        instruction_ids: Instruction token ids (no BOS/EOS).
        reasoning_ids: Reasoning token ids (no BOS/EOS).
        input_image_ids: ``N`` image token ids (codes already offset by ``layout.image_offset``), or ``None``.
        output_image_ids: ``N`` image token ids of the output image.
        layout: Token layout.
        spans: The row's spans.

    Returns:
        ``input_ids`` ``[L]`` long; ``attention_mask``, ``prompt_mask``, ``image_mask``, ``text_mask`` ``[L]``
        bool; ``truncated`` bool; ``task`` str.
    """
    if task not in TASK_TOKENS:
        raise ValueError(f"task must be one of {tuple(TASK_TOKENS)}, got {task!r}")
    n = spans.num_image_tokens
    if (input_image_ids is None) != (task == "generate"):
        raise ValueError(f"an {task!r} row needs {'an' if task == 'edit' else 'no'} input image")
    if len(output_image_ids) != n or (input_image_ids is not None and len(input_image_ids) != n):
        raise ValueError(f"images must have {n} tokens (num_image_tokens)")
    soi, eoi, ipad = layout.token_id("<|soi|>"), layout.token_id("<|eoi|>"), layout.token_id("[iPAD]")
    instruction, cut_in = text_part(instruction_ids, layout, spans.text_len)
    reasoning, cut_out = text_part(reasoning_ids, layout, spans.text_len)
    image_in = list(input_image_ids) if input_image_ids is not None else [ipad] * n
    ids = [layout.token_id(TASK_TOKENS[task]), soi, *image_in, eoi, *instruction]
    ids += [soi, *output_image_ids, eoi, *reasoning]
    length = spans.length
    attention = torch.ones(length, dtype=torch.bool)
    if input_image_ids is None:
        attention[spans.input_image] = False
    image_mask = torch.zeros(length, dtype=torch.bool)
    image_mask[spans.output_image] = True
    text_mask = torch.zeros(length, dtype=torch.bool)
    text_mask[spans.output_text.start + 1 : spans.output_text.stop] = True
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": attention,
        "prompt_mask": ~(image_mask | text_mask),
        "image_mask": image_mask,
        "text_mask": text_mask,
        "truncated": cut_in or cut_out,
        "task": task,
    }


def drop_conditions(
    ids: Tensor, attention: Tensor, drop_text: Tensor, drop_image: Tensor, layout: TokenLayout, spans: InterleaveSpans
) -> tuple[Tensor, Tensor]:
    """Rows with their instruction and/or input image dropped (condition dropout, and the CFG branch).

    Args:
        ids: ``[B, L']`` ids whose first ``P`` positions are an interleaved input part (``L' >= P``).
        attention: ``[B, L']`` bool.
        drop_text: ``[B]`` bool: replace the instruction by ``BOS EOS EOS…``.
        drop_image: ``[B]`` bool: replace the input image by ``[iPAD]×N`` with attention 0.
        layout: Token layout.
        spans: The rows' spans.

    Returns:
        New ``(ids, attention)``; the inputs are not modified.
    """
    ids, attention = ids.clone(), attention.clone()
    empty, _ = text_part([], layout, spans.text_len)
    empty_t = torch.tensor(empty, dtype=ids.dtype, device=ids.device)
    t = spans.input_text
    ids[:, t] = torch.where(drop_text[:, None], empty_t, ids[:, t])
    attention[:, t] |= drop_text[:, None]
    im = spans.input_image
    ids[:, im] = torch.where(drop_image[:, None], layout.token_id("[iPAD]"), ids[:, im])
    attention[:, im] &= ~drop_image[:, None]
    return ids, attention


class BuildInterleaveRow:
    """A picklable ``sample -> row`` transform for one interleaved task (runs in loader workers).

    ShapesWorld's fields are the defaults: editing reads ``image``, ``edit_instruction``, ``edit_reasoning`` and
    ``output_image``; generation reads ``r2i_prompt``, ``r2i_reasoning`` and ``image`` as its output.

    Args:
        task: ``"edit"`` or ``"generate"``.
        tokenizer: Text tokenizer; its layout gives every special id.
        image_tokenizer: Image tokenizer.
        text_len: ``T``.
        image_size: Image side in pixels.
        instruction_field: Field with the instruction (default per task).
        reasoning_field: Field with the reasoning (default per task).
        input_image_field: Field with the input image (editing).
        output_image_field: Field with the output image (default per task).
    """

    DEFAULT_FIELDS: dict[str, dict[str, str]] = {
        "edit": {"instruction": "edit_instruction", "reasoning": "edit_reasoning", "output_image": "output_image"},
        "generate": {"instruction": "r2i_prompt", "reasoning": "r2i_reasoning", "output_image": "image"},
    }

    def __init__(
        self,
        task: InterleaveTask,
        tokenizer: TextTokenizer,
        image_tokenizer: ImageTokenizer,
        text_len: int,
        image_size: int,
        instruction_field: str | None = None,
        reasoning_field: str | None = None,
        input_image_field: str = "image",
        output_image_field: str | None = None,
    ) -> None:
        if task not in TASK_TOKENS:
            raise ValueError(f"task must be one of {tuple(TASK_TOKENS)}, got {task!r}")
        defaults = self.DEFAULT_FIELDS[task]
        self.task = task
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.image_size = image_size
        self.instruction_field = instruction_field or defaults["instruction"]
        self.reasoning_field = reasoning_field or defaults["reasoning"]
        self.input_image_field = input_image_field
        self.output_image_field = output_image_field or defaults["output_image"]
        num_image_tokens = (image_size // image_tokenizer.downsample) ** 2
        self.spans = InterleaveSpans(text_len, num_image_tokens)

    def _image(self, sample: Mapping[str, Any], field: str) -> list[int]:
        codes = load_image_codes(sample, self.image_tokenizer, field, self.image_size)
        return image_token_ids(codes, self.tokenizer.layout, self.spans.num_image_tokens, sample.get("__key__", "?"))

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """The row of ``sample`` (see :func:`interleave_row`)."""
        tok = self.tokenizer
        image_in = self._image(sample, self.input_image_field) if self.task == "edit" else None
        return interleave_row(
            self.task,
            tok.encode(str(_field(sample, self.instruction_field))),
            tok.encode(str(_field(sample, self.reasoning_field))),
            image_in,
            self._image(sample, self.output_image_field),
            tok.layout,
            self.spans,
        )


def collate_interleave_rows(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack interleaved rows: tensors to ``[B, L]``, ``truncated`` to a count, ``task`` to a list."""
    keys = ("input_ids", "attention_mask", "prompt_mask", "image_mask", "text_mask")
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in keys}
    batch["truncated"] = torch.tensor(sum(bool(it["truncated"]) for it in items))
    batch["task"] = [str(it["task"]) for it in items]
    return batch


__all__ = [
    "BuildInterleaveRow",
    "InterleaveSpans",
    "InterleaveTask",
    "TASK_TOKENS",
    "collate_interleave_rows",
    "drop_conditions",
    "interleave_row",
    "text_part",
]
