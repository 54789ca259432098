"""Training-step throughput and CPU MFU of the masked-diffusion pretraining stage.

    python benchmarks/train_step.py                       # small preset, seq 256, batch 8 -> JSON on stdout + file

Measures, on the same initial weights and the same batches:

* ``peak``: the best fp32 matmul FLOP/s of this machine (square 2048 matmuls);
* ``plain``: a hand-written loop (mask, forward at masked positions, weighted CE, backward, AdamW step);
* ``lightning``: the full ``MaskedDiffusionPretraining`` step under ``Trainer.fit`` (optimizer, LR schedule,
  logging included), timed by :class:`dllm_zoo.callbacks.ThroughputMonitor`.

MFU = model FLOPs (3 × forward matmul FLOPs, logits at masked positions only) / step time / peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.callbacks import ThroughputMonitor, forward_flops_per_token, measure_matmul_peak
from dllm_zoo.losses import MaskedDiffusionLoss
from dllm_zoo.schedules import LinearSchedule
from dllm_zoo.stages import MaskedDiffusionPretraining, OptimConfig


def make_batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 256, (batch_size, seq_len), generator=gen),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.bool),
            "prompt_mask": torch.zeros(batch_size, seq_len, dtype=torch.bool),
        }
        for _ in range(n)
    ]


def plain_loop(state: dict, preset: str, batches: list[dict], warmup: int) -> list[float]:
    model = LLaDABackbone(preset)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    schedule, loss_fn = LinearSchedule(), MaskedDiffusionLoss.pretraining()
    gen = torch.Generator().manual_seed(0)
    mask_id = model.layout.mask_id
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        ids = batch["input_ids"]
        noised = schedule.add_noise(ids, batch["attention_mask"], mask_id, generator=gen)
        logits = model(noised.noisy, logits_at=noised.masked).logits
        loss = loss_fn(logits, ids[noised.masked], noised.masked, p_mask=noised.p_mask).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def lightning_loop(state: dict, preset: str, batches: list[dict], warmup: int, peak: float) -> ThroughputMonitor:
    backbone = LLaDABackbone(preset)
    backbone.load_state_dict(state)
    stage = MaskedDiffusionPretraining(backbone=backbone, optim=OptimConfig(lr=1e-4, warmup_steps=1))
    monitor = ThroughputMonitor(peak_flops=peak, warmup_steps=warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(stage, train_dataloaders=DataLoader(batches, batch_size=None))
    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    peak = measure_matmul_peak()
    init = LLaDABackbone(args.preset)
    state = {k: v.clone() for k, v in init.state_dict().items()}
    batches = make_batches(args.steps + args.warmup, args.batch_size, args.seq_len, init.vocab_size)
    tokens = args.batch_size * args.seq_len
    # Logits only at masked positions: with t ~ U(0,1) about half of them on average.
    flops = 3.0 * tokens * forward_flops_per_token(init, args.seq_len, logits_fraction=0.5)

    plain = plain_loop(state, args.preset, batches, args.warmup)
    monitor = lightning_loop(state, args.preset, batches, args.warmup, peak)
    light = monitor.step_times

    def summary(times: list[float]) -> dict:
        med = statistics.median(times)
        return {
            "step_s_median": med,
            "tokens_per_s": tokens / med,
            "flops_per_s": flops / med,
            "mfu": flops / med / peak,
        }

    result = {
        "benchmark": "train_step",
        "preset": args.preset,
        "params": sum(p.numel() for p in init.parameters()),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "peak_matmul_flops_per_s": peak,
        "model_flops_per_step": flops,
        "plain": summary(plain),
        "lightning": summary(light),
        "lightning_over_plain": statistics.median(plain) / statistics.median(light),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
