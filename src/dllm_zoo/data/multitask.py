"""Multi-task batches for MMaDA: one loader per task (t2i, lm, mmu, r2i …), combined every step.

MMaDA trains every step on a t2i batch, an lm batch and an mmu batch at once, each with its own batch size, from a
``CombinedLoader`` in ``max_size_cycle`` mode (a shorter stream restarts until the longest one ends the epoch), and
in its stage 2.2 fills a task's slot each step from one of several sources drawn with fixed probabilities
(research/mmada.md §1.1). :class:`MultiTaskDataModule` does both, with every loader resumable exactly:

* each task is a :class:`TaskData` (format, batch size, one or more :class:`DataSource`, field names);
* a task with one source is a :class:`~dllm_zoo.data.loader.ResumableDataLoader` (finite epochs, so
  ``max_size_cycle`` really cycles it); a task with several is a :class:`SourceMixture`, which draws the source
  of each batch with probabilities ∝ ``weight`` from a seeded, position-indexed random stream and restarts a source
  when it runs out (the mixture itself never ends: bound the run with ``--trainer.max_steps``);
* the train loader is Lightning's ``CombinedLoader`` over ``{task name: loader}`` in ``mode``; a batch is
  ``{task name: batch}`` and the stage concatenates the tasks' rows (all rows have length ``T + N + 3``).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from dllm_zoo.data.loader import ResumableDataLoader
from dllm_zoo.data.multimodal import (
    TASK_FORMATS,
    BuildTaskRow,
    TaskFormat,
    collate_task_rows,
    image_tokens_for,
    make_task_builder,
    row_length,
)
from dllm_zoo.data.stream import SampleStream
from dllm_zoo.data.synthetic.base import SyntheticTask
from dllm_zoo.tokenizers.image import ImageTokenizer, PaletteTokenizer
from dllm_zoo.tokenizers.layout import TokenLayout
from dllm_zoo.tokenizers.text import ByteTokenizer, TextTokenizer

CombineMode = Literal["max_size_cycle", "max_size", "min_size"]

# Default field names per format: what ShapesWorld and Arithmetic samples hold.
_FORMAT_FIELDS: dict[str, dict[str, str]] = {
    "t2i": {"caption_field": "caption"},
    "mmu": {"prompt_field": "question", "response_field": "cot"},
    "r2i": {"prompt_field": "r2i_prompt", "response_field": "r2i_reasoning"},
    "lm": {},
    "lm_chat": {},
}


@dataclass
class DataSource:
    """One source of a task's samples.

    Attributes:
        task: A synthetic task whose shards are generated into the cache (used when ``train`` is unset).
        train: Training data: a WebDataset shard spec, glob, directory, URL or HF ``save_to_disk`` directory.
        val: Validation data, same forms; default: the task's val split (none for ``train`` without ``val``).
        weight: Relative probability of drawing this source for a batch when its task has several (MMaDA stage 2.2:
            cot 3.5, vqa 5.5, clevr 0.5, geo 0.5).
    """

    task: SyntheticTask | None = None
    train: str | None = None
    val: str | None = None
    weight: float = 1.0


@dataclass
class TaskData:
    """One slot of the multi-task batch.

    Attributes:
        format: Row layout: ``t2i``, ``mmu``, ``r2i`` (multimodal) or ``lm``, ``lm_chat`` (text).
        batch_size: Rows of this task per step (per device).
        sources: Where its samples come from (at least one).
        prompt_field: Question / instruction field (default per format: mmu ``question``, r2i ``r2i_prompt``,
            lm_chat ``prompt``).
        response_field: Answer / reasoning field (mmu ``cot``, r2i ``r2i_reasoning``, lm_chat ``response``).
        caption_field: Caption field (t2i).
        text_field: Document field (lm).
        image_field: Image field (palette grid, image bytes, or precomputed ``{image_field}_codes``).
        answer_field: Reference answer field, kept in the batch as ``answer``.
    """

    format: TaskFormat = "lm"
    batch_size: int = 8
    sources: list[DataSource] = field(default_factory=list)
    prompt_field: str | None = None
    response_field: str | None = None
    caption_field: str | None = None
    text_field: str = "text"
    image_field: str = "image"
    answer_field: str = "answer"

    def fields(self) -> dict[str, str]:
        """Field names for the builder: the format's defaults, overridden by the ones set here."""
        out = {"prompt_field": "prompt", "response_field": "response", "caption_field": "caption"}
        out.update(_FORMAT_FIELDS.get(self.format, {}))
        for name in ("prompt_field", "response_field", "caption_field"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out["text_field"] = self.text_field
        out["answer_field"] = self.answer_field
        return out


class SourceMixture:
    """Batches from several loaders, each batch's source drawn with probabilities ∝ ``weights``; never ends.

    The source of the ``i``-th batch is a function of ``(seed, i)`` only, each source keeps its own exact position,
    and :meth:`state_dict` records the batches consumed (Lightning fetches one ahead, see
    :meth:`~dllm_zoo.data.loader.ResumableDataLoader.mark_consumed`), so a resumed run continues identically.

    Args:
        loaders: One resumable loader per source.
        weights: Relative probabilities (positive).
        seed: Seed of the source choices.
    """

    def __init__(self, loaders: Sequence[ResumableDataLoader], weights: Sequence[float], seed: int = 0) -> None:
        if len(loaders) != len(weights) or not loaders:
            raise ValueError("SourceMixture needs one weight per loader and at least one loader")
        if any(w <= 0 for w in weights):
            raise ValueError(f"source weights must be > 0, got {list(weights)} (--data.tasks.*.sources[*].weight)")
        self.loaders = list(loaders)
        self.weights = [float(w) for w in weights]
        self.seed = seed
        self.draws = 0  # batches consumed (or yielded, before the first mark_consumed)
        self.counts = [0] * len(loaders)  # batches consumed per source (reported, not needed for resume)
        self._pending: deque[int] = deque(maxlen=4096)
        self._tracked = False

    def choice(self, index: int) -> int:
        """The source of batch ``index`` (a pure function of ``seed`` and ``index``)."""
        rng = random.Random(self.seed * 1_000_003 + index)
        return rng.choices(range(len(self.loaders)), weights=self.weights)[0]

    def __iter__(self) -> Iterator[Any]:
        iterators: list[Iterator[Any] | None] = [None] * len(self.loaders)
        index = self.draws
        self._pending.clear()
        while True:
            src = self.choice(index)
            batch = None
            for _ in range(2):  # a source that has just ended restarts once (its next epoch)
                if iterators[src] is None:
                    iterators[src] = iter(self.loaders[src])
                try:
                    batch = next(iterators[src])  # type: ignore[arg-type]
                    break
                except StopIteration:
                    iterators[src] = None
            if batch is None:
                raise RuntimeError(f"source {src} of the mixture yields no batch at all (is its data empty?)")
            index += 1
            self._pending.append(src)
            if not self._tracked:
                self.draws = index
            yield batch

    def mark_consumed(self) -> None:
        """The consumer trained on the oldest yielded batch (see the class docstring)."""
        if not self._tracked:
            self._tracked = True
            self.draws -= len(self._pending)  # from now on count consumed batches only
        if self._pending:
            src = self._pending.popleft()
            self.loaders[src].mark_consumed()
            self.counts[src] += 1
            self.draws += 1

    def state_dict(self) -> dict[str, Any]:
        """Batches drawn and every source's own position."""
        return {"draws": self.draws, "counts": list(self.counts), "sources": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the stored batch (the next ``iter()``)."""
        if len(state["sources"]) != len(self.loaders):
            raise ValueError(
                f"the data position holds {len(state['sources'])} sources for this task but it now has "
                f"{len(self.loaders)}; resume with the same --data.tasks"
            )
        self.draws = int(state["draws"])
        self.counts = [int(c) for c in state.get("counts", [0] * len(self.loaders))]
        for loader, sub in zip(self.loaders, state["sources"]):
            loader.load_state_dict(sub)


def default_tasks() -> dict[str, TaskData]:
    """MMaDA stage-1 style mix on the embedded data: ShapesWorld t2i + mmu, Arithmetic lm_chat."""
    from dllm_zoo.data.synthetic import Arithmetic, ShapesWorld

    shapes = ShapesWorld()
    return {
        "t2i": TaskData("t2i", 8, [DataSource(task=shapes)]),
        "lm": TaskData("lm_chat", 8, [DataSource(task=Arithmetic())]),
        "mmu": TaskData("mmu", 8, [DataSource(task=shapes)]),
    }


class MultiTaskDataModule(L.LightningDataModule):
    """Combined multi-task batches (MMaDA pretraining and mixed long-CoT SFT); see the module docstring.

    A training batch is ``{task name: batch}``; each task batch has ``input_ids``, ``attention_mask``,
    ``prompt_mask``, ``image_mask`` ``[b_task, L]`` (``L = text_len + N + 3``, ``N = (image_size / downsample)²``) and
    the counters of :func:`~dllm_zoo.data.sequences.collate_sequences`. Validation batches have the same form
    (``CombinedLoader`` mode ``max_size``: a task whose validation data has ended is ``None``).

    Args:
        tasks: Task name -> :class:`TaskData`; default :func:`default_tasks` (ShapesWorld t2i and mmu, Arithmetic).
        tokenizer: Text tokenizer (default ``ByteTokenizer``); its layout must have an image segment.
        image_tokenizer: Image tokenizer (default :class:`PaletteTokenizer`, lossless for ShapesWorld).
        text_len: ``T``: text tokens per row (MMaDA ``max_seq_length``).
        image_size: Image side in pixels (ShapesWorld default 9 → 81 palette tokens; MMaDA 256 / 512).
        mode: ``CombinedLoader`` mode of the train loader: ``max_size_cycle`` (MMaDA), ``max_size`` or ``min_size``.
        shuffle_buffer: Sample shuffle buffer per reader.
        num_workers: DataLoader workers per task loader.
        seed: Seed of shuffling and of the source choices.
        cache_dir: Cache root for synthetic shards.
    """

    def __init__(
        self,
        tasks: dict[str, TaskData] | None = None,
        tokenizer: TextTokenizer | None = None,
        image_tokenizer: ImageTokenizer | None = None,
        text_len: int = 64,
        image_size: int = 9,
        mode: CombineMode = "max_size_cycle",
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tasks if tasks is not None else default_tasks()
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.image_tokenizer = image_tokenizer if image_tokenizer is not None else PaletteTokenizer()
        self.text_len = text_len
        self.image_size = image_size
        self.mode = mode
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self._validate()
        self._train_loaders: dict[str, ResumableDataLoader | SourceMixture] | None = None
        self._loader_state: dict[str, Any] | None = None

    def _validate(self) -> None:
        if not self.tasks:
            raise ValueError("--data.tasks is empty; give at least one task")
        if self.mode not in ("max_size_cycle", "max_size", "min_size"):
            raise ValueError(f"--data.mode must be max_size_cycle, max_size or min_size, got {self.mode!r}")
        if self.text_len < 4:
            raise ValueError(f"--data.text_len must be >= 4, got {self.text_len}")
        image_tokens_for(self.image_size, self.image_tokenizer)  # checks the size
        lay = self.layout
        for name, spec in self.tasks.items():
            if spec.format not in TASK_FORMATS:
                raise ValueError(f"--data.tasks.{name}.format={spec.format!r}; choose one of {list(TASK_FORMATS)}")
            if spec.batch_size < 1:
                raise ValueError(f"--data.tasks.{name}.batch_size must be >= 1, got {spec.batch_size}")
            if not spec.sources:
                raise ValueError(f"--data.tasks.{name}.sources is empty; give a task or train data")
            for i, src in enumerate(spec.sources):
                if src.task is None and src.train is None:
                    raise ValueError(f"--data.tasks.{name}.sources[{i}] needs `task` or `train`")
            if spec.format in ("t2i", "mmu", "r2i"):
                if not lay.has_images:
                    raise ValueError(
                        f"task {name!r} ({spec.format}) needs image tokens but the tokenizer's layout {lay.name!r} has "
                        "no image segment"
                    )
                if self.image_tokenizer.codebook_size > lay.image_codebook_size:
                    raise ValueError(
                        f"the image tokenizer has {self.image_tokenizer.codebook_size} codes but layout {lay.name!r} "
                        f"reserves {lay.image_codebook_size}; use a layout with a large enough image segment"
                    )

    # ------------------------------------------------------------------ facts
    @property
    def layout(self) -> TokenLayout:
        """The tokenizer's token layout (the stage checks it against the backbone's)."""
        return self.tokenizer.layout

    @property
    def num_image_tokens(self) -> int:
        """``N``: image tokens per image."""
        return image_tokens_for(self.image_size, self.image_tokenizer)

    @property
    def seq_len(self) -> int:
        """``L = T + N + 3``, the length of every row."""
        return row_length(self.text_len, self.num_image_tokens)

    def task_of(self, name: str) -> SyntheticTask | None:
        """The synthetic task of the first source of task ``name`` (the callbacks score it), if any."""
        spec = self.tasks.get(name)
        if spec is None:
            return None
        return next((s.task for s in spec.sources if s.task is not None), None)

    # ---------------------------------------------------------------- sources
    def _specs(self, src: DataSource) -> tuple[Any, Any]:
        if src.train is not None:
            return src.train, src.val
        assert src.task is not None
        specs = src.task.ensure_shards(self.cache_dir)
        return specs["train"], src.val if src.val is not None else specs["val"]

    def prepare_data(self) -> None:
        """Generate every synthetic source's shards once per node."""
        for spec in self.tasks.values():
            for src in spec.sources:
                self._specs(src)

    def _transform(self, spec: TaskData) -> BuildTaskRow:
        fields = spec.fields()
        builder = make_task_builder(spec.format, **fields)
        return BuildTaskRow(
            builder, self.tokenizer, self.image_tokenizer, self.text_len, self.image_size, spec.image_field
        )

    def _loader(self, name: str, spec: TaskData, src: DataSource, index: int) -> ResumableDataLoader:
        train, _ = self._specs(src)
        stream = SampleStream(
            train,
            transform=self._transform(spec),
            shuffle=True,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed + 7919 * index,
            split_by="shards",
            flag=f"--data.tasks.{name}.sources[{index}].train",
        )
        return ResumableDataLoader(stream, spec.batch_size, num_workers=self.num_workers, collate_fn=collate_task_rows)

    # ------------------------------------------------------------ dataloaders
    def train_loaders(self) -> dict[str, ResumableDataLoader | SourceMixture]:
        """One loader per task (created once; their positions are checkpointed)."""
        if self._train_loaders is None:
            loaders: dict[str, ResumableDataLoader | SourceMixture] = {}
            for t, (name, spec) in enumerate(self.tasks.items()):
                subs = [self._loader(name, spec, src, 31 * t + i) for i, src in enumerate(spec.sources)]
                if len(subs) == 1:
                    loaders[name] = subs[0]
                else:
                    weights = [s.weight for s in spec.sources]
                    loaders[name] = SourceMixture(subs, weights, seed=self.seed + 104729 * (t + 1))
            self._train_loaders = loaders
            if self._loader_state is not None:
                self._load_loader_state(self._loader_state)
                self._loader_state = None
        return self._train_loaders

    def train_dataloader(self) -> CombinedLoader:
        """``CombinedLoader({task: loader}, mode)``: each step holds a batch of every task."""
        return CombinedLoader(self.train_loaders(), mode=self.mode)

    def val_dataloader(self) -> CombinedLoader | list[DataLoader]:
        """Every task's validation data, one deterministic pass (``CombinedLoader`` mode ``max_size``)."""
        loaders: dict[str, DataLoader] = {}
        for name, spec in self.tasks.items():
            src = next((s for s in spec.sources if s.task is not None or s.val is not None), None)
            if src is None:
                continue
            _, val = self._specs(src)
            if val is None:
                continue
            stream = SampleStream(
                val,
                transform=self._transform(spec),
                shuffle=False,
                seed=self.seed,
                split_by="samples",
                flag=f"--data.tasks.{name}.sources.val",
            )
            loaders[name] = DataLoader(
                stream, spec.batch_size, num_workers=self.num_workers, collate_fn=collate_task_rows
            )
        return CombinedLoader(loaders, mode="max_size") if loaders else []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Every task loader's position (also restored by Lightning through the CombinedLoader)."""
        if self._train_loaders is None:
            return {}
        return {"train_loaders": {name: ld.state_dict() for name, ld in self._train_loaders.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the task loaders' positions as soon as they exist."""
        state = state_dict.get("train_loaders")
        if state is None:
            return
        if self._train_loaders is None:
            self._loader_state = state
        else:
            self._load_loader_state(state)

    def _load_loader_state(self, state: Mapping[str, Any]) -> None:
        assert self._train_loaders is not None
        missing = sorted(set(self._train_loaders) - set(state))
        extra = sorted(set(state) - set(self._train_loaders))
        if missing or extra:
            raise ValueError(
                f"the checkpoint's data position has tasks {sorted(state)} but --data.tasks has "
                f"{sorted(self._train_loaders)}; resume with the same tasks"
            )
        for name, loader in self._train_loaders.items():
            loader.load_state_dict(state[name])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tell every task loader its batch reached the training step (Lightning fetches one batch ahead)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loaders is not None and isinstance(batch, dict):
            for name, loader in self._train_loaders.items():
                if batch.get(name) is not None:
                    loader.mark_consumed()
        return batch
