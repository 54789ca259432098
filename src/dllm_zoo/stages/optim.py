"""Optimizer and learning-rate schedule shared by every stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Parameters of these module types never get weight decay (nor biases, wherever they live).
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and cosine decay.

    Attributes:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay, applied to matrices only (not norms, embeddings, biases).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warmup from 0 to ``lr``.
        decay_steps: Cosine decay from ``lr`` to ``min_lr_scale·lr`` ends here; ``None`` = ``trainer.max_steps``.
        min_lr_scale: Final learning rate as a fraction of ``lr``.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None
    min_lr_scale: float = 0.1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group by module type.

    Args:
        model: Any module.
        weight_decay: Decay of the first group.

    Returns:
        Two AdamW parameter groups (empty groups are dropped).
    """
    decay: dict[int, nn.Parameter] = {}
    no_decay: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, NO_DECAY_MODULES) or name == "bias" or p.ndim < 2:
                no_decay[id(p)] = p
            else:
                decay[id(p)] = p
    for key in no_decay:  # a tied parameter seen through a no-decay module is never decayed
        decay.pop(key, None)
    groups = [
        {"params": list(decay.values()), "weight_decay": weight_decay},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_scale: float) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, cosine to ``min_lr_scale`` at ``decay_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr_scale
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr_scale + (1.0 - min_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, max_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` plus a per-step :func:`warmup_cosine` schedule.

    Raises:
        ValueError: if neither ``decay_steps`` nor a positive ``max_steps`` is known.
    """
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max_steps
    if decay_steps is None or decay_steps <= 0:
        raise ValueError("set --trainer.max_steps or --model.optim.decay_steps: the cosine decay needs an end step")
    if cfg.warmup_steps < 0 or cfg.warmup_steps > decay_steps:
        raise ValueError(f"--model.optim.warmup_steps={cfg.warmup_steps} must be in [0, decay_steps={decay_steps}]")
    warmup = max(1, cfg.warmup_steps)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=False, foreach=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, decay_steps, cfg.min_lr_scale))
    return opt, sched
