"""ParaRL: chosen steps, step replay, normalisation, per-step and output-level advantages, a fit, and learning."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.data import ParallelDataModule
from dllm_zoo.data.interleave import BuildInterleaveRow, InterleaveSpans, drop_conditions
from dllm_zoo.data.parallel import collate_parallel_rows
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.rewards import PartialAlignment, Reward
from dllm_zoo.rewards.partial import MASKED_PIXEL
from dllm_zoo.rl import ClippedSurrogate, group_advantages, normalize_rewards, replay_rows, step_advantages
from dllm_zoo.samplers import ParallelSampler
from dllm_zoo.stages import OptimConfig, ParaRL
from dllm_zoo.stages.pararl import decode_outputs
from dllm_zoo.tokenizers import ByteTokenizer, PaletteTokenizer

T, SIDE, S = 24, 6, 8  # text_len, image side (2x2 ShapesWorld grid: N = 36 codes), sampler steps
N = SIDE * SIDE
SPANS = InterleaveSpans(T, N)
TASK = ShapesWorld(grid_size=2, num_train=64, num_val=4)
TOK, IMG = ByteTokenizer(), PaletteTokenizer()


def rows(n: int, text_len: int = T, task: str | None = None) -> dict[str, Any]:
    """``n`` interleaved ShapesWorld rows, editing and generation alternating (or all of ``task``)."""
    names = ["edit", "generate"] if task is None else [task]
    build = [BuildInterleaveRow(name, TOK, IMG, text_len, SIDE) for name in names]  # type: ignore[arg-type]
    samples = itertools.islice(TASK.generate("train"), n)
    return collate_parallel_rows([build[i % len(build)](s) for i, s in enumerate(samples)])


def sampler(**kwargs: Any) -> ParallelSampler:
    defaults: dict[str, Any] = {"steps": S, "codebook_size": 16, "text_temperature": 1.0}
    return ParallelSampler(T, N, **{**defaults, **kwargs})


def stage(**kwargs: Any) -> ParaRL:
    torch.manual_seed(0)
    defaults: dict[str, Any] = {
        "backbone": LLaDABackbone("tiny", layout="default"),
        "sampler": sampler(),
        "reward": PartialAlignment(TASK),
        "num_generations": 4,
        "normalization": "fixed",
        "reward_mean": 0.0,
        "reward_std": 1.0,
        "tokenizer": TOK,
        "image_tokenizer": IMG,
    }
    defaults.update(kwargs)
    if defaults["normalization"] != "fixed":
        defaults.update(reward_mean=None, reward_std=None)
    st = ParaRL(**defaults)
    st.configure_model()
    return st


class ColourShare(Reward):
    """Share of the image's pixels in palette colour ``k`` (still-masked pixels count as other colours)."""

    name = "colour"

    def __init__(self, k: int = 3) -> None:
        self.k = k

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float | None]:
        images = torch.tensor(fields["images"])
        return (images == self.k).float().mean(dim=(1, 2)).tolist()


class Constant(Reward):
    """Scores every state ``value`` (statistics without spread)."""

    name = "constant"

    def __init__(self, value: float = 0.5) -> None:
        self.value = value

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float | None]:
        return [self.value] * len(completions)


# ------------------------------------------------------------------------------------------------ pieces


def test_chosen_steps_are_shared_within_a_group_and_differ_across_groups() -> None:
    st = stage(num_chosen_steps=3)
    group = torch.arange(3).repeat_interleave(4)
    steps = st.draw_steps(group, 3, st.step_generator(0, stream=1))
    assert steps.shape == (12, 3)
    by_group = steps.view(3, 4, 3)
    assert (by_group == by_group[:, :1]).all()  # shared by the G rollouts of a group
    assert (steps.diff(dim=1) > 0).all()  # sorted, no repeats
    assert ((steps >= 1) & (steps <= S)).all()
    assert by_group[:, 0].tolist() == [[4, 7, 8], [2, 5, 6], [2, 4, 5]]  # pinned: one draw per group
    again = st.draw_steps(group, 3, st.step_generator(0, stream=1))
    assert torch.equal(steps, again)  # a function of (seed, step, batch_idx, stream)
    # each of the 8 steps is drawn with probability s/S = 3/8 over many groups
    many = st.draw_steps(torch.arange(4000), 4000, torch.Generator().manual_seed(1))
    freq = torch.bincount(many.flatten(), minlength=S + 1)[1:] / 4000
    assert torch.allclose(freq, torch.full((S,), 3 / 8), atol=0.03)


