"""Prompt batches for RL stages: encoded, left-padded prompts plus every field of the samples for the rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dllm_zoo.data.datamodule import TextDiffusionDataModule
from dllm_zoo.data.multimodal import (
    image_token_ids,
    image_tokens_for,
    load_image_codes,
    mmu_prompt_ids,
    t2i_prefix,
)
from dllm_zoo.data.stream import DROPPED_KEY, ERRORS_KEY, KeyedChoice, SampleDropped
from dllm_zoo.data.synthetic.base import SyntheticTask
from dllm_zoo.data.synthetic.shapes import ShapesWorld
from dllm_zoo.tokenizers.image import ImageTokenizer, PaletteTokenizer
from dllm_zoo.tokenizers.text import TextTokenizer

# Stream bookkeeping keys; never handed to rewards.
_INTERNAL_PREFIX = "__"


def _missing_field(sample: Mapping[str, Any], name: str, flag: str) -> KeyError:
    """The error for a sample without the field ``name``: lists the fields it has and the flag to set."""
    fields = sorted(k for k in sample if not k.startswith(_INTERNAL_PREFIX))
    return KeyError(f"sample {sample.get('__key__', '?')!r} has no field {name!r} (fields: {fields}); set {flag}")


def prompt_token_ids(tokenizer: TextTokenizer, prompt: str, chat: bool = True) -> list[int]:
    """A prompt's ids: a user turn plus the assistant generation prompt (``chat``), or ``BOS`` + text.

    Args:
        tokenizer: Text tokenizer (its layout gives BOS and the chat format).
        prompt: The prompt text.
        chat: Render with the layout's chat template (the ``lm_chat`` training format).
    """
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return [tokenizer.layout.bos_id, *tokenizer.encode(prompt)]


def left_pad(rows: Sequence[Sequence[int] | Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Stack token rows, LEFT-padded to the longest (samplers generate after the last prompt position).

    Returns:
        ``ids`` ``[B, P]`` int64 and ``mask`` ``[B, P]`` bool (True = real token).
    """
    if not rows:
        raise ValueError("cannot pad an empty list of prompts")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = True
    return ids, mask


class EncodePrompt:
    """A picklable ``sample -> item`` transform: the prompt's ids, its text and the sample's other fields.

    Args:
        tokenizer: Text tokenizer.
        prompt_field: Sample field with the prompt text.
        chat: Chat-format prompts.
        max_prompt_len: Longer prompts are dropped (and counted in ``dropped``), never cut.
        task_name: Written into the field ``task`` of samples that have none (routes diversified rewards,
            :class:`~dllm_zoo.rewards.ForTasks`).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        prompt_field: str,
        chat: bool,
        max_prompt_len: int,
        task_name: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_field = prompt_field
        self.chat = chat
        self.max_prompt_len = max_prompt_len
        self.task_name = task_name

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Encode one sample.

        Raises:
            KeyError: when the sample lacks ``prompt_field`` (names the flag to set).
            SampleDropped: for a prompt longer than ``max_prompt_len``.
        """
        if self.prompt_field not in sample:
            raise _missing_field(sample, self.prompt_field, "--data.prompt_field")
        prompt = str(sample[self.prompt_field])
        ids = prompt_token_ids(self.tokenizer, prompt, self.chat)
        if len(ids) > self.max_prompt_len:
            raise SampleDropped(f"prompt of {len(ids)} tokens > --data.max_prompt_len={self.max_prompt_len}")
        fields = {k: v for k, v in sample.items() if not k.startswith(_INTERNAL_PREFIX)}
        if self.task_name is not None:
            fields.setdefault("task", self.task_name)
        return {"prompt_ids": torch.tensor(ids, dtype=torch.long), "prompt": prompt, "fields": fields}


