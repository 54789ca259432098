import copy
import runpy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from rl_testing import RewardTrace, Sevens, fit_quietly

from dllm_zoo.backbones import LLaDABackbone, SDARBackbone
from dllm_zoo.backbones.attention import block_causal_mask
from dllm_zoo.data import Arithmetic, PromptDataModule
from dllm_zoo.rewards import ArithmeticCorrectness, Reward
from dllm_zoo.rl import RandomMasking
from dllm_zoo.rl.trace import rollout_positions
from dllm_zoo.rl.value_model import ValueModel
from dllm_zoo.samplers import BlockSampler, LLaDASampler
from dllm_zoo.stages import OptimConfig, TraceRL
from dllm_zoo.stages.tracerl import TraceRollout, chunk_advantages

ROOT = Path(__file__).resolve().parents[2]


class Digits(Reward):
    """Share of digits in the completion: spread within a group, so every step has a gradient."""

    name = "digits"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


class ChunkDigits(Reward):
    """A process reward: per chunk of ``chunk_length`` completion tokens, whether the chunk holds a digit token."""

    name = "chunk_digits"

    def __init__(self, chunk_length: int = 4) -> None:
        self.chunk_length = chunk_length
        self.calls = 0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[Any]:
        self.calls += 1
        out: list[Any] = []
        for ids in fields["completion_ids"]:
            chunks = [ids[i : i + self.chunk_length] for i in range(0, len(ids), self.chunk_length)]
            out.append([float(any(48 <= t < 58 for t in c)) for c in chunks] or None)
        return out


def _block_model() -> SDARBackbone:
    torch.manual_seed(0)
    return SDARBackbone("tiny")


def _full_model() -> LLaDABackbone:
    torch.manual_seed(0)
    return LLaDABackbone("tiny")


def _stage(kind: str = "block", **kwargs: Any) -> TraceRL:
    defaults: dict[str, Any] = {"rewards": [ArithmeticCorrectness(), Digits()], "num_generations": 4}
    if kind == "block":
        defaults["backbone"] = _block_model()
        defaults["sampler"] = BlockSampler(gen_length=16, block_length=4, denoising_steps=4, temperature=1.0)
    else:
        defaults["backbone"] = _full_model()
        defaults["sampler"] = LLaDASampler(gen_length=16, block_length=16, steps=8, temperature=1.0)
    defaults.update(kwargs)
    return TraceRL(**defaults)


def _data(batch_size: int = 3) -> PromptDataModule:
    return PromptDataModule(task=Arithmetic(num_train=64, num_val=6, max_operand=9), batch_size=batch_size)


def _fit(stage: TraceRL, steps: int = 2, **trainer: Any) -> L.Trainer:
    return fit_quietly(stage, _data(), steps, **trainer)


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def _scored_rollout(stage: TraceRL, left_pad: bool = False) -> tuple[TraceRollout, torch.Tensor]:
    """One scored, kept rollout batch of the stage, outside a trainer (prompts left-padded to different lengths)."""
    dm = _data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    if left_pad:  # drop 3 real tokens of the first prompt: a left-padded row whose p mod B differs from the others
        ids, mask = batch["prompt_ids"].clone(), batch["prompt_mask"].clone()
        ids[0, 3:] = ids[0, :-3].clone()
        ids[0, :3] = stage.layout.pad_id
        mask[0, :3] = False
        batch = {**batch, "prompt_ids": ids, "prompt_mask": mask}
    stage._tokenizer = dm.tokenizer
    rollout = stage.rollout(batch, stage.sampler, stage.num_generations, torch.Generator().manual_seed(0))
    stage.advantages(rollout)
    sub = rollout.kept()
    assert sub.advantages is not None
    return sub, sub.advantages


# ----------------------------------------------------------------------------------------------- value model
@pytest.mark.parametrize("make", [_full_model, _block_model], ids=["llada", "sdar"])
def test_value_model_starts_at_zero_and_round_trips(make: Any, tmp_path: Path) -> None:
    model = ValueModel(make())
    ids = torch.randint(0, 200, (2, 9))
    assert torch.equal(model(ids), torch.zeros(2, 9))
    torch.nn.init.normal_(model.head.weight)
    model.save_pretrained(tmp_path)
    loaded = ValueModel.from_pretrained(tmp_path)
    assert type(loaded.backbone) is type(model.backbone)
    torch.testing.assert_close(loaded(ids), model(ids))
    with pytest.raises(FileNotFoundError, match="not a value-model directory"):
        ValueModel.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- rows and mask
