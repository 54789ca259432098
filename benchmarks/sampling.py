"""Sampling speed next to answer accuracy, for every decoding mode of both model families, trained on Arithmetic.

    python benchmarks/sampling.py                     # both families; trains each model on first use
    python benchmarks/sampling.py --family sdar       # block-attention family only
    python benchmarks/sampling.py --limit 64          # fewer questions, faster

Full attention (LLaDA ``mini`` preset, SFT by ``recipes/configs/pretrain/sft_arithmetic.yaml``): ``plain`` (static
reveal plan, no cache), ``cached`` (dual KV cache), ``threshold`` (confidence >= 0.95, at least one per step),
``cached+threshold``, ``prefix+threshold`` (prefix cache), ``cached+threshold+early_stop``; each at batch 1 and 8,
next to two literal reference loops on the same weights: LLaDA's ``generate`` and Fast-dLLM's dual cache +
threshold (batch 1 only).

Block attention (SDAR ``tiny`` preset, block-diffusion SFT by ``recipes/sdar.py``'s default): the three strategies
``low_confidence_static``, ``low_confidence_dynamic`` and ``entropy_bounded`` with the exact KV cache and as the
uncached loop, at batch 1 and 8, next to the SDAR/dLLM-RL reference loop run on a transformers Qwen3 model holding
the same weights (SDAR's HF modeling class is Qwen3 with a block mask) with an HF ``DynamicCache``.

Reports tokens/s (generated positions per second), forward passes, tokens per forward, peak memory of each mode
(above what was resident when it started; CUDA allocator peak on GPUs) and answer accuracy. JSON to
``benchmarks/results/sampling.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from dllm_zoo.backbones import LLaDABackbone, SDARBackbone  # noqa: E402
from dllm_zoo.backbones.base import Backbone  # noqa: E402
from dllm_zoo.data.synthetic import Arithmetic  # noqa: E402
from dllm_zoo.evaluation import encode_prompts, evaluate_task  # noqa: E402
from dllm_zoo.samplers import BlockSampler, LLaDASampler, Sampler, StaticQuota, Threshold  # noqa: E402
from dllm_zoo.tokenizers import ByteTokenizer  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402
from reference_loops import block_diffusion_generate, fast_dllm_dual_threshold, llada_generate, qwen3_twin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def trained_model(family: str, steps: int) -> Path:
    """Train the family's recipe once (Arithmetic) and export the backbone in its original checkpoint layout."""
    export = RESULTS / f"{family}_arithmetic" / "model"
    if (export / "config.json").is_file():
        return export
    from dllm_zoo.data import TextDiffusionDataModule
    from dllm_zoo.recipe import run_recipe
    from dllm_zoo.stages import BlockDiffusionSFT, MaskedDiffusionPretraining

    logs = [f"--trainer.logger.init_args.save_dir={RESULTS / f'{family}_arithmetic' / 'logs'}"]
    common = [f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false", *logs]
    if family == "sft":
        default = ROOT / "recipes" / "configs" / "pretrain" / "default.yaml"
        extra = ["--config", str(ROOT / "recipes" / "configs" / "pretrain" / "sft_arithmetic.yaml")]
        cli = run_recipe(MaskedDiffusionPretraining, TextDiffusionDataModule, default, ["fit", *extra, *common])
    else:
        default = ROOT / "recipes" / "configs" / "sdar" / "default.yaml"
        cli = run_recipe(BlockDiffusionSFT, TextDiffusionDataModule, default, ["fit", *common])
    cli.model.net.save_pretrained(export)
    return export


REPEATS = 2  # timings are the best of this many runs (one run is at the mercy of whatever else the cores do)


def measure(model: Backbone, sampler: Sampler, task: Arithmetic, limit: int, batch: int) -> dict[str, float]:
    """Accuracy, speed (best of :data:`REPEATS` runs), forwards and peak memory on ``limit`` questions."""
    tok = ByteTokenizer(model.layout)
    runs = []
    for _ in range(REPEATS):
        with PeakMemory() as mem:
            runs.append(evaluate_task(model, tok, sampler, task, limit=limit, batch_size=batch))
    rep = min(runs, key=lambda r: r.seconds)
    return {
        "accuracy": rep.accuracy,
        "tokens_per_s": rep.tokens_per_second,
        "forward_passes": rep.forward_passes,
        "tokens_per_forward": rep.tokens_per_forward,
        "generated_tokens": rep.generated_tokens,
        "seconds": rep.seconds,
        "peak_memory_mib": mem.mib,
    }


def time_reference(fn, model, prompts, masks, **kw) -> dict:  # type: ignore[no-untyped-def]
    """A literal reference loop at batch 1 over the prompts (unpadded), best of :data:`REPEATS` runs."""
    seconds = float("inf")
    for _ in range(REPEATS):
        tokens = nfe = 0
        with PeakMemory() as mem:
            start = time.perf_counter()
            for ids, mask in zip(prompts, masks):
                real = ids[:, mask[0]] if ids.shape[0] == 1 else ids
                out, n = fn(model, real, **kw)
                tokens += out.shape[0] * kw["gen_length"]
                nfe += n
            seconds = min(seconds, time.perf_counter() - start)
    return {
        "tokens_per_s": tokens / seconds,
        "forward_passes": nfe,
        "tokens_per_forward": tokens / nfe,
        "seconds": seconds,
        "peak_memory_mib": mem.mib,
    }


def llada_section(args: argparse.Namespace, task: Arithmetic) -> dict[str, Any]:
    """Full-attention modes and the two reference loops (see the module docstring)."""
    model = LLaDABackbone.from_pretrained(trained_model("sft", args.train_steps)).eval()
    g, blk = args.gen_length, args.block_length
    modes: dict[str, dict[str, Any]] = {
        "plain": dict(transfer=StaticQuota(), cache="none"),
        "cached": dict(transfer=StaticQuota(), cache="dual"),
        "threshold": dict(transfer=Threshold(args.threshold), cache="none"),
        "cached+threshold": dict(transfer=Threshold(args.threshold), cache="dual"),
        "prefix+threshold": dict(transfer=Threshold(args.threshold), cache="prefix"),
        "cached+threshold+early_stop": dict(transfer=Threshold(args.threshold), cache="dual", early_stop=True),
    }
    results: dict[str, dict] = {}
    for (name, kw), batch in itertools.product(modes.items(), (1, 8)):
        sampler = LLaDASampler(gen_length=g, block_length=blk, steps=g, **kw)
        results[f"{name}@{batch}"] = measure(model, sampler, task, args.limit, batch)
        print("llada", name, batch, results[f"{name}@{batch}"], flush=True)

    tok = ByteTokenizer(model.layout)
    samples = list(itertools.islice(task.generate("val"), args.limit))
    enc = [encode_prompts(tok, [s["prompt"]]) for s in samples]
    prompts, masks = [e[0] for e in enc], [e[1] for e in enc]
    results["reference_llada_generate@1"] = time_reference(
        llada_generate, model, prompts, masks, steps=g, gen_length=g, block_length=blk
    )
    results["reference_fast_dllm_dual_threshold@1"] = time_reference(
        fast_dllm_dual_threshold, model, prompts, masks, gen_length=g, block_length=blk, threshold=args.threshold
    )
    for key in ("reference_llada_generate@1", "reference_fast_dllm_dual_threshold@1"):
        print("llada", key, results[key], flush=True)
    plain1, plain8 = results["plain@1"], results["plain@8"]
    summary = {
        "cached+threshold_over_plain@1": results["cached+threshold@1"]["tokens_per_s"] / plain1["tokens_per_s"],
        "cached+threshold_over_plain@8": results["cached+threshold@8"]["tokens_per_s"] / plain8["tokens_per_s"],
        "plain_over_reference@1": plain1["tokens_per_s"] / results["reference_llada_generate@1"]["tokens_per_s"],
        "cached+threshold_over_fast_dllm@1": results["cached+threshold@1"]["tokens_per_s"]
        / results["reference_fast_dllm_dual_threshold@1"]["tokens_per_s"],
        "cached+threshold@8_over_fast_dllm@1": results["cached+threshold@8"]["tokens_per_s"]
        / results["reference_fast_dllm_dual_threshold@1"]["tokens_per_s"],
        "cached+threshold+early_stop_over_fast_dllm@1": results["cached+threshold+early_stop@1"]["tokens_per_s"]
        / results["reference_fast_dllm_dual_threshold@1"]["tokens_per_s"],
        "accuracy_drop_points@8": 100 * (plain8["accuracy"] - results["cached+threshold@8"]["accuracy"]),
    }
    return {
        "model": "mini LLaDA preset, SFT on Arithmetic",
        "timing": f"best of {REPEATS} runs",
        "gen_length": g,
        "block_length": blk,
        "threshold": args.threshold,
        "modes": results,
        "summary": summary,
    }


def sdar_section(args: argparse.Namespace, task: Arithmetic) -> dict[str, Any]:
    """Block-attention strategies, cached and uncached, and the reference loop on a Qwen3 twin."""
    model = SDARBackbone.from_pretrained(trained_model("sdar", args.sdar_train_steps)).eval()
    g, blk, steps = args.gen_length, args.sdar_block_length, args.sdar_steps
    results: dict[str, dict] = {}
    strategies = ("low_confidence_static", "low_confidence_dynamic", "entropy_bounded")
    for strategy, use_cache, batch in itertools.product(strategies, (True, False), (1, 8)):
        sampler = BlockSampler.for_strategy(
            strategy,  # type: ignore[arg-type]
            threshold=args.sdar_threshold,
            gen_length=g,
            block_length=blk,
            denoising_steps=steps,
            use_cache=use_cache,
        )
        key = f"{strategy}{'' if use_cache else '+uncached'}@{batch}"
        results[key] = measure(model, sampler, task, args.limit, batch)
        print("sdar", key, results[key], flush=True)

    # The reference loop at batch 1 on the same weights (stops at EOS like ours), static, greedy.
    tok = ByteTokenizer(model.layout)
    qwen = qwen3_twin(model, RESULTS / "sdar_arithmetic" / "qwen3_twin")
    samples = list(itertools.islice(task.generate("val"), args.limit))
    seconds = float("inf")
    for _ in range(REPEATS):
        correct = tokens = nfe = 0
        with PeakMemory() as mem:
            start = time.perf_counter()
            for sample in samples:
                ids, _ = encode_prompts(tok, [sample["prompt"]])
                x, n = block_diffusion_generate(
                    qwen,
                    ids,
                    mask_id=model.layout.mask_id,
                    gen_length=g,
                    block_length=blk,
                    denoising_steps=steps,
                    stopping_criteria_idx=[model.layout.eos_id],
                )
                gen = x[0, ids.shape[1] :]
                gen = gen[gen != model.layout.mask_id]
                tokens += gen.numel()
                nfe += n
                correct += task.check(tok.decode(gen.tolist(), skip_special_tokens=True), sample)
            seconds = min(seconds, time.perf_counter() - start)
    results["reference_block_diffusion_generate@1"] = {
        "accuracy": correct / len(samples),
        "tokens_per_s": tokens / seconds,
        "forward_passes": nfe,
        "tokens_per_forward": tokens / nfe,
        "generated_tokens": tokens,
        "seconds": seconds,
        "peak_memory_mib": mem.mib,
    }
    print("sdar reference", results["reference_block_diffusion_generate@1"], flush=True)
    ref = results["reference_block_diffusion_generate@1"]
    static1 = results["low_confidence_static@1"]
    summary = {
        "static_cached_over_reference@1": static1["tokens_per_s"] / ref["tokens_per_s"],
        "static_cached_over_uncached@1": static1["tokens_per_s"]
        / results["low_confidence_static+uncached@1"]["tokens_per_s"],
        "dynamic_over_static@8": results["low_confidence_dynamic@8"]["tokens_per_s"]
        / results["low_confidence_static@8"]["tokens_per_s"],
        "same_accuracy_as_reference": static1["accuracy"] == ref["accuracy"],
    }
    return {
        "model": "tiny SDAR preset, block-diffusion SFT on Arithmetic (recipes/sdar.py default)",
        "timing": f"best of {REPEATS} runs",
        "gen_length": g,
        "block_length": blk,
        "denoising_steps": steps,
        "dynamic_threshold": args.sdar_threshold,
        "modes": results,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("llada", "sdar", "all"), default="all")
    parser.add_argument("--limit", type=int, default=256, help="validation questions to decode")
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=16, help="LLaDA block length")
    parser.add_argument("--threshold", type=float, default=0.95, help="LLaDA confidence threshold")
    parser.add_argument("--train-steps", type=int, default=12000, help="LLaDA SFT steps (first run only)")
    parser.add_argument("--sdar-block-length", type=int, default=4)
    parser.add_argument("--sdar-steps", type=int, default=4, help="SDAR denoising steps per block")
    parser.add_argument("--sdar-threshold", type=float, default=0.9, help="SDAR dynamic threshold (dLLM-RL README)")
    parser.add_argument("--sdar-train-steps", type=int, default=1500, help="SDAR SFT steps (first run only)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timings are the best of this many runs")
    parser.add_argument("--out", default=str(RESULTS / "sampling.json"))
    args = parser.parse_args()
    globals()["REPEATS"] = max(1, args.repeats)
    torch.manual_seed(0)
    task = Arithmetic()
    out = Path(args.out)
    report: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    report.update(
        {
            "benchmark": "sampling",
            "questions": args.limit,
            "threads": torch.get_num_threads(),
            "device": "cpu",
            "timing": f"best of {REPEATS} runs",
        }
    )
    if args.family in ("llada", "all"):
        report["llada"] = llada_section(args, task)
        print(json.dumps(report["llada"]["summary"], indent=2))
    if args.family in ("sdar", "all"):
        report["sdar"] = sdar_section(args, task)
        print(json.dumps(report["sdar"]["summary"], indent=2))
    for stale in ("modes", "summary", "peak_rss_mib", "model", "gen_length", "block_length", "threshold"):
        report.pop(stale, None)  # the single-family layout of earlier versions
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
