import lightning as L
import torch
from torch.utils.data import DataLoader

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.callbacks import ThroughputMonitor, forward_flops_per_token
from dllm_zoo.stages import MaskedDiffusionPretraining, OptimConfig


def test_forward_flops_per_token_pinned_for_tiny() -> None:
    model = LLaDABackbone("tiny")
    # per layer: q,k,v,out 4·64·64 + gate,up,down 3·64·192 = 53,248 weights; 2 layers -> 2·106,496 FLOPs;
    # attention 4·seq·64 per layer; head 2·64·336 scaled by the logits fraction.
    assert forward_flops_per_token(model, 16, logits_fraction=0.5) == 2 * 106_496 + 2 * 4 * 16 * 64 + 64 * 336
    assert forward_flops_per_token(model, 16, logits_fraction=1.0) == 2 * 106_496 + 2 * 4 * 16 * 64 + 2 * 64 * 336


def test_monitor_logs_throughput_and_mfu_after_warmup() -> None:
    torch.manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, 256, (2, 16)),
            "attention_mask": torch.ones(2, 16, dtype=torch.bool),
            "prompt_mask": torch.zeros(2, 16, dtype=torch.bool),
        }
        for _ in range(5)
    ]
    monitor = ThroughputMonitor(peak_flops=1e12, warmup_steps=2)
    stage = MaskedDiffusionPretraining(backbone=LLaDABackbone("tiny"), optim=OptimConfig(warmup_steps=1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(stage, train_dataloaders=DataLoader(batches, batch_size=None))
    assert len(monitor.step_times) == 3  # steps 3..5
    metrics = trainer.callback_metrics
    assert metrics["perf/tokens_per_s"] > 0
    assert 0 < metrics["perf/mfu"] < 1