class CollatePrompts:
    """Stack :class:`EncodePrompt` items: left-padded ids and per-field lists (a field missing somewhere is None).

    Args:
        pad_id: Padding id of the prompts (must differ from the mask id).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate.

        Returns:
            ``prompt_ids`` ``[B, P]`` int64, ``prompt_mask`` ``[B, P]`` bool, ``prompts`` (``B`` strings), ``fields``
            (``{name: list of B values}``), scalar long tensors ``data_errors`` and ``dropped``.
        """
        ids, mask = left_pad([it["prompt_ids"] for it in items], self.pad_id)
        names = sorted({k for it in items for k in it["fields"]})
        return {
            "prompt_ids": ids,
            "prompt_mask": mask,
            "prompts": [it["prompt"] for it in items],
            "fields": {k: [it["fields"].get(k) for it in items] for k in names},
            "data_errors": torch.tensor(sum(int(it.get(ERRORS_KEY, 0)) for it in items), dtype=torch.long),
            "dropped": torch.tensor(sum(int(it.get(DROPPED_KEY, 0)) for it in items), dtype=torch.long),
        }


class PromptDataModule(TextDiffusionDataModule):
    """Prompts for RL stages: encoded prompts plus the raw sample fields for the rewards.

    The sources are those of :class:`TextDiffusionDataModule` (shards, HF datasets, a synthetic task; resumable
    train loader).

    Batches (see :class:`CollatePrompts`): ``prompt_ids``/``prompt_mask`` ``[B, P]`` (left-padded), ``prompts``,
    ``fields`` — e.g. Arithmetic's ``answer``, and ``task`` (the synthetic task's name when the samples have
    none). ``batch_size`` is the number of prompts per RL step; each is answered ``num_generations`` times by the
    stage.

    Args:
        train: Training prompts (see :class:`TextDiffusionDataModule`); ``None`` = ``task``.
        val: Held-out prompts; ``None`` = the task's val split.
        task: Synthetic task (default ``Arithmetic()``).
        tokenizer: Text tokenizer (default byte-level).
        format: ``lm_chat`` (prompts as a chat user turn + generation prompt) or ``lm`` (``BOS`` + prompt).
        max_prompt_len: Longest prompt in tokens; longer prompts are dropped and counted (``data/dropped``).
        batch_size: Prompts per step (per device).
        shuffle_buffer: Sample shuffle buffer per reader.
        num_workers: Loader worker processes.
        seed: Shuffling seed.
        cache_dir: Cache root of synthetic shards.
        prompt_field: Sample field with the prompt text.
    """

    def __init__(
        self,
        train: str | Any | None = None,
        val: str | Any | None = None,
        task: SyntheticTask | None = None,
        tokenizer: TextTokenizer | None = None,
        format: str = "lm_chat",
        max_prompt_len: int = 256,
        batch_size: int = 8,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        prompt_field: str = "prompt",
    ) -> None:
        if format not in ("lm", "lm_chat"):
            raise ValueError(f"--data.format must be lm or lm_chat for prompts, got {format!r}")
        if max_prompt_len < 1:
            raise ValueError(f"--data.max_prompt_len must be >= 1, got {max_prompt_len}")
        super().__init__(
            train=train,
            val=val,
            task=task,
            tokenizer=tokenizer,
            format=format,  # type: ignore[arg-type]
            seq_len=max(2, max_prompt_len),
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            num_workers=num_workers,
            seed=seed,
            cache_dir=cache_dir,
            prompt_field=prompt_field,
        )
        self.max_prompt_len = max_prompt_len
        self.prompt_field = prompt_field

    @property
    def chat(self) -> bool:
        """Whether prompts use the chat template."""
        return self.format == "lm_chat"

    def _transform(self) -> EncodePrompt:
        name = self.task.name if self.train is None and self.task is not None else None
        return EncodePrompt(self.tokenizer, self.prompt_field, self.chat, self.max_prompt_len, name)

    def _collate_fn(self) -> CollatePrompts:
        return CollatePrompts(self.tokenizer.layout.pad_id)

    def _packer(self) -> None:
        return None