def test_replayed_canvas_before_a_step_is_the_samplers_snapshot() -> None:
    st = stage()
    batch = rows(2)
    p = SPANS.prompt_len
    smp = sampler(mode="semi_parallel", text_block_length=8)
    out = smp.generate(
        st.net,
        batch["input_ids"][:, :p],
        batch["attention_mask"][:, :p],
        generator=torch.Generator().manual_seed(0),
        record=set(range(1, S + 1)),
    )
    assert out.snapshots is not None
    start = torch.cat([batch["input_ids"][:, :p], torch.tensor(SPANS.output_tail(st.layout)).expand(2, -1)], dim=1)
    snaps = {0: start, **out.snapshots}
    every = torch.arange(1, S + 1).expand(2, -1)  # every step of both rollouts
    canvas, committed = replay_rows(out.tokens, out.step_map, every, st.layout.mask_id)
    canvas, committed = canvas.view(2, S, -1), committed.view(2, S, -1)
    for t in range(1, S + 1):
        assert torch.equal(canvas[:, t - 1], snaps[t - 1]), t  # the canvas just before step t
        assert torch.equal(committed[:, t - 1], snaps[t] != snaps[t - 1]), t  # exactly the tokens of step t
    assert committed.sum(dim=1).eq(1).sum() == 2 * (N + T - 1)  # every target committed exactly once


def test_decode_outputs_drops_masked_text_and_marks_masked_codes() -> None:
    batch = rows(1, task="generate")
    lay = LLaDABackbone("tiny", layout="default").layout
    canvas = batch["input_ids"].clone()
    text = slice(SPANS.output_text.start + 1, SPANS.output_text.stop)
    canvas[0, text.start + 1] = lay.mask_id  # the 2nd reasoning byte ("t" of "<think>")
    image = SPANS.output_image
    canvas[0, image.start + 7] = lay.mask_id  # pixel (1, 1)
    texts, images = decode_outputs(canvas, SPANS, TOK, IMG)
    full, ref = decode_outputs(batch["input_ids"], SPANS, TOK, IMG)
    assert full[0].startswith("<think>")
    assert texts[0] == "<" + full[0][2:]
    assert images[0, 1, 1] == MASKED_PIXEL
    assert (images != ref).sum() == 1


def test_normalisation_matches_hand_values() -> None:
    c = torch.tensor([0.10, 0.30, 0.35, 0.45, 0.80, -1.0])
    r = normalize_rewards(c, 0.3, 0.1)
    # (c − μ)/σ = −2, 0, 0.5, 1.5, 5, −13 -> clipped -1, 0, 0.5, 1, 1, -1 -> ½(1 + ·)
    assert torch.allclose(r, torch.tensor([0.0, 0.5, 0.75, 1.0, 1.0, 0.0]))
    st = stage(reward_mean=0.3, reward_std=0.1)
    rollout = st.rollout(rows(1), st.sampler, 4, st.step_generator(0))
    steps = torch.tensor([[2, 5]]).expand(4, -1)
    scores = torch.tensor([[0.1, 0.3, 0.35], [0.45, 0.8, -1.0], [math.nan, 0.3, 0.3], [0.3, 0.3, 0.3]])
    scored = st.advantages(rollout, steps, scores)
    assert torch.allclose(scored.step_rewards, torch.tensor([[0.0, 0.5], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5]]))
    assert torch.allclose(scored.output_rewards, torch.tensor([0.75, 0.0, 0.5, 0.5]))  # NaN -> ½
    assert torch.equal(scored.rollout.rewards["partial_alignment"], scores[:, 2])


