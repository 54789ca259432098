"""Measured peak memory of real training steps vs. :func:`dllm_zoo.memory.estimate_memory`, on CPU proxies.

    python benchmarks/memory.py                  # every proxy, each in a fresh process -> results/memory.json
    python benchmarks/memory.py --only llada-v   # proxies whose name contains the string
    python benchmarks/memory.py --repeat 3       # measure each proxy 3 times (spread check)

Each proxy is a small config of one family (tens of millions of parameters, so the static terms are far above
the allocator noise) trained for a few real steps by ``Trainer.fit`` on CPU in fp32 (``precision="32-true"``):
the stage's forward, Lightning's ``zero_grad``/``backward``, AdamW. Variants: full fine-tune, LoRA and QLoRA
(bitsandbytes NF4 on CPU), with and without per-block gradient checkpointing, on the ``pretrain``, ``sft`` and
``block_sft`` stages. The noise schedule draws ``t = 1`` (every answer token masked), the step the estimator's
default ``masked_fraction=1`` describes (the worst step of a run).

Ratio = (estimated peak + fixed overhead) / measured. The fixed overhead is measured, not fitted: a null run (a
0.1 M-parameter model, one row of 16 tokens, through the same ``fit``) costs ~20 MiB besides its model (Lightning's
loop objects, thread pools, kernel scratch); ``measured - estimated peak`` of that run is added to every proxy's
estimate, as the estimator adds its fixed CUDA overhead on GPUs. ``ratio_without_overhead`` is reported too.

Measurement: :class:`peak_memory.PeakMemory` (resident-set high-water mark, heap trimmed first). The baseline is
the resident memory right before the backbone is built; the reported peak is the training steps' peak above that
baseline = (resident after building, above the baseline) + (peak of ``fit`` above its own start). The build itself
is reported apart (``build_peak_mib``): QLoRA builds the fp32 model before quantising it, a transient a real run
does on the host, not on the GPU. Every proxy runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` fixed at
64 KiB, so glibc serves every tensor-sized block from ``mmap`` and returns it to the kernel when freed; with the
default (dynamic) threshold freed blocks stay in the heap and the resident peak drifts above the live tensors by
a run-dependent amount (``--default-malloc`` measures that way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from peak_memory import PeakMemory  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass(frozen=True)
class Proxy:
    """One measured configuration."""

    name: str
    family: str  # llada | sdar
    size: str  # key of SIZES
    stage: str  # pretrain | sft | block_sft
    adapter: str  # none | lora | qlora
    checkpointing: bool
    batch_size: int
    seq_len: int


# (width, layers, heads, kv heads, head_dim, ffn, layout): ~25-70 M parameters each, plus the null run.
SIZES: dict[str, tuple[int, int, int, int, int, int, str]] = {
    "null": (64, 2, 4, 4, 16, 192, "default"),  # 0.1 M: what a fit() costs besides the model (runtime overhead)
    "llada-s": (512, 8, 8, 8, 64, 1536, "default"),  # 25 M, byte vocabulary: blocks dominate
    "llada-v": (256, 4, 4, 4, 64, 768, "llada"),  # 68 M, LLaDA's 126464-row vocabulary: head and logits dominate
    "sdar-s": (512, 8, 8, 4, 64, 1536, "default"),  # 23 M, GQA + per-head q/k norms
    # smaller ones for tests/test_memory.py (a few seconds each)
    "test-llada": (256, 2, 4, 4, 64, 768, "llada"),  # 66 M, almost all embedding + head
    "test-sdar": (384, 4, 6, 2, 64, 1024, "default"),  # 6.5 M
}


#: A trivially small run: its measured peak minus its estimated peak is the fixed CPU overhead of a fit (Lightning
#: loop objects, thread pools, kernel scratch), the CPU counterpart of the CUDA context in the estimator's overhead.
NULL = Proxy("null/pretrain/none/nockpt", "llada", "null", "pretrain", "none", False, 1, 16)


#: The proxies tests/test_memory.py measures (through ``--child``).
TEST_PROXIES = [
    Proxy("test-llada/sft/lora/ckpt", "llada", "test-llada", "sft", "lora", True, 1, 128),
    Proxy("test-sdar/block_sft/none/nockpt", "sdar", "test-sdar", "block_sft", "none", False, 2, 128),
]


def proxies() -> list[Proxy]:
    """Every proxy: 3 sizes x {full, LoRA, QLoRA} x {no checkpointing, checkpointing}."""
    plan = [("llada-s", "pretrain", 4, 256), ("llada-v", "sft", 2, 128), ("sdar-s", "block_sft", 2, 256)]
    out = []
    for size, stage, batch, seq in plan:
        family = size.split("-")[0]
        for adapter in ("none", "lora", "qlora"):
            for ckpt in (False, True):
                name = f"{size}/{stage}/{adapter}/{'ckpt' if ckpt else 'nockpt'}"
                out.append(Proxy(name, family, size, stage, adapter, ckpt, batch, seq))
    return out


def make_config(proxy: Proxy) -> Any:
    """The family config of a proxy size."""
    from dllm_zoo.backbones import LLaDAConfig, SDARConfig
    from dllm_zoo.tokenizers import TokenLayout

    width, layers, heads, kv_heads, head_dim, ffn, layout_name = SIZES[proxy.size]
    lay = TokenLayout.preset(layout_name)
    if proxy.family == "llada":
        return LLaDAConfig(
            d_model=width,
            n_heads=heads,
            n_kv_heads=kv_heads,
            n_layers=layers,
            mlp_hidden_size=ffn,
            vocab_size=lay.vocab_size,
            embedding_size=lay.vocab_size,
            mask_token_id=lay.mask_id,
            eos_token_id=lay.eos_id,
            pad_token_id=lay.pad_id,
        )
    return SDARConfig(
        vocab_size=lay.vocab_size,
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        mask_token_id=lay.mask_id,
        bos_token_id=lay.bos_id,
        eos_token_id=lay.eos_id,
        pad_token_id=lay.pad_id,
    )


def make_adapter(name: str) -> Any:
    from dllm_zoo.adapters import LoRA

    return {"none": None, "lora": LoRA(rank=16), "qlora": LoRA(rank=16, quantize="nf4")}[name]


def make_batches(proxy: Proxy, vocab_limit: int, steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shape = (proxy.batch_size, proxy.seq_len)
    return [
        {
            "input_ids": torch.randint(0, vocab_limit, shape, generator=gen),
            "attention_mask": torch.ones(shape, dtype=torch.bool),
            "prompt_mask": torch.zeros(shape, dtype=torch.bool),
        }
        for _ in range(steps)
    ]


def measure_one(proxy: Proxy, steps: int) -> dict[str, Any]:
    """Train ``proxy`` for ``steps`` steps in this process; return estimate and measurement."""
    import lightning as L
    from torch.utils.data import DataLoader

    from dllm_zoo.backbones import LLaDABackbone, SDARBackbone
    from dllm_zoo.losses import MaskedDiffusionLoss
    from dllm_zoo.memory import estimate_memory
    from dllm_zoo.schedules import LinearSchedule
    from dllm_zoo.stages import BlockDiffusionSFT, MaskedDiffusionPretraining, OptimConfig

    class FullMasking(LinearSchedule):
        """``t = 1`` for every row: every answer token is masked (the estimator's worst-case step)."""

        def sample_t(
            self, batch_size: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
        ) -> torch.Tensor:
            return torch.ones(batch_size, device=device)

    # Import what the adapter code imports lazily (peft pulls in transformers: ~85 MiB of Python modules) before
    # the baseline: it is the environment's memory, not the model's.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401

    torch.manual_seed(0)
    config = make_config(proxy)
    adapter = make_adapter(proxy.adapter)
    batches = make_batches(proxy, 256, steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(batches, batch_size=None)
    optim = OptimConfig(lr=1e-4, warmup_steps=1)
    cls = LLaDABackbone if proxy.family == "llada" else SDARBackbone

    with PeakMemory() as build:  # baseline: resident memory before the backbone exists
        backbone = cls(config, gradient_checkpointing=proxy.checkpointing)
        if proxy.stage == "block_sft":
            stage: Any = BlockDiffusionSFT(backbone=backbone, schedule=FullMasking(), optim=optim, adapter=adapter)
        else:
            loss = MaskedDiffusionLoss.pretraining() if proxy.stage == "pretrain" else MaskedDiffusionLoss.sft()
            stage = MaskedDiffusionPretraining(
                backbone=backbone, schedule=FullMasking(), loss=loss, optim=optim, adapter=adapter
            )
        stage.configure_model()  # injects LoRA / quantises to NF4 now, so fit() starts from the built model
    start = time.perf_counter()
    with PeakMemory() as train:
        trainer.fit(stage, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    # PeakMemory records the resident KiB at entry in `_start`: the model's resident size is the difference.
    built_mib = (train._start - build._start) / 1024
    measured = built_mib + train.mib
    est = estimate_memory(
        config=config,
        stage=proxy.stage,
        adapter=adapter,
        precision="32-true",
        batch_size=proxy.batch_size,
        seq_len=proxy.seq_len,
        gradient_checkpointing=proxy.checkpointing,
        device="cpu",
    )
    return {
        "proxy": proxy.name,
        "family": proxy.family,
        "stage": proxy.stage,
        "adapter": proxy.adapter,
        "checkpointing": proxy.checkpointing,
        "batch_size": proxy.batch_size,
        "seq_len": proxy.seq_len,
        "params": est.total_params,
        "trainable_params": est.trainable_params,
        "estimate_mib": est.peak / 2**20,
        "measured_mib": measured,
        "ratio": est.peak / 2**20 / measured,
        "estimate_phase": est.peak_phase,
        "estimate_terms_mib": {
            "parameters": est.parameters / 2**20,
            "gradients": est.gradients / 2**20,
            "optimizer_states": est.optimizer_states / 2**20,
            "activations": est.activations / 2**20,
            "optimizer_step": est.optimizer_step / 2**20,
        },
        "estimate_phases_mib": {k: v / 2**20 for k, v in est.phases.items()},
        "built_mib": built_mib,
        "build_peak_mib": build.mib,
        "fit_peak_above_built_mib": train.mib,
        "measurement": train.kind,
        "fit_seconds": seconds,
    }


def run_isolated(proxy: Proxy, steps: int, default_malloc: bool) -> dict[str, Any]:
    """Measure ``proxy`` in a fresh interpreter (clean heap, fixed malloc settings)."""
    env = dict(os.environ)
    if not default_malloc:
        env.update(MALLOC_ENV)
    cmd = [sys.executable, __file__, "--child", proxy.name, "--steps", str(steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{proxy.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run proxies whose name contains this string")
    parser.add_argument("--steps", type=int, default=3, help="training steps per proxy (>= 2: optimizer state)")
    parser.add_argument("--repeat", type=int, default=1, help="measurements per proxy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's dynamic mmap threshold on")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    by_name = {p.name: p for p in [NULL, *proxies(), *TEST_PROXIES]}
    if args.child is not None:
        print(json.dumps(measure_one(by_name[args.child], args.steps)))
        return

    nulls = [run_isolated(NULL, args.steps, args.default_malloc) for _ in range(max(2, args.repeat))]
    overhead = sum(r["measured_mib"] - r["estimate_mib"] for r in nulls) / len(nulls)
    print(f"fixed CPU overhead of a fit (null run): {overhead:.1f} MiB", flush=True)
    rows = []
    for proxy in proxies():
        if args.only not in proxy.name:
            continue
        runs = [run_isolated(proxy, args.steps, args.default_malloc) for _ in range(args.repeat)]
        row = runs[0]
        measured = [r["measured_mib"] for r in runs]
        row["measured_mib"] = sum(measured) / len(measured)
        row["measured_runs_mib"] = measured
        row["overhead_mib"] = overhead
        row["estimate_total_mib"] = row["estimate_mib"] + overhead
        row["ratio"] = row["estimate_total_mib"] / row["measured_mib"]
        row["ratio_without_overhead"] = row["estimate_mib"] / row["measured_mib"]
        rows.append(row)
        print(
            f"{proxy.name:32} params {row['params'] / 1e6:6.1f}M  estimate {row['estimate_mib']:8.1f} "
            f"+ {overhead:.1f} MiB  measured {row['measured_mib']:8.1f} MiB "
            f"(runs {', '.join(f'{m:.1f}' for m in measured)})  ratio {row['ratio']:.3f}  [{row['estimate_phase']}]",
            flush=True,
        )
    ratios = [r["ratio"] for r in rows]
    result = {
        "benchmark": "memory",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "malloc": "glibc default" if args.default_malloc else MALLOC_ENV,
        "fixed_overhead_mib": overhead,
        "null_runs_mib": [{"measured": r["measured_mib"], "estimate": r["estimate_mib"]} for r in nulls],
        "max_abs_error": max((abs(r - 1) for r in ratios), default=0.0),
        "proxies": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}; max |estimate/measured - 1| = {result['max_abs_error']:.3f}")


if __name__ == "__main__":
    main()
