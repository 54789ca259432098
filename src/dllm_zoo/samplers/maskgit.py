"""MaskGIT text-to-image sampling, as MMaDA generates images (research/mmada.md §5.2).

MaskGIT (Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer") starts from an all-``[MASK]`` grid of
image codes and, at each of ``S`` steps, samples every masked code, keeps the most confident samples and re-masks
the rest; how many stay masked follows a schedule ``γ`` (cosine by default). MMaDA (Yang et al. 2025, "MMaDA:
Multimodal Large Diffusion Language Models", arXiv:2505.15809) runs it on the t2i layout
``[iPAD]×k <|t2i|> BOS caption EOS <|soi|> img_1..img_N <|eoi|>`` with classifier-free guidance
``l = (1 + w)·l_cond − w·l_uncond`` against an empty-caption prefix (``t2i_generate`` in ``modeling_mmada.py``,
inherited from Show-o).

Deliberate differences from the released MMaDA / Show-o code:

* The unconditional prefix ``[iPAD]… <|t2i|> BOS EOS`` has the SAME length ``P`` as the conditional prefix and is
  built once (:meth:`MaskGITSampler.unconditional_prefix`). The released code splices
  ``uncond_input_ids[:, :resolution + 1]`` with a hard-coded length each step, which is wrong whenever the text
  prefix is not ``resolution + 1`` tokens long.
* The Gumbel temperature is ``τ_s = τ·(1 − r)`` (original MaskGIT). The released code reassigns
  ``τ ← τ·(1 − r)`` every step, so it compounds; ``compounding_temperature=True`` reproduces that.
* Exactly ``mask_len`` positions are re-masked, ties broken by position (stable sort); the released
  ``confidence < cut_off`` re-masks fewer when confidences tie at the cut-off (possible at temperature 0).
* ``mask_len`` uses ``schedule.masked_fraction`` in float64; the released code evaluates the cosine in float32
  (``torch.tensor(ratio)``), which can differ by one where ``N·γ(r)`` lands on an integer.
* Confidence is ``log_softmax`` of the sampled code (released: ``log`` of the softmax), known positions get
  ``+inf`` (released: ``finfo.max`` before the log); logits are computed only at the ``N`` image positions.
* No Gumbel noise is drawn when ``τ_s = 0`` (temperature 0, the last step), so the random stream differs from the
  released one even where the distribution is the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.multimodal import unconditional_t2i_prefix
from dllm_zoo.samplers.base import Sampler, SamplerOutput
from dllm_zoo.schedules.base import NoiseSchedule
from dllm_zoo.schedules.cosine import CosineSchedule
from dllm_zoo.tokenizers.layout import TokenLayout

IPAD, T2I, SOI, EOI = "[iPAD]", "<|t2i|>", "<|soi|>", "<|eoi|>"


def t2i_special_ids(layout: TokenLayout) -> tuple[int, int, int, int]:
    """The ids MaskGIT t2i sampling needs, after checking that ``layout`` can hold a t2i sequence.

    Args:
        layout: The model's token layout.

    Returns:
        ``([iPAD], <|t2i|>, <|soi|>, <|eoi|>)`` ids.

    Raises:
        ValueError: if the layout has no image segment or lacks one of those tokens.
    """
    if layout.image_offset is None or layout.image_codebook_size <= 0:
        raise ValueError(
            f"MaskGITSampler needs a layout with an image-code segment; layout {layout.name!r} is text-only "
            "(image_offset is None)"
        )
    missing = [tok for tok in (IPAD, T2I, SOI, EOI) if tok not in layout.special_tokens]
    if missing:
        raise ValueError(
            f"MaskGITSampler needs the t2i tokens {[IPAD, T2I, SOI, EOI]}; layout {layout.name!r} lacks {missing}"
        )
    return tuple(layout.special_tokens[tok] for tok in (IPAD, T2I, SOI, EOI))  # type: ignore[return-value]


def gumbel_temperature(step: int, steps: int, temperature: float, compounding: bool = False) -> float:
    """Scale ``τ_s`` of the Gumbel noise added to the confidence at 0-based step ``step`` of ``steps``.

    With ``r_j = (j + 1) / S``: ``τ_s = τ·(1 − r_s)`` (MaskGIT), or ``τ·Π_{j<=s}(1 − r_j)`` when ``compounding``
    (the released MMaDA / Show-o loop reassigns ``temperature = temperature * (1 - ratio)`` every step).

    Args:
        step: 0-based step ``s``.
        steps: Total steps ``S``.
        temperature: Initial ``τ``.
        compounding: Reproduce the released code's compounding annealing.

    Returns:
        ``τ_s`` (0 at the last step either way).
    """
    if not compounding:
        return temperature * (1.0 - (step + 1) / steps)
    tau = temperature
    for j in range(step + 1):
        tau *= 1.0 - (j + 1) / steps
    return tau


def _gumbel(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise ``−log(−log U)`` of ``shape`` (float32)."""
    u = torch.rand(shape, generator=generator, device=device).clamp(min=1e-20)
    return -torch.log((-torch.log(u)).clamp(min=1e-20))


