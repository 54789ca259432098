"""Where a UniGRPO step spends its time: model forward/backward passes versus everything else.

    python benchmarks/unigrpo_step.py                          # the default recipe's shapes, mini preset, JSON out
    python benchmarks/unigrpo_step.py --pretrained DIR         # from a warm start (rewards then vary)

Runs the :class:`~dllm_zoo.stages.UniGRPO` stage under ``Trainer.fit`` with the default recipe's settings (8 prompts x
8 generations, 64-token canvases, 64 sampler steps in random commit order, μ = 2, KL against a frozen reference,
correctness + format rewards). For every RL step after ``--warmup`` it records the wall time between consecutive batch
ends (data loading, Lightning hooks and logging included) and the stage's timers: ``generate`` (the sampler),
``logp_old`` / ``logp_ref`` (no-grad passes), ``forward_backward`` (the policy's passes with gradients); the rest —
decoding, rewards, advantages, masks, optimizer step, logging, data — is the time outside the model. Target:
under 10 %.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.data import Arithmetic, PromptDataModule
from dllm_zoo.rewards import ArithmeticCorrectness, ThinkFormat
from dllm_zoo.rl import ClippedSurrogate, UniformlySpacedMasking
from dllm_zoo.samplers import LLaDASampler, RandomConfidence
from dllm_zoo.stages import OptimConfig, UniGRPO
from dllm_zoo.stages.unigrpo import MODEL_TIMERS


class StepTimes(L.Callback):
    """Wall time between consecutive batch ends plus a copy of the stage's timers for that step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            record = dict(pl_module.timers)
            record["wall"] = now - self._last
            self.steps.append(record)
        self._last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--pretrained", default=None, help="backbone directory (e.g. the recipe's warm start)")
    parser.add_argument("--steps", type=int, default=12, help="RL steps measured")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--inner", type=int, default=2)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--sampler-steps", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "unigrpo_step.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = LLaDABackbone(pretrained=args.pretrained) if args.pretrained else LLaDABackbone(args.preset)
    stage = UniGRPO(
        backbone=backbone,
        sampler=LLaDASampler(
            gen_length=args.gen_length,
            block_length=args.gen_length,
            steps=args.sampler_steps,
            temperature=1.0,
            confidence=RandomConfidence(),
        ),
        rewards=[ArithmeticCorrectness(), ThinkFormat()],
        reward_weights=[2.0, 0.5],
        objective=ClippedSurrogate(eps=0.2, beta=0.04, kl_against="reference"),
        masking=UniformlySpacedMasking(),
        num_generations=args.generations,
        inner_iterations=args.inner,
        optim=OptimConfig(lr=2e-4, weight_decay=0.0, warmup_steps=1, min_lr_scale=1.0),
    )
    data = PromptDataModule(task=Arithmetic(num_val=8), batch_size=args.prompts, max_prompt_len=64)
    timer = StepTimes()
    total_steps = args.steps + args.warmup + 1
    trainer = L.Trainer(
        max_steps=total_steps * args.inner,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[timer],
    )
    stage.on_train_start = lambda: None  # type: ignore[method-assign]  # no held-out pass: timing only
    stage.on_train_end = lambda: None  # type: ignore[method-assign]
    trainer.fit(stage, data)
    steps = timer.steps[args.warmup :]

    def med(key: str) -> float:
        return statistics.median(s.get(key, 0.0) for s in steps)

    model = [sum(s.get(k, 0.0) for k in MODEL_TIMERS) for s in steps]
    outside = [s["wall"] - m for s, m in zip(steps, model)]
    rollouts = args.prompts * args.generations
    result = {
        "benchmark": "unigrpo_step",
        "device": str(stage.device),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "preset": args.preset if not args.pretrained else args.pretrained,
        "rollouts_per_step": rollouts,
        "inner_iterations": args.inner,
        "gen_length": args.gen_length,
        "sampler_steps": args.sampler_steps,
        "measured_steps": len(steps),
        "median_seconds": {
            "step_wall": med("wall"),
            **{k: med(k) for k in (*MODEL_TIMERS, "decode", "reward", "advantage", "optimizer")},
        },
        "outside_model_fraction_median": statistics.median(o / s["wall"] for o, s in zip(outside, steps)),
        "outside_model_fraction_total": sum(outside) / sum(s["wall"] for s in steps),
        "rollout_tokens_per_second": rollouts * args.gen_length / med("generate"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