# MMaDA's UniGRPO mixes image-understanding questions (answered in text) and text-to-image captions (answered with an
# image); the two prompt kinds of :class:`MultimodalPromptDataModule`, by their ``task`` field.
MULTIMODAL_PROMPT_TASKS: tuple[str, ...] = ("mmu", "t2i")


class EncodeMultimodalPrompt:
    """A picklable ``sample -> item`` transform: an image question (``mmu``) or a caption to draw (``t2i``).

    The kind of a sample is drawn from ``tasks`` as a function of ``(seed, __key__)`` (:class:`KeyedChoice`), so
    every worker and every resumed run agrees. ``mmu`` prompts are ``<|mmu|> <|soi|> img <|eoi|>`` + the chat prompt
    of the question (:func:`~dllm_zoo.data.multimodal.mmu_prompt_ids`), the text the MMaDA stages train on; ``t2i``
    prompts are ``<|t2i|> BOS caption EOS`` (the t2i prefix without its ``[iPAD]`` padding: the collate left-pads),
    after which an image sampler draws the ``N`` codes.

    Args:
        tokenizer: Text tokenizer (its layout has the mmu / t2i tokens and an image segment).
        image_tokenizer: Encodes the sample's image (``mmu``).
        image_size: Image side in pixels.
        tasks: Kind -> relative probability (keys from :data:`MULTIMODAL_PROMPT_TASKS`, weights > 0).
        text_len: Longest caption part ``BOS … EOS`` of a t2i prompt (as in training: longer captions are cut).
        max_prompt_len: Longer prompts are dropped (and counted in ``dropped``), never cut.
        seed: Seed of the kind draw.
        question_field: Sample field holding the question (``mmu``).
        caption_field: Sample field holding the caption (``t2i``).
        image_field: Sample field holding the image (``mmu``).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        image_tokenizer: ImageTokenizer,
        image_size: int,
        tasks: Mapping[str, float],
        text_len: int,
        max_prompt_len: int,
        seed: int = 0,
        question_field: str = "question",
        caption_field: str = "caption",
        image_field: str = "image",
    ) -> None:
        unknown = sorted(set(tasks) - set(MULTIMODAL_PROMPT_TASKS))
        if unknown:
            raise ValueError(f"--data.tasks has unknown kind(s) {unknown}; use {list(MULTIMODAL_PROMPT_TASKS)}")
        lay = tokenizer.layout
        if lay.image_offset is None:
            raise ValueError(f"layout {lay.name!r} has no image segment; multimodal prompts need one")
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.image_size = image_size
        self.num_image_tokens = image_tokens_for(image_size, image_tokenizer)
        self.choice = KeyedChoice(tasks, seed)
        self.text_len = text_len
        self.max_prompt_len = max_prompt_len
        self.question_field = question_field
        self.caption_field = caption_field
        self.image_field = image_field

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Encode one sample; ``fields["task"]`` is its kind.

        Raises:
            KeyError: when the sample lacks the field its kind needs (names the flag to set).
            SampleDropped: for a prompt longer than ``max_prompt_len``.
        """
        kind = self.choice.choose(sample)
        name = self.question_field if kind == "mmu" else self.caption_field
        if name not in sample:
            raise _missing_field(sample, name, "--data.question_field" if kind == "mmu" else "--data.caption_field")
        text = str(sample[name])
        lay = self.tokenizer.layout
        if kind == "mmu":
            codes = load_image_codes(sample, self.image_tokenizer, self.image_field, self.image_size)
            image = image_token_ids(codes, lay, self.num_image_tokens, sample.get("__key__", "?"))
            ids = mmu_prompt_ids(self.tokenizer, image, text)
        else:
            prefix, pads, _ = t2i_prefix(self.tokenizer.encode(text), lay, self.text_len)
            ids = prefix[pads:]
        if len(ids) > self.max_prompt_len:
            raise SampleDropped(f"{kind} prompt of {len(ids)} tokens > --data.max_prompt_len={self.max_prompt_len}")
        fields = {k: v for k, v in sample.items() if not k.startswith(_INTERNAL_PREFIX)}
        fields["task"] = kind
        return {"prompt_ids": torch.tensor(ids, dtype=torch.long), "prompt": text, "fields": fields}


