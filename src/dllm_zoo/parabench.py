r"""ParaBench on ShapesWorld: MMaDA-Parallel's six-axis report, with the task's exact checker as the judge.

ParaBench (Tian et al. 2025, research/mmada.md §7) scores a thinking-aware editor/generator on 300 prompts (200 edits,
100 open generations) with GPT-4.1 as the judge, on six axes. Here the prompts are held-out
:class:`~dllm_zoo.data.synthetic.ShapesWorld` samples (the val split: no image of it is ever trained on) and every
axis is an exact check, so a score is a fraction of samples, not an opinion:

* **edit** prompts: the input image + ``edit_instruction``; the target is ``output_objects`` (``output_caption``);
* **generate** prompts: ``r2i_prompt`` alone (no input image); the target is ``objects`` (``caption``).

The first ``limit`` val samples give the prompts of each task (the same images for both tasks). Per sample, with
``reasoning`` the decoded output text and ``image`` the decoded output image (palette-index grid):

========================  ==============================================================================
``text_quality``          the reasoning is exactly one ``<think>…</think>`` block (only whitespace outside)
                          whose content after its last ``Result:`` (edit) — or whole content (generate) —
                          parses as a caption (:meth:`ShapesWorld.parse <dllm_zoo.data.synthetic.ShapesWorld.parse>`)
``text_alignment``        ``check_reasoning(reasoning, sample, target)``: the reasoning's final caption names
                          exactly the target objects (target ``"output_image"`` for edit, ``"image"`` for generate)
``image_quality``         the image reads cleanly (every non-empty slot is one known shape in one colour) and
                          holds at least one object — ParaBench's "Image Quality" as a well-formedness check
                          (under :class:`~dllm_zoo.tokenizers.ShapeSlotTokenizer`, one code per slot, every image
                          reads cleanly, so this only asks for a non-empty image)
``image_alignment``       ``check_image(image, sample, target)``: the image holds exactly the target objects
``image_consistency``     edit only: the share of the input objects the edit does not touch that appear unchanged
                          (same colour, shape and slot) in the image; see :func:`image_consistency`
``output_alignment``      the image holds exactly the objects of the caption the reasoning itself states
                          (``alignment``; 0 if that caption does not parse) — ParaBench's key axis, text vs image
                          of the *same* output, whatever the target
``output_alignment_f1``   the object-set F1 of the same pair (``alignment_score``), a softer view of it
========================  ==============================================================================

The reasoning is the output text after its BOS up to its first EOS, special tokens skipped. An output image with a
token outside the image tokenizer's codebook (a sampler drawing from the whole image segment of a larger layout) is
not an image: it scores 0 on every image axis (``image_*`` and ``output_alignment*``).

Aggregates (:class:`ParaBenchReport`): per task and ``overall`` (pooled over the samples of both tasks), the mean of
each axis over the samples it applies to (``image_consistency`` skips generation prompts and edits whose every input
object is touched), the counts behind each mean, and the means per edit kind. ``mean`` (the last column of
:meth:`ParaBenchReport.to_markdown`) averages the six ParaBench axes of a row, like the paper's "Overall"
(``output_alignment_f1`` left out: it restates ``output_alignment``). Reference numbers of the 8B models with the
GPT-4.1 judge (research/mmada.md §6.3): MMaDA-Parallel with ParaRL scores Output Alignment 59.8, without 51.5.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.interleave import TASK_TOKENS, BuildInterleaveRow, InterleaveSpans, InterleaveTask
from dllm_zoo.data.synthetic.shapes import ShapesWorld
from dllm_zoo.samplers.parallel import ParallelSampler
from dllm_zoo.tokenizers.image import ImageTokenizer
from dllm_zoo.tokenizers.text import TextTokenizer

AXES: tuple[str, ...] = (
    "text_quality",
    "text_alignment",
    "image_quality",
    "image_alignment",
    "image_consistency",
    "output_alignment",
    "output_alignment_f1",
)
"""Every scored axis, in table order."""

PARABENCH_AXES: tuple[str, ...] = AXES[:-1]
"""The six ParaBench axes (averaged into ``mean``)."""

AXIS_TITLES: dict[str, str] = {
    "text_quality": "Text Qual.",
    "text_alignment": "Text Align.",
    "image_quality": "Img Qual.",
    "image_alignment": "Img Align.",
    "image_consistency": "Img Cons.",
    "output_alignment": "Out Align.",
    "output_alignment_f1": "Out Align. F1",
}

# The sample field holding each task's target objects, as ShapesWorld's checkers name it.
TARGETS: dict[str, str] = {"edit": "output_image", "generate": "image"}

Scores = dict[str, float | None]


# ------------------------------------------------------------------------------------------------- scoring


def reasoning_caption(text: str) -> str:
    """The caption a reasoning states: its think content after the last ``Result:`` (case-insensitive).

    The think content is the last ``<think>…</think>`` block's, the text after an unclosed ``<think>``, or the
    whole text without tags — the same lenient reading as ``ShapesWorld.check_reasoning``.

    Example:
        >>> reasoning_caption("<think>the top is empty. Result: a red x at the top.</think>")
        ' a red x at the top.'
    """
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[0]
    text = text.rsplit("<think>", 1)[-1]
    index = text.lower().rfind("result:")
    return text[index + len("result:") :] if index >= 0 else text


def text_quality(task: ShapesWorld, name: str, text: str) -> bool:
    """Whether a reasoning is well formed for task ``name`` (strict, unlike :func:`reasoning_caption`).

    Exactly one ``<think>`` and one ``</think>``, in that order, with only whitespace around the block; for
    ``"edit"`` the content has a ``Result:`` and what follows the last one parses as a caption; for ``"generate"``
    the whole content parses as a caption.

    Example:
        >>> task = ShapesWorld()
        >>> text_quality(task, "generate", "<think>a red x at the top</think>"), text_quality(task, "edit", "a red x")
        (True, False)
    """
    body = text.strip()
    if not (body.startswith("<think>") and body.endswith("</think>")):
        return False
    content = body[len("<think>") : -len("</think>")]
    if "<think>" in content or "</think>" in content:
        return False
    if name == "edit":
        index = content.lower().rfind("result:")
        if index < 0:
            return False
        content = content[index + len("result:") :]
    return task.parse(content) is not None


def image_consistency(task: ShapesWorld, sample: Mapping[str, Any], image: Any | None) -> float | None:
    """Share of the input objects an edit leaves alone that the output image keeps unchanged.

    An input object (``sample["objects"]``) is *untouched* when the target output (``sample["output_objects"]``)
    holds it identically: same colour, shape and slot. The edit touches the one object it moves (at its source
    slot), recolours, reshapes or removes; an ``add`` touches none. The score is the fraction of untouched objects
    that :meth:`ShapesWorld.read <dllm_zoo.data.synthetic.ShapesWorld.read>` finds, identical, in ``image``.
    Other slots are not looked at (a stray object elsewhere costs image and output alignment, not consistency).

    Args:
        task: The ShapesWorld task of the sample.
        sample: An editing sample (``objects``, ``output_objects``).
        image: The output palette-index grid; ``None`` = no decodable image (scores 0).

    Returns:
        The fraction in ``[0, 1]``, or ``None`` when the edit touches every input object (nothing to preserve).
    """
    before = {tuple(o) for o in sample["objects"]}
    untouched = before & {tuple(o) for o in sample["output_objects"]}
    if not untouched:
        return None
    if image is None:
        return 0.0
    kept = untouched & set(task.read(image).objects)
    return len(kept) / len(untouched)


def score_sample(task: ShapesWorld, name: str, sample: Mapping[str, Any], reasoning: str, image: Any | None) -> Scores:
    """Score one output on every axis (see the module docstring).

    Args:
        task: The ShapesWorld task of ``sample`` (the judge).
        name: ``"edit"`` or ``"generate"``.
        sample: The prompt's sample.
        reasoning: The decoded output text.
        image: The output palette-index grid (``[H, W]`` tensor or nested lists), ``None`` when the output has
            tokens that are no image codes of the tokenizer (scores 0 on every image axis).

    Returns:
        Axis -> score in ``[0, 1]``; ``None`` where the axis does not apply (``image_consistency`` of a
        generation, or of an edit that touches every input object).

    Example:
        >>> task = ShapesWorld()
        >>> s = task.sample("val", 0)
        >>> set(score_sample(task, "edit", s, s["edit_reasoning"], s["output_image"]).values()) <= {1.0, None}
        True
    """
    if name not in TARGETS:
        raise ValueError(f"task must be one of {tuple(TARGETS)}, got {name!r}")
    target = TARGETS[name]
    sample = cast(dict[str, Any], sample)  # the checkers take dicts; they only read
    caption = reasoning_caption(reasoning)
    grid = image.tolist() if isinstance(image, Tensor) else image
    scores: Scores = {
        "text_quality": float(text_quality(task, name, reasoning)),
        "text_alignment": float(task.check_reasoning(reasoning, sample, target)),
    }
    if grid is None:
        scores.update(image_quality=0.0, image_alignment=0.0, output_alignment=0.0, output_alignment_f1=0.0)
    else:
        reading = task.read(grid)
        scores.update(
            image_quality=float(reading.clean and bool(reading.objects)),
            image_alignment=float(task.check_image(grid, sample, target)),
            output_alignment=float(task.alignment(caption, grid)),
            output_alignment_f1=float(task.alignment_score(caption, grid)),
        )
    scores["image_consistency"] = image_consistency(task, sample, grid) if name == "edit" else None
    return {axis: scores[axis] for axis in AXES}


# ---------------------------------------------------------------------------------------------- report


@dataclass
class ParaBenchSample:
    """One scored prompt: what was asked, what came out, and its scores.

    Attributes:
        task: ``"edit"`` or ``"generate"``.
        index: Index of the sample in its split.
        edit_kind: The edit's kind (``move``, ``recolor``, ``reshape``, ``remove``, ``add``); ``None`` for generate.
        instruction: ``edit_instruction`` or ``r2i_prompt``.
        target_caption: Caption of the target objects.
        reasoning: The decoded output text.
        image: The output palette-index grid ``[H][W]`` (invalid codes shown as background).
        image_valid: Whether every output image token was a code of the image tokenizer.
        input_image: The input palette-index grid for edits, ``None`` for generate.
        target_image: The target palette-index grid (``output_image`` for edit, ``image`` for generate).
        scores: Axis -> score (``None`` = not applicable).
    """

    task: str
    index: int
    edit_kind: str | None
    instruction: str
    target_caption: str
    reasoning: str
    image: list[list[int]]
    image_valid: bool
    input_image: list[list[int]] | None
    target_image: list[list[int]]
    scores: Scores


def _mean_of(samples: Sequence[ParaBenchSample]) -> tuple[dict[str, float], dict[str, int]]:
    """Per-axis means over the samples an axis applies to, and those counts (axes that apply to none left out)."""
    means: dict[str, float] = {}
    counts: dict[str, int] = {}
    for axis in AXES:
        values = [v for s in samples if (v := s.scores[axis]) is not None]
        if values:
            means[axis] = sum(values) / len(values)
            counts[axis] = len(values)
    return means, counts


@dataclass
class ParaBenchReport:
    """Scores of every prompt and their aggregates (all means are fractions in ``[0, 1]``).

    Attributes:
        samples: Every scored prompt, edits first, in sample order.
        seconds: Wall time of the sampler calls.
        forward_passes: Sum over batches of the sampler's NFE.
        settings: What produced the report (limit, batch size, seed, sampler settings).
    """

    samples: list[ParaBenchSample]
    seconds: float = 0.0
    forward_passes: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """The tasks present, in order of first appearance."""
        return list(dict.fromkeys(s.task for s in self.samples))

    def groups(self) -> dict[str, list[ParaBenchSample]]:
        """Task name -> its samples, then ``"overall"`` -> every sample."""
        out = {name: [s for s in self.samples if s.task == name] for name in self.tasks}
        out["overall"] = list(self.samples)
        return out

    def means(self) -> dict[str, dict[str, float]]:
        """Task (and ``"overall"``) -> axis -> mean over the samples the axis applies to."""
        return {name: _mean_of(group)[0] for name, group in self.groups().items()}

    def counts(self) -> dict[str, dict[str, int]]:
        """Task (and ``"overall"``) -> axis -> number of samples behind its mean."""
        return {name: _mean_of(group)[1] for name, group in self.groups().items()}

    def by_edit_kind(self) -> dict[str, dict[str, float]]:
        """Edit kind -> axis -> mean over the editing samples of that kind (kinds sorted)."""
        kinds = sorted({s.edit_kind for s in self.samples if s.task == "edit" and s.edit_kind is not None})
        return {k: _mean_of([s for s in self.samples if s.task == "edit" and s.edit_kind == k])[0] for k in kinds}

    def edit_kind_counts(self) -> dict[str, int]:
        """Edit kind -> number of editing samples of that kind."""
        kinds = [s.edit_kind for s in self.samples if s.task == "edit" and s.edit_kind is not None]
        return {k: kinds.count(k) for k in sorted(set(kinds))}

    @staticmethod
    def mean_of_axes(means: Mapping[str, float]) -> float | None:
        """The paper's "Overall" of one row: the mean of its ParaBench axes present (``None`` if none)."""
        values = [means[a] for a in PARABENCH_AXES if a in means]
        return sum(values) / len(values) if values else None

    def scalars(self, prefix: str = "parabench") -> dict[str, float]:
        """Flat ``{prefix}/{task}/{axis}`` -> mean (``task`` includes ``overall``), plus ``{prefix}/{task}/mean``."""
        out: dict[str, float] = {}
        for name, means in self.means().items():
            out.update({f"{prefix}/{name}/{axis}": value for axis, value in means.items()})
            mean = self.mean_of_axes(means)
            if mean is not None:
                out[f"{prefix}/{name}/mean"] = mean
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-serialisable.

        Keys: ``means``, ``mean_of_axes``, ``counts``, ``num_samples``, ``by_edit_kind``, ``edit_kind_counts``,
        ``seconds``, ``forward_passes``, ``settings`` and the raw ``samples`` (completions, images, scores).
        """
        groups = self.groups()
        return {
            "means": self.means(),
            "mean_of_axes": {name: self.mean_of_axes(m) for name, m in self.means().items()},
            "counts": self.counts(),
            "num_samples": {name: len(group) for name, group in groups.items()},
            "by_edit_kind": self.by_edit_kind(),
            "edit_kind_counts": self.edit_kind_counts(),
            "seconds": self.seconds,
            "forward_passes": self.forward_passes,
            "settings": self.settings,
            "samples": [asdict(s) for s in self.samples],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """ParaBench-style tables: rows = tasks (then ``overall``), columns = axes in %; then per edit kind.

        A cell is ``–`` where the axis applies to no sample of the row (``Img Cons.`` of generation).
        """

        def cell(value: float | None) -> str:
            return "–" if value is None else f"{100 * value:.1f}"

        head = ["N", *(AXIS_TITLES[a] for a in AXES), "Mean"]

        def table(first: str, rows: Sequence[tuple[str, int, Mapping[str, float]]]) -> list[str]:
            lines = [
                "| " + " | ".join([first, *head]) + " |",
                "|" + "|".join([":---", *["---:"] * len(head)]) + "|",
            ]
            for label, n, means in rows:
                values = [cell(means.get(a)) for a in AXES] + [cell(self.mean_of_axes(means))]
                lines.append("| " + " | ".join([label, str(n), *values]) + " |")
            return lines

        groups, means = self.groups(), self.means()
        lines = ["## ParaBench (ShapesWorld, exact checker)", ""]
        lines += table("Task", [(name, len(groups[name]), means[name]) for name in groups])
        kinds, kind_counts = self.by_edit_kind(), self.edit_kind_counts()
        if kinds:
            lines += ["", "### Editing by kind", ""]
            lines += table("Edit kind", [(k, kind_counts[k], kinds[k]) for k in kinds])
        lines += ["", f"{len(self.samples)} prompts, {self.forward_passes} forward passes, {self.seconds:.1f} s."]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- generation


@dataclass
class ParaBenchData:
    """What :func:`parabench` needs besides the model and sampler (taken from a datamodule, or given).

    Attributes:
        task: The ShapesWorld task whose held-out samples are the prompts (and whose checker judges).
        tokenizer: Text tokenizer of the rows.
        image_tokenizer: Image tokenizer of the rows.
        text_len: ``T`` of the rows.
        image_size: Image side in pixels.
        tasks: Which prompts to build: ``"edit"`` and/or ``"generate"``.
        fields: Optional per-task field names for :class:`~dllm_zoo.data.interleave.BuildInterleaveRow`.
    """

    task: ShapesWorld
    tokenizer: TextTokenizer
    image_tokenizer: ImageTokenizer
    text_len: int
    image_size: int
    tasks: tuple[str, ...] = ("edit", "generate")
    fields: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_datamodule(cls, dm: Any) -> ParaBenchData:
        """The parts of a :class:`~dllm_zoo.data.ParallelDataModule`.

        Its task, tokenizers, sizes, field names and the interleaved tasks it trains (``task_of``).
        """
        for attr in ("task_of", "tokenizer", "image_tokenizer", "text_len", "image_size"):
            if not hasattr(dm, attr):
                raise ValueError(f"parabench needs a ParallelDataModule (the datamodule has no {attr!r})")
        tasks = tuple(name for name in TASK_TOKENS if dm.task_of(name) is not None)
        task = dm.task_of(tasks[0]) if tasks else None
        if not isinstance(task, ShapesWorld):
            raise ValueError(
                f"parabench scores ShapesWorld samples with its exact checker; the datamodule's task is "
                f"{type(task).__name__} (train on a ShapesWorld task: --data.task)"
            )
        return cls(task, dm.tokenizer, dm.image_tokenizer, dm.text_len, dm.image_size, tasks, dict(dm.fields))

    @property
    def spans(self) -> InterleaveSpans:
        """The rows' spans."""
        return InterleaveSpans(self.text_len, (self.image_size // self.image_tokenizer.downsample) ** 2)


def build_prompts(parts: ParaBenchData, name: str, samples: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
    """The interleaved input parts of ``samples`` as rows of task ``name`` (the layout the model is trained on).

    Returns:
        ``ids`` ``[B, P]`` int64 and ``mask`` ``[B, P]`` bool (0 on a generation row's ``[iPAD]`` image slot),
        ``P = N + T + 3``.
    """
    build = BuildInterleaveRow(
        cast(InterleaveTask, name),
        parts.tokenizer,
        parts.image_tokenizer,
        parts.text_len,
        parts.image_size,
        **parts.fields.get(name, {}),
    )
    p = build.spans.prompt_len
    rows = [build(dict(s)) for s in samples]  # the full row; its input part is the prompt
    return torch.stack([r["input_ids"][:p] for r in rows]), torch.stack([r["attention_mask"][:p] for r in rows])


def decode_outputs(
    tokens: Tensor, spans: InterleaveSpans, tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer
) -> tuple[list[str], Tensor, Tensor]:
    """Reasoning texts and images of generated interleaved rows.

    Args:
        tokens: ``[B, L]`` int64 rows (``L = 2N + 2T + 5``), as :meth:`ParallelSampler.generate` returns them.
        spans: Their spans.
        tokenizer: Text tokenizer (its layout gives EOS and the image offset).
        image_tokenizer: Image tokenizer of the codes.

    Returns:
        ``texts`` (``B`` strings: the output text after its BOS up to the first EOS, special tokens skipped),
        ``grids`` ``[B, H, W]`` int64 palette indices (invalid codes as background) and ``valid`` ``[B]`` bool
        (every output image token is a code of ``image_tokenizer``).
    """
    # Imported here: dllm_zoo.callbacks imports this module (ParaBenchEvaluation), so a top-level import would cycle.
    from dllm_zoo.callbacks.multimodal import codes_to_grids

    lay = tokenizer.layout
    if lay.image_offset is None:
        raise ValueError(f"layout {lay.name!r} has no image segment")
    tokens = tokens.detach().cpu()
    text = tokens[:, spans.output_text.start + 1 : spans.output_text.stop]  # [B, T - 1], after the fixed BOS
    is_eos = text == lay.eos_id
    # First EOS per row (T - 1 when there is none): everything before it is the reasoning.
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), text.shape[1])
    keep = torch.arange(text.shape[1]) < first[:, None]
    texts = tokenizer.batch_decode([r[k].tolist() for r, k in zip(text, keep)], skip_special_tokens=True)
    codes = tokens[:, spans.output_image] - lay.image_offset  # [B, N]
    valid = ((codes >= 0) & (codes < image_tokenizer.codebook_size)).all(1)
    side = math.isqrt(spans.num_image_tokens)
    if side * side != spans.num_image_tokens:
        raise ValueError(f"images must be square, got {spans.num_image_tokens} tokens")
    grids = codes_to_grids(codes.clamp(min=0).view(-1, side, side), image_tokenizer)
    return texts, grids.long(), valid


def _grid(image: Any) -> list[list[int]]:
    """A palette-index image (nested lists or a 2-D tensor/array) as plain nested ints."""
    rows = image.tolist() if hasattr(image, "tolist") else image
    return [[int(v) for v in row] for row in rows]


@torch.no_grad()
def parabench(
    model: Backbone,
    sampler: ParallelSampler,
    data: ParaBenchData | Any,
    *,
    tasks: Sequence[str] | None = None,
    limit: int = 32,
    batch_size: int = 32,
    split: str = "val",
    seed: int = 0,
) -> ParaBenchReport:
    """Generate and score ParaBench-style prompts of held-out ShapesWorld samples (see the module docstring).

    Every prompt goes through ``sampler.generate`` in batches of ``batch_size`` rows (editing and generation rows
    share a length, so a batch may mix them); the model is put in eval mode and restored after.

    Args:
        model: The backbone (its layout must be the tokenizer's).
        sampler: The joint sampler; its ``text_len`` and ``num_image_tokens`` must be the data's.
        data: A :class:`~dllm_zoo.data.ParallelDataModule` or :class:`ParaBenchData`.
        tasks: ``"edit"`` and/or ``"generate"``; default the data's tasks.
        limit: Prompts per task: the first ``limit`` samples of ``split``.
        batch_size: Rows per ``generate`` call.
        split: The split the prompts come from (``"val"``: held out from training).
        seed: Seed of the sampler's random source (the same draws on every call).

    Returns:
        The :class:`ParaBenchReport`.
    """
    parts = data if isinstance(data, ParaBenchData) else ParaBenchData.from_datamodule(data)
    names = tuple(tasks) if tasks is not None else parts.tasks
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        raise ValueError(f"tasks must be a non-empty subset of {tuple(TARGETS)}, got {names}")
    if limit < 1 or batch_size < 1:
        raise ValueError(f"limit and batch_size must be >= 1, got limit={limit}, batch_size={batch_size}")
    spans = parts.spans
    if sampler.spans != spans:
        raise ValueError(
            f"the sampler generates rows of text_len={sampler.text_len}, num_image_tokens={sampler.num_image_tokens} "
            f"but the data's rows have text_len={spans.text_len}, num_image_tokens={spans.num_image_tokens}"
        )
    if model.layout != parts.tokenizer.layout:
        raise ValueError(f"the model's layout {model.layout.name!r} is not the tokenizer's")
    task = parts.task
    samples = list(itertools.islice(task.generate(split), limit))  # type: ignore[arg-type]
    jobs = [(name, i, s) for name in names for i, s in enumerate(samples)]
    prompt_ids, prompt_mask = zip(*(build_prompts(parts, name, samples) for name in names))
    ids, mask = torch.cat(prompt_ids), torch.cat(prompt_mask)

    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    outputs: list[Tensor] = []
    seconds, nfe = 0.0, 0
    try:
        for start in range(0, len(jobs), batch_size):
            t0 = time.perf_counter()
            out = sampler.generate(
                model,
                ids[start : start + batch_size].to(device),
                mask[start : start + batch_size].to(device),
                generator=gen,
            )
            outputs.append(out.tokens.cpu())  # also the sync that makes the timing honest on accelerators
            seconds += time.perf_counter() - t0
            nfe += out.nfe
    finally:
        model.train(was_training)
    texts, grids, valid = decode_outputs(torch.cat(outputs), spans, parts.tokenizer, parts.image_tokenizer)

    results: list[ParaBenchSample] = []
    for (name, index, sample), text, grid, ok in zip(jobs, texts, grids.tolist(), valid.tolist()):
        results.append(
            ParaBenchSample(
                task=name,
                index=index,
                edit_kind=str(sample.get("edit_kind")) if name == "edit" else None,
                instruction=str(sample["edit_instruction" if name == "edit" else "r2i_prompt"]),
                target_caption=str(sample["output_caption" if name == "edit" else "caption"]),
                reasoning=text,
                image=grid,
                image_valid=bool(ok),
                input_image=_grid(sample["image"]) if name == "edit" else None,
                target_image=_grid(sample[TARGETS[name]]),
                scores=score_sample(task, name, sample, text, grid if ok else None),
            )
        )
    settings = {
        "split": split,
        "limit": limit,
        "batch_size": batch_size,
        "seed": seed,
        "tasks": list(names),
        "text_len": spans.text_len,
        "num_image_tokens": spans.num_image_tokens,
        "sampler": {
            "steps": sampler.steps,
            "mode": sampler.mode,
            "text_block_length": sampler.text_block_length,
            "image_guidance_scale": sampler.image_guidance_scale,
            "text_guidance_scale": sampler.text_guidance_scale,
            "image_temperature": sampler.image_temperature,
            "text_temperature": sampler.text_temperature,
        },
    }
    return ParaBenchReport(results, seconds=seconds, forward_passes=nfe, settings=settings)


__all__ = [
    "AXES",
    "PARABENCH_AXES",
    "ParaBenchData",
    "ParaBenchReport",
    "ParaBenchSample",
    "build_prompts",
    "decode_outputs",
    "image_consistency",
    "parabench",
    "reasoning_caption",
    "score_sample",
    "text_quality",
]
