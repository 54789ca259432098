"""Parallel vs semi-parallel vs sequential joint decoding of one MMaDA-Parallel model (the paper's sampler ablation).

    python benchmarks/parallel_modes.py runs/mmada_parallel/sft                 # a backbone directory
    python benchmarks/parallel_modes.py runs/.../last.ckpt --seeds 0 1 2 --limit 64

The model (a backbone directory written by ``save_pretrained`` / ``dllm-zoo convert-checkpoint``, or a Lightning
checkpoint of the MMaDA-Parallel default) answers the held-out ParaBench prompts of the recipe's embedded default
(``recipes/configs/mmada_parallel/default.yaml``: one-shape ShapesWorld, brief reasoning, WordTokenizer, T = 24)
with the default's ``ParallelSampler`` settings in every mode, same total steps; each ``--seeds`` value is one full
pass with its own sampler draws, so the spread over seeds is the decoding noise. Results go to
``benchmarks/results/parallel_modes.json``.
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
import yaml
from jsonargparse import ArgumentParser

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data import ParallelDataModule
from dllm_zoo.parabench import AXES, parabench
from dllm_zoo.samplers import ParallelSampler
from dllm_zoo.samplers.parallel import PARALLEL_MODES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DEFAULT_CONFIG = ROOT / "recipes" / "configs" / "mmada_parallel" / "default.yaml"


def load_model(path: Path) -> LLaDABackbone:
    """A backbone directory, or the ``backbone.`` weights of a stage checkpoint (``*.ckpt``) of the default.

    A checkpoint's weights go into the default config's backbone (its ``mini`` preset and token layout).
    """
    if path.suffix != ".ckpt":
        return LLaDABackbone.from_pretrained(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    backbone_args = yaml.safe_load(DEFAULT_CONFIG.read_text())["model"]["init_args"]["backbone"]["init_args"]
    model = LLaDABackbone(**backbone_args)
    model.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    return model


def default_parts() -> tuple[ParallelDataModule, dict[str, Any]]:
    """The default config's data module (set up) and its ParaBench sampler arguments."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    # jsonargparse builds the data module as the recipe does (nested class_path specs: task, image tokenizer)
    parser = ArgumentParser()
    parser.add_argument("--data", type=ParallelDataModule)
    dm = parser.instantiate(parser.parse_object({"data": config["data"]})).data
    dm.setup("fit")
    (bench,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ParaBenchEvaluation")]
    return dm, dict(bench["init_args"]["sampler"]["init_args"])


def overall_means(
    model: Backbone, sampler: ParallelSampler, dm: ParallelDataModule, limit: int, seeds: list[int]
) -> list[dict[str, float]]:
    """The ``overall`` ParaBench means of ``model`` on ``limit`` held-out prompts per task, once per sampler seed."""
    return [parabench(model, sampler, dm, limit=limit, batch_size=32, seed=s).means()["overall"] for s in seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="backbone directory or MMaDA-Parallel default .ckpt")
    parser.add_argument("--modes", nargs="+", default=list(PARALLEL_MODES), choices=PARALLEL_MODES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--limit", type=int, default=64, help="held-out prompts per task")
    parser.add_argument("--out", type=Path, default=RESULTS / "parallel_modes.json")
    args = parser.parse_args()
    model = load_model(args.model).eval()
    dm, sampler_args = default_parts()
    report: dict[str, Any] = {
        "what": "joint decoding modes of one MMaDA-Parallel model, same total steps (ParaBench on held-out prompts)",
        "command": " ".join(["python", "benchmarks/parallel_modes.py", *sys.argv[1:]]),  # every flag: seeds, limit
        "model": str(args.model),
        "sampler": sampler_args,
        "limit": args.limit,
        "machine": f"{torch.get_num_threads()} CPU threads, float32",
        "modes": {},
    }
    for mode in args.modes:
        sampler = ParallelSampler(**{**sampler_args, "mode": mode})
        start = time.perf_counter()
        per_seed = overall_means(model, sampler, dm, args.limit, args.seeds)
        entry: dict[str, Any] = {"seconds": time.perf_counter() - start, "seeds": args.seeds}
        for axis in AXES:
            values = [m[axis] for m in per_seed if axis in m]
            if values:
                entry[axis] = {
                    "mean": statistics.fmean(values),
                    "per_seed": values,
                    "stdev_over_seeds": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
        report["modes"][mode] = entry
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(mode, {a: round(entry[a]["mean"], 4) for a in AXES if a in entry}, flush=True)


if __name__ == "__main__":
    main()
