"""MaskGIT text-to-image sampling (MMaDA, research/mmada.md §5.2): ``MaskGITSampler`` vs two plain reference loops.

    python benchmarks/maskgit.py                          # mini preset, batch 1 and 8 -> results/maskgit.json
    python benchmarks/maskgit.py --preset small --batches 1  # the 27.6 M demo preset (batch 8 adds ~10 min)
    python benchmarks/maskgit.py --quick                  # smoke run: tiny preset, 4 steps, 1 repeat, writes nothing

Setting: a randomly initialised ``LLaDABackbone`` (fixed seed, fp32, CPU, 2 threads) with the default token layout
(64-code image segment); prompts are t2i prefixes ``[iPAD]… <|t2i|> BOS caption EOS`` of ``T = 64`` text tokens
(``P = 65``) built by ``dllm_zoo.callbacks.multimodal.t2i_prompts`` from ShapesWorld validation captions; ``N = 256``
image tokens (canvas ``P + N + 2 = 323``), 15 steps, CFG ``w = 3.5``, cosine schedule, Gumbel temperature 1
(MaskGIT's ``τ·(1 − r)``), at batch 1 and 8. Three loops on the same weights and prompts:

* ``ours``: :class:`dllm_zoo.samplers.MaskGITSampler` (one ``2B``-row forward per step, logits only at the ``N``
  image positions, batched selection);
* ``reference_spec_loop``: the test suite's brute-force loop (``tests/samplers/maskgit_reference.py``, written
  from the spec), copied here: per step and per row a conditional forward and a separate unconditional forward
  (``2B`` one-row forwards), full-vocabulary logits over the whole canvas then sliced, per-row Python selection;
* ``reference_released_structure``: the structure of the released ``t2i_generate`` (MMaDA / Show-o): per step ONE
  forward over ``cat([cond, uncond])`` (``2B`` rows), full-vocabulary logits over the whole canvas, sliced to the
  image positions and the codebook, ``softmax`` → ``multinomial``, and ``mask_by_random_topk``'s batched
  sort + cut-off re-masking.

Both references are aligned with our sampler's random stream and its documented deliberate differences (no Gumbel
draw when ``τ_s = 0``; ``mask_len`` from the float64 cosine; non-compounding ``τ``), so with identical generators all
three must produce identical tokens, which the benchmark checks (``identity``). None of those alignments changes
the work done per step. The released float32 cosine would keep 127 instead of 128 positions masked at step 10 of 15
(``256·cos(π/3)``), a one-token difference in the plan, not in the cost.

Reports image tokens/s (``B·N`` per run / seconds), forward calls counted by a forward hook (a CFG ``2B``-row forward is
one call; rows, positions and logit values per run are reported too), peak memory of each run
(:class:`peak_memory.PeakMemory`: resident-set growth on CPU), best of ``--repeats`` timed runs after one untimed
warm-up run (whose tokens feed the identity check). JSON to ``benchmarks/results/maskgit.json``, one section per preset
(an existing file keeps its other presets).

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (set it to override): with the default spinning policy, 2 OpenMP
threads on 2 cores that another process also uses make every parallel region wait for a scheduler slice (a mini
forward took 1.26 s instead of 0.02 s on the shared CI machine). The value is recorded in the JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime; see the docstring

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "samplers"))

from maskgit_reference import reference  # noqa: E402

from dllm_zoo.backbones import LLaDABackbone  # noqa: E402
from dllm_zoo.callbacks.multimodal import t2i_prompts  # noqa: E402
from dllm_zoo.data.synthetic import ShapesWorld  # noqa: E402
from dllm_zoo.samplers import MaskGITSampler  # noqa: E402
from dllm_zoo.tokenizers import ByteTokenizer  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cosine_gamma(r: float) -> float:
    """MaskGIT's cosine reveal curve ``γ(r) = cos(π r / 2)`` in float64 (what ``CosineSchedule`` gives the sampler)."""
    return math.cos(math.pi * r / 2)


# --------------------------------------------------------------------------------------------------------------------
# Reference 1, the plain reference loop: the brute-force loop from the spec (tests/samplers/maskgit_reference.py).
# --------------------------------------------------------------------------------------------------------------------
reference_spec_loop = reference