def test_per_step_advantages_match_hand_values() -> None:
    # two groups of three rollouts, two chosen steps each
    r = torch.tensor([[0.0, 0.5], [0.5, 0.5], [1.0, 0.5], [0.2, 1.0], [0.2, 0.0], [0.8, 0.5]])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    a = step_advantages(r, group)
    s6 = math.sqrt(1 / 6)  # population std of (0, ½, 1)
    sd = math.sqrt(0.08)  # population std of (0.2, 0.2, 0.8): mean 0.4, deviations −0.2, −0.2, 0.4
    hand = torch.tensor(
        [
            [-0.5 / s6, 0.0],  # step 1 of group 0 has spread; step 2 has none -> 0
            [0.0, 0.0],
            [0.5 / s6, 0.0],
            [-0.2 / sd, 0.5 / s6],  # step 2 of group 1: (1, 0, ½) has the spread of (0, ½, 1)
            [-0.2 / sd, -0.5 / s6],
            [0.4 / sd, 0.0],
        ]
    )
    assert torch.allclose(a, hand, atol=1e-5)
    # the same through the stage (μ = 0, σ = 1: R = ½(1 + c))
    st = stage()
    rollout = st.rollout(rows(2), st.sampler, 3, st.step_generator(0))
    assert torch.equal(rollout.group, group)
    scores = torch.cat([2 * r - 1, torch.zeros(6, 1)], dim=1)
    scored = st.advantages(rollout, torch.tensor([[1, 4]] * 3 + [[3, 8]] * 3), scores)
    assert torch.allclose(scored.advantages, hand, atol=1e-5)


def test_output_level_gives_every_chosen_step_of_a_rollout_its_final_advantage() -> None:
    st = stage(reward_level="output", num_chosen_steps=3)
    rollout = st.rollout(rows(2), st.sampler, 4, st.step_generator(0))
    steps = st.draw_steps(rollout.group, 2, st.step_generator(0, stream=1))
    scores = torch.rand(8, 4, generator=torch.Generator().manual_seed(0))
    scored = st.advantages(rollout, steps, scores)
    expected = group_advantages(0.5 * (1 + scores[:, 3]), rollout.group)
    assert torch.allclose(scored.advantages, expected[:, None].expand(-1, 3))
    assert (scored.advantages.std(dim=1) == 0).all()
    step_level = stage().advantages(rollout, steps, scores).advantages
    assert not torch.allclose(step_level, scored.advantages)


def test_statistics_from_data_and_from_rollouts() -> None:
    batches = [rows(8), rows(8)]
    data = stage(normalization="data", reward=ColourShare())
    clean = torch.cat([data.score_canvases(b["input_ids"], torch.arange(8), b) for b in batches])
    assert data.reward_stats is None
    mean, std = data.estimate_reward_stats(batches)
    # ground truth at random mask levels: masking only removes colour-3 pixels
    assert 0 < mean < float(clean.mean())
    assert (mean, std) == pytest.approx((0.04167, 0.08158), abs=1e-4)  # pinned
    assert data.reward_stats == (mean, std)
    checkpoint: dict[str, Any] = {}
    data.on_save_checkpoint(checkpoint)
    resumed = stage(normalization="data")
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.reward_stats == (mean, std)  # a resumed run normalises as the original did
    roll = stage(normalization="rollouts", reward=ColourShare())
    mean, std = roll.estimate_reward_stats(batches[:1])
    assert 0 < mean < 1 / 16  # partial images of an untrained model: about 1/16 of the revealed codes
    assert std > 0
    flat = stage(normalization="data", reward=Constant(0.5))
    with pytest.warns(UserWarning, match="σ = 1"):
        assert flat.estimate_reward_stats(batches[:1]) == (0.5, 1.0)


