"""Masked-diffusion pretraining (LLaDA, Nie et al. 2025 §2.1; MMaDA ``lm`` task, research/mmada.md §4.1)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jsonargparse import lazy_instance
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones.attention import packed_mask
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
        adapter: Train a LoRA / QLoRA adapter (:class:`~dllm_zoo.adapters.LoRA`, ``--model.adapter.*``) instead of
            every weight; ``None`` = full training.
    """

    def __init__(
        self,
        backbone: BackboneFactory | Backbone = lambda: LLaDABackbone("tiny"),
        schedule: NoiseSchedule = lazy_instance(LinearSchedule),
        loss: MaskedDiffusionLoss = lazy_instance(MaskedDiffusionLoss),
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
        adapter: LoRA | None = None,
    ) -> None:
        super().__init__(backbone, optim, seed, adapter)
        self.schedule = schedule
        self.loss_fn = loss
        self.save_hyperparameters(ignore=["backbone", "schedule", "loss", "optim", "adapter"])
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.hparams["optim"] = dataclasses.asdict(optim)
        self.hparams["adapter"] = None if self.adapter is None else self.adapter.to_dict()

    def forward_loss(self, batch: dict[str, Any], batch_idx: int, stream: int = 0, per_step: bool = True) -> LossOutput:
        """Corrupt ``batch`` and compute the loss (shared by training and validation).

        Packed rows (``segment_ids``/``position_ids`` in the batch) get one ``t`` per sample, attention only inside
        each sample and positions restarting at 0 per sample.
        """
        attention: Tensor = batch["attention_mask"]
        noised = self.corrupt(batch, self.schedule, self.step_generator(batch_idx, stream, per_step))
        segments = batch.get("segment_ids")
        mask = attention if segments is None else packed_mask(segments, attention)
        out = self.net(
            noised.noisy, attention_mask=mask, position_ids=batch.get("position_ids"), logits_at=noised.masked
        )
        assert out.logits is not None
        return self.masked_loss(out.logits, batch, noised)
