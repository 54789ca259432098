"""ParallelSampler: MMaDA-Parallel's joint text + image sampler on interleaved rows (research/mmada.md §5.4)."""

from __future__ import annotations

import pytest
import torch
from sampler_helpers import Spy

import dllm_zoo.samplers.parallel as parallel_module
from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.data.interleave import InterleaveSpans, drop_conditions, interleave_row
from dllm_zoo.samplers import ParallelSampler, canvas_after, committed_at, guided_logits, gumbel_temperature
from dllm_zoo.schedules import LinearSchedule
from dllm_zoo.tokenizers.layout import TokenLayout

T, N, S = 9, 10, 6  # 8 text targets, 10 image codes, 6 steps
SPANS = InterleaveSpans(T, N)
P = SPANS.prompt_len
IMG = SPANS.output_image
TXT = slice(SPANS.output_text.start + 1, SPANS.output_text.stop)  # the T − 1 text targets
GREEDY = {"text_temperature": 0.0, "image_temperature": 0.0, "image_argmax": True}

# Pinned plans (T − 1 = 8 text targets, N = 10 codes, S = 6): text LLaDA counts ⌊m/S⌋ + (s < m mod S) per block;
# image cosine ⌊N·cos(π/2·(k+1)/S_img)⌋ left after image step k: 10 → 9, 8, 7, 5, 2, 0 (S_img = 6) and
# 10 → 8, 5, 0 (S_img = 3, second half).
PLANS = {
    ("parallel", None): ([2, 2, 1, 1, 1, 1], [1, 1, 1, 2, 3, 2]),
    ("semi_parallel", None): ([2, 2, 1, 1, 1, 1], [0, 0, 0, 2, 3, 5]),
    ("sequential", None): ([3, 3, 2, 0, 0, 0], [0, 0, 0, 2, 3, 5]),
    ("parallel", 3): ([2, 1, 2, 1, 1, 1], [1, 1, 1, 2, 3, 2]),  # blocks (0,3) (3,6) (6,8), two steps each
    ("sequential", 3): ([3, 3, 2, 0, 0, 0], [0, 0, 0, 2, 3, 5]),  # S_text = 3: one step per block
}
BLOCK_STEPS = {("parallel", 3): [[1, 2], [3, 4], [5, 6]], ("sequential", 3): [[1], [2], [3]]}


