r"""Sequence builders: one sample dict -> one fixed-length training row, and the collate that stacks rows.

The layouts follow MMaDA's ``UniversalPrompting`` (research/mmada.md §2.3), built on LLaDA's pretraining and
SFT rows (Nie et al. 2025, §2.2–2.3):

* ``lm`` (:class:`LMBuilder`): ``BOS text EOS [EOS …]`` padded with EOS to ``L``. No prompt: every position,
  the EOS padding included, is a denoising target, and the attention mask is all ones (LLaDA/MMaDA
  pretraining predicts the padding).
* ``lm_chat`` (:class:`LMChatBuilder`): the chat rendering of ``[user: prompt, assistant: response]`` in the
  layout's chat format, then ``EOS`` padding. The prompt is everything up to and including the last
  ``<|end_header_id|>`` (ChatML: up to and including ``<|im_start|>assistant\n``); the response, its
  end-of-turn token and the EOS padding are targets. The end-of-turn token is the real ``<|eot_id|>`` special
  token (the released MMaDA writes a literal ``<eot_id>`` string by mistake; we do not reproduce that).

Rows longer than ``L`` are cut to ``L - 1`` tokens plus a final EOS and flagged ``truncated``. An
``lm_chat`` sample whose prompt leaves no room for a response token and the final EOS is **dropped**
(:class:`~dllm_zoo.data.stream.SampleDropped`): the stream counts it per batch as ``dropped`` and warns with its
key, rather than training on an all-prompt row (which has no target) or stopping a long run.

With ``pad=False`` a builder returns the sample's own tokens (no EOS padding) for packing several samples into
one row (:mod:`dllm_zoo.data.packing`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from dllm_zoo.data.stream import DROPPED_KEY, ERRORS_KEY, SampleDropped
from dllm_zoo.tokenizers.layout import END_HEADER
from dllm_zoo.tokenizers.text import TextTokenizer

SequenceFormat = Literal["lm", "lm_chat"]


def _field(sample: Mapping[str, Any], name: str) -> Any:
    if name not in sample:
        fields = sorted(k for k in sample if not str(k).startswith("__"))
        raise KeyError(
            f"sample {sample.get('__key__', '?')!r} (from {sample.get('__url__', '?')}) has no field {name!r}; "
            f"it has {fields}. Set the DataModule's field names (--data.text_field / --data.prompt_field / "
            "--data.response_field) to match your data"
        )
    return sample[name]


class SequenceBuilder(ABC):
    """Turn one sample into one row of ``seq_len`` tokens.

    Subclasses implement :meth:`token_ids`; this base pads, truncates and builds the masks.

    Args:
        text_field: Field holding a whole document (``lm``).
        prompt_field: Field holding the prompt / user turn.
        response_field: Field holding the response / assistant turn.
        answer_field: Field with a reference answer, passed through to the batch as ``answer`` when present.
    """

    def __init__(
        self,
        text_field: str = "text",
        prompt_field: str = "prompt",
        response_field: str = "response",
        answer_field: str = "answer",
    ) -> None:
        self.text_field = text_field
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.answer_field = answer_field

    @abstractmethod
    def token_ids(self, sample: Mapping[str, Any], tokenizer: TextTokenizer) -> tuple[list[int], int]:
        """Unpadded ids of the row (ending in EOS) and the prompt length (0 = no prompt).

        Raises:
            KeyError: if a field is missing (the message names the field and the sample key).
        """

    def build_ids(
        self, sample: Mapping[str, Any], tokenizer: TextTokenizer, seq_len: int
    ) -> tuple[list[int], int, bool]:
        """The unpadded ids of one sample, cut to ``seq_len``.

        Args:
            sample: The sample dict (``__key__`` is used in error messages).
            tokenizer: Text tokenizer; its layout gives BOS/EOS and the chat format.
            seq_len: Row length ``L``.

        Returns:
            ``(ids, prompt_len, truncated)``: at most ``seq_len`` ids ending in EOS (a longer sample is cut to
            ``L - 1`` tokens plus EOS and flagged ``truncated``) and the prompt length.

        Raises:
            SampleDropped: if the prompt leaves no room for a response token and the final EOS.
            KeyError: if a field is missing.
        """
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (BOS/EOS), got {seq_len}")
        ids, prompt_len = self.token_ids(sample, tokenizer)
        if prompt_len > seq_len - 2:
            raise SampleDropped(
                f"its prompt is {prompt_len} tokens; seq_len={seq_len} leaves no room for a response "
                "(raise --data.seq_len)"
            )
        truncated = len(ids) > seq_len
        if truncated:
            ids = ids[: seq_len - 1] + [tokenizer.layout.eos_id]
        return ids, prompt_len, truncated

    def __call__(
        self, sample: Mapping[str, Any], tokenizer: TextTokenizer, seq_len: int, *, pad: bool = True
    ) -> dict[str, Any]:
        """Build one row.

        Args:
            sample: The sample dict (``__key__`` is used in error messages).
            tokenizer: Text tokenizer; its layout gives BOS/EOS and the chat format.
            seq_len: Row length ``L``.
            pad: Pad with EOS to ``L`` (default). ``False`` returns the sample's own ``n <= L`` tokens, for packing
                (:class:`~dllm_zoo.data.packing.PackSequences`).

        Returns:
            ``input_ids`` ``[L]`` long, ``attention_mask`` ``[L]`` bool (all True: EOS padding is a target),
            ``prompt_mask`` ``[L]`` bool (True = prompt, never masked), ``truncated`` bool, and ``answer`` (str)
            when the sample has the answer field. With ``pad=False`` the tensors are ``[n]``.

        Raises:
            SampleDropped: if the prompt leaves no room for a response token and the final EOS.
            KeyError: if a field is missing.
        """
        ids, prompt_len, truncated = self.build_ids(sample, tokenizer, seq_len)
        length = seq_len if pad else len(ids)
        input_ids = torch.full((length,), tokenizer.layout.eos_id, dtype=torch.long)
        input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones(length, dtype=torch.bool),
            "prompt_mask": torch.arange(length) < prompt_len,
            "truncated": truncated,
        }
        if self.answer_field in sample:
            out["answer"] = str(sample[self.answer_field])
        return out


class LMBuilder(SequenceBuilder):
    """MMaDA/LLaDA ``lm`` rows: ``BOS text EOS`` + EOS padding; no prompt (research/mmada.md §2.3).

    The text is ``sample[text_field]``, or ``prompt + " " + response`` when the sample has no text field.

    Example:
        >>> from dllm_zoo.tokenizers import ByteTokenizer
        >>> row = LMBuilder()({"text": "hi"}, ByteTokenizer(), 6)
        >>> row["input_ids"].tolist(), row["prompt_mask"].any().item()
        ([256, 104, 105, 257, 257, 257], False)
    """

    def token_ids(self, sample: Mapping[str, Any], tokenizer: TextTokenizer) -> tuple[list[int], int]:
        """See :meth:`SequenceBuilder.token_ids`."""
        if self.text_field in sample:
            text = str(sample[self.text_field])
        else:
            text = f"{_field(sample, self.prompt_field)} {_field(sample, self.response_field)}"
        lay = tokenizer.layout
        return [lay.bos_id, *tokenizer.encode(text), lay.eos_id], 0


class LMChatBuilder(SequenceBuilder):
    r"""MMaDA ``lm_chat`` rows: one user/assistant exchange in the layout's chat format + EOS padding.

    The prompt (``prompt_mask``) runs up to and including the last ``<|end_header_id|>`` (LLaMA-3 format) or
    ``<|im_start|>assistant\n`` (ChatML); the boundary is computed from the rendered generation prompt, so a
    header string inside the response cannot move it.

    Example:
        >>> from dllm_zoo.tokenizers import ByteTokenizer
        >>> row = LMChatBuilder()({"prompt": "1+1", "response": "2"}, ByteTokenizer(), 32)
        >>> int(row["prompt_mask"].sum())  # BOS <sh> user <eh> \n 1+1 <eot> <sh> assistant <eh>
        23
    """

    def token_ids(self, sample: Mapping[str, Any], tokenizer: TextTokenizer) -> tuple[list[int], int]:
        """See :meth:`SequenceBuilder.token_ids`."""
        prompt = str(_field(sample, self.prompt_field))
        response = str(_field(sample, self.response_field))
        lay = tokenizer.layout
        user = {"role": "user", "content": prompt}
        head = tokenizer.encode_chat([user], add_generation_prompt=True)  # type: ignore[list-item]
        ids = tokenizer.encode_chat([user, {"role": "assistant", "content": response}])  # type: ignore[list-item]
        if lay.chat_format == "llama3":
            end_header = lay.token_id(END_HEADER)
            prompt_len = len(head) - head[::-1].index(end_header)
        else:
            prompt_len = len(head)
        if ids[:prompt_len] != head[:prompt_len]:  # tokenizers that merge across the boundary
            raise ValueError(
                f"sample {sample.get('__key__', '?')!r}: the tokenizer does not keep the chat prompt as a prefix "
                "of the full conversation; the prompt boundary would be wrong"
            )
        return [*ids, lay.eos_id], prompt_len


def make_builder(
    fmt: SequenceFormat,
    text_field: str = "text",
    prompt_field: str = "prompt",
    response_field: str = "response",
    answer_field: str = "answer",
) -> SequenceBuilder:
    """The builder of a format name (``"lm"`` or ``"lm_chat"``), with the given field names."""
    builders: dict[str, type[SequenceBuilder]] = {"lm": LMBuilder, "lm_chat": LMChatBuilder}
    if fmt not in builders:
        raise ValueError(f"unknown sequence format {fmt!r}; choose one of {sorted(builders)} (--data.format)")
    return builders[fmt](text_field, prompt_field, response_field, answer_field)


class BuildSequence:
    """A picklable ``sample -> row`` transform for :class:`~dllm_zoo.data.stream.SampleStream` workers.

    Args:
        builder: The sequence builder.
        tokenizer: The text tokenizer.
        seq_len: Row length ``L``.
        pad: Pad rows to ``L`` (default); ``False`` keeps each sample's own length, for packing.
    """

    def __init__(self, builder: SequenceBuilder, tokenizer: TextTokenizer, seq_len: int, pad: bool = True) -> None:
        self.builder = builder
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.pad = pad

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Build the row of ``sample`` (see :meth:`SequenceBuilder.__call__`)."""
        return self.builder(sample, self.tokenizer, self.seq_len, pad=self.pad)


