"""A closed-vocabulary word tokenizer: whole words as single ids, bytes for everything else.

The synthetic tasks speak a small regular language (ShapesWorld has ~80 words). Byte-level text makes a caption
~30 tokens that a tiny model must spell letter by letter; with one id per word it is ~7, the rows are shorter
and a misspelt word is impossible. Anything outside the vocabulary (digits, punctuation, other words) falls back to
bytes, so encoding stays lossless for any text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from dllm_zoo.tokenizers.layout import TokenLayout
from dllm_zoo.tokenizers.text import ByteTokenizer


class WordTokenizer(ByteTokenizer):
    """Whole words of a closed vocabulary as single ids (with and without a leading space), bytes otherwise.

    Word ids fill the layout's text segment above its highest special id (the ``words`` preset: ids 270-511), in
    sorted order, so the same vocabulary always gives the same ids. A word is matched only as a whole word (not
    inside a longer one: ``"the"`` never matches the start of ``"there"``), longest entry first.

    Args:
        words: Vocabulary entries (a word or any fixed string such as ``"<think>"``).
        tasks: Tasks whose ``vocabulary`` joins ``words`` (e.g. ``ShapesWorld``); from YAML a list of task configs.
        layout: A layout whose first 256 ids are bytes and with spare text ids above its specials (``words``).

    Raises:
        ValueError: if the vocabulary is empty, holds an empty or space-containing entry, or does not fit in the
            layout's spare text ids (the message gives both counts).

    Example:
        >>> tok = WordTokenizer(["red", "square", "at", "the", "top"])
        >>> ids = tok.encode("a red square at the top!")
        >>> len(ids), tok.decode(ids)
        (7, 'a red square at the top!')
    """

    def __init__(
        self, words: Sequence[str] = (), tasks: Sequence[Any] = (), layout: TokenLayout | str = "words"
    ) -> None:
        super().__init__(layout)
        vocab = set(words)
        for task in tasks:
            vocab.update(getattr(task, "vocabulary", ()))
        bad = sorted(w for w in vocab if not w or any(ch.isspace() for ch in w))
        if bad:
            raise ValueError(f"WordTokenizer words must be non-empty and hold no spaces, got {bad}")
        if not vocab:
            raise ValueError("WordTokenizer needs words: give `words` or `tasks` whose vocabulary is not empty")
        entries = sorted(vocab) + sorted(" " + w for w in vocab)
        first = max(self._special_to_id.values()) + 1
        room = self.layout.text_vocab_size - first
        if len(entries) > room:
            raise ValueError(
                f"WordTokenizer: {len(vocab)} words need {len(entries)} ids (with and without a leading space), "
                f"but layout {self.layout.name!r} has {room} spare text ids "
                f"({first}..{self.layout.text_vocab_size - 1}); use the `words` layout or fewer words"
            )
        self.words: tuple[str, ...] = tuple(sorted(vocab))
        self._word_to_id = {e: first + i for i, e in enumerate(entries)}
        self._id_to_word = {i: e for e, i in self._word_to_id.items()}
        # Whole words only: an entry that starts (ends) with a letter or digit must not continue (be continued by)
        # one. Longest first, and the optional leading space is taken whenever the word follows it.
        guarded = "|".join(
            ("(?<![A-Za-z0-9])" if w[0].isalnum() else "")
            + re.escape(w)
            + ("(?![A-Za-z0-9])" if w[-1].isalnum() else "")
            for w in sorted(vocab, key=len, reverse=True)
        )
        self._words_re = re.compile(f" ?(?:{guarded})")

    @property
    def word_ids(self) -> dict[str, int]:
        """Vocabulary entry -> id (each word twice: bare and with a leading space)."""
        return dict(self._word_to_id)

    def _encode_plain(self, text: str) -> Iterable[int]:
        pos = 0
        for m in self._words_re.finditer(text):
            yield from text[pos : m.start()].encode("utf-8")
            yield self._word_to_id[m.group(0)]
            pos = m.end()
        yield from text[pos:].encode("utf-8")

    def _id_text(self, i: int, skip_special_tokens: bool) -> str | None:
        word = self._id_to_word.get(i)
        return word if word is not None else super()._id_text(i, skip_special_tokens)