def guided_logits(logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``(1 + w)·l_cond − w·l_uncond`` of a ``[2B, ...]`` forward (cond rows first).

    Args:
        logits: ``[2B, ...]``: the conditional rows, then the unconditional rows in the same order.
        scale: ``w``; 0 returns the conditional rows' values.

    Returns:
        ``[B, ...]`` guided logits.
    """
    cond, uncond = logits.chunk(2, dim=0)
    return (1 + scale) * cond - scale * uncond


def draw_codes(
    logits: Tensor, temperature: float, generator: torch.Generator | None = None, greedy: bool = False
) -> tuple[Tensor, Tensor]:
    """One MaskGIT draw: a code per position and its confidence ``log p(code) + τ·Gumbel``.

    Args:
        logits: ``[B, N, C]`` (guided) logits over the codebook.
        temperature: ``τ_s``, scale of the Gumbel noise on the confidence; no noise is drawn when it is 0.
        generator: Random source of the categorical draw (first) and the Gumbel noise (second).
        greedy: Take the most probable code instead of drawing one from ``softmax(logits)``.

    Returns:
        ``(codes [B, N] int64 in [0, C), confidence [B, N] float32)``.
    """
    logp = torch.log_softmax(logits, dim=-1)
    if greedy:
        codes = logp.argmax(dim=-1)
    else:
        codes = torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator)
        codes = codes.view(logp.shape[:-1])
    conf = logp.gather(-1, codes[..., None]).squeeze(-1)
    if temperature > 0:
        conf = conf + temperature * _gumbel(conf.shape, generator, conf.device)
    return codes, conf


class MaskGITSampler(Sampler):
    """MMaDA's text-to-image sampler: MaskGIT confidence re-masking over ``N`` image codes, with CFG.

    ``prompt_ids`` are t2i prefixes ``[iPAD]×k <|t2i|> BOS caption EOS`` left-padded with ``[iPAD]`` (0 in
    ``prompt_mask``); the canvas is ``prefix + <|soi|> + [MASK]×N + <|eoi|>``. Each step ``s = 0..S−1``:

    1. one forward over the canvas (key-padding mask), logits at the ``N`` image positions restricted to the
       codebook slice; with ``guidance_scale = w ≠ 0`` the conditional and unconditional canvases run as one
       ``2B``-row forward and ``l = (1 + w)·l_cond − w·l_uncond``;
    2. every masked position draws a code from ``softmax(l)``; committed positions keep theirs;
    3. ``r = (s + 1)/S``, ``mask_len = clamp(⌊N·γ(r)⌋, 1, n_unknown − 1)`` per row (``γ`` =
       ``schedule.masked_fraction``);
    4. confidence ``log p(sampled) + τ_s·Gumbel`` (committed positions ``+inf``); the ``mask_len`` least
       confident are re-masked, the others committed; the last step commits everything.

    Args:
        num_image_tokens: ``N``, image codes per sample (MAGVIT-v2: 256 at 256 px, 1024 at 512 px).
        steps: ``S`` (MMaDA README: 15; paper: 50).
        guidance_scale: CFG weight ``w``; 0 runs the conditional branch only (``B`` rows).
        schedule: Reveal curve ``γ`` via :meth:`NoiseSchedule.masked_fraction`; default :class:`CosineSchedule`.
        temperature: ``τ`` of the Gumbel noise on the confidence (MaskGIT's choice temperature; it does not
            scale the sampling distribution). 0 = pure confidence order.
        codebook_size: Sample only the first ``codebook_size`` codes of the layout's image segment (an image
            tokenizer with fewer codes than the segment, e.g. the 16-colour palette in the 64-code embedded
            layout); ``None`` = the whole segment.
        compounding_temperature: Anneal like the released code (``τ ← τ·(1 − r)`` each step, compounding)
            instead of MaskGIT's ``τ·(1 − r)``; see :func:`gumbel_temperature`.

    Example:
        >>> from dllm_zoo.backbones import LLaDABackbone
        >>> model = LLaDABackbone("tiny").eval()
        >>> lay = model.layout
        >>> prefix = torch.tensor([[lay.token_id("<|t2i|>"), lay.bos_id, 104, 105, lay.eos_id]])
        >>> out = MaskGITSampler(num_image_tokens=4, steps=2).generate(model, prefix)
        >>> out.tokens.shape, out.nfe
        (torch.Size([1, 11]), 2)
    """

    def __init__(
        self,
        num_image_tokens: int = 256,
        steps: int = 15,
        guidance_scale: float = 3.5,
        schedule: NoiseSchedule | None = None,
        temperature: float = 1.0,
        compounding_temperature: bool = False,
        codebook_size: int | None = None,
    ) -> None:
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens <= 0:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.num_image_tokens = num_image_tokens
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.schedule = schedule if schedule is not None else CosineSchedule()
        self.temperature = temperature
        self.compounding_temperature = compounding_temperature
        if codebook_size is not None and (isinstance(codebook_size, bool) or codebook_size <= 0):
            raise ValueError(f"codebook_size must be a positive int or None, got {codebook_size!r}")
        self.codebook_size = codebook_size

    def unconditional_prefix(
        self, layout: TokenLayout, prompt_ids: Tensor, prompt_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The CFG branch's prefix: an empty caption ``<|t2i|> BOS EOS`` left-padded with ``[iPAD]`` to length ``P``.

        This is MMaDA's training-time caption dropout (and its inference builder with caption ``""``), at the
        conditional prefix's length so both branches share the image positions. Override to change the
        unconditional condition.

        Args:
            layout: The model's layout.
            prompt_ids: ``[B, P]`` conditional prefixes.
            prompt_mask: ``[B, P]`` bool, their key-padding mask.

        Returns:
            ``(ids [B, P] int64, mask [B, P] bool)`` with ``mask`` False on the ``[iPAD]`` padding.
        """
        t2i_special_ids(layout)  # clear error for a layout without the t2i tokens
        b, p = prompt_ids.shape
        if p < 3:
            raise ValueError(f"prompt_ids must have at least 3 columns (<|t2i|> BOS EOS) for CFG, got P={p}")
        template, pads = unconditional_t2i_prefix(layout, p - 1)  # the training-time dropped caption, same length
        ids = torch.tensor(template, dtype=torch.long, device=prompt_ids.device).expand(b, p).clone()
        mask = (torch.arange(p, device=prompt_ids.device) >= pads).expand(b, p).clone()
        return ids, mask

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
        """Generate ``N`` image codes per t2i prefix.

        Args:
            model: Backbone whose ``layout`` has an image segment and the t2i tokens.
            prompt_ids: ``[B, P]`` int64 t2i prefixes ``[iPAD]×k <|t2i|> BOS caption EOS``, left-padded with
                ``[iPAD]``.
            prompt_mask: ``[B, P]`` 0/1 or bool, 0 on the ``[iPAD]`` padding; ``None`` = every prefix token is
                attended (the ``[iPAD]`` too).
            generator: Random source of the categorical draws and the Gumbel noise (on the model's device).
            record: Steps (1-based) after which to keep a copy of the canvas.

        Returns:
            :class:`SamplerOutput`: ``tokens`` ``[B, P + N + 2]`` (image slots hold ``image_offset + code``),
            ``step_map`` (step at which each image position was committed, 1..S; 0 elsewhere), ``nfe = S``,
            ``snapshots``, ``attention_mask`` (``prompt_mask`` then ones).

        Raises:
            ValueError: for a layout without images or t2i tokens, malformed inputs, or a canvas longer than the
                model's ``config.max_sequence_length``.
        """
        layout = model.layout
        _, _, soi_id, eoi_id = t2i_special_ids(layout)
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
        device = prompt_ids.device
        b, p = prompt_ids.shape
        n, steps, w = self.num_image_tokens, self.steps, self.guidance_scale
        total = p + n + 2
        max_len = getattr(getattr(model, "config", None), "max_sequence_length", None)
        if isinstance(max_len, int) and total > max_len:
            raise ValueError(
                f"num_image_tokens={n} does not fit: the canvas P + N + 2 = {p} + {n} + 2 = {total} exceeds the "
                f"model's max_sequence_length={max_len}"
            )
        if prompt_mask is None:
            prompt_bool = torch.ones(b, p, dtype=torch.bool, device=device)
        else:
            if tuple(prompt_mask.shape) != (b, p):
                raise ValueError(f"prompt_mask must be [B, P] = {(b, p)}, got {tuple(prompt_mask.shape)}")
            prompt_bool = prompt_mask.to(device) != 0
        mask_id = layout.mask_id
        off, codebook = layout.image_offset, layout.image_codebook_size
        if self.codebook_size is not None:
            if self.codebook_size > codebook:
                raise ValueError(
                    f"codebook_size={self.codebook_size} exceeds the layout's image_codebook_size={codebook}"
                )
            codebook = self.codebook_size  # the image tokenizer's codes: the first codebook_size of the segment
        assert off is not None  # checked by t2i_special_ids

        def col(token: int, width: int = 1) -> Tensor:
            return torch.full((b, width), token, dtype=torch.long, device=device)

        canvas = torch.cat([prompt_ids.long(), col(soi_id), col(mask_id, n), col(eoi_id)], dim=1)
        tail_ones = torch.ones(b, n + 2, dtype=torch.bool, device=device)
        attn = torch.cat([prompt_bool, tail_ones], dim=1)
        cfg = w != 0
        model_mask: Tensor | None = attn if prompt_mask is not None else None
        un_prefix: Tensor | None = None
        if cfg:
            un_prefix, un_mask = self.unconditional_prefix(layout, prompt_ids, prompt_bool)
            if tuple(un_prefix.shape) != (b, p) or tuple(un_mask.shape) != (b, p):
                raise ValueError(
                    f"unconditional_prefix must return [B, P] = {(b, p)} ids and mask, got "
                    f"{tuple(un_prefix.shape)} and {tuple(un_mask.shape)}"
                )
            model_mask = torch.cat([attn, torch.cat([un_mask.to(device) != 0, tail_ones], dim=1)], dim=0)
        rows = 2 * b if cfg else b
        img = slice(p + 1, p + 1 + n)
        logits_at = torch.arange(p + 1, p + 1 + n, device=device).expand(rows, n)
        # ⌊N·γ(r)⌋ for r = 1/S .. S/S, planned on the host once; one copy to the device, none inside the loop.
        progress = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        targets = torch.floor(n * self.schedule.masked_fraction(progress).to(torch.float64)).to(torch.int64)
        targets = targets.to(device)

        step_map = torch.zeros(b, total, dtype=torch.long, device=device)
        snapshots: dict[int, Tensor] = {}
        for s in range(steps):
            image = canvas[:, img]  # [B, N]
            unknown = image == mask_id
            inp = canvas
            if cfg:
                assert un_prefix is not None
                inp = torch.cat([canvas, torch.cat([un_prefix, canvas[:, p:]], dim=1)], dim=0)
            out = model(inp, attention_mask=model_mask, logits_at=logits_at)
            assert out.logits is not None
            logits = out.logits[..., off : off + codebook].float()  # [rows, N, C]
            if cfg:
                logits = guided_logits(logits, w)
            # The last step commits everything: its confidence is unused, so no Gumbel noise is drawn there.
            last = s == steps - 1
            tau = 0.0 if last else gumbel_temperature(s, steps, self.temperature, self.compounding_temperature)
            sampled, conf = draw_codes(logits, tau, generator)  # [B, N] each
            sampled_ids = torch.where(unknown, sampled + off, image)
            if last:
                commit = unknown
                new_image = sampled_ids
            else:
                conf = conf.masked_fill(~unknown, torch.inf)
                mask_len = torch.minimum(unknown.sum(dim=1) - 1, targets[s]).clamp(min=1)  # [B]
                ranks = conf.argsort(dim=1, stable=True).argsort(dim=1)
                remask = (ranks < mask_len[:, None]) & unknown
                commit = unknown & ~remask
                new_image = torch.where(remask, torch.full_like(sampled_ids, mask_id), sampled_ids)
            canvas[:, img] = new_image
            step_map[:, img] = torch.where(commit, torch.full_like(new_image, s + 1), step_map[:, img])
            if s + 1 in record:
                snapshots[s + 1] = canvas.clone()

        return SamplerOutput(
            tokens=canvas,
            step_map=step_map,
            nfe=steps,
            snapshots=snapshots or None,
            attention_mask=attn,
        )
