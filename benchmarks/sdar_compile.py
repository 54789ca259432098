"""Block sampler vs the SDAR reference loop, both eager and both under ``torch.compile``, batch 1, on one prompt.

    python benchmarks/sdar_compile.py        # needs the model of benchmarks/sampling.py --family sdar

What ``torch.compile`` (inductor, ``dynamic=True``: the KV cache grows every block) buys each side at the tiny
SDAR preset, where per-op overhead dominates the forward. Greedy static decoding, block 4, 4 steps, 64 tokens,
no stop token (every run decodes the whole canvas, so the two sides do the same work). Compile time is reported
separately and excluded from the timings. JSON to ``benchmarks/results/sdar_compile.json``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dllm_zoo.backbones import SDARBackbone  # noqa: E402
from dllm_zoo.samplers import BlockSampler  # noqa: E402
from reference_loops import block_diffusion_generate, qwen3_twin  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = RESULTS / "sdar_arithmetic" / "model"
GEN, BLOCK, STEPS, REPEATS = 64, 4, 4, 20


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(first call seconds, best-of-REPEATS seconds afterwards)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


@torch.no_grad()
def main() -> None:
    if not MODEL.is_dir():
        raise SystemExit(f"{MODEL} is missing: run `python benchmarks/sampling.py --family sdar` first")
    torch.set_num_threads(2)
    prompt = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    ours = SDARBackbone.from_pretrained(MODEL).eval()
    sampler = BlockSampler(
        gen_length=GEN, block_length=BLOCK, denoising_steps=STEPS, temperature=0.0, stop_token_ids=[]
    )
    qwen = qwen3_twin(SDARBackbone.from_pretrained(MODEL).eval(), RESULTS / "sdar_arithmetic" / "qwen3_twin")
    kw = {"mask_id": ours.layout.mask_id, "gen_length": GEN, "block_length": BLOCK, "denoising_steps": STEPS}

    def run_ours() -> torch.Tensor:
        return sampler.generate(ours, prompt).tokens

    def run_reference() -> torch.Tensor:
        return block_diffusion_generate(qwen, prompt, stopping_criteria_idx=[], **kw)[0]

    eager_tokens = run_ours()
    assert torch.equal(eager_tokens[0, -GEN:], run_reference()[0, -GEN:]), "the two loops disagree"
    out: dict[str, float] = {}
    out["ours_eager_s"] = timed(run_ours)[1]
    out["reference_eager_s"] = timed(run_reference)[1]
    ours.forward = torch.compile(ours.forward, dynamic=True)  # type: ignore[method-assign]
    qwen.forward = torch.compile(qwen.forward, dynamic=True)  # type: ignore[method-assign]
    out["ours_compile_first_s"], out["ours_compiled_s"] = timed(run_ours)
    out["reference_compile_first_s"], out["reference_compiled_s"] = timed(run_reference)
    assert torch.equal(run_ours(), eager_tokens), "compiling changed our tokens"
    out["eager_over_eager"] = out["reference_eager_s"] / out["ours_eager_s"]
    out["compiled_over_compiled"] = out["reference_compiled_s"] / out["ours_compiled_s"]
    out["ours_compiled_over_reference_eager"] = out["reference_eager_s"] / out["ours_compiled_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sdar_compile.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
