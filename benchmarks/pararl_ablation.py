"""ParaRL (step-level rewards) vs output-level RL from one parallel-SFT model, same rollouts (the paper's ablation).

    python benchmarks/pararl_ablation.py runs/mmada_parallel/sft --steps 40 --seeds 0 1

Each run is ``python recipes/mmada_parallel.py fit --config recipes/configs/mmada_parallel/pararl.yaml`` from the
given backbone directory with ``--model.reward_level L --seed_everything S --model.seed S --trainer.max_steps N``
(4 prompts x 8 rollouts per step, 3 chosen steps, alignment F1 reward): both levels train on the same chosen steps'
tokens, so the rollout budget and the training compute are equal. Before RL and after each run the policy answers
the held-out ParaBench prompts of the default (``--limit`` per task) with the pararl config's sampler, once per
``--eval_seeds`` value. Results go to ``benchmarks/results/pararl_ablation.json`` after every run (finished runs are
kept on a rerun with the same budget).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dllm_zoo.backbones.base import Backbone  # noqa: E402
from dllm_zoo.data import ParallelDataModule  # noqa: E402
from dllm_zoo.parabench import AXES  # noqa: E402
from dllm_zoo.recipe import run_recipe  # noqa: E402
from dllm_zoo.samplers import ParallelSampler  # noqa: E402
from dllm_zoo.stages import DiffusionStage  # noqa: E402
from mmada_parallel import DEFAULT_CONFIG, MMaDAParallelCLI  # noqa: E402
from parallel_modes import default_parts, load_model, overall_means  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PARARL_CONFIG = ROOT / "recipes" / "configs" / "mmada_parallel" / "pararl.yaml"


def heldout(model: Backbone, dm: ParallelDataModule, sampler: ParallelSampler, limit: int, seeds: list[int]) -> dict:
    """Overall ParaBench means of ``model`` averaged over sampler seeds (and the per-seed output alignment)."""
    per_seed = overall_means(model, sampler, dm, limit, seeds)
    out: dict[str, Any] = {a: statistics.fmean(m[a] for m in per_seed) for a in AXES if a in per_seed[0]}
    out["output_alignment_per_seed"] = [m["output_alignment"] for m in per_seed]
    return out


def run(
    model_dir: Path,
    level: str,
    seed: int,
    steps: int,
    logs: Path,
    lr: float | None = None,
    metric: str | None = None,
) -> DiffusionStage:
    """One ParaRL recipe run (``lr``, ``metric``: the learning rate and PartialAlignment metric, ``None`` = the
    config's); returns the stage."""
    args = [
        "fit",
        f"--config={PARARL_CONFIG}",
        f"--model.init_args.backbone.init_args.pretrained={model_dir}",
        f"--model.init_args.reward_level={level}",
        f"--seed_everything={seed}",
        f"--model.init_args.seed={seed}",
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",  # the reward curves (train/output_alignment) in the run logs
        "--trainer.enable_checkpointing=false",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks=null",
        # the stage scores its val split before and after; this script scores ParaBench itself, so keep that short
        "--data.init_args.task.init_args.num_val=32",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.logger.init_args.name={level}_seed{seed}",
    ]
    if lr is not None:
        args.append(f"--model.init_args.optim.lr={lr}")
    if metric is not None:
        args.append(f"--model.init_args.reward.init_args.metric={metric}")
    cli = run_recipe(DiffusionStage, ParallelDataModule, DEFAULT_CONFIG, args, cli_class=MMaDAParallelCLI)
    return cli.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the parallel-SFT backbone directory (convert-checkpoint output)")
    parser.add_argument("--levels", nargs="+", default=["step", "output"], choices=["step", "output"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="RL steps per run")
    parser.add_argument("--limit", type=int, default=64, help="held-out prompts per task")
    parser.add_argument("--eval_seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--lr", type=float, default=None, help="policy learning rate (default: pararl.yaml's)")
    parser.add_argument("--metric", choices=["f1", "pixels"], default=None, help="reward (default: pararl.yaml's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pararl_ablation.json")
    args = parser.parse_args()
    budget = {
        "model": str(args.model),
        "steps": args.steps,
        "limit": args.limit,
        "eval_seeds": args.eval_seeds,
        "lr": args.lr,
        "metric": args.metric,
    }
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if report.get("budget") != budget:
        report = {}  # another model or budget: start over
    report.update(
        what="ParaRL (reward at 3 chosen denoising steps) vs output-level RL (final-sample reward), same rollouts",
        command="python benchmarks/pararl_ablation.py " + " ".join(sys.argv[1:]),
        machine=f"{torch.get_num_threads()} CPU threads, float32",
        budget=budget,
    )
    runs: dict[str, dict[str, Any]] = report.setdefault("runs", {})
    dm, _ = default_parts()
    logs = RESULTS / "pararl_ablation_logs"
    for seed in args.seeds:  # seed-major: a partial run still compares the levels on the same seeds
        for level in args.levels:
            if str(seed) in runs.get(level, {}):
                continue
            start = time.perf_counter()
            stage = run(args.model, level, seed, args.steps, logs, args.lr, args.metric)
            sampler = stage.sampler
            assert isinstance(sampler, ParallelSampler)
            if "before" not in report:
                report["before"] = heldout(load_model(args.model).eval(), dm, sampler, args.limit, args.eval_seeds)
            result = heldout(stage.net, dm, sampler, args.limit, args.eval_seeds)
            result["seconds"] = time.perf_counter() - start
            runs.setdefault(level, {})[str(seed)] = result
            report["summary"] = {
                lv: {
                    "output_alignment": statistics.fmean(r["output_alignment"] for r in by_seed.values()),
                    "output_alignment_f1": statistics.fmean(r["output_alignment_f1"] for r in by_seed.values()),
                    "seeds": len(by_seed),
                }
                for lv, by_seed in runs.items()
            }
            args.out.write_text(json.dumps(report, indent=1) + "\n")
            print(level, seed, {k: v for k, v in result.items() if k.startswith("output")}, flush=True)
    print(json.dumps(report.get("summary"), indent=1))


if __name__ == "__main__":
    main()
