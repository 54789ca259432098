"""Training throughput: tokens/s and model FLOP utilisation (MFU) against a measured matmul peak."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import nn

from dllm_zoo.backbones.base import Backbone


def forward_flops_per_token(backbone: Backbone, seq_len: int, logits_fraction: float = 1.0) -> float:
    """Matmul FLOPs of one token's forward pass (the convention of MFU: no recompute, no elementwise ops).

    Counts ``2·(weights of every Linear inside the transformer blocks)``, the attention products
    ``4·seq_len·d_attn`` per layer (``QKᵀ`` and ``A·V``) and the vocabulary projection ``2·D·V`` scaled by
    ``logits_fraction`` (the share of positions whose logits are computed).

    Args:
        backbone: Any :class:`Backbone`.
        seq_len: Attended keys per query.
        logits_fraction: Fraction of positions projected to the vocabulary.
    """
    blocks = backbone.transformer_blocks()
    linear = sum(m.weight.numel() for blk in blocks for m in blk.modules() if isinstance(m, nn.Linear))
    attn = 0.0
    for blk in blocks:
        q = next(m for name, m in blk.named_modules() if name.endswith("q_proj"))
        attn += 4.0 * seq_len * q.weight.shape[0]
    head = backbone.output_head().weight.numel()
    return 2.0 * linear + attn + 2.0 * head * logits_fraction


def measure_matmul_peak(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best achieved FLOP/s of a square ``size × size`` matmul on the current default device (CPU here)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


class ThroughputMonitor(L.Callback):
    """Log ``perf/tokens_per_s`` and, given a peak, ``perf/mfu`` for every training step.

    Training FLOPs are ``3 ×`` forward (backward ≈ 2 × forward). Steps before ``warmup_steps`` are not
    reported (allocator and thread-pool warm-up).

    Args:
        peak_flops: The device's peak FLOP/s (e.g. from :func:`measure_matmul_peak`); ``None`` logs no MFU.
        warmup_steps: Steps to skip.
        logits_fraction: Share of positions whose logits are computed (masked positions only: about 0.5).
    """

    def __init__(self, peak_flops: float | None = None, warmup_steps: int = 2, logits_fraction: float = 0.5) -> None:
        self.peak_flops = peak_flops
        self.warmup_steps = warmup_steps
        self.logits_fraction = logits_fraction
        self.step_times: list[float] = []
        self._flops_per_token: dict[int, float] = {}  # by sequence length: the model does not change in a run
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the step clock."""
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop the clock (after backward and optimizer step) and log."""
        elapsed = time.perf_counter() - self._start
        if trainer.global_step <= self.warmup_steps:
            return
        ids = batch["input_ids"]
        backbone = getattr(pl_module, "net", None)
        if not isinstance(backbone, Backbone):
            return
        seq = ids.shape[1]
        if seq not in self._flops_per_token:
            self._flops_per_token[seq] = forward_flops_per_token(backbone, seq, self.logits_fraction)
        tokens = ids.numel()
        flops = 3.0 * tokens * self._flops_per_token[seq]
        self.step_times.append(elapsed)
        metrics = {"perf/tokens_per_s": tokens / elapsed, "perf/step_s": elapsed}
        if self.peak_flops:
            metrics["perf/mfu"] = flops / elapsed / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=ids.shape[0])