@pytest.mark.parametrize("training_block_size", [None, 8])
def test_every_target_is_scored_in_the_state_the_sampler_decoded_it_from(training_block_size: int | None) -> None:
    """A trajectory row scores each target of training block b exactly as a block-causal forward over the rollout's
    prompt, the clean blocks before b and the row's noisy block b (left-padded prompts, p mod B ≠ 0, B = 4 and 8)."""
    stage = _stage(training_block_size=training_block_size)
    net = stage.net.eval()
    sub, adv = _scored_rollout(stage, left_pad=True)
    rows = stage.build_rows(sub, adv, None)
    trace = rows.trace
    assert trace is not None
    block = 4 if training_block_size is None else 8
    with torch.no_grad():
        logp, _ = stage.token_logprobs(net, rows.noisy[0], rows.labels, rows.targets[0], rows.keys)
    positions = rollout_positions(sub.prompt_mask, sub.attention_mask)
    p = sub.prompt_width
    checked = 0
    for m in range(rows.num_rows):
        src = int(trace.source[m])
        targets = trace.target_mask[m].nonzero().squeeze(1)
        for b in (positions[src, targets] // block).unique().tolist():
            in_block = (positions[src] // block == b) & (torch.arange(sub.tokens.shape[1]) >= p)
            canvas = torch.where(in_block, trace.input_ids[m], sub.tokens[src])
            keep = sub.attention_mask[src] & (positions[src] // block <= b)
            with torch.no_grad():
                ref = net(
                    canvas[None],
                    attention_mask=block_causal_mask(positions[src][None], block, keep[None]),  # the training grid
                    position_ids=positions[src][None],
                    logits_at=(trace.target_mask[m] & in_block)[None],
                ).logits
            assert ref is not None
            cols = (trace.target_mask[m] & in_block).nonzero().squeeze(1)
            want = torch.log_softmax(ref.float(), -1).gather(1, sub.tokens[src, cols][:, None]).squeeze(1)
            got = logp[m, logp.shape[1] - (sub.tokens.shape[1] - p) + (cols - p)]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            checked += cols.numel()
    assert checked == int((trace.steps > 0).sum())  # every trainable token, once


def test_training_block_size_merges_rollout_blocks_into_longer_traces() -> None:
    rows4 = _stage().build_rows(*_scored_rollout(_stage()), None)
    stage8 = _stage(training_block_size=8)
    rows8 = stage8.build_rows(*_scored_rollout(stage8), None)
    assert rows4.trace is not None
    assert rows8.trace is not None
    # 4 steps per rollout block: <= 4 rows per response at B = 4, <= 8 at B = 8 (two rollout blocks, in order)
    assert int(rows4.trace.rows_per_rollout.max()) <= 4
    assert int(rows8.trace.rows_per_rollout.max()) == 8


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("block", {}),
        ("full", {"shrink": 2}),
        ("block", {"training_block_size": 8}),
        ("block", {"baseline": "random_masking"}),
        ("block", {"baseline": "coupled"}),
        ("full", {"baseline": "coupled"}),
    ],
    ids=["sdar", "llada-shrink2", "sdar-b4-to-b8", "sdar-random-masking", "sdar-coupled", "llada-coupled"],
)
def test_policy_only_tracerl_and_its_baselines_update_the_policy(kind: str, options: dict[str, Any]) -> None:
    stage = _stage(kind, inner_iterations=2, optim=OptimConfig(lr=1e-3, warmup_steps=0, min_lr_scale=1.0), **options)
    before = copy.deepcopy(stage.net.state_dict())
    m = _fit(stage, steps=4).callback_metrics
    assert _changed(before, stage.net)
    for key in ("train/loss", "train/kl", "train/clip_fraction", "train/entropy", "train/rows", "time/rows"):
        assert key in m, key
    assert ("train/rows_per_response" in m) == (options.get("baseline", "trace") == "trace")
    assert "train/value_loss" not in m


@pytest.mark.parametrize("kind", ["block", "full"])
def test_the_value_model_trains_with_its_own_learning_rate_and_feeds_token_advantages(kind: str) -> None:
    value = ValueModel(_block_model() if kind == "block" else _full_model())
    stage = _stage(kind, value_model=value, value_lr=1e-3, inner_iterations=2)
    before_policy = copy.deepcopy(stage.net.state_dict())
    before_value = copy.deepcopy(value.state_dict())
    m = _fit(stage, steps=4).callback_metrics
    assert _changed(before_policy, stage.net)
    assert _changed(before_value, value)
    assert float(value.head.weight.abs().sum()) > 0  # the zero head has moved
    for key in ("train/value_loss", "train/explained_variance", "train/value_mean", "time/value"):
        assert key in m, key
    # the value model is trained by its own optimizer, not the policy's
    policy_params = {id(p) for g in stage.optimizers().optimizer.param_groups for p in g["params"]}  # type: ignore[union-attr]
    assert not policy_params & {id(p) for p in value.parameters()}
    assert stage._value_optimizer is not None
    assert stage._value_optimizer.param_groups[0]["lr"] == 1e-3


def _gae_stage(gamma: float, lam: float) -> tuple[TraceRL, TraceRollout, torch.Tensor, Any, torch.Tensor]:
    value = ValueModel(_block_model())
    torch.nn.init.normal_(value.head.weight, std=0.5)  # non-zero values so the identities are not trivial
    stage = _stage(value_model=value, gamma=gamma, lam=lam)
    sub, adv = _scored_rollout(stage)
    rows = stage.build_rows(sub, adv, None)
    assert rows.trace is not None
    with torch.no_grad():
        old = stage.values(rows.noisy[0], rows.keys)
    gae, values = stage.trace_gae(sub, adv, rows.trace, old)
    return stage, sub, adv, gae, values


def test_gae_gamma_lambda_one_gives_the_sequence_reward_minus_the_value_end_to_end() -> None:
    _, sub, adv, gae, values = _gae_stage(1.0, 1.0)
    trainable = (sub.response_mask & (sub.step_map > 0)).bool()
    assert bool(values[trainable].abs().gt(0).all())
    want_ret = torch.where(trainable, adv[:, None].expand_as(values), 0.0)
    torch.testing.assert_close(gae.returns, want_ret)
    torch.testing.assert_close(gae.advantages, torch.where(trainable, want_ret - values, 0.0))


def test_gae_lambda_zero_is_the_one_step_td_error_end_to_end() -> None:
    stage, sub, adv, gae, values = _gae_stage(1.0, 0.0)
    trace = stage.build_rows(sub, adv, None).trace
    assert trace is not None
    steps = trace.steps
    last = steps == steps.amax(dim=1, keepdim=True)
    rewards = torch.where(last & (steps > 0), adv[:, None].expand_as(values), 0.0)
    want = torch.zeros_like(values)
    for n in range(values.shape[0]):  # the definition, token by token: r_j − V_j + mean of V over the next step
        ids = steps[n][steps[n] > 0].unique().tolist()
        for k, step in enumerate(ids):
            cols = steps[n] == step
            nxt = values[n][steps[n] == ids[k + 1]].mean() if k + 1 < len(ids) else torch.tensor(0.0)
            want[n, cols] = rewards[n, cols] - values[n, cols] + nxt
    torch.testing.assert_close(gae.advantages, want)


def test_process_rewards_land_on_the_step_that_completed_each_chunk_and_train() -> None:
    judge = ChunkDigits(chunk_length=4)
    stage = _stage(value_model=ValueModel(_block_model()), process_reward=judge, gamma=0.99)
    sub, adv = _scored_rollout(stage)
    assert sub.chunk_rewards is not None
    assert judge.calls == 1
    assert sub.chunk_rewards.shape[0] == sub.num_rollouts
    z = chunk_advantages(sub.chunk_rewards, sub.group)
    assert torch.equal(torch.isnan(z), torch.isnan(sub.chunk_rewards))
    rows = stage.build_rows(sub, adv, None)
    assert rows.trace is not None
    zero = torch.zeros(rows.num_rows, rows.labels.shape[1])
    with_chunks, _ = stage.trace_gae(sub, adv, rows.trace, zero)
    sub.chunk_rewards = None
    outcome_only, _ = stage.trace_gae(sub, adv, rows.trace, zero)
    assert not torch.allclose(with_chunks.returns, outcome_only.returns)
    m = _fit(stage, steps=2).callback_metrics
    assert "train/process_reward" in m
    assert judge.calls >= 3  # one call per training rollout batch, none for held-out rollouts


# ------------------------------------------------------------------------------------ the policy gradient works
def test_the_trace_policy_gradient_raises_the_reward() -> None:
    """End to end on the block model: sampled completions with more sevens become more likely."""
    trace = RewardTrace("sevens")
    stage = _stage(
        rewards=[Sevens()],
        accuracy_reward=None,
        num_generations=8,
        inner_iterations=2,
        optim=OptimConfig(lr=5e-3, weight_decay=0.0, warmup_steps=1, min_lr_scale=1.0),
    )
    _fit(stage, steps=24, callbacks=[trace])  # 12 RL steps of μ = 2
    # pinned (seeded, CPU): the share of sevens climbs from ~0.02 to ~0.5 within 12 RL steps
    first, last = sum(trace.values[:3]) / 3, sum(trace.values[-3:]) / 3
    assert first < 0.05
    assert last > 0.3, trace.values


# ------------------------------------------------------------------------------------------------- arguments
def test_bad_arguments_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--model.baseline must be"):
        _stage(baseline="nope")
    with pytest.raises(ValueError, match="--model.masking is for the random_masking"):
        _stage(masking=RandomMasking())
    with pytest.raises(ValueError, match="--model.shrink must be >= 1"):
        _stage(shrink=0)
    with pytest.raises(ValueError, match="--model.value_model needs --model.baseline=trace"):
        _stage(baseline="coupled", value_model=ValueModel(_block_model()))
    with pytest.raises(ValueError, match="--model.gamma and --model.lam"):
        _stage(gamma=1.5)
    with pytest.raises(ValueError, match="--model.value_clip must be > 0"):
        _stage(value_clip=0.0)
    with pytest.raises(ValueError, match="--model.process_reward needs --model.value_model"):
        _stage(process_reward=ChunkDigits())
    with pytest.raises(ValueError, match="--model.process_reward .* chunk_length"):
        _stage(value_model=ValueModel(_block_model()), process_reward=Digits())
    with pytest.raises(ValueError, match="--model.training_block_size=6 must be a multiple"):
        _stage(training_block_size=6).configure_model()
    with pytest.raises(ValueError, match="--model.training_block_size=8 is for block-attention backbones"):
        _stage("full", training_block_size=8).configure_model()
    with pytest.raises(ValueError, match="--model.num_generations must be >= 2"):
        _stage(num_generations=1)


def test_a_checkpoint_keeps_the_value_optimizer(tmp_path: Path) -> None:
    stage = _stage(value_model=ValueModel(_block_model()), value_lr=1e-3)
    _fit(stage, steps=2, default_root_dir=str(tmp_path))
    assert stage._value_optimizer is not None
    checkpoint: dict[str, Any] = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(checkpoint)
    resumed = _stage(
        value_model=ValueModel(_block_model()), value_lr=1e-3, optim=OptimConfig(warmup_steps=0, decay_steps=10)
    )
    resumed.on_load_checkpoint(checkpoint)
    resumed.configure_optimizers()
    assert resumed._value_optimizer is not None
    saved = stage._value_optimizer.state_dict()["state"]
    restored = resumed._value_optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys()
    assert saved
    torch.testing.assert_close(restored[0]["exp_avg"], saved[0]["exp_avg"])


# ---------------------------------------------------------------------------------------------------- recipe
def test_the_recipe_runs_two_steps_from_a_backbone_directory(tmp_path: Path) -> None:
    start = tmp_path / "start"
    _block_model().save_pretrained(start)
    main = runpy.run_path(str(ROOT / "recipes" / "tracerl.py"))["main"]
    main(
        [
            "fit",
            "--warm_start",
            str(start),
            "--model.sampler.init_args.gen_length",
            "8",
            "--model.eval_sampler.init_args.gen_length",
            "8",
            "--model.num_generations",
            "2",
            "--data.batch_size",
            "2",
            "--data.task.init_args.num_val",
            "2",
            "--trainer.max_steps",
            "2",
            "--model.optim.warmup_steps",
            "1",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    version = next((tmp_path).glob("*/version_0"))
    assert list(version.glob("events.out.tfevents.*"))
    assert "TraceRL" in (version / "config.yaml").read_text()


def test_the_auto_warm_start_is_refused_for_a_backbone_it_does_not_fit() -> None:
    main = runpy.run_path(str(ROOT / "recipes" / "tracerl.py"))["main"]
    config = ROOT / "recipes" / "configs" / "tracerl" / "full_attention.yaml"
    with pytest.raises(ValueError, match="--warm_start auto trains a SDARBackbone .* does not fit .*LLaDABackbone"):
        main(["fit", "--config", str(config), "--warm_start", "auto"])