def test_bad_arguments_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--model.reward_mean and --model.reward_std go together"):
        ParaRL(sampler=sampler(), normalization="data", reward_mean=0.0, reward_std=1.0)
    with pytest.raises(ValueError, match="--model.reward_mean and --model.reward_std go together"):
        ParaRL(sampler=sampler(), normalization="fixed", reward_mean=0.0)
    with pytest.raises(ValueError, match="--model.num_chosen_steps must be in 1..8"):
        ParaRL(sampler=sampler(), num_chosen_steps=9)
    with pytest.raises(ValueError, match="--model.reward_level"):
        ParaRL(sampler=sampler(), reward_level="final")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--model.eval_sampler generates rows"):
        ParaRL(sampler=sampler(), eval_sampler=ParallelSampler(T + 1, N, steps=S))
    st = stage(normalization="data")
    with pytest.raises(RuntimeError, match="reward statistics are not set"):
        st.training_step(rows(2), 0)
    with pytest.raises(ValueError, match="set --model.sampler.init_args.text_len"):
        st.rollout(rows(2, text_len=T + 2), st.sampler, 2)


# ---------------------------------------------------------------------------------------------------- fits


def trainer(steps: int, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "log_every_n_steps": 1,
    }
    return L.Trainer(**{**defaults, **kwargs})


def datamodule(root: Path, text_len: int = T, batch_size: int = 2, **kwargs: Any) -> ParallelDataModule:
    return ParallelDataModule(
        task=TASK, text_len=text_len, image_size=SIDE, batch_size=batch_size, cache_dir=str(root), **kwargs
    )