def collate_sequences(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack built rows into a batch: padded by a :class:`SequenceBuilder`, or packed (``PackSequences``).

    Args:
        items: Rows, optionally carrying the stream's ``__errors__`` and ``__dropped__`` counts.

    Returns:
        ``input_ids`` ``[B, L]`` long, ``attention_mask`` ``[B, L]`` bool, ``prompt_mask`` ``[B, L]`` bool;
        scalar long tensors ``data_errors`` (unreadable records owned by these rows), ``dropped`` (samples
        dropped by the builder) and ``truncated`` (samples cut to ``L``); and ``answer`` (``list[str]``, ``B``) when
        every row has one. Packed rows add ``segment_ids`` and ``position_ids`` ``[B, L]`` long and carry
        ``answers`` (``list[list[str]]``: per row, one per packed sample in segment order) instead of ``answer``.
    """
    if not items:
        raise ValueError("cannot collate an empty list of rows")
    keys = ["input_ids", "attention_mask", "prompt_mask"]
    keys += [k for k in ("segment_ids", "position_ids") if all(k in it for it in items)]
    batch: dict[str, Any] = {key: torch.stack([it[key] for it in items]) for key in keys}
    batch["data_errors"] = torch.tensor(sum(int(it.get(ERRORS_KEY, 0)) for it in items), dtype=torch.long)
    batch["dropped"] = torch.tensor(sum(int(it.get(DROPPED_KEY, 0)) for it in items), dtype=torch.long)
    # a padded row holds a bool (one sample), a packed row the count of its truncated samples
    batch["truncated"] = torch.tensor(sum(int(it.get("truncated", 0)) for it in items), dtype=torch.long)
    if all("answer" in it for it in items):
        batch["answer"] = [str(it["answer"]) for it in items]
    if all("answers" in it for it in items):
        batch["answers"] = [[str(a) for a in it["answers"]] for it in items]
    return batch
