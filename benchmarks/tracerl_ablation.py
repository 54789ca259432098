"""TraceRL vs random-masking vs coupled RL on one warm start and one rollout budget (the paper's Figure 1, toy scale).

    python benchmarks/tracerl_ablation.py                              # 3 objectives x 5 seeds, ~60 min on 2 cores
    python benchmarks/tracerl_ablation.py --baselines trace random_masking --seeds 0 1

Each run is ``python recipes/tracerl.py fit --model.baseline B --seed_everything S --model.seed S`` (the recipe's
embedded default: the cached SDAR warm start, 200 RL steps x 8 prompts x 8 rollouts). After it, the final policy is
scored on the held-out prompts two ways:

* ``greedy``: accuracy of one greedy decode per prompt (the recipe's ``val/accuracy``; 96 prompts, so one prompt is
  1 point and seeds differ by several);
* ``sampled``: accuracy of ``--samples`` decodes per prompt at the rollout temperature (T = 1), the quantity RL
  optimises, with a standard error ``sqrt(p(1-p)/n)`` far below the greedy one's.

Results go to ``benchmarks/results/tracerl_ablation.json`` after every run (finished runs are kept on a rerun).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from dllm_zoo.backbones import SDARBackbone  # noqa: E402
from dllm_zoo.backbones.base import Backbone  # noqa: E402
from dllm_zoo.data import PromptDataModule  # noqa: E402
from dllm_zoo.evaluation import evaluate_task  # noqa: E402
from dllm_zoo.recipe import run_recipe  # noqa: E402
from dllm_zoo.samplers import BlockSampler  # noqa: E402
from dllm_zoo.stages import TraceRL  # noqa: E402
from dllm_zoo.tokenizers import ByteTokenizer  # noqa: E402
from tracerl import DEFAULT_CONFIG, WARM_START, TraceRLCLI  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def heldout(model: Backbone, data: PromptDataModule, sampler: BlockSampler, samples: int) -> dict[str, float]:
    """Greedy and sampled held-out accuracy of ``model`` on the recipe's validation prompts.

    Args:
        model: The policy backbone.
        data: The recipe's data module (its task and validation split).
        sampler: The recipe's rollout sampler (its temperature is used for ``sampled``; greedy sets it to 0).
        samples: Sampled decodes per prompt (each with its own seed).
    """
    tok = ByteTokenizer(model.layout)
    task = data.task
    greedy_sampler = BlockSampler(
        gen_length=sampler.gen_length,
        block_length=sampler.block_length,
        denoising_steps=sampler.denoising_steps,
        confidence=sampler.confidence,
        transfer=sampler.transfer,
        temperature=0.0,
    )
    greedy = evaluate_task(model, tok, greedy_sampler, task, batch_size=32)
    runs = [evaluate_task(model, tok, sampler, task, batch_size=32, seed=seed).accuracy for seed in range(samples)]
    n = greedy.num_samples * samples
    p = sum(runs) / samples
    return {
        "greedy": greedy.accuracy,
        "sampled": p,
        "sampled_stderr": math.sqrt(p * (1 - p) / n),
        "prompts": greedy.num_samples,
        "sampled_decodes": n,
    }


def run(baseline: str, seed: int, steps: int, logs: Path) -> tuple[TraceRL, PromptDataModule]:
    """One TraceRL recipe run; returns the trained stage and its data module."""
    args = [
        "fit",
        f"--model.baseline={baseline}",
        f"--seed_everything={seed}",
        f"--model.seed={seed}",
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=null",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.logger.init_args.name={baseline}_seed{seed}",
    ]
    cli = run_recipe(TraceRL, PromptDataModule, DEFAULT_CONFIG, args, cli_class=TraceRLCLI)
    return cli.model, cli.datamodule


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of each metric, per objective."""
    out: dict[str, Any] = {}
    for baseline, by_seed in runs.items():
        seeds = [v for k, v in by_seed.items() if k.isdigit()]
        if not seeds:
            continue
        out[baseline] = {
            metric: {
                "mean": statistics.fmean(r[metric] for r in seeds),
                "stdev_over_seeds": statistics.stdev(r[metric] for r in seeds) if len(seeds) > 1 else 0.0,
            }
            for metric in ("greedy", "sampled")
        }
        out[baseline]["seeds"] = len(seeds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baselines", nargs="+", default=["trace", "random_masking", "coupled"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=200, help="RL steps per run (the recipe's default)")
    parser.add_argument("--samples", type=int, default=8, help="sampled decodes per held-out prompt")
    parser.add_argument("--out", type=Path, default=RESULTS / "tracerl_ablation.json")
    args = parser.parse_args()
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if report.get("steps") != args.steps or report.get("samples") != args.samples:
        report = {}  # another budget or metric: start over
    report.update(
        what="TraceRL vs random-masking vs coupled RL on the same warm start and rollout budget (the paper's Figure "
        "1 at toy scale)",
        command="python benchmarks/tracerl_ablation.py",
        machine=f"{torch.get_num_threads()} CPU threads, float32",
        run="python recipes/tracerl.py fit --model.baseline B --seed_everything S --model.seed S (embedded default: "
        "cached SDAR warm start, single-digit Arithmetic, RL steps x 8 prompts x 8 rollouts, BlockSampler B=4, 4 "
        "steps, T=1)",
        steps=args.steps,
        samples=args.samples,
    )
    runs: dict[str, dict[str, Any]] = report.setdefault("runs", {})
    logs = RESULTS / "tracerl_ablation_logs"
    for seed in args.seeds:  # seed-major, so a partial run still compares the objectives on the same seeds
        for baseline in args.baselines:
            if str(seed) in runs.get(baseline, {}):
                continue
            start = time.perf_counter()
            stage, data = run(baseline, seed, args.steps, logs)
            if "before" not in report:
                warm = SDARBackbone.from_pretrained(WARM_START.directory()).eval()
                report["before"] = heldout(warm, data, stage.sampler, args.samples)
            result = heldout(stage.net, data, stage.sampler, args.samples)
            result["seconds"] = time.perf_counter() - start
            runs.setdefault(baseline, {})[str(seed)] = result
            report["summary"] = summarise(runs)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
            print(baseline, seed, result, flush=True)
    print(json.dumps(report.get("summary"), indent=1))


if __name__ == "__main__":
    main()
