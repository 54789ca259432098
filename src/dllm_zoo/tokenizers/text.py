"""Text tokenizers: the byte-level embedded default and a wrapper over any local HF tokenizer directory."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypedDict

from dllm_zoo.tokenizers.layout import END_HEADER, EOT, IM_END, IM_START, START_HEADER, TokenLayout


class ChatMessage(TypedDict):
    """One chat turn."""

    role: str
    content: str


class TextTokenizer(ABC):
    """Base class of text tokenizers. Ids come from :attr:`layout`; chat rendering is shared here.

    Subclasses implement :meth:`encode` (plain text, special-token strings recognised, no BOS/EOS added) and
    :meth:`decode`.
    """

    layout: TokenLayout

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings such as ``<|eot_id|>`` become their ids."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Image codes and (optionally) special tokens are dropped."""

    def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` for each row of ``rows``."""
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def encode_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = False) -> list[int]:
        r"""Render chat turns in the layout's format and encode them, BOS first.

        LLaMA-3 (LLaDA/MMaDA, research/mmada.md §2.2): ``BOS`` then per turn
        ``<|start_header_id|>{role}<|end_header_id|>\\n{content}<|eot_id|>``; the generation prompt is
        ``<|start_header_id|>assistant<|end_header_id|>\\n``. ChatML (SDAR/Qwen3):
        ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, generation prompt ``<|im_start|>assistant\\n``.
        """
        ids = [self.layout.bos_id] if self.layout.chat_format == "llama3" else []
        for m in messages:
            ids += self._turn_header(m["role"]) + self.encode(m["content"]) + self._turn_end()
        if add_generation_prompt:
            ids += self._turn_header("assistant")
        return ids

    def _turn_header(self, role: str) -> list[int]:
        lay = self.layout
        if lay.chat_format == "llama3":
            return [lay.token_id(START_HEADER), *self.encode(role), lay.token_id(END_HEADER), *self.encode("\n")]
        return [lay.token_id(IM_START), *self.encode(f"{role}\n")]

    def _turn_end(self) -> list[int]:
        lay = self.layout
        if lay.chat_format == "llama3":
            return [lay.token_id(EOT)]
        return [lay.token_id(IM_END), *self.encode("\n")]

    @property
    def vocab_size(self) -> int:
        """Rows the backbone's embedding needs (the layout's full vocabulary, image codes included)."""
        return self.layout.vocab_size


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes as ids 0–255, special tokens above them: the embedded default, no files needed.

    Args:
        layout: A layout whose first 256 ids are bytes (the ``default`` preset).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.decode(tok.encode("2+3=<|eot_id|>"))
        '2+3=<|eot_id|>'
    """

    def __init__(self, layout: TokenLayout | str = "default") -> None:
        self.layout = TokenLayout.resolve(layout)
        specials = dict(self.layout.special_tokens)
        for tok, tid in (("<|startoftext|>", self.layout.bos_id), ("<|endoftext|>", self.layout.eos_id)):
            specials.setdefault(tok, tid)
        specials.setdefault("<|mdm_mask|>", self.layout.mask_id)
        if min(specials.values()) < 256:
            raise ValueError(
                f"ByteTokenizer needs ids 0-255 free for bytes; layout {self.layout.name!r} uses lower ids"
            )
        self._special_to_id = specials
        self._id_to_special = {v: k for k, v in specials.items()}
        # Longest first, so that e.g. "<|eot_id|>" is not read as a shorter token.
        alternation = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._split = re.compile(f"({alternation})")

    def encode(self, text: str) -> list[int]:
        """See :meth:`TextTokenizer.encode`."""
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            tid = self._special_to_id.get(piece)
            if tid is None:
                ids.extend(self._encode_plain(piece))
            else:
                ids.append(tid)
        return ids

    def _encode_plain(self, text: str) -> Iterable[int]:
        """Ids of text without special tokens: its UTF-8 bytes (subclasses add whole-word ids)."""
        return text.encode("utf-8")

    def _id_text(self, i: int, skip_special_tokens: bool) -> str | None:
        """Text of a non-byte id, or ``None`` to drop it (image codes, skipped specials)."""
        special = self._id_to_special.get(i)
        return None if special is None or skip_special_tokens else special

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """See :meth:`TextTokenizer.decode`. Invalid UTF-8 becomes U+FFFD; image codes are dropped."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            text = self._id_text(i, skip_special_tokens)
            if text is not None:
                out.append(text)
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTextTokenizer(TextTokenizer):
    """Any local HF tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``), no hub access.

    Args:
        path: Directory written by ``save_pretrained`` of a ``transformers`` tokenizer.
        layout: The layout of the model the tokenizer belongs to (a preset name such as ``"llada"`` or a
            :class:`TokenLayout`). Checked against the tokenizer: it must fit in the layout's text segment.

    Raises:
        FileNotFoundError: if ``path`` is not a directory.
        ValueError: if the tokenizer has more tokens than the layout's text segment.
    """

    def __init__(self, path: str | Path, layout: TokenLayout | str) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist (set the tokenizer's `path`)")
        self.layout = TokenLayout.resolve(layout)
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        n = len(self.hf)
        if n > self.layout.text_vocab_size:
            raise ValueError(
                f"tokenizer at {str(path)!r} has {n} tokens but layout {self.layout.name!r} reserves only "
                f"text_vocab_size={self.layout.text_vocab_size} text ids; pick the layout of this tokenizer's model"
            )
        self.path = path

    def encode(self, text: str) -> list[int]:
        """See :meth:`TextTokenizer.encode`."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """See :meth:`TextTokenizer.decode`."""
        lay = self.layout
        keep = [int(i) for i in ids if int(i) < lay.text_vocab_size and int(i) != lay.mask_id]
        return str(self.hf.decode(keep, skip_special_tokens=skip_special_tokens))
