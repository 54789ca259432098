"""What every training stage shares: late backbone construction, layout checks, per-step RNG, optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from dllm_zoo.backbones.base import Backbone
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

    # ------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        """AdamW (no decay on norms, embeddings, biases) with per-step warmup + cosine."""
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        opt, sched = build_optimizer(self, self.optim, max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