@torch.no_grad()
def reference_released_structure(
    model: LLaDABackbone,
    ids: Tensor,
    mask: Tensor,
    n: int,
    steps: int,
    w: float,
    gamma: Callable[[float], float],
    tau0: float,
    compounding: bool,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """REFERENCE: the released ``t2i_generate`` loop's structure, aligned with our random stream (module docstring).

    Per step: ``model_input = cat([input_ids, uncond_input_ids])`` (the uncond prefix spliced onto the current image
    part), one forward with full-vocabulary logits at every position, ``chunk(2)``, CFG, slice to the image positions
    ``[-(N + 1):-1]`` and the codebook, ``softmax``, ``multinomial``; known codes kept; ``mask_by_random_topk``:
    ``log(p_sampled) + τ·Gumbel`` (known positions ``log(finfo.max)``), sort, ``cut_off = sorted[mask_len]``,
    re-mask ``confidence < cut_off``. Output = the last step's ``sampled_ids``. Returns ``(tokens, step_map)``.
    """
    lay = model.layout
    ipad, t2i, soi, eoi = (lay.token_id(t) for t in ("[iPAD]", "<|t2i|>", "<|soi|>", "<|eoi|>"))
    off, codebook, mask_id = lay.image_offset, lay.image_codebook_size, lay.mask_id
    assert off is not None
    b, p = ids.shape
    input_ids = torch.cat([ids, torch.full((b, 1), soi), torch.full((b, n), mask_id), torch.full((b, 1), eoi)], dim=1)
    attention_mask = torch.cat([mask.bool(), torch.ones(b, n + 2, dtype=torch.bool)], dim=1)
    uncond_prefix = torch.tensor([ipad] * (p - 3) + [t2i, lay.bos_id, lay.eos_id]).expand(b, p)
    uncond_attention_mask = torch.tensor([False] * (p - 3) + [True] * (n + 5)).expand(b, p + n + 2)
    all_attention_mask = torch.cat([attention_mask, uncond_attention_mask], dim=0)
    # the image part minus the offset, [MASK] kept as is (input_ids_minus_lm_vocab_size)
    codes = input_ids[:, -(n + 1) : -1].clone()
    codes = torch.where(codes == mask_id, mask_id, codes - off)
    step_map = torch.zeros_like(input_ids)
    tau = tau0
    sampled_ids = codes
    for s in range(steps):
        uncond_input_ids = torch.cat([uncond_prefix, input_ids[:, p:]], dim=1)
        model_input = torch.cat([input_ids, uncond_input_ids])
        logits = model(model_input, attention_mask=all_attention_mask).logits  # [2B, L, V]: every position
        cond_logits, uncond_logits = torch.chunk(logits, 2, dim=0)
        logits = (1 + w) * cond_logits - w * uncond_logits
        logits = logits[:, -(n + 1) : -1, off : off + codebook]
        probs = logits.softmax(dim=-1)
        sampled = probs.reshape(-1, logits.size(-1))
        sampled_ids = torch.multinomial(sampled, 1, generator=generator)[:, 0].view(*logits.shape[:-1])
        unknown_map = codes == mask_id
        sampled_ids = torch.where(unknown_map, sampled_ids, codes)
        ratio = 1.0 * (s + 1) / steps
        mask_ratio = gamma(ratio)  # released: float32 cosine (see the module docstring)
        selected_probs = torch.gather(probs, -1, sampled_ids.long()[..., None]).squeeze(-1)
        selected_probs = torch.where(unknown_map, selected_probs, torch.finfo(selected_probs.dtype).max)
        mask_len = torch.tensor([math.floor(n * mask_ratio)])[None]
        mask_len = torch.max(torch.tensor([1]), torch.min(unknown_map.sum(dim=-1, keepdim=True) - 1, mask_len))
        tau = tau * (1 - ratio) if compounding else tau0 * (1 - ratio)
        if s == steps - 1:  # the released loop re-masks too, then returns sampled_ids: everything is committed
            step_map[:, -(n + 1) : -1] = torch.where(unknown_map, s + 1, step_map[:, -(n + 1) : -1])
            break
        # mask_by_random_topk (released: Gumbel noise drawn even when τ_s = 0; here only when τ_s > 0, as ours)
        confidence = torch.log(selected_probs.clamp(1e-20))
        if tau > 0:
            noise = torch.zeros_like(selected_probs).uniform_(0, 1, generator=generator)
            confidence = confidence + tau * -torch.log((-torch.log(noise.clamp(1e-20))).clamp(1e-20))
        sorted_confidence, _ = torch.sort(confidence, dim=-1)
        cut_off = torch.gather(sorted_confidence, 1, mask_len.long())
        masking = confidence < cut_off
        codes = torch.where(masking, mask_id, sampled_ids)
        input_ids[:, -(n + 1) : -1] = torch.where(masking, mask_id, sampled_ids + off)
        step_map[:, -(n + 1) : -1] = torch.where(unknown_map & ~masking, s + 1, step_map[:, -(n + 1) : -1])
    input_ids[:, -(n + 1) : -1] = sampled_ids + off
    return input_ids, step_map


# --------------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------------
class ForwardCounter:
    """Forward hook on the backbone: calls, rows, positions and logit values computed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = self.rows = self.positions = self.logit_values = 0
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        self.calls += 1
        self.rows += ids.shape[0]
        self.positions += ids.numel()
        if getattr(out, "logits", None) is not None:
            self.logit_values += out.logits.numel()

    def reset(self) -> None:
        self.calls = self.rows = self.positions = self.logit_values = 0

    def remove(self) -> None:
        self._handle.remove()


def check_valid(model: LLaDABackbone, ids: Tensor, tokens: Tensor, n: int) -> bool:
    """Prefix untouched, ``<|soi|>`` / ``<|eoi|>`` in place, every image slot an image code (no ``[MASK]`` left)."""
    lay = model.layout
    b, p = ids.shape
    return (
        tuple(tokens.shape) == (b, p + n + 2)
        and torch.equal(tokens[:, :p], ids)
        and bool((tokens[:, p] == lay.token_id("<|soi|>")).all())
        and bool((tokens[:, -1] == lay.token_id("<|eoi|>")).all())
        and bool(lay.is_image(tokens[:, p + 1 : p + 1 + n]).all())
    )


def measure(
    run: Callable[[torch.Generator], tuple[Tensor, Tensor]],
    counter: ForwardCounter,
    images: int,
    n: int,
    repeats: int,
    seed: int,
) -> tuple[dict[str, Any], tuple[Tensor, Tensor]]:
    """One untimed warm-up run (its output is returned), then ``repeats`` timed runs; the best time counts."""
    counter.reset()
    warm = run(torch.Generator().manual_seed(seed))
    calls, rows, positions, logit_values = counter.calls, counter.rows, counter.positions, counter.logit_values
    seconds, peaks = float("inf"), []
    for _ in range(repeats):
        counter.reset()
        with PeakMemory() as mem:
            start = time.perf_counter()
            out = run(torch.Generator().manual_seed(seed))
            elapsed = time.perf_counter() - start
        seconds = min(seconds, elapsed)
        peaks.append(mem.mib)
        assert counter.calls == calls, "forward calls differ between runs"
        assert torch.equal(out[0], warm[0]), "a run with the same seed gave other tokens"
    return {
        "image_tokens_per_s": images * n / seconds,
        "seconds": seconds,
        "forward_calls": calls,
        "forward_rows": rows,
        "forward_positions": positions,
        "logit_values": logit_values,
        "ms_per_forward_call": 1000 * seconds / calls,
        "image_tokens_per_forward_call": images * n / calls,
        "peak_memory_mib": max(peaks),
        "peak_memory_mib_runs": peaks,
        "peak_memory_kind": mem.kind,
    }, warm


def section(args: argparse.Namespace) -> dict[str, Any]:
    """Every loop at every batch size for one preset."""
    torch.manual_seed(args.seed)
    model = LLaDABackbone(args.preset).eval()
    lay = model.layout
    n, steps, w, tau = args.num_image_tokens, args.steps, args.guidance_scale, args.temperature
    task = ShapesWorld()
    captions = [s["caption"] for s in itertools.islice(task.generate("val"), max(args.batches))]
    tok = ByteTokenizer(lay)
    sampler = MaskGITSampler(num_image_tokens=n, steps=steps, guidance_scale=w, temperature=tau)
    counter = ForwardCounter(model)
    modes: dict[str, dict[str, Any]] = {}
    identity: dict[str, Any] = {}
    loops: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
        "reference_released_structure": reference_released_structure,
        "reference_spec_loop": reference_spec_loop,
    }
    try:
        for batch in args.batches:
            ids, mask = t2i_prompts(tok, captions[:batch], args.text_len)

            def ours(gen: torch.Generator, ids: Tensor = ids, mask: Tensor = mask) -> tuple[Tensor, Tensor]:
                out = sampler.generate(model, ids, mask, generator=gen)
                return out.tokens, out.step_map

            modes[f"ours@{batch}"], (ours_tokens, ours_map) = measure(ours, counter, batch, n, args.repeats, args.seed)
            print(f"ours@{batch}", json.dumps(modes[f"ours@{batch}"]), flush=True)
            valid = {"ours": check_valid(model, ids, ours_tokens, n)}
            same: dict[str, Any] = {}
            for name, fn in loops.items():

                def ref(gen: torch.Generator, fn: Callable = fn, ids: Tensor = ids, mask: Tensor = mask):  # type: ignore[no-untyped-def]
                    return fn(model, ids, mask, n, steps, w, cosine_gamma, tau, False, gen)

                key = f"{name}@{batch}"
                modes[key], (tokens, smap) = measure(ref, counter, batch, n, args.repeats, args.seed)
                print(key, json.dumps(modes[key]), flush=True)
                valid[name] = check_valid(model, ids, tokens, n)
                img = slice(ids.shape[1] + 1, ids.shape[1] + 1 + n)
                same[name] = {
                    "identical_tokens": bool(torch.equal(tokens, ours_tokens)),
                    "identical_step_map": bool(torch.equal(smap, ours_map)),
                    "matching_image_token_fraction": float((tokens[:, img] == ours_tokens[:, img]).float().mean()),
                }
            identity[f"@{batch}"] = {"valid": valid, "vs_ours": same}
    finally:
        counter.remove()

    summary: dict[str, Any] = {}
    for batch in args.batches:
        tps = modes[f"ours@{batch}"]["image_tokens_per_s"]
        for name in loops:
            summary[f"ours_over_{name}@{batch}"] = tps / modes[f"{name}@{batch}"]["image_tokens_per_s"]
    if 1 in args.batches:
        for batch in args.batches:
            if batch != 1:
                summary[f"ours@{batch}_over_ours@1"] = (
                    modes[f"ours@{batch}"]["image_tokens_per_s"] / modes["ours@1"]["image_tokens_per_s"]
                )
    summary["all_identical"] = all(v["identical_tokens"] for i in identity.values() for v in i["vs_ours"].values())
    summary["all_valid"] = all(ok for i in identity.values() for ok in i["valid"].values())
    return {
        "model": f"{args.preset} LLaDA preset, random init (torch.manual_seed({args.seed})), fp32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "layout": lay.name,
        "image_codebook": lay.image_codebook_size,
        "vocab_size": lay.vocab_size,
        "num_image_tokens": n,
        "text_len": args.text_len,
        "prefix_len": args.text_len + 1,
        "canvas_len": args.text_len + 1 + n + 2,
        "steps": steps,
        "guidance_scale": w,
        "temperature": tau,
        "compounding_temperature": False,
        "schedule": "cosine",
        "captions": captions,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": "cpu",
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "timing": f"best of {args.repeats} runs after one warm-up run",
        "modes": modes,
        "identity": identity,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini", choices=("tiny", "mini", "small"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-image-tokens", type=int, default=256)
    parser.add_argument("--text-len", type=int, default=64, help="T: the prefix is T + 1 tokens")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 4 steps, 1 repeat; writes nothing")
    parser.add_argument("--out", default=None, help="JSON file (default: results/maskgit.json; none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.steps, args.repeats = "tiny", 4, 1
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = section(args)
    result["wall_seconds"] = time.perf_counter() - start
    result["load_average_1_5_15_before"] = load_before
    result["load_average_1_5_15_after"] = os.getloadavg()
    print(json.dumps(result["summary"], indent=2))
    if args.quick and args.out is None:
        return
    out = Path(args.out) if args.out else RESULTS / "maskgit.json"
    report: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    report["benchmark"] = "maskgit"
    report[args.preset] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
