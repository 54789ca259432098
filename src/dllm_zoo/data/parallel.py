"""MMaDA-Parallel's parallel-SFT data: interleaved editing and generation rows, mixed in one batch.

MMaDA-Parallel (Tian et al. 2025, §3.2; research/mmada.md §6.1) fine-tunes on quadruplets (input image, instruction,
reasoning, output image): 100K editing samples and 50K generation samples, each one row of the interleaved layout of
:mod:`dllm_zoo.data.interleave` (input part clean, output image and reasoning denoised together). Rows of both
tasks have one length, so a batch mixes them.

:class:`ParallelDataModule` is the text DataModule (:class:`~dllm_zoo.data.TextDiffusionDataModule`) with another
row builder: it inherits the sources (shards, URLs, HF datasets, or a synthetic task generated into the cache), the
resumable shuffled train loader, the one-pass validation loader over the task's val split and the checkpointed
data position. Each sample becomes the row of ONE task, drawn with probabilities ∝ ``tasks`` as a pure function of
``(seed, sample key)`` (:class:`BuildParallelRow`): a resumed or repeated run builds exactly the same rows, and a
sample keeps its task across epochs. ShapesWorld samples carry the fields of both tasks (``edit_*`` and ``r2i_*``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from dllm_zoo.data.datamodule import TextDiffusionDataModule
from dllm_zoo.data.interleave import (
    TASK_TOKENS,
    BuildInterleaveRow,
    InterleaveSpans,
    InterleaveTask,
    collate_interleave_rows,
)
from dllm_zoo.data.multimodal import image_tokens_for
from dllm_zoo.data.stream import DROPPED_KEY, ERRORS_KEY, KeyedChoice
from dllm_zoo.data.synthetic.base import SyntheticTask
from dllm_zoo.data.synthetic.shapes import ShapesWorld
from dllm_zoo.tokenizers.image import ImageTokenizer, PaletteTokenizer
from dllm_zoo.tokenizers.text import TextTokenizer

# The paper's SFT mix: 100K editing and 50K generation quadruplets (research/mmada.md §6.1).
PAPER_TASK_WEIGHTS: dict[str, float] = {"edit": 2.0, "generate": 1.0}

# Fits every ShapesWorld edit reasoning with the byte tokenizer: at most 189 bytes + BOS + EOS (default settings).
DEFAULT_TEXT_LEN = 192


class BuildParallelRow:
    """A picklable ``sample -> row`` transform that builds each sample as the row of one drawn task.

    The task of a sample is a pure function of ``(seed, sample["__key__"])`` (no random state), drawn with
    probabilities ∝ ``weights``, so workers, ranks and resumed runs agree without coordination.

    Args:
        builders: Task name (``"edit"`` / ``"generate"``) -> its row builder (all with the same spans).
        weights: Task name -> relative probability (> 0), same keys as ``builders``.
        seed: Seed of the task draw.

    Example:
        >>> from dllm_zoo.tokenizers import ByteTokenizer, PaletteTokenizer
        >>> b = BuildInterleaveRow("generate", ByteTokenizer(), PaletteTokenizer(), 8, 9)
        >>> BuildParallelRow({"generate": b}, {"generate": 1.0}).task_for({"__key__": "000000003"})
        'generate'
    """

    def __init__(self, builders: Mapping[str, BuildInterleaveRow], weights: Mapping[str, float], seed: int = 0) -> None:
        if set(builders) != set(weights) or not builders:
            raise ValueError(f"one weight per builder needed, got builders {sorted(builders)}, weights {dict(weights)}")
        spans = {b.spans for b in builders.values()}
        if len(spans) != 1:
            raise ValueError(f"every task's rows must have the same spans to share a batch, got {spans}")
        self.builders = dict(builders)
        self.choice = KeyedChoice({name: weights[name] for name in builders}, seed)

    @property
    def spans(self) -> InterleaveSpans:
        """The spans shared by every task's rows."""
        return next(iter(self.builders.values())).spans

    def task_for(self, sample: Mapping[str, Any]) -> str:
        """The task the row of ``sample`` is built for (a function of ``seed`` and the sample's ``__key__``)."""
        return self.choice.choose(sample)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The interleaved row of ``sample`` for its task (see :func:`~dllm_zoo.data.interleave.interleave_row`)."""
        return self.builders[self.task_for(sample)](sample)


def collate_parallel_rows(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """:func:`~dllm_zoo.data.interleave.collate_interleave_rows` plus the stream's ``data_errors``/``dropped`` counts.

    Returns:
        ``input_ids``, ``attention_mask``, ``prompt_mask``, ``image_mask``, ``text_mask`` ``[B, L]``; scalar long
        ``truncated``, ``data_errors``, ``dropped``; ``task`` ``list[str]`` of ``B``.
    """
    batch = collate_interleave_rows(items)
    batch["data_errors"] = torch.tensor(sum(int(it.get(ERRORS_KEY, 0)) for it in items), dtype=torch.long)
    batch["dropped"] = torch.tensor(sum(int(it.get(DROPPED_KEY, 0)) for it in items), dtype=torch.long)
    return batch


class ParallelDataModule(TextDiffusionDataModule):
    """Batches of interleaved MMaDA-Parallel rows, editing and generation mixed (parallel SFT).

    Every row has ``L = 2N + 2T + 5`` tokens (``T`` = ``text_len``, ``N = (image_size / downsample)²``; see
    :mod:`dllm_zoo.data.interleave`). A batch (:func:`collate_parallel_rows`) holds ``input_ids``,
    ``attention_mask``, ``prompt_mask``, ``image_mask`` (output image codes), ``text_mask`` (output text after its
    BOS) ``[B, L]``, the counters ``truncated`` (rows whose instruction or reasoning was cut to ``T``),
    ``data_errors`` and ``dropped``, and ``task`` (``list[str]``). Train and validation loaders, sources and resume
    are those of :class:`~dllm_zoo.data.TextDiffusionDataModule`; the default data is
    :class:`~dllm_zoo.data.synthetic.ShapesWorld` (9x9 palette images, 81 image tokens), generated into the cache
    on first use.

    The default ``text_len`` 192 fits every ShapesWorld edit reasoning with the byte tokenizer (at most 189 bytes
    with the default settings): no row is truncated. A smaller ``T`` cuts the longest reasonings (their final
    ``Result:`` caption first); the stages log the count as ``data/truncated``.

    Args:
        train: Training data (shard spec, glob, directory, URL or ``save_to_disk`` directory); ``None``: ``task``.
        val: Validation data, same forms; ``None``: the task's val split when training on a task.
        task: Synthetic task generated into ``cache_dir`` when ``train`` is ``None`` (default ``ShapesWorld()``).
        tasks: Row task -> relative probability: ``"edit"`` (input image + instruction -> reasoning + edited image)
            and/or ``"generate"`` (prompt -> reasoning + image). Default the paper's 2:1 (100K edit, 50K generation).
        tokenizer: Text tokenizer (default ``ByteTokenizer``, layout ``default``); its layout must have an image
            segment and the ``<|interleave|>`` / ``<|t2it|>`` task tokens.
        image_tokenizer: Image tokenizer (default :class:`~dllm_zoo.tokenizers.PaletteTokenizer`, lossless for
            ShapesWorld).
        text_len: ``T``: tokens of each text part (``BOS text EOS`` + EOS padding).
        image_size: Image side in pixels (ShapesWorld default: 9).
        batch_size: Rows per batch (per device).
        shuffle_buffer: Sample shuffle buffer per reader.
        num_workers: DataLoader workers per device.
        seed: Seed of the shuffling and of each sample's task.
        cache_dir: Cache root for synthetic shards.
        fields: Optional per-task field names for other data, passed to
            :class:`~dllm_zoo.data.interleave.BuildInterleaveRow`: ``{"edit": {"instruction_field": ...,
            "reasoning_field": ..., "input_image_field": ..., "output_image_field": ...}}``.
    """

    def __init__(
        self,
        train: str | Any | None = None,
        val: str | Any | None = None,
        task: SyntheticTask | None = None,
        tasks: dict[str, float] | None = None,
        tokenizer: TextTokenizer | None = None,
        image_tokenizer: ImageTokenizer | None = None,
        text_len: int = DEFAULT_TEXT_LEN,
        image_size: int = 9,
        batch_size: int = 8,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        fields: dict[str, dict[str, str]] | None = None,
    ) -> None:
        image_tokenizer = image_tokenizer if image_tokenizer is not None else PaletteTokenizer()
        spans = InterleaveSpans(text_len, image_tokens_for(image_size, image_tokenizer))
        super().__init__(
            train=train,
            val=val,
            task=task if task is not None or train is not None else ShapesWorld(),
            tokenizer=tokenizer,
            seq_len=spans.length,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            num_workers=num_workers,
            seed=seed,
            cache_dir=cache_dir,
        )
        self.image_tokenizer = image_tokenizer
        self.text_len = text_len
        self.image_size = image_size
        self.spans = spans
        self.tasks = self._check_tasks(dict(tasks) if tasks is not None else dict(PAPER_TASK_WEIGHTS))
        self.fields = {name: dict(f) for name, f in (fields or {}).items()}
        unknown = sorted(set(self.fields) - set(TASK_TOKENS))
        if unknown:
            raise ValueError(f"--data.fields has unknown task(s) {unknown}; use {sorted(TASK_TOKENS)}")
        self._check_layout()
        self.row_builder = self._transform()  # built once here, so bad field names fail at construction

    def _check_tasks(self, tasks: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(tasks) - set(TASK_TOKENS))
        if unknown:
            raise ValueError(f"--data.tasks has unknown task(s) {unknown}; use {sorted(TASK_TOKENS)}")
        if any(w < 0 for w in tasks.values()):
            raise ValueError(f"--data.tasks weights must be >= 0, got {tasks}")
        kept = {name: float(w) for name, w in tasks.items() if w > 0}
        if not kept:
            raise ValueError(f"--data.tasks needs at least one task with a weight > 0, got {tasks}")
        return kept

    def _check_layout(self) -> None:
        lay = self.layout
        if not lay.has_images:
            raise ValueError(f"interleaved rows need image tokens but the tokenizer's layout {lay.name!r} has none")
        if self.image_tokenizer.codebook_size > lay.image_codebook_size:
            raise ValueError(
                f"the image tokenizer has {self.image_tokenizer.codebook_size} codes but layout {lay.name!r} reserves "
                f"{lay.image_codebook_size}; use a layout with a large enough image segment"
            )
        missing = [tok for name, tok in TASK_TOKENS.items() if name in self.tasks and tok not in lay.special_tokens]
        if missing:
            raise ValueError(f"layout {lay.name!r} has no task token(s) {missing}; use a layout that defines them")

    # ------------------------------------------------------------------ facts
    @property
    def num_image_tokens(self) -> int:
        """``N``: image tokens per image."""
        return self.spans.num_image_tokens

    def task_of(self, name: str) -> SyntheticTask | None:
        """The synthetic task behind the rows of task ``name`` (``"edit"``/``"generate"``), if any.

        An evaluation callback reads the raw val samples from it (``task.generate("val")``) and scores them with
        its checkers (ShapesWorld: :meth:`~dllm_zoo.data.synthetic.ShapesWorld.check_image`, ``check_reasoning``).
        """
        return self.task if name in self.tasks else None

    def task_for(self, sample: Mapping[str, Any]) -> str:
        """Which task's row ``sample`` becomes (needs its ``__key__``, as read from the shards)."""
        return self.row_builder.task_for(sample)

    # ------------------------------------------------------------- row hooks
    def _transform(self) -> BuildParallelRow:
        """One :class:`~dllm_zoo.data.interleave.BuildInterleaveRow` per task, the task drawn per sample."""
        builders = {
            name: BuildInterleaveRow(
                cast(InterleaveTask, name),  # checked against TASK_TOKENS in __init__
                self.tokenizer,
                self.image_tokenizer,
                self.text_len,
                self.image_size,
                **self.fields.get(name, {}),
            )
            for name in self.tasks
        }
        return BuildParallelRow(builders, self.tasks, seed=self.seed)

    def _collate_fn(self) -> Any:
        """:func:`collate_parallel_rows`."""
        return collate_parallel_rows


__all__ = ["DEFAULT_TEXT_LEN", "PAPER_TASK_WEIGHTS", "BuildParallelRow", "ParallelDataModule", "collate_parallel_rows"]
