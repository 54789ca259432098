"""What every training stage shares: late backbone construction, layout checks, per-step RNG, optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.packing import packed_sample_ids
from dllm_zoo.losses.masked_diffusion import LossOutput, MaskedDiffusionLoss
from dllm_zoo.schedules.base import NoisedBatch, NoiseSchedule
from dllm_zoo.stages.optim import OptimConfig, build_optimizer
from dllm_zoo.tokenizers.layout import TokenLayout

BackboneFactory = Callable[[], Backbone]


class DiffusionStage(L.LightningModule):
    """Base LightningModule of the dllm_zoo stages.

    * The backbone arrives as a factory and is built in :meth:`configure_model`, so sharded strategies can
      build it on the meta device (DESIGN.md §3 "Stages"). A ready :class:`Backbone` instance is accepted too.
    * :meth:`step_generator` gives a random source derived from ``(seed, rank, global_step, batch_idx)``:
      masking is different on every rank and step, and a resumed run draws exactly what the uninterrupted
      run would have drawn, with no RNG state to checkpoint.

    Args:
        backbone: A zero-argument callable returning a :class:`Backbone` (in YAML: ``class_path`` +
            ``init_args`` of a backbone class), or a backbone instance.
        optim: Optimizer and learning-rate schedule.
        seed: Seed of the per-step random source.
    """

    loss_fn: MaskedDiffusionLoss

    def __init__(self, backbone: BackboneFactory | Backbone, optim: OptimConfig, seed: int) -> None:
        super().__init__()
        self.backbone_factory = backbone
        self.backbone: Backbone | None = None
        self.optim = optim
        self.seed = seed
        if isinstance(backbone, Backbone):
            self.backbone = backbone

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the backbone (once) and check it against the data's token layout."""
        if self.backbone is None:
            built = self.backbone_factory()
            if not isinstance(built, Backbone):
                raise TypeError(f"--model.backbone must build a dllm_zoo Backbone, got {type(built).__name__}")
            self.backbone = built
        self._check_layout()

    def _check_layout(self) -> None:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        data_layout = getattr(datamodule, "layout", None)
        if isinstance(data_layout, TokenLayout) and self.backbone is not None:
            mine = self.backbone.layout
            if data_layout != mine:
                raise ValueError(
                    f"the data's token layout {data_layout.name!r} (vocab {data_layout.vocab_size}, mask "
                    f"{data_layout.mask_id}) differs from the backbone's {mine.name!r} (vocab {mine.vocab_size}, "
                    f"mask {mine.mask_id}); set --model.backbone.layout and --data.tokenizer to the same layout"
                )

    @property
    def layout(self) -> TokenLayout:
        """The backbone's token layout."""
        return self.net.layout

    @property
    def net(self) -> Backbone:
        """The built backbone (raises before :meth:`configure_model`)."""
        if self.backbone is None:
            raise RuntimeError("the backbone is built in configure_model(); call it first (Trainer does)")
        return self.backbone

    # -------------------------------------------------------------------- rng
    def step_generator(self, batch_idx: int, stream: int = 0, per_step: bool = True) -> torch.Generator:
        """A generator seeded from ``(seed, global rank, global step, batch_idx, stream)`` on this device.

        With ``per_step=False`` the global step is left out (validation: the same masks at every evaluation).
        """
        rank = self.trainer.global_rank if self._trainer is not None else 0
        step = self.trainer.global_step if self._trainer is not None and per_step else 0
        key = hash((self.seed, rank, step, batch_idx, stream)) & 0x7FFF_FFFF_FFFF_FFFF
        gen = torch.Generator(device=self.device)
        gen.manual_seed(key)
        return gen

    # ------------------------------------------------------------- corruption
    def corrupt(
        self,
        batch: dict[str, Any],
        schedule: NoiseSchedule,
        generator: torch.Generator | None = None,
        at_least_one: bool = False,
    ) -> NoisedBatch:
        """Mask the answer tokens of ``batch`` (not the prompt, not padding), one ``t`` per sample.

        A sample is a row, or a packed segment when the batch has ``segment_ids`` (then ``t``/``p_mask`` are
        ``[B·L]`` indexed by :func:`~dllm_zoo.data.packing.packed_sample_ids`).
        """
        maskable = batch["attention_mask"] & ~batch["prompt_mask"]
        segments = batch.get("segment_ids")
        return schedule.add_noise(
            batch["input_ids"],
            maskable,
            self.layout.mask_id,
            generator=generator,
            at_least_one=at_least_one,
            sample_ids=None if segments is None else packed_sample_ids(segments),
        )

    @staticmethod
    def answer_lengths(batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Answer (maskable) tokens per sample and the sample ids of packed rows.

        Returns:
            ``(answer_length, sample_ids)``: ``[B]`` and ``None`` for unpacked rows; ``[B·L]`` (indexed by sample
            id) and ``[B, L]`` for packed rows.
        """
        maskable = batch["attention_mask"] & ~batch["prompt_mask"]
        segments: Tensor | None = batch.get("segment_ids")
        if segments is None:
            return maskable.sum(dim=1), None
        sample_ids = packed_sample_ids(segments)
        total = maskable.numel()
        length = torch.zeros(total, dtype=torch.long, device=maskable.device).index_add_(
            0, sample_ids.clamp(min=0).flatten(), maskable.flatten().long()
        )
        return length, sample_ids

    def masked_loss(self, logits: Tensor, batch: dict[str, Any], noised: NoisedBatch) -> LossOutput:
        """``self.loss_fn`` over the masked positions of ``noised`` (logits ``[N, V]`` in row-major mask order)."""
        answer_length, sample_ids = self.answer_lengths(batch)
        return self.loss_fn(
            logits,
            batch["input_ids"][noised.masked],
            noised.masked,
            p_mask=noised.p_mask,
            t=noised.t,
            answer_length=answer_length,
            sample_ids=sample_ids,
        )

    # ------------------------------------------------------------------ steps
    def forward_loss(self, batch: dict[str, Any], batch_idx: int, stream: int = 0, per_step: bool = True) -> LossOutput:
        """Corrupt ``batch`` with :meth:`step_generator` and compute the stage's loss (training and validation)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_loss")

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

    # ------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        """AdamW (no decay on norms, embeddings, biases) with per-step warmup + cosine."""
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        opt, sched = build_optimizer(self, self.optim, max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
