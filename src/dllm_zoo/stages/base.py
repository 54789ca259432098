"""What every training stage shares: late backbone construction, layout checks, per-step RNG, optimizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dllm_zoo.adapters import LoRA, apply_lora, disable_adapter, has_adapter
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.packing import packed_sample_ids
from dllm_zoo.losses.masked_diffusion import LossOutput, MaskedDiffusionLoss
from dllm_zoo.parallel import FSDP2Strategy, is_sharded, shard_backbone
from dllm_zoo.schedules.base import NoisedBatch, NoiseSchedule
from dllm_zoo.stages.optim import OptimConfig, build_optimizer
from dllm_zoo.tokenizers.layout import TokenLayout

BackboneFactory = Callable[[], Backbone]

# Checkpoint entry marking a state dict that holds the adapter only (see DiffusionStage.on_save_checkpoint).
ADAPTER_CHECKPOINT_KEY = "dllm_zoo_adapter"


class DiffusionStage(L.LightningModule):
    """Base LightningModule of the dllm_zoo stages.

    * The backbone arrives as a factory and is built in :meth:`configure_model`, so sharded strategies can
      build it on the meta device (DESIGN.md §3 "Stages"). A ready :class:`Backbone` instance is accepted too.
    * :meth:`step_generator` gives a random source derived from ``(seed, rank, global_step, batch_idx)``:
      masking is different on every rank and step, and a resumed run draws exactly what the uninterrupted
      run would have drawn, with no RNG state to checkpoint.
    * With an ``adapter`` (:class:`~dllm_zoo.adapters.LoRA`) the built backbone gets LoRA layers injected in place
      (QLoRA: its block Linear layers stored as 4-bit NF4 first); only the LoRA factors train, the optimizer sees
      only them, checkpoints hold only them (the frozen base is rebuilt from ``--model.backbone`` on resume), and
      :meth:`disable_adapter` runs the base model (reference policy of the RL stages).

    Args:
        backbone: A zero-argument callable returning a :class:`Backbone` (in YAML: ``class_path`` +
            ``init_args`` of a backbone class), or a backbone instance.
        optim: Optimizer and learning-rate schedule.
        seed: Seed of the per-step random source.
        adapter: LoRA / QLoRA adapter to train instead of the full backbone; ``None`` trains every weight.
    """

    loss_fn: MaskedDiffusionLoss

    def __init__(
        self, backbone: BackboneFactory | Backbone, optim: OptimConfig, seed: int, adapter: LoRA | None = None
    ) -> None:
        super().__init__()
        # An instance is held once, as `backbone`: registered under a second name too, it would put every tensor in
        # the state dict twice and make checkpoints depend on how the stage was given its backbone.
        self.backbone_factory: BackboneFactory | None = None if isinstance(backbone, Backbone) else backbone
        self.backbone: Backbone | None = None
        self.optim = optim
        self.seed = seed
        # load_from_checkpoint passes the plain dict stored in hparams back in.
        self.adapter = LoRA(**adapter) if isinstance(adapter, Mapping) else adapter
        self._adapter_only_state = False  # set by on_load_checkpoint for load_state_dict
        if isinstance(backbone, Backbone):
            self.backbone = backbone

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the backbone (once), check it against the data's token layout, inject the adapter, and shard.

        Under a ``ModelParallelStrategy`` (:class:`~dllm_zoo.parallel.FSDP2Strategy`) a fresh backbone is built on
        the meta device and materialised shard by shard after ``fully_shard`` (see :mod:`dllm_zoo.parallel`).
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        sharded = isinstance(strategy, ModelParallelStrategy)
        if self.backbone is None:
            assert self.backbone_factory is not None  # __init__ stores a factory whenever it got no instance
            with torch.device("meta") if sharded else nullcontext():
                built = self.backbone_factory()  # `pretrained` weights are loaded for real even under meta
            if not isinstance(built, Backbone):
                raise TypeError(f"--model.backbone must build a dllm_zoo Backbone, got {type(built).__name__}")
            self.backbone = built
        self._check_layout()
        self._apply_adapter()
        if sharded and not is_sharded(self.backbone):
            assert isinstance(strategy, ModelParallelStrategy)
            policy = strategy.sharding if isinstance(strategy, FSDP2Strategy) else None
            assert self.device_mesh is not None  # set by the strategy before configure_model
            if self.device_mesh["tensor_parallel"].size() > 1:
                # Lightning's plain ModelParallelStrategy defaults to tensor parallelism inside a node; the backbones
                # have no tensor-parallel plan, so each rank would silently train its own unsynchronised copy.
                raise ValueError(
                    f"--trainer.strategy: tensor_parallel_size={self.device_mesh['tensor_parallel'].size()} is not "
                    "supported (the backbones have no tensor-parallel plan). Use "
                    "--trainer.strategy dllm_zoo.parallel.FSDP2Strategy (recipes/configs/strategies/fsdp2.yaml), or "
                    "ModelParallelStrategy with data_parallel_size=<world size> and tensor_parallel_size=1"
                )
            mesh = self.device_mesh["data_parallel"]
            shard_backbone(self.backbone, mesh, policy, device=strategy.root_device, seed=self.seed)

    def _apply_adapter(self) -> None:
        """Inject ``self.adapter`` into the built backbone, once (``configure_model`` may run several times).

        A backbone that already holds an adapter (a stage re-configured, or a user's pre-adapted instance) is left
        as it is. QLoRA quantises on the trainer's device, so a checkpoint loaded on CPU reaches a GPU as 4-bit.
        """
        if self.adapter is None or self.backbone is None or has_adapter(self.backbone):
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        apply_lora(self.backbone, self.adapter, device=device)

    def disable_adapter(self) -> AbstractContextManager[None]:
        """Context manager: the backbone computes its base model (adapter off), e.g. an RL reference policy.

        Raises:
            ValueError: when the stage has no adapter (``--model.adapter`` unset).
        """
        return disable_adapter(self.net)

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
        # Each rank validates its own share: average over ranks (one all-reduce per key at epoch end).
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/ce", out.ce, batch_size=bs, sync_dist=True)

    # ------------------------------------------------------------ checkpoints
    def _frozen_backbone_keys(self) -> set[str]:
        """State-dict keys (of this stage) of the backbone's frozen tensors."""
        net = self.net
        trainable = {id(p) for p in net.parameters() if p.requires_grad}  # the adapter, plus anything user-unfrozen
        return {f"backbone.{k}" for k, v in net.state_dict(keep_vars=True).items() if id(v) not in trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With an adapter on a pretrained base, keep only the adapter's tensors (the frozen base is not saved).

        The base is rebuilt from ``--model.backbone`` (the same ``pretrained`` directory) when the run resumes; an
        8B LoRA checkpoint is then megabytes, not 16 GB. Sharded (FSDP2) checkpoints keep everything. A base
        initialised here (no ``pretrained``) is saved with the adapter, since nothing could rebuild it, except under
        QLoRA: bitsandbytes' 4-bit weights cannot be loaded back through ``load_state_dict``, so that base is
        rebuilt from the recipe's seed (and a warning says so on resume).
        """
        if self.backbone is None or not has_adapter(self.backbone):
            return
        base = self.net.pretrained_from
        quantized = self.adapter is not None and self.adapter.quantize is not None
        state = checkpoint["state_dict"]
        # Sharded checkpoints keep the base: each rank writes only its shards, and the distributed loader restores
        # the module's full key set.
        drop = (base is not None or quantized) and not is_sharded(self.net)
        dropped = self._frozen_backbone_keys() & set(state) if drop else set()
        for key in dropped:
            del state[key]
        checkpoint[ADAPTER_CHECKPOINT_KEY] = {
            "adapter": self.adapter.to_dict() if self.adapter is not None else None,
            "base": base,
            "frozen_keys_not_saved": len(dropped),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Note whether the checkpoint holds the adapter only (for :meth:`load_state_dict`) and check it fits.

        Raises:
            ValueError: when the checkpoint's adapter differs from ``--model.adapter`` in anything but dropout.
        """
        entry = checkpoint.get(ADAPTER_CHECKPOINT_KEY)
        self._adapter_only_state = isinstance(entry, dict) and entry.get("frozen_keys_not_saved", 0) > 0
        if self._adapter_only_state and entry.get("base") is None:  # type: ignore[union-attr]
            rank_zero_warn(
                "this QLoRA checkpoint's base was initialised from the seed, not loaded from `pretrained`: it is "
                "rebuilt the same way now, which matches the trained run only with the same seed and --model.backbone"
            )
        saved = entry.get("adapter") if isinstance(entry, dict) else None
        if saved is None or self.adapter is None:
            return
        mine = self.adapter.to_dict()
        differ = [f"{k}={saved.get(k)!r} (now {mine[k]!r})" for k in mine if k != "dropout" and saved.get(k) != mine[k]]
        if differ:
            raise ValueError(
                "the checkpoint was trained with another adapter: set --model.adapter to match it: " + ", ".join(differ)
            )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; an adapter-only checkpoint may lack exactly the frozen backbone tensors.

        Raises:
            RuntimeError: when an adapter-only checkpoint meets a stage without adapter, or (``strict``) has
                unexpected keys or lacks an adapter tensor.
        """
        if not self._adapter_only_state:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._adapter_only_state = False
        if self.backbone is None or not has_adapter(self.backbone):
            raise RuntimeError(
                "this checkpoint holds LoRA adapter weights only (no base weights): build the stage with the "
                "--model.adapter it was trained with"
            )
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = sorted(set(result.missing_keys) - self._frozen_backbone_keys())
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"the adapter checkpoint does not fit this stage's --model.adapter: missing adapter tensors "
                f"{missing[:5]}, unexpected keys {list(result.unexpected_keys)[:5]}"
            )
        return result

    # ------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        """AdamW (no decay on norms, embeddings, biases) with per-step warmup + cosine."""
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        opt, sched = build_optimizer(self, self.optim, max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
