import copy
import json
import runpy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from rl_testing import RewardTrace, Sevens, fit_quietly

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.data import Arithmetic, PromptDataModule
from dllm_zoo.rewards import ArithmeticCorrectness, Reward, ThinkFormat
from dllm_zoo.rl import ClippedSurrogate, CoupledMasking, RandomMasking, UniformlySpacedMasking
from dllm_zoo.samplers import LLaDASampler
from dllm_zoo.stages import OptimConfig, UniGRPO

ROOT = Path(__file__).resolve().parents[2]


class DigitCount(Reward):
    """A user's own reward, defined outside the package: the number of digits in the completion, scaled."""

    name = "digits"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.calls = 0

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float | None]:
        self.calls += 1
        return [self.scale * sum(ch.isdigit() for ch in c) for c in completions]

    def stats(self) -> dict[str, int]:
        """Counters the stage logs as reward_stats/<name>/<key> (as CodeExecution's failure counts)."""
        return {"calls": self.calls}


def _stage(**kwargs: Any) -> UniGRPO:
    torch.manual_seed(0)
    defaults: dict[str, Any] = {
        "backbone": LLaDABackbone("tiny"),
        "sampler": LLaDASampler(gen_length=16, block_length=16, steps=8, temperature=1.0),
        "rewards": [ArithmeticCorrectness(), ThinkFormat(), DigitCount(0.1)],
        "num_generations": 4,
        "inner_iterations": 2,
    }
    defaults.update(kwargs)
    return UniGRPO(**defaults)


def _data(batch_size: int = 3) -> PromptDataModule:
    return PromptDataModule(task=Arithmetic(num_train=64, num_val=6, max_operand=9), batch_size=batch_size)


def _fit(stage: UniGRPO, steps: int = 4, **trainer: Any) -> L.Trainer:
    t = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        **trainer,
    )
    t.fit(stage, _data())
    return t


def test_unigrpo_steps_update_the_policy_and_log_every_term() -> None:
    stage = _stage(objective=ClippedSurrogate(beta=0.01, kl_against="reference"))
    before = copy.deepcopy(stage.net.state_dict())
    trainer = _fit(stage)
    m = trainer.callback_metrics
    for key in (
        "train/reward/correctness",
        "train/reward/format",
        "train/reward/digits",
        "train/accuracy",
        "train/reward",
        "train/kl",
        "train/clip_fraction",
        "train/entropy",
        "train/response_length",
        "train/dropped_groups",
        "time/rollout",
        "time/scoring",
        "time/training",
        "time/outside_model",
        "val/accuracy",
        "val/reward/digits",
    ):
        assert key in m, key
    assert trainer.global_step == 4  # 2 RL steps x 2 inner iterations = 4 optimizer steps
    assert stage.reference is not None  # frozen copy for the KL against the reference
    # the policy moved, the reference did not
    moved = any(not torch.equal(before[k], v) for k, v in stage.net.state_dict().items())
    assert moved
    torch.testing.assert_close(stage.reference.state_dict(), before)
    assert stage.heldout_after["prompts"] == 6.0


