"""MaskGITSampler: MMaDA's text-to-image sampler, checked against a brute-force per-row loop written from the spec."""

from __future__ import annotations

import math

import pytest
import torch
from maskgit_reference import reference
from sampler_helpers import Spy, left_pad

import dllm_zoo.samplers.maskgit as maskgit_module
from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.samplers import MaskGITSampler, gumbel_temperature, t2i_special_ids
from dllm_zoo.schedules import CosineSchedule, LinearSchedule, NoiseSchedule, SigmoidSchedule
from dllm_zoo.tokenizers.layout import TokenLayout


def t2i_prompts(layout: TokenLayout, captions: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[iPAD]… <|t2i|> BOS caption EOS`` left-padded with ``[iPAD]``: ``(ids [B, P], mask [B, P])``."""
    rows = [
        torch.tensor([layout.token_id("<|t2i|>"), layout.bos_id, *cap, layout.eos_id], dtype=torch.long)
        for cap in captions
    ]
    return left_pad(rows, layout.token_id("[iPAD]"))


CAPTIONS = [b"a red cube", b"sky", b"two cats on a mat"]


@pytest.fixture(scope="module")
def prompts(model: LLaDABackbone) -> tuple[torch.Tensor, torch.Tensor]:
    return t2i_prompts(model.layout, CAPTIONS)


def _gamma_sigmoid(r: float) -> float:
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    return (s(3) - s(6 * r - 3)) / (s(3) - s(-3))


@pytest.mark.parametrize(
    ("w", "temperature", "compounding", "schedule", "gamma"),
    [
        (2.0, 1.0, False, CosineSchedule(), lambda r: math.cos(math.pi * r / 2)),
        (2.0, 3.0, True, CosineSchedule(), lambda r: math.cos(math.pi * r / 2)),
        (0.0, 0.0, False, SigmoidSchedule(), _gamma_sigmoid),
        (1.5, 0.0, False, LinearSchedule(eps=0.0), lambda r: 1 - r),
    ],
)
def test_matches_brute_force_reference(
    model: LLaDABackbone, prompts, w: float, temperature: float, compounding: bool, schedule: NoiseSchedule, gamma
) -> None:
    ids, mask = prompts
    n, steps = 9, 5
    sampler = MaskGITSampler(n, steps, w, schedule, temperature, compounding)
    out = sampler.generate(model, ids, mask, generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_map = reference(
        model, ids, mask, n, steps, w, gamma, temperature, compounding, torch.Generator().manual_seed(3)
    )
    assert torch.equal(out.tokens, ref_tokens)
    assert torch.equal(out.step_map, ref_map)


def test_output_layout_and_contract(model: LLaDABackbone, prompts) -> None:
    ids, mask = prompts
    lay = model.layout
    b, p = ids.shape
    n, steps = 16, 4
    out = MaskGITSampler(n, steps, guidance_scale=3.5).generate(
        model, ids, mask, generator=torch.Generator().manual_seed(0), record={1, 3, 4}
    )
    assert out.tokens.shape == out.step_map.shape == out.attention_mask.shape == (b, p + n + 2)
    assert torch.equal(out.tokens[:, :p], ids)
    assert (out.tokens[:, p] == lay.token_id("<|soi|>")).all()
    assert (out.tokens[:, -1] == lay.token_id("<|eoi|>")).all()
    image = out.tokens[:, p + 1 : p + 1 + n]
    assert lay.is_image(image).all()
    assert (out.step_map[:, : p + 1] == 0).all()
    assert (out.step_map[:, -1] == 0).all()
    smap = out.step_map[:, p + 1 : p + 1 + n]
    assert ((smap >= 1) & (smap <= steps)).all()
    assert out.nfe == steps
    assert torch.equal(out.attention_mask, torch.cat([mask.bool(), torch.ones(b, n + 2, dtype=torch.bool)], dim=1))
    assert out.snapshots is not None
    assert sorted(out.snapshots) == [1, 3, 4]
    assert torch.equal(out.snapshots[4], out.tokens)
    snap = out.snapshots[1][:, p + 1 : p + 1 + n]
    assert torch.equal(snap == lay.mask_id, smap > 1)  # still masked after step 1 = committed later
    assert torch.equal(snap[smap == 1], image[smap == 1])


def test_deterministic_with_generator(model: LLaDABackbone, prompts) -> None:
    ids, mask = prompts
    sampler = MaskGITSampler(num_image_tokens=9, steps=4)
    a = sampler.generate(model, ids, mask, generator=torch.Generator().manual_seed(5))
    b = sampler.generate(model, ids, mask, generator=torch.Generator().manual_seed(5))
    c = sampler.generate(model, ids, mask, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.step_map, b.step_map)
    assert not torch.equal(a.tokens, c.tokens)


def _expected_reveals(n: int, steps: int, gamma) -> list[int]:
    """MaskGIT's plan: after step s, max(1, min(left − 1, ⌊N·γ((s+1)/S)⌋)) stay masked; the last step clears all."""
    left, counts = n, []
    for s in range(steps):
        new = 0 if s == steps - 1 else max(1, min(left - 1, math.floor(n * gamma((s + 1) / steps))))
        counts.append(left - new)
        left = new
    return counts


@pytest.mark.parametrize(
    ("schedule", "gamma", "n", "steps", "expected"),
    [
        (CosineSchedule(), lambda r: math.cos(math.pi * r / 2), 16, 5, [1, 3, 3, 5, 4]),
        (CosineSchedule(), lambda r: math.cos(math.pi * r / 2), 9, 4, [1, 2, 3, 3]),
        (CosineSchedule(), lambda r: math.cos(math.pi * r / 2), 4, 7, [1, 1, 1, 0, 0, 0, 1]),  # clamps
        (SigmoidSchedule(), _gamma_sigmoid, 16, 5, [2, 4, 5, 4, 1]),
        (LinearSchedule(), lambda r: 0.999 * (1 - r) + 0.001, 16, 5, [4, 3, 3, 3, 3]),
    ],
)
def test_reveals_per_step_follow_schedule(
    model: LLaDABackbone, prompts, schedule: NoiseSchedule, gamma, n: int, steps: int, expected: list[int]
) -> None:
    assert _expected_reveals(n, steps, gamma) == expected
    ids, mask = prompts
    out = MaskGITSampler(n, steps, guidance_scale=0.0, schedule=schedule, temperature=1.0).generate(
        model, ids, mask, generator=torch.Generator().manual_seed(1)
    )
    smap = out.step_map[:, ids.shape[1] + 1 : -1]
    for row in smap:
        assert torch.bincount(row, minlength=steps + 1)[1:].tolist() == expected


def test_unconditional_prefix_same_length_for_any_caption(model: LLaDABackbone, prompts) -> None:
    ids, mask = prompts
    lay = model.layout
    b, p = ids.shape
    ipad, t2i = lay.token_id("[iPAD]"), lay.token_id("<|t2i|>")
    expected = torch.tensor([ipad] * (p - 3) + [t2i, lay.bos_id, lay.eos_id]).expand(b, p)
    sampler = MaskGITSampler(num_image_tokens=9, steps=3, guidance_scale=2.0)
    un_ids, un_mask = sampler.unconditional_prefix(lay, ids, mask.bool())
    assert torch.equal(un_ids, expected)
    assert torch.equal(un_mask, torch.tensor([False] * (p - 3) + [True] * 3).expand(b, p))
    # The forward sees both branches as one 2B-row batch, the uncond rows with that prefix and the same image part.
    spy = Spy(model)
    out = sampler.generate(spy, ids, mask, generator=torch.Generator().manual_seed(0))
    assert len(spy.calls) == out.nfe == 3
    for call in spy.calls:
        inp = call["input_ids"]
        assert inp.shape == (2 * b, p + 9 + 2)
        assert torch.equal(inp[b:, :p], expected)
        assert torch.equal(inp[b:, p:], inp[:b, p:])
        assert torch.equal(inp[:b, :p], ids)
        am = call["attention_mask"]
        assert torch.equal(am[:b, :p], mask.bool())
        assert torch.equal(am[b:, :p], un_mask)
        assert am[:, p:].all()
        assert torch.equal(call["logits_at"], torch.arange(p + 1, p + 10).expand(2 * b, 9))


def test_no_guidance_runs_b_rows(model: LLaDABackbone, prompts) -> None:
    ids, mask = prompts
    rows: list[int] = []
    handle = model.register_forward_hook(lambda mod, args, kwargs, out: rows.append(args[0].shape[0]), with_kwargs=True)
    try:
        out = MaskGITSampler(num_image_tokens=9, steps=4, guidance_scale=0.0).generate(model, ids, mask)
        MaskGITSampler(num_image_tokens=9, steps=2, guidance_scale=1.0).generate(model, ids, mask)
    finally:
        handle.remove()
    assert out.nfe == 4
    assert rows == [3] * 4 + [6] * 2


def test_gumbel_temperature_schedules() -> None:
    plain = [gumbel_temperature(s, 4, 2.0) for s in range(4)]
    compounding = [gumbel_temperature(s, 4, 2.0, compounding=True) for s in range(4)]
    assert plain == pytest.approx([1.5, 1.0, 0.5, 0.0])  # τ·(1 − r)
    assert compounding == pytest.approx([1.5, 0.75, 0.1875, 0.0])  # τ ← τ·(1 − r), reassigned every step
    assert gumbel_temperature(2, 5, 0.0, compounding=True) == 0.0


@pytest.mark.parametrize("compounding", [False, True])
def test_sampler_uses_gumbel_temperature(
    model: LLaDABackbone, prompts, monkeypatch: pytest.MonkeyPatch, compounding: bool
) -> None:
    calls: list[tuple] = []

    def spy(step: int, steps: int, temperature: float, compounding: bool = False) -> float:
        calls.append((step, steps, temperature, compounding))
        return gumbel_temperature(step, steps, temperature, compounding)

    monkeypatch.setattr(maskgit_module, "gumbel_temperature", spy)
    ids, mask = prompts
    sampler = MaskGITSampler(9, 4, 0.0, temperature=2.0, compounding_temperature=compounding)
    sampler.generate(model, ids, mask, generator=torch.Generator().manual_seed(0))
    assert calls == [(s, 4, 2.0, compounding) for s in range(3)]  # the last step commits without a draw


def test_text_only_or_incomplete_layouts_are_rejected() -> None:
    text_only = TokenLayout(
        name="text-only",
        text_vocab_size=32,
        vocab_size=32,
        mask_id=31,
        bos_id=28,
        eos_id=29,
        pad_id=29,
        special_tokens={"[iPAD]": 20, "<|t2i|>": 21, "<|soi|>": 22, "<|eoi|>": 23},
    )
    with pytest.raises(ValueError, match="text-only"):
        t2i_special_ids(text_only)
    torch.manual_seed(0)
    tiny = LLaDABackbone("tiny", layout=text_only).eval()
    with pytest.raises(ValueError, match="image-code segment"):
        MaskGITSampler(4, 2).generate(tiny, torch.tensor([[21, 28, 5, 29]]))
    default = TokenLayout.preset("default")
    no_eoi = default.replace(special_tokens={k: v for k, v in default.special_tokens.items() if k != "<|eoi|>"})
    with pytest.raises(ValueError, match=r"lacks \['<\|eoi\|>'\]"):
        t2i_special_ids(no_eoi)
    assert t2i_special_ids(default) == tuple(default.token_id(t) for t in ("[iPAD]", "<|t2i|>", "<|soi|>", "<|eoi|>"))


def test_canvas_must_fit_and_prefix_must_hold_uncond(model: LLaDABackbone, prompts) -> None:
    ids, mask = prompts
    with pytest.raises(ValueError, match="num_image_tokens=1100 does not fit"):
        MaskGITSampler(num_image_tokens=1100).generate(model, ids, mask)
    with pytest.raises(ValueError, match="at least 3 columns"):
        MaskGITSampler(4, 2, guidance_scale=1.0).generate(model, ids[:, -2:])
    with pytest.raises(ValueError, match="prompt_mask"):
        MaskGITSampler(4, 2).generate(model, ids, mask[:, 1:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_image_tokens": 0}, "num_image_tokens"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"temperature": -1.0}, "temperature"),
        ({"schedule": "cosine"}, "schedule"),
    ],
)
def test_init_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MaskGITSampler(**kwargs)


def test_compounding_temperature_changes_the_order(model: LLaDABackbone, prompts) -> None:
    ids, mask = prompts
    outs = [
        MaskGITSampler(16, 4, 0.0, temperature=5.0, compounding_temperature=c).generate(
            model, ids, mask, generator=torch.Generator().manual_seed(2)
        )
        for c in (False, True)
    ]
    # Same draws (the step-0 τ is equal), different Gumbel scales from step 1 on: a different commit order.
    assert not torch.equal(outs[0].step_map, outs[1].step_map)
