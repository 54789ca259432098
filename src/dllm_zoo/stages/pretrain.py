"""Masked-diffusion pretraining (LLaDA, Nie et al. 2025 §2.1; MMaDA ``lm`` task, research/mmada.md §4.1)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jsonargparse import lazy_instance
from torch import Tensor

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.llada import LLaDABackbone
from dllm_zoo.losses.masked_diffusion import LossOutput, MaskedDiffusionLoss
from dllm_zoo.schedules.base import NoiseSchedule
from dllm_zoo.schedules.linear import LinearSchedule
from dllm_zoo.stages.base import BackboneFactory, DiffusionStage
from dllm_zoo.stages.optim import OptimConfig


class MaskedDiffusionPretraining(DiffusionStage):
    """Train a mask predictor: corrupt with the schedule, predict the masked tokens, weighted CE.

    Each row draws its own ``t``; every maskable token (not prompt, not attention padding) is masked by the
    schedule; logits are computed only at masked positions; the loss object weights and normalises
    (default LLaDA pretraining: ``Σ CE/p ÷ B·L``). With ``MaskedDiffusionLoss.sft()`` and a data format that
    marks prompts (``lm_chat``) the same stage is LLaDA-style SFT.

    Batches are dicts with ``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]`` bool and ``prompt_mask``
    ``[B, L]`` bool; optional scalar counters ``data_errors`` and ``truncated`` are logged.

    Args:
        backbone: Backbone factory (see :class:`DiffusionStage`).
        schedule: Noise schedule shared with the samplers.
        loss: Weighting and normalisation.
        optim: Optimizer settings.
        seed: Seed of the masking random source.
    """

    def __init__(
        self,
        backbone: BackboneFactory | Backbone = lambda: LLaDABackbone("tiny"),
        schedule: NoiseSchedule = lazy_instance(LinearSchedule),
        loss: MaskedDiffusionLoss = lazy_instance(MaskedDiffusionLoss),
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, optim, seed)
        self.schedule = schedule
        self.loss_fn = loss
        self.save_hyperparameters(ignore=["backbone", "schedule", "loss", "optim"])
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.hparams["optim"] = dataclasses.asdict(optim)

    def forward_loss(self, batch: dict[str, Any], batch_idx: int, stream: int = 0, per_step: bool = True) -> LossOutput:
        """Corrupt ``batch`` and compute the loss (shared by training and validation)."""
        ids: Tensor = batch["input_ids"]
        attention: Tensor = batch["attention_mask"]
        maskable = attention & ~batch["prompt_mask"]
        noised = self.schedule.add_noise(
            ids, maskable, self.layout.mask_id, generator=self.step_generator(batch_idx, stream, per_step)
        )
        out = self.net(noised.noisy, attention_mask=attention, logits_at=noised.masked)
        assert out.logits is not None
        return self.loss_fn(
            out.logits,
            ids[noised.masked],
            noised.masked,
            p_mask=noised.p_mask,
            t=noised.t,
            answer_length=maskable.sum(dim=1),
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One optimisation step; logs ``train/loss``, ``train/ce``, masked-token count and data counters."""
        out = self.forward_loss(batch, batch_idx)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/ce", out.ce, batch_size=bs)
        self.log("train/masked_tokens", out.num_masked.float(), batch_size=bs)
        for key in ("data_errors", "dropped", "truncated"):
            if key in batch:
                self.log(f"data/{key}", batch[key].float(), reduce_fx="sum", batch_size=bs)
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss on held-out data with masks that depend only on ``batch_idx`` (comparable across runs)."""
        out = self.forward_loss(batch, batch_idx, stream=1, per_step=False)
        bs = batch["input_ids"].shape[0]
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("val/ce", out.ce, batch_size=bs)