def test_fit_estimates_statistics_logs_every_key_and_first_iteration_is_on_policy(tmp_path: Path) -> None:
    st = stage(
        sampler=ParallelSampler(96, N, steps=S, codebook_size=16, text_temperature=1.0),
        normalization="data",
        stats_fraction=0.25,  # 16 of the 64 training rows
        objective=ClippedSurrogate(beta=1e-4, kl_against="reference"),
    )
    before = copy.deepcopy(st.net.state_dict())
    dm = datamodule(tmp_path, text_len=96, tasks={"generate": 1.0})
    t = trainer(2, limit_val_batches=1, val_check_interval=2)
    t.fit(st, dm)
    m = t.callback_metrics
    keys = [f"train/{k}/{j}" for k in ("step_score", "step_reward", "chosen_step") for j in (1, 2, 3)]
    keys += [f"train/{k}" for k in ("output_alignment", "output_reward", "reward", "advantage_abs")]
    keys += [f"train/{k}" for k in ("loss", "surrogate", "kl", "clip_fraction", "ratio", "entropy")]
    keys += ["train/committed_tokens", "train/rollout_nfe", "reward_stats/mean", "reward_stats/std"]
    keys += [f"time/{k}" for k in ("rollout", "scoring", "training", "step", "outside_model")]
    keys += ["data/truncated", "val/output_alignment"]
    assert not [k for k in keys if k not in m], sorted(m)
    assert m["train/ratio"].item() == pytest.approx(1.0, abs=1e-6)  # μ = 1: old log-probs = current ones
    assert m["train/clip_fraction"].item() == 0.0
    assert m["train/kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["train/rollout_nfe"].item() == S
    assert st.reward_stats is not None
    assert st.reward_stats[1] > 0
    assert m["reward_stats/mean"].item() == pytest.approx(st.reward_stats[0])
    assert st.heldout_after["prompts"] == 4.0
    assert "output_alignment" in st.heldout_after
    assert t.global_step == 2
    assert st.reference is not None  # a frozen copy for the KL against the reference
    torch.testing.assert_close(st.reference.state_dict(), before)


def test_statistics_sample_is_a_fixed_random_draw_of_training_rows(tmp_path: Path) -> None:
    dm = datamodule(tmp_path, batch_size=4)
    first = list(dm.sample_dataloader(6, seed=3))
    assert [b["input_ids"].shape[0] for b in first] == [4, 2]  # exactly 6 rows
    again = torch.cat([b["input_ids"] for b in dm.sample_dataloader(6, seed=3)])
    assert torch.equal(torch.cat([b["input_ids"] for b in first]), again)
    other = torch.cat([b["input_ids"] for b in dm.sample_dataloader(6, seed=4)])
    assert not torch.equal(again, other)


def test_inner_iterations_and_micro_batches_train(tmp_path: Path) -> None:
    st = stage(inner_iterations=2, micro_batch_size=5, reward=ColourShare())
    t = trainer(4)
    st.on_train_start = lambda: None  # type: ignore[method-assign]
    st.on_train_end = lambda: None  # type: ignore[method-assign]
    t.fit(st, datamodule(tmp_path))
    assert t.global_step == 4  # 2 RL steps x 2 inner iterations
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert t.callback_metrics["train/ratio"].item() != pytest.approx(1.0, abs=1e-6)  # off-policy 2nd iteration


class Trace(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.values.append(float(trainer.callback_metrics["train/output_alignment"]))


def toy_run(root: Path, steps: int = 20, **kwargs: Any) -> list[float]:
    """``train/output_alignment`` per RL step of a ParaRL run on :class:`ColourShare` (μ = 0, σ = 1)."""
    trace = Trace()
    st = stage(
        reward=ColourShare(k=3),
        optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=1, min_lr_scale=1.0),
        **kwargs,
    )
    st.on_train_start = lambda: None  # type: ignore[method-assign]
    st.on_train_end = lambda: None  # type: ignore[method-assign]
    trainer(steps, callbacks=[trace]).fit(st, datamodule(root))
    return trace.values


@pytest.mark.parametrize(
    ("kwargs", "last"),
    [
        ({"reward_level": "step", "sampler": sampler(image_guidance_scale=0.0)}, 0.90),
        ({"reward_level": "output", "sampler": sampler(image_guidance_scale=0.0)}, 0.75),
        ({"reward_level": "step", "guided_likelihood": True}, 0.95),  # CFG 3.5 in rollouts and in the likelihood
    ],
    ids=["step", "output", "step-guided"],
)
def test_the_policy_gradient_raises_a_toy_reward(tmp_path: Path, kwargs: dict[str, Any], last: float) -> None:
    """Share of image pixels in colour 3 (1/16 for an untrained model): only a right gradient sign raises it."""
    values = toy_run(tmp_path, **kwargs)
    assert values[0] == pytest.approx(0.066 if "guided_likelihood" in kwargs else 0.059, abs=0.005)  # pinned
    assert sum(values[-3:]) / 3 > last, values


def test_conditional_likelihood_under_image_cfg_can_move_away_from_the_reward(tmp_path: Path) -> None:
    """The caveat of the module docstring: the unconditional branch learns the condition-free reward faster."""
    values = toy_run(tmp_path, steps=18)  # CFG 3.5 in the rollouts, conditional likelihood in training
    assert max(values) > 0.3, values  # it rises first …
    assert sum(values[-3:]) / 3 < 0.1, values  # … then the guided sampler avoids the rewarded colour


def test_guided_likelihood_is_the_samplers_guided_distribution() -> None:
    st = stage(sampler=sampler(image_guidance_scale=2.0, text_guidance_scale=0.5), guided_likelihood=True)
    rollout = st.rollout(rows(2), st.sampler, 2, st.step_generator(0))
    steps = torch.tensor([[3], [3], [6], [6]])
    noisy, committed = replay_rows(rollout.tokens, rollout.step_map, steps, st.layout.mask_id)
    with torch.no_grad():
        logp, _ = st.token_logprobs(st.net, noisy, rollout.tokens, committed, rollout.attention_mask)
        drop = torch.ones(4, dtype=torch.bool)
        un_ids, un_attn = drop_conditions(noisy, rollout.attention_mask, drop, drop, st.layout, SPANS)
        cond = st.net(noisy, attention_mask=rollout.attention_mask).logits
        uncond = st.net(un_ids, attention_mask=un_attn).logits
    w = torch.full((1, SPANS.length, 1), 0.5)
    w[:, SPANS.output_image] = 2.0
    guided = ((1 + w) * cond - w * uncond).log_softmax(-1).gather(-1, rollout.tokens[..., None])[..., 0]
    assert committed.any(dim=1).all()
    torch.testing.assert_close(logp[committed], guided[committed], atol=1e-5, rtol=1e-5)
    assert (logp[~committed] == 0).all()
    plain = stage(sampler=st.sampler).token_logprobs(st.net, noisy, rollout.tokens, committed, rollout.attention_mask)
    assert not torch.allclose(plain[0], logp)  # the default scores the conditional denoiser alone
