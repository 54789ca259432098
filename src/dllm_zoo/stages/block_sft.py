"""Block-diffusion SFT on ``[x_t | x_0]`` rows (SDAR's official training, research/tracerl_llada.md §3.2)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from jsonargparse import lazy_instance
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones.attention import sdar_training_mask
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.sdar import SDARBackbone
from dllm_zoo.losses.masked_diffusion import LossOutput, MaskedDiffusionLoss
from dllm_zoo.schedules.base import NoisedBatch, NoiseSchedule
from dllm_zoo.schedules.linear import LinearSchedule
from dllm_zoo.stages.base import BackboneFactory, DiffusionStage
from dllm_zoo.stages.optim import OptimConfig

DEFAULT_BLOCK_SIZE = 4


class BlockDiffusionSFT(DiffusionStage):
    """Supervised fine-tuning of a block-diffusion model: noisy and clean copies in one row, block attention.

    Per step (SDAR, research/tracerl_llada.md §3.2):

    1. Every sample (each packed segment, or each row when the batch is not packed) draws one ``t ~ U(0, 1)``;
       its response tokens are masked i.i.d. with ``p = mask_prob(t)`` (``(1 − ε)t + ε``, ε = 1e-3, with the
       default :class:`LinearSchedule`), at least one per sample. The prompt is never masked.
    2. The model sees ``[x_t | x_0]`` (``2L`` tokens, positions duplicated) under
       :func:`~dllm_zoo.backbones.attention.sdar_training_mask`: ``x_t`` tokens attend to their own noisy block and
       to the clean earlier blocks, ``x_0`` is block-causal, samples never see each other. Blocks lie on the
       absolute grid ``position // block_size`` of each sample, as at inference.
    3. Logits are computed only at the masked ``x_t`` positions; the ``x_0`` half gets no loss. The loss is
       ``Σ_masked CE/p ÷ |answer|`` per sample, averaged over the samples of the batch
       (:meth:`MaskedDiffusionLoss.sft`; with packing the answer length is per packed sample).

    Any :class:`~dllm_zoo.backbones.base.Backbone` works: the stage passes a ``[B, 1, 2L, 2L]`` bool mask and
    ``position_ids``, which replace whatever attention the family uses by default.

    Batches: ``input_ids``, ``attention_mask`` (key padding), ``prompt_mask`` ``[B, L]``; optional
    ``segment_ids`` and ``position_ids`` ``[B, L]`` from packed data
    (:class:`~dllm_zoo.data.TextDiffusionDataModule` with ``pack=True``); optional counters ``data_errors``,
    ``dropped``, ``truncated``. Unpacked rows keep their EOS padding as answer tokens (LLaDA SFT convention);
    packed samples have none, so their answer is the response plus its EOS.

    Args:
        backbone: Backbone factory (see :class:`DiffusionStage`); default ``SDARBackbone("tiny")``.
        block_size: Tokens per attention block ``B``. ``None``: the backbone's ``config.block_size`` when it has
            one (SDAR/TraDo: 4), else 4.
        schedule: Noise schedule shared with the samplers (packed rows need one that supports ``sample_ids``,
            e.g. the default :class:`LinearSchedule`).
        loss: Weighting and normalisation; default SDAR's ``Σ CE/p ÷ |answer|`` (:meth:`MaskedDiffusionLoss.sft`).
        optim: Optimizer settings.
        seed: Seed of the masking random source.
        adapter: Train a LoRA / QLoRA adapter (:class:`~dllm_zoo.adapters.LoRA`, ``--model.adapter.*``) instead of
            every weight; ``None`` = full training.
    """

    def __init__(
        self,
        backbone: BackboneFactory | Backbone = lambda: SDARBackbone("tiny"),
        block_size: int | None = None,
        schedule: NoiseSchedule = lazy_instance(LinearSchedule),
        loss: MaskedDiffusionLoss = lazy_instance(MaskedDiffusionLoss, normalization="answer_length"),
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
        adapter: LoRA | None = None,
    ) -> None:
        super().__init__(backbone, optim, seed, adapter)
        if block_size is not None and block_size <= 0:
            raise ValueError(f"--model.block_size must be > 0, got {block_size}")
        self.requested_block_size = block_size
        self.schedule = schedule
        self.loss_fn = loss
        self.save_hyperparameters(ignore=["backbone", "schedule", "loss", "optim", "adapter"])
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.hparams["optim"] = dataclasses.asdict(optim)
        self.hparams["adapter"] = None if self.adapter is None else self.adapter.to_dict()

    @property
    def block_size(self) -> int:
        """The block size in use: the ``block_size`` argument, else the backbone's ``config.block_size``, else 4."""
        if self.requested_block_size is not None:
            return self.requested_block_size
        config_block = getattr(getattr(self.net, "config", None), "block_size", None)
        return int(config_block) if isinstance(config_block, int) and config_block > 0 else DEFAULT_BLOCK_SIZE

    # -------------------------------------------------------------------- loss
    def loss_for(self, batch: dict[str, Any], noised: NoisedBatch) -> LossOutput:
        """The SFT loss of ``batch`` corrupted as ``noised`` (see the class docstring)."""
        ids: Tensor = batch["input_ids"]
        attention: Tensor = batch["attention_mask"]
        b, length = ids.shape
        segments: Tensor | None = batch.get("segment_ids")
        positions: Tensor | None = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=ids.device).expand(b, length)
        mask = sdar_training_mask(positions, self.block_size, attention, segments)
        clean_half = torch.zeros_like(noised.masked)
        out = self.net(
            torch.cat([noised.noisy, ids], dim=1),
            attention_mask=mask,
            position_ids=torch.cat([positions, positions], dim=1),
            logits_at=torch.cat([noised.masked, clean_half], dim=1),  # masked x_t positions only
        )
        assert out.logits is not None
        return self.masked_loss(out.logits, batch, noised)

    def forward_loss(self, batch: dict[str, Any], batch_idx: int, stream: int = 0, per_step: bool = True) -> LossOutput:
        """Corrupt ``batch`` with the step's random source (at least one mask per sample) and compute the loss."""
        noised = self.corrupt(batch, self.schedule, self.step_generator(batch_idx, stream, per_step), at_least_one=True)
        return self.loss_for(batch, noised)
