r"""MMaDA-Parallel's joint sampler: the output image and the reasoning text denoised together on one time axis.

MMaDA-Parallel (Tian et al. 2025, arXiv:2511.09611; research/mmada.md §5.4–§5.5) generates an edited (or new) image
and the reasoning behind it in ONE masked sequence (the interleaved row of :mod:`dllm_zoo.data.interleave`)::

    prompt (P = N + T + 3):  [task] <|soi|> in_img×N <|eoi|> BOS instruction EOS [EOS…]
    output tail:             <|soi|> [MASK]×N <|eoi|> BOS [MASK]×(T−1)

Each of the ``S`` steps runs one forward over the whole canvas (with guidance: the conditional and unconditional
rows as one ``2B``-row batch, one NFE) and updates both modalities from it, each with its own schedule on the
shared time axis (the paper's "dual schedulers"):

* **text** (LLaDA, §5.1): the ``T − 1`` text targets, optionally in semi-autoregressive blocks of
  ``text_block_length`` filled left to right; a block's count plan is ``text_schedule.reveal_counts`` (linear: the
  exact LLaDA count per step); ``x0`` = argmax of the (Gumbel-perturbed, ``text_temperature > 0``) logits; the
  ``count`` masked positions of the active block with the highest ``text_confidence`` (default: probability of
  ``x0``) are committed.
* **image** (MaskGIT, §5.2): every masked code is drawn from ``softmax`` of the guided codebook logits (argmax with
  ``image_argmax``), confidence ``log p(code) + τ_s·Gumbel`` with ``τ_s = image_temperature·(1 − r)`` on the
  image's own clock ``r = (k + 1)/S_img`` (:func:`~dllm_zoo.samplers.maskgit.gumbel_temperature`); the plan is
  ``image_schedule.reveal_counts`` (cosine: ``⌊N·cos(π/2·(k+1)/S_img)⌋`` codes still masked after image step ``k``,
  at least one reveal per step while codes remain, none left after the last image step), committing the most
  confident codes of the whole image (global confidence).

Nothing is ever re-masked, so the canvas after any step is ``tokens`` with the positions revealed later masked
again (:func:`canvas_after`); :func:`committed_at` gives the tokens of one step. ParaRL (§6.2) replays exactly that:
it scores the partial text and image after chosen steps and the likelihood of the step's tokens given the canvas
before it.

**Modes** (the paper's ablation, same total ``S`` in every mode), with ``h = ⌊S/2⌋``:

* ``parallel``: text and image on every step ``1..S`` (``S_text = S_img = S``).
* ``semi_parallel``: text on every step ``1..S``; image only on steps ``h+1..S`` (``S_img = S − h``), so text
  runs alone over the first half and together with the image over the second.
* ``sequential``: text alone on steps ``1..h`` (fully decoded there), then the image alone on steps ``h+1..S``
  conditioned on the final text (``S_text = h``, ``S_img = S − h``).

The text blocks share the text steps as evenly as possible: with ``nb`` blocks, block ``j`` gets
``⌊S_text/nb⌋ + (j < S_text mod nb)`` consecutive steps (the last block may be shorter than ``text_block_length``
when it does not divide ``T − 1``).

**Guidance.** The unconditional rows drop both conditions (:func:`~dllm_zoo.data.interleave.drop_conditions`: the
instruction becomes ``BOS EOS EOS…``, the input image ``[iPAD]×N`` with attention 0) and share the output part of
the canvas. Image logits: ``(1 + w_img)·cond − w_img·uncond`` (default ``w_img = 3.5``, paper App. E). Text
logits: the same standard form with ``w_text`` (default 0 = off). A step runs the ``2B`` rows only when a
modality updated at that step is guided (e.g. the text half of ``sequential`` runs ``B`` rows without text CFG).

Deliberate differences from the released code (research/mmada.md §5.4–§5.5):

* Text CFG has the standard sign. The released Parallel-M loop computes ``cond + w·(uncond − cond)``, i.e.
  ``(1 − w)·cond + w·uncond`` (inverted; the paper says text CFG 0), which is not reproduced.
* ``parallel`` starts the image at step 1 with its own clock (the paper's shared time axis). The released loops
  update the image only at ``round(linspace(S/4, S−1, image_steps))`` and evaluate the cosine on the *text* clock.
* The image plan reveals at least one code per step while codes remain (MaskGIT's ``clamp(·, 1, unknown − 1)``
  keeps one masked until the last step instead, and stalls when ``N < S``); no code is left masked.
* The unconditional input image is ``[iPAD]`` with attention 0 (released: image id 0, a text token, attended).
* Text positions choose among the text segment of the layout minus ``[MASK]``; image positions among the codebook
  (first ``codebook_size`` codes of the image segment). The released code has no text restriction, so an untrained
  model could "reveal" a ``[MASK]``.
* Non-compounding Gumbel annealing by default (``compounding_temperature=True`` gives the released compounding).
* Confidence ties are broken by position (lowest first).

Random stream per step: the image's categorical draw and its Gumbel noise (``τ_s > 0``), then the text's Gumbel
noise (``text_temperature > 0``); draws are ``[B, ·]`` batched, so rows equal their batch-1 runs only without
sampling (greedy text, ``image_temperature=0``, ``image_argmax=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.interleave import InterleaveSpans, drop_conditions
from dllm_zoo.samplers.base import Sampler, SamplerOutput
from dllm_zoo.samplers.confidence import Confidence, LowConfidence
from dllm_zoo.samplers.maskgit import draw_codes, guided_logits, gumbel_temperature
from dllm_zoo.samplers.semi_ar import add_gumbel_noise
from dllm_zoo.samplers.transfer import top_k_mask
from dllm_zoo.schedules.base import NoiseSchedule
from dllm_zoo.schedules.cosine import CosineSchedule
from dllm_zoo.schedules.linear import LinearSchedule
from dllm_zoo.tokenizers.layout import TokenLayout

ParallelMode = Literal["parallel", "semi_parallel", "sequential"]
PARALLEL_MODES: tuple[str, ...] = ("parallel", "semi_parallel", "sequential")
_SPECIALS = ("<|soi|>", "<|eoi|>", "[iPAD]")


def committed_at(step_map: Tensor, step: int | Tensor) -> Tensor:
    """Positions revealed at global step ``step`` (1-based), e.g. the tokens ParaRL scores at that step.

    Args:
        step_map: ``[B, L]`` int64 from :class:`~dllm_zoo.samplers.base.SamplerOutput`.
        step: One step for every row, or ``[B]`` int64, one per row.

    Returns:
        ``[B, L]`` bool.
    """
    if isinstance(step, Tensor):
        step = step.to(step_map.device)[:, None]
    return step_map == step


def canvas_after(tokens: Tensor, step_map: Tensor, step: int | Tensor, mask_id: int) -> Tensor:
    """The canvas after ``step`` steps, rebuilt from the final tokens (0 = the starting canvas).

    Exact for samplers that never re-mask a committed token (every sampler of this package): a position still
    masked after ``step`` is one revealed later, ``step_map > step``. The canvas just before step ``t`` is
    ``canvas_after(..., t − 1, ...)``.

    Args:
        tokens: ``[B, L]`` int64 final tokens.
        step_map: ``[B, L]`` int64, 0 on prompt and fixed tokens.
        step: Steps done, for every row, or ``[B]`` int64, one per row.
        mask_id: The layout's ``[MASK]`` id.

    Returns:
        ``[B, L]`` int64.
    """
    if isinstance(step, Tensor):
        step = step.to(step_map.device)[:, None]
    return torch.where(step_map > step, torch.full_like(tokens, mask_id), tokens)


@dataclass(frozen=True)
class JointPlan:
    """Reveal plan of one generation on the shared axis of ``S`` steps; the same for every row (host side).

    Attributes:
        text_counts: ``S`` text tokens revealed at each step (0 where text is idle).
        image_counts: ``S`` image codes revealed at each step (0 where the image is idle).
        text_blocks: ``S`` index of the active text block, ``-1`` where text is idle.
        image_steps: ``S`` 0-based step on the image's own clock, ``-1`` where the image is idle.
        text_block_bounds: ``(start, stop)`` of each text block, relative to the ``T − 1`` text targets.
    """

    text_counts: tuple[int, ...]
    image_counts: tuple[int, ...]
    text_blocks: tuple[int, ...]
    image_steps: tuple[int, ...]
    text_block_bounds: tuple[tuple[int, int], ...]


def _branch(logits: Tensor, scale: float, guided: bool, rows: int) -> Tensor:
    """The logits a modality uses: guided ``[B, ...]`` if its forward ran both branches and it is guided, else cond."""
    if guided and scale != 0:
        return guided_logits(logits.float(), scale)
    return logits[:rows].float()


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ParallelSampler(Sampler):
    """Joint text + image sampler of MMaDA-Parallel (see the module docstring for the algorithm and the modes).

    ``prompt_ids`` are interleaved input parts ``[task] <|soi|> in_img×N <|eoi|> BOS instruction EOS [EOS…]`` of
    exactly ``P = N + T + 3`` tokens (:class:`~dllm_zoo.data.interleave.InterleaveSpans`), with their attention mask
    (0 on the ``[iPAD]`` image slot of generation rows). The output is the full interleaved row.

    Args:
        text_len: ``T``, the text part's length; ``T − 1`` text positions are generated (its BOS is fixed).
        num_image_tokens: ``N``, image codes of the output (and input) image.
        steps: ``S``, forwards on the shared time axis (every mode uses all of them).
        mode: ``"parallel"``, ``"semi_parallel"`` or ``"sequential"`` (the paper's ablation).
        text_block_length: Semi-autoregressive text blocks of this many positions, left to right; ``None`` = one
            block over all ``T − 1`` (the released code; the paper uses 64 for ``T = 256``).
        text_temperature: 0 = greedy ``x0``; otherwise LLaDA's float64 Gumbel-max sampling.
        image_temperature: ``τ`` of the Gumbel noise on the image confidence, annealed ``τ·(1 − r)``.
        image_guidance_scale: Image CFG weight ``w_img`` (paper App. E: 3.5; released Parallel-M: 4.0); 0 = off.
        text_guidance_scale: Text CFG weight ``w_text``, standard form ``(1 + w)·cond − w·uncond``; 0 = off (paper).
        text_schedule: Text count plan per block (:meth:`NoiseSchedule.reveal_counts`); default
            :class:`LinearSchedule` (LLaDA's exact counts).
        image_schedule: Image count plan; default :class:`CosineSchedule` (MaskGIT).
        text_confidence: Score that orders text reveals; default :class:`LowConfidence`.
        image_argmax: Take the most probable code instead of drawing one (deterministic image decoding).
        compounding_temperature: Anneal ``τ`` like the released code (compounding; see
            :func:`~dllm_zoo.samplers.maskgit.gumbel_temperature`).
        codebook_size: Draw only the first ``codebook_size`` codes of the layout's image segment; ``None`` = all.

    Example:
        >>> from dllm_zoo.backbones import LLaDABackbone
        >>> from dllm_zoo.data.interleave import InterleaveSpans, interleave_row
        >>> model = LLaDABackbone("tiny").eval()
        >>> spans = InterleaveSpans(text_len=6, num_image_tokens=4)
        >>> img = model.layout.image_ids(torch.arange(4)).tolist()
        >>> row = interleave_row("edit", [104, 105], [], img, img, model.layout, spans)
        >>> p = spans.prompt_len
        >>> out = ParallelSampler(6, 4, steps=4).generate(model, row["input_ids"][None, :p],
        ...                                               row["attention_mask"][None, :p])
        >>> out.tokens.shape, out.nfe, (out.tokens == model.layout.mask_id).any().item()
        (torch.Size([1, 25]), 4, False)
    """

    def __init__(
        self,
        text_len: int = 256,
        num_image_tokens: int = 1024,
        steps: int = 128,
        mode: ParallelMode = "parallel",
        text_block_length: int | None = None,
        text_temperature: float = 0.0,
        image_temperature: float = 1.0,
        image_guidance_scale: float = 3.5,
        text_guidance_scale: float = 0.0,
        text_schedule: NoiseSchedule | None = None,
        image_schedule: NoiseSchedule | None = None,
        text_confidence: Confidence | None = None,
        image_argmax: bool = False,
        compounding_temperature: bool = False,
        codebook_size: int | None = None,
    ) -> None:
        if _positive_int("text_len", text_len) < 2:
            raise ValueError(f"text_len must be >= 2 (its BOS and at least one generated position), got {text_len}")
        self.spans = InterleaveSpans(text_len, _positive_int("num_image_tokens", num_image_tokens))
        self.steps = _positive_int("steps", steps)
        if mode not in PARALLEL_MODES:
            raise ValueError(f"mode must be one of {PARALLEL_MODES}, got {mode!r}")
        if mode != "parallel" and steps < 2:
            raise ValueError(f"mode={mode!r} splits the steps in two halves and needs steps >= 2, got steps={steps}")
        targets = text_len - 1
        if text_block_length is not None:
            _positive_int("text_block_length", text_block_length)
        blocks = 1 if text_block_length is None else math.ceil(targets / text_block_length)
        text_steps = steps if mode != "sequential" else steps // 2
        if blocks > text_steps:
            raise ValueError(
                f"text_block_length={text_block_length} makes {blocks} text blocks of the {targets} text positions, "
                f"more than the {text_steps} text steps of steps={steps} in mode={mode!r}"
            )
        for name, value in (("text_temperature", text_temperature), ("image_temperature", image_temperature)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        for name, value in (
            ("image_guidance_scale", image_guidance_scale),
            ("text_guidance_scale", text_guidance_scale),
        ):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        for name, sched in (("text_schedule", text_schedule), ("image_schedule", image_schedule)):
            if sched is not None and not isinstance(sched, NoiseSchedule):
                raise ValueError(f"{name} must be a NoiseSchedule, got {type(sched).__name__}")
        if codebook_size is not None:
            _positive_int("codebook_size", codebook_size)
        self.mode = mode
        self.text_block_length = text_block_length
        self.text_temperature = text_temperature
        self.image_temperature = image_temperature
        self.image_guidance_scale = image_guidance_scale
        self.text_guidance_scale = text_guidance_scale
        self.text_schedule = text_schedule if text_schedule is not None else LinearSchedule()
        self.image_schedule = image_schedule if image_schedule is not None else CosineSchedule()
        self.text_confidence = text_confidence if text_confidence is not None else LowConfidence()
        self.image_argmax = image_argmax
        self.compounding_temperature = compounding_temperature
        self.codebook_size = codebook_size

    @property
    def text_len(self) -> int:
        """``T``."""
        return self.spans.text_len

    @property
    def num_image_tokens(self) -> int:
        """``N``."""
        return self.spans.num_image_tokens

    def plan(self) -> JointPlan:
        """The reveal plan on the shared time axis (see the module docstring for the mode split).

        Returns:
            A :class:`JointPlan`; its counts sum to ``T − 1`` (text) and ``N`` (image).
        """
        steps, half = self.steps, self.steps // 2
        text_range = range(half) if self.mode == "sequential" else range(steps)
        image_range = range(steps) if self.mode == "parallel" else range(half, steps)
        targets = self.text_len - 1
        width = self.text_block_length or targets
        bounds = tuple((a, min(a + width, targets)) for a in range(0, targets, width))
        nb, ts = len(bounds), len(text_range)
        text_counts: list[int] = []
        text_blocks: list[int] = []
        for j, (a, z) in enumerate(bounds):
            block_steps = ts // nb + (j < ts % nb)  # the text steps shared as evenly as possible
            text_counts += self.text_schedule.reveal_counts(torch.tensor([z - a]), block_steps)[0].tolist()
            text_blocks += [j] * block_steps
        image_counts = self.image_schedule.reveal_counts(torch.tensor([self.num_image_tokens]), len(image_range))
        t_counts, i_counts, t_blocks, i_steps = [0] * steps, [0] * steps, [-1] * steps, [-1] * steps
        for k, s in enumerate(text_range):
            t_counts[s], t_blocks[s] = text_counts[k], text_blocks[k]
        for k, s in enumerate(image_range):
            i_counts[s], i_steps[s] = int(image_counts[0, k]), k
        return JointPlan(tuple(t_counts), tuple(i_counts), tuple(t_blocks), tuple(i_steps), bounds)

    def _layout_ids(self, layout: TokenLayout) -> tuple[int, int, int]:
        """``(image_offset, codebook, text_vocab)`` after checking the layout can hold an interleaved row."""
        if layout.image_offset is None or layout.image_codebook_size <= 0:
            raise ValueError(
                f"ParallelSampler needs a layout with an image-code segment; layout {layout.name!r} is text-only "
                "(image_offset is None)"
            )
        missing = [tok for tok in _SPECIALS if tok not in layout.special_tokens]
        if missing:
            raise ValueError(
                f"ParallelSampler needs the tokens {list(_SPECIALS)}; layout {layout.name!r} lacks {missing}"
            )
        codebook = layout.image_codebook_size
        if self.codebook_size is not None:
            if self.codebook_size > codebook:
                raise ValueError(
                    f"codebook_size={self.codebook_size} exceeds the layout's image_codebook_size={codebook}"
                )
            codebook = self.codebook_size
        return layout.image_offset, codebook, layout.text_vocab_size

    def _check_prompt(self, model: Backbone, prompt_ids: Tensor, prompt_mask: Tensor | None) -> Tensor:
        """Validate the prompt; returns its ``[B, P]`` bool attention mask."""
        layout, spans = model.layout, self.spans
        n, t, p = spans.num_image_tokens, spans.text_len, spans.prompt_len
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
        b, width = prompt_ids.shape
        if width != p:
            raise ValueError(
                f"prompt_ids has P={width} columns, but text_len={t} and num_image_tokens={n} need the interleaved "
                f"input part of P = N + T + 3 = {p} tokens"
            )
        max_len = getattr(getattr(model, "config", None), "max_sequence_length", None)
        if isinstance(max_len, int) and spans.length > max_len:
            raise ValueError(
                f"the interleaved row of text_len={t}, num_image_tokens={n} has 2N + 2T + 5 = {spans.length} tokens, "
                f"more than the model's max_sequence_length={max_len}"
            )
        if prompt_mask is None:
            attn = torch.ones(b, p, dtype=torch.bool, device=prompt_ids.device)
        elif tuple(prompt_mask.shape) != (b, p):
            raise ValueError(f"prompt_mask must be [B, P] = {(b, p)}, got {tuple(prompt_mask.shape)}")
        else:
            attn = prompt_mask.to(prompt_ids.device) != 0
        # One host sync per call: a misplaced <|soi|>/<|eoi|> means a prompt built for another N or T.
        soi, eoi = layout.token_id("<|soi|>"), layout.token_id("<|eoi|>")
        bad_frame, has_mask = torch.stack(
            [
                ((prompt_ids[:, 1] != soi) | (prompt_ids[:, n + 2] != eoi)).any(),
                (prompt_ids == layout.mask_id).any(),
            ]
        ).tolist()
        if bad_frame:
            raise ValueError(
                f"prompt_ids must have <|soi|> at column 1 and <|eoi|> at column N + 2 = {n + 2} "
                f"(num_image_tokens={n}); some row does not"
            )
        if has_mask:
            raise ValueError(f"prompt_ids contains the mask id {layout.mask_id}; the prompt must be clean")
        return attn

    @torch.no_grad()
    def generate(
        self,
        model: Backbone,
        prompt_ids: Tensor,
        prompt_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        record: frozenset[int] | set[int] = frozenset(),
    ) -> SamplerOutput:
        """Generate the output image and text of each interleaved prompt.

        Args:
            model: Backbone whose layout has an image segment and ``<|soi|>``, ``<|eoi|>``, ``[iPAD]``.
            prompt_ids: ``[B, P]`` int64 interleaved input parts, ``P = N + T + 3`` (no left padding: the layout
                is fixed).
            prompt_mask: ``[B, P]`` 0/1 or bool (0 on a generation row's ``[iPAD]`` image slot); ``None`` = all 1.
            generator: Random source of the text Gumbel noise, the image draws and their Gumbel noise.
            record: Global steps (1-based) after which to keep a copy of the canvas.

        Returns:
            :class:`SamplerOutput`: ``tokens`` ``[B, L]`` (``L = 2N + 2T + 5``, the interleaved row),
            ``step_map`` ``[B, L]`` (1..S on the ``N`` image and ``T − 1`` text targets, 0 elsewhere),
            ``nfe = S``, ``snapshots``, ``attention_mask`` (``prompt_mask`` then ones).

        Raises:
            ValueError: for a layout without images or the interleave tokens, a prompt of the wrong length or
                frame, a row longer than the model's ``max_sequence_length``, or a bad ``prompt_mask``.
        """
        layout, spans = model.layout, self.spans
        off, codebook, text_vocab = self._layout_ids(layout)
        prompt_bool = self._check_prompt(model, prompt_ids, prompt_mask)
        device = prompt_ids.device
        b, p = prompt_ids.shape
        n, mask_id = spans.num_image_tokens, layout.mask_id
        w_img, w_txt = self.image_guidance_scale, self.text_guidance_scale
        plan = self.plan()

        prompt = prompt_ids.long()
        tail = torch.tensor(spans.output_tail(layout), dtype=torch.long, device=device)
        canvas = torch.cat([prompt, tail.expand(b, -1)], dim=1)
        tail_ones = torch.ones(b, spans.length - p, dtype=torch.bool, device=device)
        attn = torch.cat([prompt_bool, tail_ones], dim=1)
        cond_mask: Tensor | None = attn if prompt_mask is not None else None
        un_prompt: Tensor | None = None
        cfg_mask: Tensor | None = None
        if w_img != 0 or w_txt != 0:
            drop = torch.ones(b, dtype=torch.bool, device=device)
            un_prompt, un_attn = drop_conditions(prompt, prompt_bool, drop, drop, layout, spans)
            cfg_mask = torch.cat([attn, torch.cat([un_attn, tail_ones], dim=1)], dim=0)

        img = spans.output_image
        t0 = spans.output_text.start + 1  # first text target (the text part's BOS is fixed)
        img_pos = torch.arange(img.start, img.stop, device=device)
        block_pos = [torch.arange(t0 + a, t0 + z, device=device) for a, z in plan.text_block_bounds]
        # Planned counts on the device once: indexing them in the loop needs no host sync.
        text_counts = torch.tensor(plan.text_counts, dtype=torch.long, device=device)
        image_counts = torch.tensor(plan.image_counts, dtype=torch.long, device=device)
        is_mask = torch.zeros(text_vocab, dtype=torch.bool, device=device)
        is_mask[mask_id] = True  # a committed [MASK] would stay masked
        n_image_steps = sum(k >= 0 for k in plan.image_steps)

        step_map = torch.zeros(b, spans.length, dtype=torch.long, device=device)
        snapshots: dict[int, Tensor] = {}
        for s in range(self.steps):
            blk, k_img = plan.text_blocks[s], plan.image_steps[s]
            text_on, image_on = blk >= 0, k_img >= 0
            # 2B rows only when a modality updated at this step is guided.
            guided = (image_on and w_img != 0) or (text_on and w_txt != 0)
            parts = ([img_pos] if image_on else []) + ([block_pos[blk]] if text_on else [])
            at = torch.cat(parts) if len(parts) > 1 else parts[0]
            inp, mask = canvas, cond_mask
            if guided:
                assert un_prompt is not None
                inp = torch.cat([canvas, torch.cat([un_prompt, canvas[:, p:]], dim=1)], dim=0)
                mask = cfg_mask
            out = model(inp, attention_mask=mask, logits_at=at.expand(inp.shape[0], -1))
            assert out.logits is not None
            logits = out.logits

            if image_on:
                il = _branch(logits[:, :n, off : off + codebook], w_img, guided, b)  # [B, N, C]
                tau = gumbel_temperature(k_img, n_image_steps, self.image_temperature, self.compounding_temperature)
                codes, conf = draw_codes(il, tau, generator, greedy=self.image_argmax)  # [B, N] each
                image = canvas[:, img]
                commit = top_k_mask(conf, image == mask_id, image_counts[s].expand(b))
                canvas[:, img] = torch.where(commit, codes + off, image)
                step_map[:, img] = torch.where(commit, s + 1, step_map[:, img])
            if text_on:
                a, z = plan.text_block_bounds[blk]
                cols = slice(t0 + a, t0 + z)
                tl = _branch(logits[:, n if image_on else 0 :, :text_vocab], w_txt, guided, b)  # text ids only
                tl = tl.masked_fill(is_mask, -torch.inf)  # [B, K, V_text]
                x0 = add_gumbel_noise(tl, self.text_temperature, generator).argmax(dim=-1)
                conf = self.text_confidence(tl, x0, generator=generator)
                block = canvas[:, cols]
                commit = top_k_mask(conf, block == mask_id, text_counts[s].expand(b))
                canvas[:, cols] = torch.where(commit, x0, block)
                step_map[:, cols] = torch.where(commit, s + 1, step_map[:, cols])
            if s + 1 in record:
                snapshots[s + 1] = canvas.clone()

        return SamplerOutput(
            tokens=canvas, step_map=step_map, nfe=self.steps, snapshots=snapshots or None, attention_mask=attn
        )


__all__ = ["JointPlan", "PARALLEL_MODES", "ParallelMode", "ParallelSampler", "canvas_after", "committed_at"]