def interleave_prompts(layout: TokenLayout, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` input parts ``[B, P]`` (even rows edit with a random input image, odd rows generate) and their masks."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(b):
        image = layout.image_ids(torch.randint(0, 16, (N,), generator=g)).tolist()
        instruction = torch.randint(97, 123, (1 + i % 5,), generator=g).tolist()
        task = "edit" if i % 2 == 0 else "generate"
        rows.append(interleave_row(task, instruction, [], image if task == "edit" else None, image, layout, SPANS))
    return torch.stack([r["input_ids"][:P] for r in rows]), torch.stack([r["attention_mask"][:P] for r in rows])


@pytest.fixture(scope="module")
def prompts(model: LLaDABackbone) -> tuple[torch.Tensor, torch.Tensor]:
    return interleave_prompts(model.layout, 3)


def run(model, prompts, record=frozenset(), seed: int = 0, **kw):  # type: ignore[no-untyped-def]
    ids, mask = prompts
    sampler = ParallelSampler(T, N, steps=kw.pop("steps", S), **kw)
    return sampler.generate(model, ids, mask, generator=torch.Generator().manual_seed(seed), record=record)


@pytest.mark.parametrize("mode", ["parallel", "semi_parallel", "sequential"])
def test_output_contract(model: LLaDABackbone, prompts, mode: str) -> None:
    ids, mask = prompts
    lay = model.layout
    out = run(model, prompts, mode=mode, text_block_length=4)
    b = ids.shape[0]
    assert out.tokens.shape == out.step_map.shape == out.attention_mask.shape == (b, SPANS.length)
    assert out.nfe == S
    assert not (out.tokens == lay.mask_id).any()  # everything revealed
    assert torch.equal(out.tokens[:, :P], ids)  # prompt untouched
    tail = torch.tensor(SPANS.output_tail(lay))
    fixed = tail != lay.mask_id
    assert torch.equal(out.tokens[:, P:][:, fixed], tail[fixed].expand(b, -1))  # <|soi|> <|eoi|> BOS kept
    image, text = out.tokens[:, IMG], out.tokens[:, TXT]
    assert lay.is_image(image).all()
    assert ((text < lay.text_vocab_size) & (text != lay.mask_id)).all()  # text ids only
    targets = torch.zeros(SPANS.length, dtype=torch.bool)
    targets[IMG] = targets[TXT] = True
    assert (out.step_map[:, ~targets] == 0).all()
    assert ((out.step_map[:, targets] >= 1) & (out.step_map[:, targets] <= S)).all()
    ones = torch.ones(b, SPANS.length - P, dtype=torch.bool)
    assert torch.equal(out.attention_mask, torch.cat([mask.bool(), ones], dim=1))


@pytest.mark.parametrize(("mode", "block"), list(PLANS))
def test_reveals_per_step_follow_the_schedules(model: LLaDABackbone, prompts, mode: str, block: int | None) -> None:
    text_plan, image_plan = PLANS[(mode, block)]
    sampler = ParallelSampler(T, N, steps=S, mode=mode, text_block_length=block)  # type: ignore[arg-type]
    plan = sampler.plan()
    assert list(plan.text_counts) == text_plan
    assert list(plan.image_counts) == image_plan
    out = run(model, prompts, mode=mode, text_block_length=block, seed=1)  # sampled: temperature 1 on the image
    for row in range(out.tokens.shape[0]):
        assert torch.bincount(out.step_map[row, TXT], minlength=S + 1)[1:].tolist() == text_plan
        assert torch.bincount(out.step_map[row, IMG], minlength=S + 1)[1:].tolist() == image_plan
    half = S // 2
    if mode != "parallel":  # the image waits for the second half
        assert (out.step_map[:, IMG] > half).all()
    if mode == "sequential":  # ... and the text is complete before it starts
        assert (out.step_map[:, TXT] <= half).all()
    for j, steps in enumerate(BLOCK_STEPS.get((mode, block), [])):  # semi-AR: block j only on its own steps
        a, z = plan.text_block_bounds[j]
        assert set(out.step_map[:, TXT][:, a:z].unique().tolist()) == set(steps)


def test_plan_bounds_and_even_step_split() -> None:
    plan = ParallelSampler(text_len=12, num_image_tokens=4, steps=7, text_block_length=4).plan()
    assert plan.text_block_bounds == ((0, 4), (4, 8), (8, 11))  # the last block is shorter (T − 1 = 11)
    assert plan.text_blocks == (0, 0, 0, 1, 1, 2, 2)  # 7 steps over 3 blocks: 3, 2, 2
    assert plan.text_counts == (2, 1, 1, 2, 2, 2, 1)
    assert sum(plan.image_counts) == 4
    assert min(plan.image_counts) >= 0
    assert plan.image_steps == tuple(range(7))


@pytest.mark.parametrize(
    ("mode", "w_img", "w_txt", "rows"),
    [
        ("parallel", 3.5, 0.0, [6] * 4),  # one 2B-row forward per step
        ("parallel", 0.0, 0.0, [3] * 4),
        ("sequential", 3.5, 0.0, [3, 3, 6, 6]),  # the unguided text half runs B rows
        ("sequential", 0.0, 1.5, [6, 6, 3, 3]),
        ("semi_parallel", 3.5, 0.0, [3, 3, 6, 6]),
    ],
)
def test_one_forward_per_step(model: LLaDABackbone, prompts, mode: str, w_img: float, w_txt: float, rows) -> None:
    spy = Spy(model)
    ids, mask = prompts
    sampler = ParallelSampler(T, N, steps=4, mode=mode, image_guidance_scale=w_img, text_guidance_scale=w_txt)  # type: ignore[arg-type]
    out = sampler.generate(spy, ids, mask, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 4 == len(spy.calls)
    assert [c["input_ids"].shape[0] for c in spy.calls] == rows


def test_unconditional_rows_drop_both_conditions(model: LLaDABackbone, prompts) -> None:
    ids, mask = prompts
    lay, b = model.layout, ids.shape[0]
    spy = Spy(model)
    ParallelSampler(T, N, steps=3, mode="semi_parallel", text_block_length=4).generate(
        spy, ids, mask, generator=torch.Generator().manual_seed(0)
    )
    drop = torch.ones(b, dtype=torch.bool)
    un_ids, un_mask = drop_conditions(ids, mask.bool(), drop, drop, lay, SPANS)
    text_pos = torch.arange(TXT.start, TXT.stop)
    img_pos = torch.arange(IMG.start, IMG.stop)
    # 3 text steps over 2 blocks (2 + 1). Step 1: text block 0 alone, unguided; steps 2, 3: the image and text
    # block 0, then 1, guided.
    expected_at = [text_pos[:4], torch.cat([img_pos, text_pos[:4]]), torch.cat([img_pos, text_pos[4:]])]
    for call, at in zip(spy.calls, expected_at):
        assert torch.equal(call["logits_at"], at.expand(call["input_ids"].shape[0], -1))
    cond, guided = spy.calls[0], spy.calls[1]
    assert torch.equal(cond["input_ids"][:, :P], ids)
    assert torch.equal(cond["attention_mask"][:, :P], mask.bool())
    inp, am = guided["input_ids"], guided["attention_mask"]
    assert torch.equal(inp[:b, :P], ids)
    assert torch.equal(inp[b:, :P], un_ids)
    assert torch.equal(inp[b:, P:], inp[:b, P:])  # both branches share the canvas' output part
    assert torch.equal(am[b:, :P], un_mask)
    assert not am[b:, SPANS.input_image].any()
    assert am[:, P:].all()


def test_first_step_choices_come_from_the_guided_logits(model: LLaDABackbone, prompts) -> None:
    """Step 1 of a greedy parallel run: text = top LLaDA confidence of the standard text CFG; image = global top."""
    ids, mask = prompts
    lay, b = model.layout, ids.shape[0]
    w_img, w_txt = 2.0, 1.5
    spy = Spy(model)
    sampler = ParallelSampler(T, N, steps=S, image_guidance_scale=w_img, text_guidance_scale=w_txt, **GREEDY)
    out = sampler.generate(spy, ids, mask, record={1})
    logits = spy.calls[0]["logits"].float()
    cond, uncond = logits[:b], logits[b:]
    off, c = lay.image_offset, lay.image_codebook_size
    il = (1 + w_img) * cond[:, :N, off : off + c] - w_img * uncond[:, :N, off : off + c]
    tl = (1 + w_txt) * cond[:, N:, : lay.text_vocab_size] - w_txt * uncond[:, N:, : lay.text_vocab_size]
    tl[..., lay.mask_id] = -torch.inf
    best_code = il.log_softmax(-1).max(-1)
    text_prob = tl.softmax(-1).max(-1)
    first = committed_at(out.step_map, 1)
    n_txt, n_img = (counts[0] for counts in PLANS[("parallel", None)])
    for row in range(b):
        img_first, txt_first = first[row, IMG], first[row, TXT]
        assert set(img_first.nonzero().flatten().tolist()) == set(best_code.values[row].topk(n_img).indices.tolist())
        assert torch.equal(out.tokens[row, IMG][img_first], best_code.indices[row][img_first] + off)
        assert set(txt_first.nonzero().flatten().tolist()) == set(text_prob.values[row].topk(n_txt).indices.tolist())
        assert torch.equal(out.tokens[row, TXT][txt_first], text_prob.indices[row][txt_first])
    assert torch.allclose(guided_logits(torch.cat([cond, uncond]), w_txt), (1 + w_txt) * cond - w_txt * uncond)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_snapshots_agree_with_step_map(model: LLaDABackbone, prompts, mode: str) -> None:
    lay = model.layout
    out = run(model, prompts, record=set(range(0, S + 2)), mode=mode, text_block_length=3, text_temperature=1.0)
    assert out.snapshots is not None
    assert sorted(out.snapshots) == list(range(1, S + 1))
    start = torch.cat([prompts[0], torch.tensor(SPANS.output_tail(lay)).expand(prompts[0].shape[0], -1)], dim=1)
    assert torch.equal(canvas_after(out.tokens, out.step_map, 0, lay.mask_id), start)
    before = start
    for step in range(1, S + 1):
        snap = out.snapshots[step]
        assert torch.equal(snap, canvas_after(out.tokens, out.step_map, step, lay.mask_id))
        new = committed_at(out.step_map, step)
        assert torch.equal(new, (before == lay.mask_id) & (snap != lay.mask_id))  # exactly the step's tokens
        before = snap
    assert torch.equal(out.snapshots[S], out.tokens)
    per_row = torch.tensor([1, 3, 5])  # ParaRL: a different step per rollout
    rebuilt = canvas_after(out.tokens, out.step_map, per_row, lay.mask_id)
    for row, step in enumerate(per_row.tolist()):
        assert torch.equal(rebuilt[row], out.snapshots[step][row])
        assert torch.equal(committed_at(out.step_map, per_row)[row], out.step_map[row] == step)


@pytest.mark.parametrize(("mode", "block"), [("parallel", 4), ("sequential", None)])
def test_batched_rows_equal_their_batch_1_runs(model: LLaDABackbone, mode: str, block: int | None) -> None:
    ids, mask = interleave_prompts(model.layout, 4, seed=3)
    sampler = ParallelSampler(T, N, steps=S, mode=mode, text_block_length=block, **GREEDY)  # type: ignore[arg-type]
    out = sampler.generate(model, ids, mask)
    for i in range(4):
        one = sampler.generate(model, ids[i : i + 1], mask[i : i + 1])
        assert torch.equal(out.tokens[i], one.tokens[0])
        assert torch.equal(out.step_map[i], one.step_map[0])


def test_guidance_scale_zero_is_the_unguided_output(model: LLaDABackbone, prompts) -> None:
    """Scale 0 skips the unconditional rows; a vanishing scale runs them (2B rows) and changes nothing."""
    unguided = run(model, prompts, image_guidance_scale=0.0, text_temperature=1.0, seed=4)
    vanishing = run(model, prompts, image_guidance_scale=1e-30, text_guidance_scale=1e-30, text_temperature=1.0, seed=4)
    guided = run(model, prompts, image_guidance_scale=3.5, text_temperature=1.0, seed=4)
    assert unguided.nfe == vanishing.nfe == guided.nfe == S
    assert torch.equal(unguided.tokens, vanishing.tokens)
    assert torch.equal(unguided.step_map, vanishing.step_map)
    assert not torch.equal(unguided.tokens, guided.tokens)


def test_seeded_and_temperature_sensitive(model: LLaDABackbone, prompts) -> None:
    a = run(model, prompts, seed=5, text_temperature=1.0)
    b = run(model, prompts, seed=5, text_temperature=1.0)
    c = run(model, prompts, seed=6, text_temperature=1.0)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.step_map, b.step_map)
    assert not torch.equal(a.tokens, c.tokens)
    g1, g2 = (run(model, prompts, seed=seed, **GREEDY) for seed in (5, 6))
    assert torch.equal(g1.tokens, g2.tokens)  # greedy ignores the generator


@pytest.mark.parametrize("compounding", [False, True])
def test_image_temperature_runs_on_the_image_clock(
    model: LLaDABackbone, prompts, monkeypatch: pytest.MonkeyPatch, compounding: bool
) -> None:
    calls: list[tuple] = []

    def spy(step: int, steps: int, temperature: float, compounding: bool = False) -> float:
        calls.append((step, steps, temperature, compounding))
        return gumbel_temperature(step, steps, temperature, compounding)

    monkeypatch.setattr(parallel_module, "gumbel_temperature", spy)
    run(model, prompts, mode="semi_parallel", image_temperature=2.0, compounding_temperature=compounding)
    assert calls == [(k, 3, 2.0, compounding) for k in range(3)]  # image steps 4..6 = its own steps 0..2


def test_other_text_schedule_and_codebook(model: LLaDABackbone, prompts) -> None:
    out = run(model, prompts, text_schedule=LinearSchedule(), codebook_size=8)
    codes = model.layout.image_codes(out.tokens[:, IMG])
    assert ((codes >= 0) & (codes < 8)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be a positive int"),
        ({"steps": 1, "mode": "sequential"}, "needs steps >= 2"),
        ({"mode": "joint"}, "mode must be one of"),
        ({"text_len": 1}, "text_len must be >= 2"),
        ({"num_image_tokens": 0}, "num_image_tokens must be a positive int"),
        ({"text_block_length": 0}, "text_block_length must be a positive int"),
        ({"text_block_length": 1, "steps": 4, "mode": "sequential"}, "8 text blocks .* more than the 2 text steps"),
        ({"text_temperature": -1.0}, "text_temperature"),
        ({"image_temperature": float("inf")}, "image_temperature"),
        ({"image_guidance_scale": float("nan")}, "image_guidance_scale"),
        ({"text_guidance_scale": float("inf")}, "text_guidance_scale"),
        ({"image_schedule": "cosine"}, "image_schedule must be a NoiseSchedule"),
        ({"codebook_size": 0}, "codebook_size"),
    ],
)
def test_init_errors_name_the_argument(kwargs: dict, match: str) -> None:
    args = {"text_len": T, "num_image_tokens": N, "steps": S, **kwargs}
    with pytest.raises(ValueError, match=match):
        ParallelSampler(**args)


def test_generate_errors(model: LLaDABackbone, prompts) -> None:
    ids, mask = prompts
    lay = model.layout
    sampler = ParallelSampler(T, N, steps=2)
    with pytest.raises(ValueError, match=r"P=20 columns.*text_len=9 and num_image_tokens=10 need .* = 22"):
        sampler.generate(model, ids[:, :-2], mask[:, :-2])
    with pytest.raises(ValueError, match=r"prompt_ids must be \[B, P\]"):
        sampler.generate(model, ids[0], mask[0])
    with pytest.raises(ValueError, match="prompt_mask must be"):
        sampler.generate(model, ids, mask[:1])
    with pytest.raises(ValueError, match=r"<\|soi\|> at column 1 and <\|eoi\|> at column N \+ 2"):
        ParallelSampler(text_len=T + 1, num_image_tokens=N - 1, steps=2).generate(model, ids, mask)
    bad = ids.clone()
    bad[0, -1] = lay.mask_id
    with pytest.raises(ValueError, match="contains the mask id"):
        sampler.generate(model, bad, mask)
    with pytest.raises(ValueError, match="codebook_size=100 exceeds"):
        ParallelSampler(T, N, steps=2, codebook_size=100).generate(model, ids, mask)
    big = ParallelSampler(text_len=300, num_image_tokens=300, steps=2)
    with pytest.raises(ValueError, match="1205 tokens, more than the model's max_sequence_length=1024"):
        big.generate(model, torch.zeros(1, 603, dtype=torch.long))


def test_layouts_without_images_or_interleave_tokens_are_rejected(prompts) -> None:
    ids, mask = prompts
    default = TokenLayout.preset("default")
    text_only = default.replace(
        name="text-only", vocab_size=default.text_vocab_size, image_offset=None, image_codebook_size=0
    )
    no_ipad = default.replace(special_tokens={k: v for k, v in default.special_tokens.items() if k != "[iPAD]"})
    torch.manual_seed(0)
    for layout, match in ((text_only, "image-code segment; layout 'text-only'"), (no_ipad, r"lacks \['\[iPAD\]'\]")):
        tiny = LLaDABackbone("tiny", layout=layout).eval()
        with pytest.raises(ValueError, match=match):
            ParallelSampler(T, N, steps=2).generate(tiny, ids, mask)
