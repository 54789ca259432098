"""Block-diffusion sampler for block-attention dLLMs (SDAR / TraDo), with an exact KV cache.

SDAR-style models attend block-causally: a block sees itself bidirectionally and every earlier block, never a later
one. So a finished block's keys/values never change again and can be cached *exactly* (unlike the approximate
Fast-dLLM caches of full-attention models). The loop (research/tracerl_llada.md §3.5, JetEngine §7.1):

1. The canvas is the prompt followed by masks up to a multiple of ``block_length`` (``ceil((p + G)/B)·B``
   positions); blocks sit on the absolute grid from position 0, so the prompt's last ``p mod B`` tokens share
   the first generated block.
2. Prefill: the ``⌊p/B⌋·B`` tokens of full prompt blocks are run once and their K/V cached.
3. Per block: up to ``denoising_steps`` forwards of the active block alone (attending to the cache); each step
   samples every masked position (temperature → top-k → softmax → top-p, or argmax at temperature 0), scores it
   with the ``confidence`` policy and reveals what the ``transfer`` rule selects; the static quota of step ``i`` is
   ``B // steps + (i < B % steps)``. Once the block has no mask left its clean K/V are cached.

The reference spends one forward on the prefill and one per block on storing the clean block. Here both ride along
with the next block's first step: one forward over ``[clean, not yet cached | active block]`` returns the active
block's logits and the clean columns' K/V (same attention, so the same numbers), saving ``1 + #blocks − 1``
forwards per call (``steps`` instead of ``steps + 1`` per block).
4. A row stops after a block that contains one of ``stop_token_ids``; its later positions are padding.

Strategy names of the references map to policy pairs: ``low_confidence_static`` = (:class:`LowConfidence`,
:class:`StaticQuota`), ``low_confidence_dynamic`` = (:class:`LowConfidence`, :class:`Dynamic`),
``entropy_bounded`` = (:class:`NegEntropy`, :class:`EntropyBounded`); see :meth:`BlockSampler.for_strategy`.

Batching (vectorised; the reference breaks at batch > 1): each row keeps its own block grid, so rows are shifted by
whole blocks to align their active blocks; finished rows are never written again; every row's tokens and
``step_map`` equal its batch-1 run (the step counter is per row).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, cast

import torch
from torch import Tensor

from dllm_zoo.backbones.attention import block_causal_mask, context_window_mask
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.cache import KVCache
from dllm_zoo.samplers.base import Sampler, SamplerOutput
from dllm_zoo.samplers.confidence import Confidence, LowConfidence, NegEntropy
from dllm_zoo.samplers.sampling import sample_tokens
from dllm_zoo.samplers.transfer import Dynamic, EntropyBounded, StaticQuota, TransferRule

Strategy = Literal["low_confidence_static", "low_confidence_dynamic", "entropy_bounded"]


class BlockSampler(Sampler):
    """SDAR / TraDo block-diffusion sampler (see the module docstring for the algorithm).

    Args:
        gen_length: ``G``: at least this many positions are generated (the canvas is rounded up to whole blocks,
            so a row generates ``ceil((p + G)/B)·B − p`` positions unless it stops).
        block_length: ``B``, tokens per block; also the attention grid (the model's own ``block_size`` is not
            used, so a model can be decoded with a different block size, research/tracerl_llada.md §2.7).
        denoising_steps: Steps per block for the static quota ``B // steps + (i < B % steps)``; adaptive rules
            stop a block as soon as it is full (at most ``max(steps, B)`` steps).
        temperature: 0 = greedy argmax (the references have none); otherwise multinomial sampling.
        top_k: Keep the ``top_k`` most likely tokens before sampling (0 = all).
        top_p: Nucleus mass (1.0 = all).
        confidence: Scores of masked positions (default :class:`LowConfidence`: probability of the sampled token
            under the filtered distribution).
        transfer: Which positions to reveal (default :class:`StaticQuota`).
        stop_token_ids: A row stops after the block in which one of these appears among its generated tokens;
            ``None`` = the layout's EOS; ``[]`` = never stop early.
        use_cache: Prefill + exact block K/V cache (default). ``False`` recomputes every visible position each step
            with a block-causal mask (the uncached loop; same tokens).

    Example:
        >>> from dllm_zoo.backbones import LLaDABackbone
        >>> out = BlockSampler(gen_length=8, block_length=4, denoising_steps=4).generate(
        ...     LLaDABackbone("tiny").eval(), torch.tensor([[1, 2, 3]]))
        >>> out.tokens.shape
        torch.Size([1, 12])
    """

    def __init__(
        self,
        gen_length: int = 128,
        block_length: int = 4,
        denoising_steps: int = 4,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        confidence: Confidence | None = None,
        transfer: TransferRule | None = None,
        stop_token_ids: list[int] | None = None,
        use_cache: bool = True,
    ) -> None:
        if gen_length <= 0 or block_length <= 0 or denoising_steps <= 0:
            raise ValueError(
                f"gen_length, block_length and denoising_steps must be positive, got gen_length={gen_length}, "
                f"block_length={block_length}, denoising_steps={denoising_steps}"
            )
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        self.gen_length = gen_length
        self.block_length = block_length
        self.denoising_steps = denoising_steps
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.confidence = confidence if confidence is not None else LowConfidence()
        self.transfer = transfer if transfer is not None else StaticQuota()
        self.stop_token_ids = stop_token_ids
        self.use_cache = use_cache

    @classmethod
    def for_strategy(
        cls, strategy: Strategy, *, threshold: float = 0.9, eb_threshold: float = 0.35, **kwargs: object
    ) -> BlockSampler:
        """Build the sampler for a reference strategy name.

        Args:
            strategy: ``low_confidence_static``, ``low_confidence_dynamic`` (strict ``p > threshold`` with the
                static quota as floor) or ``entropy_bounded`` (``eb_threshold`` nats per step).
            threshold: Dynamic threshold (dLLM-RL README 0.9; SDAR's ``generate`` 0.85).
            eb_threshold: Entropy budget of ``entropy_bounded``.
            **kwargs: Other :class:`BlockSampler` arguments.
        """
        policies: dict[str, tuple[Confidence, TransferRule]] = {
            "low_confidence_static": (LowConfidence(), StaticQuota()),
            "low_confidence_dynamic": (LowConfidence(), Dynamic(threshold)),
            "entropy_bounded": (NegEntropy(), EntropyBounded(eb_threshold)),
        }
        if strategy not in policies:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(policies)}")
        confidence, transfer = policies[strategy]
        return cls(confidence=confidence, transfer=transfer, **kwargs)  # type: ignore[arg-type]

    def quota(self, device: torch.device | None = None) -> Tensor:
        """Static reveal plan of one block: ``[denoising_steps]`` int64, ``B // steps + (i < B % steps)``."""
        base, extra = divmod(self.block_length, self.denoising_steps)
        return base + (torch.arange(self.denoising_steps, device=device) < extra).long()

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
            model: A block-attention backbone (any backbone that takes 4-D masks and a :class:`KVCache`).
            prompt_ids: ``[B, P]`` int64, left-padded.
            prompt_mask: ``[B, P]`` 1 = real token; ``None`` = no padding.
            generator: Random source for temperature sampling.
            record: Loop iterations (1-based, counted over the batch; equal to the step for a batch of one) after
                which to snapshot the output canvas.

        Returns:
            :class:`SamplerOutput`: ``tokens`` ``[B, P + G']`` (the prompt as given, then each row's generated
            positions; ``G' = max`` generated count, shorter or stopped rows right-padded with the pad id),
            ``step_map`` (the row's own 1-based denoising step of each reveal, counted across blocks; 0 on the
            prompt, its padding and positions not generated),
            ``attention_mask`` (False on prompt padding and on positions a row did not generate).
        """
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
        layout = model.layout
        mask_id = layout.mask_id
        stops = [layout.eos_id] if self.stop_token_ids is None else list(self.stop_token_ids)
        device = prompt_ids.device
        b, p = prompt_ids.shape
        blk, g = self.block_length, self.gen_length
        real = torch.ones(b, p, dtype=torch.bool, device=device) if prompt_mask is None else prompt_mask.to(device) != 0
        if tuple(real.shape) != (b, p):
            raise ValueError(f"prompt_mask must be [B, P] = {(b, p)}, got {tuple(real.shape)}")

        # Block-aligned canvas: row r's prompt occupies [off_r, off_r + p_r) with off_r = F - f_r a multiple of B,
        # so all rows' active blocks start at the same canvas column F + j·B.
        plen = real.sum(dim=1)  # [B]
        full = plen // blk * blk  # f_r: prompt tokens in whole blocks (prefilled)
        tail = plen - full  # t_r < B: prompt tokens in the first generated block
        nblk = torch.div(tail + g + blk - 1, blk, rounding_mode="floor")  # blocks each row generates into
        hostv = torch.stack([full.max(), nblk.max()]).tolist()  # one sync for the loop bounds
        f_max, n_blocks = int(hostv[0]), int(hostv[1])
        width = f_max + n_blocks * blk
        off = f_max - full  # [B]
        col = torch.arange(width, device=device)
        pos = col - off[:, None]  # [B, W] absolute position of each canvas column
        in_prompt = (pos >= 0) & (pos < plen[:, None])
        gen_end = f_max + nblk * blk  # [B] first column after the row's last block
        generated = (pos >= plen[:, None]) & (col < gen_end[:, None])
        keys_real = in_prompt | generated
        # Column c of row r holds prompt index c - off_r + (P - p_r) (the prompt is left-padded to P).
        src = (pos + (p - plen)[:, None]).clamp(0, p - 1)
        prompt_cols = torch.gather(prompt_ids.long(), 1, src)
        canvas = torch.where(in_prompt, prompt_cols, torch.where(generated, mask_id, layout.pad_id))
        positions = pos.clamp(min=0)
        step_map = torch.zeros(b, width, dtype=torch.long, device=device)
        row_step = torch.zeros(b, dtype=torch.long, device=device)
        alive = torch.ones(b, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
        plan = self.quota(device)
        adaptive = self.transfer.adaptive
        snapshots: dict[int, Tensor] = {}
        nfe = iteration = 0

        ctx: KVCache | None = None
        cached_to = 0  # canvas columns [0, cached_to) have their K/V in ctx; [cached_to, s) are clean, not yet cached
        ran = torch.zeros(b, dtype=torch.long, device=device)  # blocks each row has decoded
        for j in range(n_blocks):
            s, e = f_max + j * blk, f_max + (j + 1) * blk
            alive = alive & (j < nblk)
            ran = ran + alive.long()
            iters = self._iterations(canvas[:, s:e] == mask_id, alive, plan)
            # Per-block constants (one mask and one logits index for all of the block's steps).
            window_mask: Tensor | None = None  # [B, 1, K, S + K] against this block's context, built once
            if self.use_cache:
                block_mask = block_causal_mask(positions[:, s:e], blk, keys_real[:, s:e])
                block_pos = positions[:, s:e]
            else:
                block_mask = block_causal_mask(positions[:, :e], blk, keys_real[:, :e])
                block_at = torch.arange(s, e, device=device).expand(b, blk)
            # The block's tokens and reveal steps live in contiguous [B, K] tensors updated in place; the canvas
            # gets them back once the block ends (or when a snapshot is due).
            block = canvas[:, s:e].clone()
            block_steps = step_map[:, s:e].clone()
            alive_col = alive[:, None]
            for i in range(iters):
                masked = (block == mask_id) & alive_col  # [B, K]
                if adaptive and not bool(masked.any()):  # one sync per step only for data-dependent rules
                    break
                if self.use_cache:
                    # The clean columns not cached yet (the prompt's full blocks, the block just finished) ride
                    # along with this step's forward: no separate "store" forward as in the reference.
                    c = cached_to
                    if c < s:  # only at a block's first step, when the canvas still holds `block`
                        logits, new = self._window(
                            model, canvas[:, c:e], positions[:, c:e], keys_real[:, c:e], ctx, blk
                        )
                        ctx = new if ctx is None else KVCache.cat([ctx, new])
                        cached_to = s
                    else:
                        if window_mask is None:
                            window_mask = (
                                block_mask
                                if ctx is None
                                else context_window_mask(ctx.key_mask, block_mask, b, ctx.seq_len)
                            )
                        out = model(block, attention_mask=window_mask, position_ids=block_pos, cache=ctx)
                        logits = cast(Tensor, out.logits)
                else:
                    canvas[:, s:e] = block
                    out = model(
                        canvas[:, :e], attention_mask=block_mask, position_ids=positions[:, :e], logits_at=block_at
                    )
                    logits = cast(Tensor, out.logits)
                nfe += 1
                x0, scored = sample_tokens(logits, self.temperature, self.top_k, self.top_p, generator)
                conf = self.confidence(scored, x0, generator=generator)
                quota = plan[i] if i < self.denoising_steps else plan.new_zeros(())  # adaptive rules may run longer
                reveal = self.transfer.select(conf, masked, quota.expand(b)) & masked
                row_step += masked.any(dim=1)
                torch.where(reveal, x0, block, out=block)
                torch.where(reveal, row_step[:, None], block_steps, out=block_steps)
                iteration += 1
                if iteration in record:
                    canvas[:, s:e] = block
                    snapshots[iteration] = self._gather(canvas, real, prompt_ids, plen, off, nblk, tail, layout.pad_id)[
                        0
                    ]
            canvas[:, s:e] = block
            step_map[:, s:e] = block_steps
            stopped = ((block[:, :, None] == stop_ids).any(dim=2) & generated[:, s:e]).any(dim=1)
            alive = alive & ~stopped
            if j + 1 == n_blocks or not bool((alive & (j + 1 < nblk)).any()):
                break

        # Positions of blocks a row never decoded (it stopped before them) are not generated.
        decoded = col[None, :] < (f_max + ran * blk)[:, None]
        generated = generated & decoded
        canvas = torch.where(in_prompt | generated, canvas, layout.pad_id)
        step_map = torch.where(generated, step_map, 0)
        tokens, steps_out, gen_mask = self._gather(
            canvas, real, prompt_ids, plen, off, nblk, tail, layout.pad_id, step_map, generated
        )
        return SamplerOutput(
            tokens=tokens,
            step_map=steps_out,
            nfe=nfe,
            snapshots=snapshots or None,
            attention_mask=torch.cat([real, gen_mask], dim=1),
        )

    def _iterations(self, masked: Tensor, alive: Tensor, plan: Tensor) -> int:
        """Steps to run on a block: enough for the static plan to fill every alive row (one host sync per block).

        Adaptive rules get ``max(steps, B)`` and stop early when the block is full.
        """
        if self.transfer.adaptive:
            return max(self.denoising_steps, self.block_length)
        need = (masked & alive[:, None]).sum(dim=1)  # [B]
        # Static: steps until the cumulative quota covers the row's masks (the plan sums to B >= masks).
        steps = (plan.cumsum(0)[None, :] < need[:, None]).sum(dim=1) + (need > 0).long()
        return int(steps.max())

    @staticmethod
    def _window(
        model: Backbone, ids: Tensor, pos: Tensor, keys_real: Tensor, ctx: KVCache | None, blk: int
    ) -> tuple[Tensor, KVCache]:
        """A cached step that also caches clean columns: the active block's logits and the clean columns' K/V.

        ``ids`` ``[B, C + K]`` = clean columns not cached yet (``C`` > 0, whole blocks) followed by the active block;
        the window attends to ``ctx`` and block-causally on the sampler's own grid inside (bidirectional within the
        active block, whatever the model's ``block_size``).

        Returns:
            ``(logits [B, K, V], cache of the C clean columns)``.
        """
        k = blk
        width = ids.shape[1]
        at = torch.arange(width - k, width, device=ids.device).expand(ids.shape[0], k)
        mask = block_causal_mask(pos, blk, keys_real)
        out = model(ids, attention_mask=mask, position_ids=pos, cache=ctx, logits_at=at, return_cache=True)
        assert out.logits is not None
        assert out.cache is not None
        clean = out.cache.select(slice(0, width - k))
        return out.logits, dataclasses.replace(clean, key_mask=keys_real[:, : width - k])

    def _gather(
        self,
        canvas: Tensor,
        real: Tensor,
        prompt_ids: Tensor,
        plen: Tensor,
        off: Tensor,
        nblk: Tensor,
        tail: Tensor,
        pad_id: int,
        step_map: Tensor | None = None,
        generated: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Back from the block-aligned canvas to ``[prompt as given | generated positions]`` rows.

        Returns:
            ``tokens`` ``[B, P + G']``, ``step_map`` ``[B, P + G']`` (zeros when ``step_map`` is None) and the
            ``[B, G']`` bool mask of generated positions.
        """
        b, p = prompt_ids.shape
        n_gen = nblk * self.block_length - tail  # [B] canvas positions after the prompt
        width = int(n_gen.max())
        k = torch.arange(width, device=canvas.device)
        src = (off + plen)[:, None] + k[None, :]
        inside = (k[None, :] < n_gen[:, None]) & (src < canvas.shape[1])
        src = src.clamp(max=canvas.shape[1] - 1)
        gen_tokens = torch.gather(canvas, 1, src)
        gen_mask = inside if generated is None else inside & torch.gather(generated, 1, src)
        gen_tokens = torch.where(gen_mask, gen_tokens, pad_id)
        tokens = torch.cat([prompt_ids.long(), gen_tokens], dim=1)
        steps = torch.zeros(b, p + width, dtype=torch.long, device=canvas.device)
        if step_map is not None:
            steps[:, p:] = torch.where(gen_mask, torch.gather(step_map, 1, src), 0)
        return tokens, steps, gen_mask
