"""Shared pieces of the RL stage tests (imported by test_unigrpo*.py and test_tracerl.py; not collected)."""

from collections.abc import Sequence
from typing import Any

import lightning as L

from dllm_zoo.rewards import Reward


class Sevens(Reward):
    """Share of '7' characters in the completion: an easy target that only the policy gradient can raise."""

    name = "sevens"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        return [c.count("7") / max(1, len(c)) for c in completions]


class RewardTrace(L.Callback):
    """Records ``train/reward/<name>`` after every training batch."""

    def __init__(self, name: str) -> None:
        self.key = f"train/reward/{name}"
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.values.append(float(trainer.callback_metrics[self.key]))


def fit_quietly(stage: L.LightningModule, data: L.LightningDataModule, steps: int, **trainer: Any) -> L.Trainer:
    """Fit ``steps`` optimizer steps on CPU without logger, checkpoints, validation or the held-out report."""
    t = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
        log_every_n_steps=1,
        **trainer,
    )
    stage.on_train_start = lambda: None  # type: ignore[method-assign]  # skip the held-out report: speed
    stage.on_train_end = lambda: None  # type: ignore[method-assign]
    t.fit(stage, data)
    return t