class MultimodalPromptDataModule(PromptDataModule):
    """Prompts for multimodal RL (MMaDA's UniGRPO): image questions answered in text and captions to draw.

    Each sample becomes one prompt of a kind drawn per sample (:class:`EncodeMultimodalPrompt`): ``mmu`` (the image
    and its question; rewards read ``answer`` and ``image``) or ``t2i`` (the caption; rewards read ``caption`` and
    the generated ``images``). Batches are those of :class:`PromptDataModule`, both kinds mixed and left-padded
    together, with ``fields["task"]`` telling them apart: the stage generates ``t2i`` rows with its image sampler
    and the others with its text sampler, and :class:`~dllm_zoo.rewards.ForTasks` routes each reward to its kinds.

    Args:
        train: Training samples (shard spec, …; see :class:`TextDiffusionDataModule`); ``None`` = ``task``.
        val: Held-out samples; ``None`` = the task's val split.
        task: Synthetic task (default ``ShapesWorld()``).
        tasks: Kind -> relative probability (default ``{"mmu": 1, "t2i": 1}``).
        tokenizer: Text tokenizer (default byte-level, default layout).
        image_tokenizer: Image tokenizer (default :class:`~dllm_zoo.tokenizers.PaletteTokenizer`).
        image_size: Image side in pixels (ShapesWorld default: 9).
        text_len: Longest ``BOS caption EOS`` of a t2i prompt (the MMaDA stage's ``text_len``).
        max_prompt_len: Longest prompt in tokens; longer ones are dropped and counted.
        batch_size: Prompts per step (per device).
        shuffle_buffer: Sample shuffle buffer per reader.
        num_workers: Loader worker processes.
        seed: Shuffling seed and seed of the kind draw.
        cache_dir: Cache root of synthetic shards.
        question_field: Sample field with an mmu question.
        caption_field: Sample field with a t2i caption.
        image_field: Sample field with the image of an mmu question.
    """

    def __init__(
        self,
        train: str | Any | None = None,
        val: str | Any | None = None,
        task: SyntheticTask | None = None,
        tasks: dict[str, float] | None = None,
        tokenizer: TextTokenizer | None = None,
        image_tokenizer: ImageTokenizer | None = None,
        image_size: int = 9,
        text_len: int = 96,
        max_prompt_len: int = 256,
        batch_size: int = 8,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        question_field: str = "question",
        caption_field: str = "caption",
        image_field: str = "image",
    ) -> None:
        image_tokenizer = image_tokenizer if image_tokenizer is not None else PaletteTokenizer()
        image_tokens_for(image_size, image_tokenizer)  # checks the size
        super().__init__(
            train=train,
            val=val,
            task=task if task is not None or train is not None else ShapesWorld(),
            tokenizer=tokenizer,
            format="lm_chat",
            max_prompt_len=max_prompt_len,
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            num_workers=num_workers,
            seed=seed,
            cache_dir=cache_dir,
            prompt_field=question_field,
        )
        self.tasks = dict(tasks) if tasks is not None else {"mmu": 1.0, "t2i": 1.0}
        self.image_tokenizer = image_tokenizer
        self.image_size = image_size
        self.text_len = text_len
        self.question_field = question_field
        self.caption_field = caption_field
        self.image_field = image_field
        self._transform()  # fails here, at construction, for unknown kinds or a text-only layout

    @property
    def num_image_tokens(self) -> int:
        """``N``, image tokens per image."""
        return image_tokens_for(self.image_size, self.image_tokenizer)

    def _transform(self) -> EncodeMultimodalPrompt:  # type: ignore[override]
        return EncodeMultimodalPrompt(
            self.tokenizer,
            self.image_tokenizer,
            self.image_size,
            self.tasks,
            self.text_len,
            self.max_prompt_len,
            self.seed,
            self.question_field,
            self.caption_field,
            self.image_field,
        )
