"""LLaDA's semi-autoregressive sampler for full-attention masked-diffusion LMs, with Fast-dLLM's accelerations.

LLaDA (Nie et al. 2025, "Large Language Diffusion Models") appends ``G`` masks to the prompt, splits them into
blocks filled left to right, and at each step reveals the most confident predictions of the active block
(research/tracerl_llada.md §5.1). Fast-dLLM (Wu et al. 2025) adds an approximate KV cache (prefix or dual) and
confidence-threshold parallel decoding; dLLM-RL adds dynamic decoding and a prefix cache with a horizon
(research/tracerl_llada.md §7.2). All of them are options of :class:`LLaDASampler`; the confidence and transfer
policies are swappable objects (:mod:`~dllm_zoo.samplers.confidence`, :mod:`~dllm_zoo.samplers.transfer`).

With the defaults (temperature 0, low confidence, static quota, no cache) the output is token-for-token the
reference ``generate`` of ML-GSAI/LLaDA on the same weights. Deliberate differences from the reference:

* Logits are computed only for the active block (``logits_at``); hidden states still cover the whole canvas.
* Mask ids inside the prompt are prompt tokens (never filled); the reference would fill them.
* Temperature > 0: Gumbel noise (float64, as in the reference) is drawn only for the active block ``[B, K, V]``
  and random remasking draws ``[B, K]`` uniforms, so the random stream differs from the reference's full-canvas
  draws (the distribution is the same).
* Top-k ties are broken by position (lowest first); ``torch.topk``'s tie order is unspecified.
* Special ids come from ``model.layout`` (the reference hard-codes LLaDA-8B's 126081 / 126348).
* ``confidence_eos_eot_inf`` reproduces the reference's chained assignment
  ``logits_with_noise[..., eos] = logits[..., eot] = -inf`` literally: the EoT logit is set to −inf before the
  confidence softmax, and at temperature 0 — where the reference's ``add_gumbel_noise`` returns ``logits``
  itself, so the two names alias — the EOS logit too. At temperature > 0 the EOS part has no effect.

Caches (``cache="prefix"`` / ``"dual"``) follow Fast-dLLM but batched and correct with left padding (the
backbone's :class:`~dllm_zoo.backbones.cache.KVCache` carries the key-padding mask; Fast-dLLM runs batch 1 only,
research/reference-semantics.md): the first step of each block is a full forward (exact) that records every
layer's K/V; the block's later steps run only a window against the stale context K/V (approximate).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.cache import KVCache
from dllm_zoo.samplers.base import Sampler, SamplerOutput
from dllm_zoo.samplers.confidence import Confidence, LowConfidence
from dllm_zoo.samplers.transfer import StaticQuota, TransferRule
from dllm_zoo.schedules.base import NoiseSchedule
from dllm_zoo.schedules.linear import LinearSchedule
from dllm_zoo.tokenizers.layout import EOT

CacheMode = Literal["none", "prefix", "dual"]


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """LLaDA's Gumbel-max perturbation: ``argmax`` of the result samples ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` logits.
        temperature: 0 returns ``logits`` itself (no copy); otherwise ``exp(logits) / (−log U)^T`` in float64
            with ``U ~ U(0, 1)`` float64 (low-precision Gumbel noise hurts quality, per the reference).
        generator: Random source for ``U``.

    Returns:
        ``[..., V]``: ``logits`` (temperature 0) or float64 perturbed scores.
    """
    if temperature == 0:
        return logits
    logits64 = logits.to(torch.float64)
    u = torch.rand(logits64.shape, dtype=torch.float64, generator=generator, device=logits.device)
    return logits64.exp() / (-torch.log(u)) ** temperature


class LLaDASampler(Sampler):
    """LLaDA semi-autoregressive sampler (blocks left to right, confidence-ordered reveals within a block).

    Canvas: ``[prompt | gen_length masks]``, ``gen_length / block_length`` blocks, ``steps / num_blocks`` steps
    per block. At each step: ``x0 = argmax`` of the (Gumbel-noised, if ``temperature > 0``) logits of the active
    block; the masked positions of the block are scored by ``confidence`` and ``transfer`` picks the ones to
    reveal. The reveal plan of each block is ``schedule.reveal_counts(#masked at block start, steps per block)``.

    Args:
        gen_length: ``G``, number of generated positions.
        block_length: Positions per block; must divide ``gen_length``.
        steps: Total steps (static rules); must be a multiple of the number of blocks. Adaptive transfer rules
            (threshold, factor, dynamic) stop a block as soon as it is filled.
        temperature: 0 = greedy; otherwise Gumbel-max sampling in float64.
        cfg_scale: Classifier-free guidance weight ``w``; ``logits = un + (w + 1)·(cond − un)`` where the
            unconditional branch has every prompt position masked. Both branches run as one ``2B``-row forward.
        confidence: Score that orders reveals; default :class:`LowConfidence`.
        transfer: How many / which positions to reveal; default :class:`StaticQuota`.
        schedule: Reveal plan; default :class:`LinearSchedule` (LLaDA's ``get_num_transfer_tokens``).
        logits_eos_inf: Set the EOS logit to −inf before choosing ``x0`` (EOS is never generated).
        confidence_eos_eot_inf: The reference's EoT (and, at temperature 0, EOS) confidence suppression; see the
            module docstring. Needs a layout with ``<|eot_id|>``.
        early_stop: After a block is filled, stop if every row has an EOS among its generated tokens so far and
            fill the remaining positions with EOS; their ``step_map`` is the last step executed. Saves forwards
            (``nfe`` counts only those run). Not in the reference.
        cache: ``"none"`` (exact), ``"prefix"`` (K/V of the positions before the block, from the block's first
            step) or ``"dual"`` (prefix and suffix K/V; only the block is recomputed), Fast-dLLM style.
        further_horizon: With ``cache="prefix"``: the window run at later steps is ``[block start, block end +
            further_horizon)`` capped at the canvas end (dLLM-RL); ``None`` = up to the canvas end (Fast-dLLM).

    Example:
        >>> from dllm_zoo.backbones import LLaDABackbone
        >>> out = LLaDASampler(gen_length=8, block_length=4, steps=4).generate(
        ...     LLaDABackbone("tiny").eval(), torch.tensor([[1, 2, 3]]))
        >>> out.tokens.shape, out.nfe
        (torch.Size([1, 11]), 4)
    """

    def __init__(
        self,
        gen_length: int = 128,
        block_length: int = 32,
        steps: int = 128,
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        confidence: Confidence | None = None,
        transfer: TransferRule | None = None,
        schedule: NoiseSchedule | None = None,
        logits_eos_inf: bool = False,
        confidence_eos_eot_inf: bool = False,
        early_stop: bool = False,
        cache: CacheMode = "none",
        further_horizon: int | None = None,
    ) -> None:
        if gen_length <= 0 or block_length <= 0 or steps <= 0:
            raise ValueError(
                f"gen_length, block_length and steps must be positive, got gen_length={gen_length}, "
                f"block_length={block_length}, steps={steps}"
            )
        if gen_length % block_length:
            raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
        num_blocks = gen_length // block_length
        if steps % num_blocks:
            raise ValueError(
                f"steps={steps} must be a multiple of the number of blocks gen_length/block_length={num_blocks}"
            )
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if cache not in ("none", "prefix", "dual"):
            raise ValueError(f"cache must be 'none', 'prefix' or 'dual', got {cache!r}")
        if further_horizon is not None and (cache != "prefix" or further_horizon < 0):
            raise ValueError(
                f"further_horizon={further_horizon} needs cache='prefix' (got cache={cache!r}) and must be >= 0"
            )
        self.gen_length = gen_length
        self.block_length = block_length
        self.steps = steps
        self.temperature = temperature
        self.cfg_scale = cfg_scale
        self.confidence = confidence if confidence is not None else LowConfidence()
        self.transfer = transfer if transfer is not None else StaticQuota()
        self.schedule = schedule if schedule is not None else LinearSchedule()
        self.logits_eos_inf = logits_eos_inf
        self.confidence_eos_eot_inf = confidence_eos_eot_inf
        self.early_stop = early_stop
        self.cache = cache
        self.further_horizon = further_horizon

    @property
    def num_blocks(self) -> int:
        """``gen_length / block_length``."""
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        """``steps / num_blocks``."""
        return self.steps // self.num_blocks

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
        """See :meth:`Sampler.generate`.

        Args:
            model: Backbone; ``model.layout`` supplies the mask, EOS and EoT ids.
            prompt_ids: ``[B, P]`` int64, left-padded.
            prompt_mask: ``[B, P]`` 1 = real token; ``None`` = no padding (the model then gets no mask).
            generator: Random source (temperature > 0, random remasking).
            record: Global steps after which to snapshot the canvas.

        Returns:
            :class:`SamplerOutput` with ``tokens``/``step_map``/``attention_mask`` of shape ``[B, P + G]``.
        """
        layout = model.layout
        mask_id, eos_id = layout.mask_id, layout.eos_id
        eot_id = layout.special_tokens.get(EOT)
        if self.confidence_eos_eot_inf and eot_id is None:
            raise ValueError(f"confidence_eos_eot_inf needs a layout with {EOT!r}; layout {layout.name!r} has none")
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
        device = prompt_ids.device
        b, p = prompt_ids.shape
        g, k = self.gen_length, self.block_length
        total = p + g
        canvas = torch.cat([prompt_ids.long(), torch.full((b, g), mask_id, dtype=torch.long, device=device)], dim=1)
        gen_ones = torch.ones(b, g, dtype=torch.bool, device=device)
        if prompt_mask is None:
            attn_bool = torch.ones(b, total, dtype=torch.bool, device=device)
            model_mask: Tensor | None = None
        else:
            if tuple(prompt_mask.shape) != (b, p):
                raise ValueError(f"prompt_mask must be [B, P] = {(b, p)}, got {tuple(prompt_mask.shape)}")
            attn_bool = torch.cat([prompt_mask.to(device) != 0, gen_ones], dim=1)
            model_mask = attn_bool
        cfg = self.cfg_scale > 0
        rows = 2 * b if cfg else b
        if cfg and model_mask is not None:
            model_mask = torch.cat([model_mask, model_mask], dim=0)

        step_map = torch.zeros(b, total, dtype=torch.long, device=device)
        snapshots: dict[int, Tensor] = {}
        rel = torch.arange(k, device=device)
        window_logits_at = rel.expand(rows, k)
        adaptive = self.transfer.adaptive
        spb = self.steps_per_block
        step = nfe = 0

        for blk in range(self.num_blocks):
            s = p + blk * k
            e = s + k
            n_masked = (canvas[:, s:e] == mask_id).sum(dim=1)
            plan = self.schedule.reveal_counts(n_masked, spb).to(device)  # [B, spb]
            full_logits_at = (s + rel).expand(rows, k)
            ctx: KVCache | None = None
            w_end = e
            max_steps = k if adaptive else spb  # adaptive rules reveal >= 1 token per unfinished row per step
            for i in range(max_steps):
                block = canvas[:, s:e]
                masked = block == mask_id  # [B, K]
                if ctx is None:
                    inp = canvas
                    if cfg:
                        un = canvas.clone()
                        un[:, :p] = mask_id
                        inp = torch.cat([canvas, un], dim=0)
                    out = model(
                        inp,
                        attention_mask=model_mask,
                        logits_at=full_logits_at,
                        return_cache=self.cache != "none",
                    )
                    if self.cache != "none":
                        ctx, w_end = self._context(out.cache, s, e, total)
                else:
                    win = canvas[:, s:w_end]
                    if cfg:
                        win = torch.cat([win, win], dim=0)  # the window lies after the prompt: branches agree
                    positions = torch.arange(s, w_end, device=device).expand(rows, w_end - s)
                    out = model(win, position_ids=positions, cache=ctx, logits_at=window_logits_at)
                nfe += 1
                logits = out.logits
                assert logits is not None
                if cfg:
                    cond, uncond = logits.chunk(2, dim=0)
                    logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
                if self.logits_eos_inf:
                    logits[..., eos_id] = -torch.inf
                x0 = add_gumbel_noise(logits, self.temperature, generator).argmax(dim=-1)  # [B, K]
                if self.confidence_eos_eot_inf:
                    logits[..., eot_id] = -torch.inf
                    if self.temperature == 0:  # reference aliasing: logits_with_noise IS logits
                        logits[..., eos_id] = -torch.inf
                conf = self.confidence(logits, x0, generator=generator)
                quota = plan[:, i] if i < spb else torch.zeros_like(n_masked)
                reveal = self.transfer.select(conf, masked, quota) & masked
                step += 1
                canvas[:, s:e] = torch.where(reveal, x0, block)
                step_map[:, s:e] = torch.where(reveal, torch.full_like(x0, step), step_map[:, s:e])
                if step in record:
                    snapshots[step] = canvas.clone()
                if adaptive and not bool((canvas[:, s:e] == mask_id).any()):
                    break
            if self.early_stop and e < total and bool((canvas[:, p:e] == eos_id).any(dim=1).all()):
                canvas[:, e:] = eos_id
                step_map[:, e:] = step
                break

        return SamplerOutput(
            tokens=canvas,
            step_map=step_map,
            nfe=nfe,
            snapshots=snapshots or None,
            attention_mask=attn_bool,
        )

    def _context(self, full: KVCache, s: int, e: int, total: int) -> tuple[KVCache, int]:
        """Context K/V kept from a block's first (full) forward and the end of the window run at later steps.

        Args:
            full: K/V of every canvas position ``[rows, H_kv, P + G, hd]`` with the canvas key-padding mask.
            s: Block start (canvas index).
            e: Block end.
            total: Canvas length ``P + G``.

        Returns:
            ``(context cache, window end)``: prefix ``[0, s)`` and window ``[s, end)`` (``end`` = canvas end or
            ``e + further_horizon``) for ``"prefix"``; prefix + suffix ``[e, total)`` and window ``[s, e)`` for
            ``"dual"``.
        """
        prefix = full.select(slice(0, s))
        if self.cache == "dual":
            if e >= total:
                return prefix, e
            return KVCache.cat([prefix, full.select(slice(e, total))]), e
        end = total if self.further_horizon is None else min(e + self.further_horizon, total)
        return prefix, end