def test_first_inner_iteration_has_ratio_one_and_no_clipping() -> None:
    """Old log-probs are computed once before the first update, on the same masks: iteration 1 is on-policy."""
    stage = _stage(inner_iterations=1, rewards=[DigitCount()], accuracy_reward=None)
    trainer = _fit(stage, steps=2)
    assert trainer.callback_metrics["train/ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert trainer.callback_metrics["train/clip_fraction"].item() == 0.0


@pytest.mark.parametrize("masking", [UniformlySpacedMasking(), RandomMasking(copies=2), CoupledMasking()])
def test_every_masking_scheme_trains(masking: Any) -> None:
    trainer = _fit(_stage(masking=masking, micro_batch_size=5), steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_group_filter_drops_uninformative_groups_and_counts_them() -> None:
    # DigitCount as "accuracy": every completion with a digit counts as correct -> groups are mostly all-correct
    stage = _stage(accuracy_reward="digits", filter_groups=True, filter_low=0.05, filter_high=0.95)
    trainer = _fit(stage, steps=2)
    dropped = trainer.callback_metrics["train/dropped_groups"].item()
    kept = trainer.callback_metrics["train/kept_rollouts"].item()
    assert dropped * 4 + kept == pytest.approx(12.0)  # 3 prompts x 4 generations, every rollout kept or dropped


def test_adapter_reference_is_the_base_model_without_a_copy() -> None:
    stage = _stage(
        adapter=LoRA(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        objective=ClippedSurrogate(beta=0.05, kl_against="reference"),
    )
    trainer = _fit(stage, steps=2)
    assert stage.reference is None
    assert torch.isfinite(trainer.callback_metrics["train/kl"])


def test_bad_arguments_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--model.rewards is empty"):
        _stage(rewards=[])
    with pytest.raises(ValueError, match="--model.reward_weights has 1 entries for 3 rewards"):
        _stage(reward_weights=[1.0])
    with pytest.raises(ValueError, match="--model.accuracy_reward='nope'"):
        _stage(accuracy_reward="nope")
    with pytest.raises(ValueError, match="--model.num_generations must be >= 2"):
        _stage(num_generations=1)
    with pytest.raises(ValueError, match="--model.reference=adapter needs --model.adapter"):
        _stage(reference="adapter")


def test_a_user_reward_class_from_a_test_module_works_from_yaml_by_class_path(tmp_path: Path) -> None:
    """The recipe's CLI builds DigitCount (defined in this test module, outside the package) from its class path."""
    config = tmp_path / "rewards.yaml"
    config.write_text(
        f"""
model:
  init_args:
    rewards:
      - class_path: dllm_zoo.rewards.ArithmeticCorrectness
      - class_path: {__name__}.DigitCount
        init_args:
          scale: 0.25
    reward_weights: [2.0, 1.0]
"""
    )
    main = runpy.run_path(str(ROOT / "recipes" / "unigrpo.py"))["main"]
    main(
        [
            "fit",
            "--config",
            str(config),
            "--warm_start",
            "none",
            "--model.backbone.init_args.config",
            "tiny",
            "--model.sampler.init_args.gen_length",
            "16",
            "--model.sampler.init_args.block_length",
            "16",
            "--model.sampler.init_args.steps",
            "4",
            "--model.eval_sampler.init_args.gen_length",
            "16",
            "--model.eval_sampler.init_args.block_length",
            "16",
            "--model.eval_sampler.init_args.steps",
            "4",
            "--model.num_generations",
            "2",
            "--data.batch_size",
            "2",
            "--data.task.init_args.num_val",
            "4",
            "--trainer.max_steps",
            "4",
            "--model.optim.warmup_steps",
            "1",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    saved = (tmp_path / "mini_arithmetic" / "version_0" / "config.yaml").read_text()
    assert f"{__name__}.DigitCount" in saved
    assert "scale: 0.25" in saved
    events = list((tmp_path / "mini_arithmetic" / "version_0").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert "train/reward/digits" in acc.Tags()["scalars"]
    assert "heldout_before/accuracy" in acc.Tags()["scalars"]


def test_the_recipe_trains_and_caches_its_warm_start_with_the_sft_recipe(tmp_path: Path) -> None:
    recipe = runpy.run_path(str(ROOT / "recipes" / "unigrpo.py"))
    tiny = tmp_path / "tiny_sft.yaml"
    tiny.write_text(
        """
trainer:
  max_steps: 3
  val_check_interval: 3
  callbacks: []
  enable_checkpointing: false
model:
  init_args:
    backbone:
      init_args: {config: tiny}
    optim: {warmup_steps: 1}
data:
  init_args:
    batch_size: 4
    task:
      class_path: dllm_zoo.data.synthetic.Arithmetic
      init_args: {num_train: 16, num_val: 4}
"""
    )
    ensure = recipe["WARM_START"].ensure
    out = ensure(tmp_path / "cache", extra_configs=(tiny,))
    assert (out / "config.json").is_file()
    assert out.parent == tmp_path / "cache" / "warm_start"
    # one directory per phase and no temporary directory left behind
    assert sorted(p.name.split("-")[2] for p in out.parent.iterdir()) == ["sft", "terse"]
    record = json.loads((out / "warm_start.json").read_text())
    assert record["start"] is not None
    assert "unigrpo-arithmetic-sft-" in record["start"]  # phase 2 continued from phase 1
    assert record["steps"] == 3
    loaded = LLaDABackbone(pretrained=str(out))
    assert loaded.config == LLaDABackbone("tiny").config
    stamp = (out / "config.json").stat().st_mtime_ns
    assert ensure(tmp_path / "cache", extra_configs=(tiny,)) == out
    assert (out / "config.json").stat().st_mtime_ns == stamp


def test_the_policy_gradient_raises_the_reward() -> None:
    """End to end through the stage: sampled completions with higher reward become more likely."""
    trace = RewardTrace("sevens")
    stage = _stage(
        rewards=[Sevens()],
        accuracy_reward=None,
        num_generations=8,
        inner_iterations=2,
        optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=1, min_lr_scale=1.0),
    )
    fit_quietly(stage, _data(batch_size=4), 40, callbacks=[trace])
    # pinned (seeded, CPU): the share of sevens climbs from ~0 to ~0.9 over 20 RL steps
    first, last = sum(trace.values[:4]) / 4, sum(trace.values[-4:]) / 4
    assert first < 0.05
    assert last > 0.5, trace.values
