"""The text DataModule: shards, URLs or HF datasets (or a synthetic task) -> ``lm`` / ``lm_chat`` batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from dllm_zoo.data.loader import ResumableDataLoader
from dllm_zoo.data.packing import PackSequences
from dllm_zoo.data.sequences import BuildSequence, SequenceFormat, collate_sequences, make_builder
from dllm_zoo.data.shards import expand_shards, is_remote
from dllm_zoo.data.stream import SampleStream, is_hf_dataset_dir
from dllm_zoo.data.synthetic.arithmetic import Arithmetic
from dllm_zoo.data.synthetic.base import SyntheticTask
from dllm_zoo.tokenizers.layout import TokenLayout
from dllm_zoo.tokenizers.text import ByteTokenizer, TextTokenizer


class _Take(IterableDataset):
    """The first ``count`` items of an iterable dataset."""

    def __init__(self, dataset: IterableDataset, count: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.count = count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.dataset), self.count)


class TextDiffusionDataModule(L.LightningDataModule):
    """Batches of text rows for masked-diffusion training: ``lm`` (pretraining) or ``lm_chat`` (SFT).

    With neither ``train`` nor ``task`` set, the embedded :class:`~dllm_zoo.data.synthetic.Arithmetic` task is
    generated into the cache on first use, so a recipe runs with no data at all. Batches are dicts (see
    :func:`~dllm_zoo.data.sequences.collate_sequences`): ``input_ids``/``attention_mask``/``prompt_mask``
    ``[B, L]``, scalar ``data_errors``, ``dropped``, ``truncated``, and ``answer`` (``list[str]``) when the data has
    answers. The train loader is a :class:`~dllm_zoo.data.loader.ResumableDataLoader`: shuffled per epoch, split
    by rank and worker, saved in checkpoints and resumed exactly; the validation loader is one deterministic
    pass split by samples.

    With ``pack=True`` each row holds several samples (greedy first-fit in stream order within each batch, see
    :mod:`dllm_zoo.data.packing`); batches then also carry ``segment_ids`` and ``position_ids`` ``[B, L]`` (the
    padding tail has ``segment_ids`` -1 and ``attention_mask`` False), ``truncated`` counts samples, and the
    reference answers come as ``answers`` (``list[list[str]]``, per row one per packed sample) instead of
    ``answer``. Only stages that read ``segment_ids`` keep packed samples apart
    (:class:`~dllm_zoo.stages.BlockDiffusionSFT`); the others would attend across samples. Resume stays exact.

    In Python, ``train``/``val`` may also be ``datasets.Dataset`` objects.

    Args:
        train: Training data: a WebDataset shard spec (``data/shard-{000000..000099}.tar``, a glob, a directory
            of ``.tar`` files, a URL or ``pipe:`` command) or a ``datasets.save_to_disk`` directory. ``None``:
            use ``task``.
        val: Validation data, same forms. ``None``: the task's val split when training on a task, else no
            validation.
        task: Synthetic task whose shards are generated into ``cache_dir`` (used when ``train`` is ``None``;
            default ``Arithmetic()``).
        tokenizer: Text tokenizer (default: the byte-level ``ByteTokenizer``). Its layout must match the
            backbone's.
        format: Row layout: ``lm`` (``BOS text EOS`` + EOS padding, no prompt) or ``lm_chat`` (user/assistant chat,
            prompt kept clean).
        seq_len: Row length ``L`` in tokens; longer samples are truncated (counted as ``truncated``).
        batch_size: Rows per batch (per device).
        shuffle_buffer: Sample shuffle buffer per reader (shards only).
        num_workers: DataLoader worker processes per device (shards need ranks x workers <= shard count).
        seed: Seed of the shuffling (the order is a function of seed and epoch).
        cache_dir: Cache root for synthetic shards (default ``$DLLM_ZOO_CACHE`` or ``~/.cache/dllm_zoo``).
        text_field: Sample field with the document text (``lm``; falls back to prompt + " " + response).
        prompt_field: Sample field with the prompt / user turn.
        response_field: Sample field with the response / assistant turn.
        answer_field: Sample field with a reference answer, kept in batches as ``answer`` (``answers`` when packing).
        pack: Pack several samples into each row (train and validation) instead of padding each to ``seq_len``.
    """

    def __init__(
        self,
        train: str | Any | None = None,
        val: str | Any | None = None,
        task: SyntheticTask | None = None,
        tokenizer: TextTokenizer | None = None,
        format: SequenceFormat = "lm",
        seq_len: int = 64,
        batch_size: int = 32,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        text_field: str = "text",
        prompt_field: str = "prompt",
        response_field: str = "response",
        answer_field: str = "answer",
        pack: bool = False,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"--data.seq_len must be >= 2, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {num_workers}")
        self.train = train
        self.val = val
        self.task = task if task is not None or train is not None else Arithmetic()
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.format: SequenceFormat = format
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.pack = pack
        self.builder = make_builder(format, text_field, prompt_field, response_field, answer_field)
        self._train_source: Any = None
        self._val_source: Any = None
        self._train_loader: ResumableDataLoader | None = None
        self._loader_state: dict[str, Any] | None = None

    @property
    def layout(self) -> TokenLayout:
        """The tokenizer's token layout (the training stage checks it against the backbone's)."""
        return self.tokenizer.layout

    # ------------------------------------------------------------------ sources
    def _resolve(self) -> tuple[Any, Any]:
        train, val = self.train, self.val
        if train is None:
            if self.task is None:
                raise ValueError("set --data.train or --data.task")
            specs = self.task.ensure_shards(self.cache_dir)
            train = specs["train"]
            val = specs["val"] if val is None else val
        return train, val

    @staticmethod
    def _check(source: Any, flag: str) -> None:
        if isinstance(source, (list, tuple)):
            expand_shards([str(s) for s in source], flag)  # raises FileNotFoundError naming the flag
        elif isinstance(source, (str, Path)) and not is_remote(str(source)) and not is_hf_dataset_dir(source):
            expand_shards(str(source), flag)

    def prepare_data(self) -> None:
        """Generate the synthetic task's shards (once per node) and check that the data paths exist."""
        train, val = self._resolve()
        self._check(train, "--data.train")
        if val is not None:
            self._check(val, "--data.val")

    def setup(self, stage: str | None = None) -> None:
        """Resolve the sources on every process (the task's shards are read from the cache)."""
        self._train_source, self._val_source = self._resolve()

    def _transform(self) -> Any:
        """The per-sample transform run in the loader workers (a subclass may build other rows)."""
        return BuildSequence(self.builder, self.tokenizer, self.seq_len, pad=not self.pack)

    def _collate_fn(self) -> Any:
        """The (picklable) function stacking transformed samples into a batch; a subclass may collate other rows."""
        return collate_sequences

    def _packer(self) -> PackSequences | None:
        # one packed batch = one loader batch, so a batch boundary is a stream position (exact resume)
        return PackSequences(self.seq_len, self.batch_size, self.layout.eos_id) if self.pack else None

    # -------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> ResumableDataLoader:
        """The resumable, shuffled, rank- and worker-split training loader (one instance per DataModule)."""
        if self._train_loader is None:
            if self._train_source is None:
                self.setup("fit")
            stream = SampleStream(
                self._train_source,
                transform=self._transform(),
                shuffle=True,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
                split_by="shards",
                flag="--data.train",
                pack=self._packer(),
            )
            self._train_loader = ResumableDataLoader(
                stream, self.batch_size, num_workers=self.num_workers, collate_fn=self._collate_fn()
            )
            if self._loader_state is not None:
                self._train_loader.load_state_dict(self._loader_state)
                self._loader_state = None
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One deterministic pass over the validation data, split by samples over ranks and workers."""
        if self._train_source is None and self._val_source is None:
            self.setup("validate")
        if self._val_source is None:
            return []
        stream = SampleStream(
            self._val_source,
            transform=self._transform(),
            shuffle=False,
            seed=self.seed,
            split_by="samples",
            flag="--data.val",
            pack=self._packer(),
        )
        return DataLoader(stream, self.batch_size, num_workers=self.num_workers, collate_fn=self._collate_fn())

    def sample_dataloader(self, num_samples: int, seed: int = 0, batch_size: int | None = None) -> DataLoader:
        """Batches of ``num_samples`` training rows drawn at random, the same on every rank.

        For statistics of the training data (e.g. ParaRL's reward normalisation from "a random 1% of the training
        data"). A new shuffled pass over the training source, read in this process with seed ``seed``: it neither
        advances nor resets :meth:`train_dataloader`, and it is as random as the training shuffle (shard order and
        a ``shuffle_buffer``-sample buffer).

        Args:
            num_samples: Rows in all (the last batch may be smaller).
            seed: Seed of the shuffle.
            batch_size: Rows per batch; default ``batch_size``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if self._train_source is None:
            self.setup("fit")
        stream = SampleStream(
            self._train_source,
            transform=self._transform(),
            shuffle=True,
            shuffle_buffer=self.shuffle_buffer,
            seed=seed,
            split_by="samples",
            rank=0,
            world_size=1,
            flag="--data.train",
            pack=self._packer(),
        )
        return DataLoader(_Take(stream, num_samples), batch_size or self.batch_size, collate_fn=self._collate_fn())

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position, also kept here (see :meth:`load_state_dict`)."""
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the train loader's position as soon as the loader exists.

        Lightning restores the loader itself too (``combined_loader`` state), but skips that when the train
        loader was requested before the restore — e.g. by ``trainer.estimated_stepping_batches`` in
        ``configure_optimizers`` with ``max_epochs`` set (Lightning issue #20550). The DataModule state is
        restored earlier, so with it the position survives that path as well.
        """
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is None:
            self._loader_state = state
        else:
            self._train_loader.load_state_dict(state)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Tell the train loader a batch reached the training step (Lightning fetches one batch ahead)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()
        return batch
