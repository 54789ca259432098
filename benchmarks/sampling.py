"""Sampling speed next to answer accuracy, for every decoding mode, on a small model trained on Arithmetic.

    python benchmarks/sampling.py                 # trains the SFT model on first use (~9 min on 2 cores)
    python benchmarks/sampling.py --limit 256     # more questions

Modes (all on the same weights): ``plain`` (static reveal plan, no cache), ``cached`` (dual KV cache),
``threshold`` (confidence >= 0.9, at least one per step), ``cached+threshold``; each at batch 1 and 8. Two
reference loops written from the published descriptions run on the same weights and prompts: LLaDA's
``generate`` (logits for the whole canvas every step) and Fast-dLLM's dual cache + threshold (batch 1 only).
Reports tokens/s (generated canvas positions per second), forward passes, tokens per forward, peak RSS and
answer accuracy. JSON to ``benchmarks/results/sampling.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from dllm_zoo.backbones import LLaDABackbone  # noqa: E402
from dllm_zoo.data.synthetic import Arithmetic  # noqa: E402
from dllm_zoo.evaluation import encode_prompts, evaluate_task  # noqa: E402
from dllm_zoo.samplers import LLaDASampler, StaticQuota, Threshold  # noqa: E402
from dllm_zoo.tokenizers import ByteTokenizer  # noqa: E402
from memory import PeakMemory  # noqa: E402
from reference_loops import fast_dllm_dual_threshold, llada_generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def trained_model(steps: int) -> Path:
    """Train the SFT recipe once and export the backbone in the original LLaDA layout."""
    export = RESULTS / "sft_arithmetic" / "model"
    if (export / "config.json").is_file():
        return export
    from dllm_zoo.data import TextDiffusionDataModule
    from dllm_zoo.recipe import run_recipe
    from dllm_zoo.stages import MaskedDiffusionPretraining

    cli = run_recipe(
        MaskedDiffusionPretraining,
        TextDiffusionDataModule,
        ROOT / "recipes" / "configs" / "pretrain" / "default.yaml",
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "configs" / "pretrain" / "sft_arithmetic.yaml"),
            f"--trainer.max_steps={steps}",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={RESULTS / 'sft_arithmetic' / 'logs'}",
        ],
    )
    cli.model.net.save_pretrained(export)
    return export


def time_reference(fn, model, prompts, masks, **kw) -> dict:  # type: ignore[no-untyped-def]
    tokens = nfe = 0
    with PeakMemory() as mem:
        start = time.perf_counter()
        for ids, mask in zip(prompts, masks):
            real = ids[:, mask[0]] if ids.shape[0] == 1 else ids
            out, n = fn(model, real, **kw)
            tokens += out.shape[0] * kw["gen_length"]
            nfe += n
        seconds = time.perf_counter() - start
    return {
        "tokens_per_s": tokens / seconds,
        "forward_passes": nfe,
        "tokens_per_forward": tokens / nfe,
        "seconds": seconds,
        "peak_memory_mib": mem.mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=64, help="validation questions to decode")
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--train-steps", type=int, default=4000)
    parser.add_argument("--out", default=str(RESULTS / "sampling.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    model = LLaDABackbone.from_pretrained(trained_model(args.train_steps)).eval()
    tok, task = ByteTokenizer(model.layout), Arithmetic()
    g, blk = args.gen_length, args.block_length
    modes = {
        "plain": dict(transfer=StaticQuota(), cache="none"),
        "cached": dict(transfer=StaticQuota(), cache="dual"),
        "threshold": dict(transfer=Threshold(args.threshold), cache="none"),
        "cached+threshold": dict(transfer=Threshold(args.threshold), cache="dual"),
    }
    results: dict[str, dict] = {}
    for (name, kw), batch in itertools.product(modes.items(), (1, 8)):
        sampler = LLaDASampler(gen_length=g, block_length=blk, steps=g, **kw)  # type: ignore[arg-type]
        with PeakMemory() as mem:
            rep = evaluate_task(model, tok, sampler, task, limit=args.limit, batch_size=batch)
        results[f"{name}@{batch}"] = {
            "accuracy": rep.accuracy,
            "tokens_per_s": rep.tokens_per_second,
            "forward_passes": rep.forward_passes,
            "tokens_per_forward": rep.tokens_per_forward,
            "seconds": rep.seconds,
            "peak_memory_mib": mem.mib,
        }
        print(name, batch, results[f"{name}@{batch}"], flush=True)

    samples = list(itertools.islice(task.generate("val"), args.limit))
    enc = [encode_prompts(tok, [s["prompt"]]) for s in samples]
    results["reference_llada_generate@1"] = time_reference(
        llada_generate, model, [e[0] for e in enc], [e[1] for e in enc], steps=g, gen_length=g, block_length=blk
    )
    results["reference_fast_dllm_dual_threshold@1"] = time_reference(
        fast_dllm_dual_threshold,
        model,
        [e[0] for e in enc],
        [e[1] for e in enc],
        gen_length=g,
        block_length=blk,
        threshold=args.threshold,
    )
    for key in ("reference_llada_generate@1", "reference_fast_dllm_dual_threshold@1"):
        print(key, results[key], flush=True)
    plain = results["plain@1"]["tokens_per_s"]
    summary = {
        "cached+threshold_over_plain@1": results["cached+threshold@1"]["tokens_per_s"] / plain,
        "cached+threshold_over_plain@8": results["cached+threshold@8"]["tokens_per_s"]
        / results["plain@8"]["tokens_per_s"],
        "plain_over_reference@1": plain / results["reference_llada_generate@1"]["tokens_per_s"],
        "cached+threshold_over_fast_dllm@1": results["cached+threshold@1"]["tokens_per_s"]
        / results["reference_fast_dllm_dual_threshold@1"]["tokens_per_s"],
        "accuracy_drop_points@8": 100 * (results["plain@8"]["accuracy"] - results["cached+threshold@8"]["accuracy"]),
    }
    report = {
        "benchmark": "sampling",
        "model": "mini LLaDA preset, SFT on Arithmetic",
        "gen_length": g,
        "block_length": blk,
        "threshold": args.threshold,
        "questions": args.limit,
        "threads": torch.get_num_threads(),
        "modes": results,
        "summary": summary,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
