"""UniGRPO over MMaDA's diversified tasks: image questions answered in text, captions answered with an image."""

from pathlib import Path
from typing import Any

import pytest
import torch
from rl_testing import RewardTrace, fit_quietly

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.data import MultimodalPromptDataModule
from dllm_zoo.data.synthetic import ShapesWorld, parse_listing
from dllm_zoo.rewards import ForTasks, Reward, ShapesAlignment, ShapesAnswerCorrectness, ThinkFormat
from dllm_zoo.samplers import LLaDASampler, MaskGITSampler
from dllm_zoo.stages import OptimConfig, UniGRPO

TASK = ShapesWorld(num_train=64, num_val=8)
G = 2


def _rewards() -> list[Reward]:
    return [
        ForTasks(ShapesAnswerCorrectness(), tasks=["mmu"]),
        ForTasks(ThinkFormat(), tasks=["mmu"]),
        ForTasks(
            ShapesAlignment(
                TASK, "f1", name="mmu_alignment", caption_field=None, image_field="image", completion_part="listing"
            ),
            tasks=["mmu"],
        ),
        ForTasks(ShapesAlignment(TASK, "f1", name="t2i_alignment"), tasks=["t2i"]),
    ]


def _stage(**kwargs: Any) -> UniGRPO:
    torch.manual_seed(0)
    defaults: dict[str, Any] = {
        "backbone": LLaDABackbone("tiny"),
        "sampler": LLaDASampler(gen_length=12, block_length=12, steps=4, temperature=1.0),
        "image_sampler": MaskGITSampler(num_image_tokens=81, steps=3, guidance_scale=0.0, codebook_size=16),
        "rewards": _rewards(),
        "reward_weights": [2.0, 0.5, 1.0, 1.0],
        "num_generations": G,
        "inner_iterations": 2,
    }
    defaults.update(kwargs)
    return UniGRPO(**defaults)


def _data(tmp_path: Path, batch_size: int = 4) -> MultimodalPromptDataModule:
    dm = MultimodalPromptDataModule(task=TASK, batch_size=batch_size, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _attach(stage: UniGRPO, dm: MultimodalPromptDataModule) -> None:
    stage._tokenizer = dm.tokenizer
    stage._image_tokenizer = dm.image_tokenizer
    stage.configure_model()


def test_a_mixed_batch_rolls_out_text_and_images_in_one_scored_record(tmp_path: Path) -> None:
    dm = _data(tmp_path)
    stage = _stage()
    _attach(stage, dm)
    batch = next(iter(dm.train_dataloader()))
    kinds = [k for k in batch["fields"]["task"] for _ in range(G)]
    assert set(kinds) == {"mmu", "t2i"}
    out = stage.rollout(batch, stage.sampler, G, torch.Generator().manual_seed(0), stage.image_sampler)
    lay = stage.layout
    p = batch["prompt_ids"].shape[1]
    img = torch.tensor([k == "t2i" for k in kinds])
    # image rows: the response is exactly the 81 generated codes, the soi/eoi around them are context
    resp = out.response_mask[:, p:]
    assert resp[img].sum(dim=1).tolist() == [81] * int(img.sum())
    codes = out.tokens[:, p:][img][resp[img]]
    assert bool(((codes >= lay.image_offset) & (codes < lay.image_offset + 16)).all())
    assert bool(out.prompt_mask[img][:, p].all())
    assert bool(out.prompt_mask[img][:, p + 82].all())
    assert int(out.tokens[img][0, p]) == lay.token_id("<|soi|>")
    # text rows: the text sampler's answer, right-padded with attention 0 to the image rows' width
    assert out.tokens.shape[1] == p + 83
    assert not bool(out.attention_mask[~img][:, p + 12 :].any())
    assert not bool(out.prompt_mask[~img][:, p:].any())
    assert bool(resp[~img][:, :12].any())
    assert not bool(resp[~img][:, 12:].any())
    # the text rows are what the text sampler gives them alone (it runs first on the same random stream)
    ids = batch["prompt_ids"].repeat_interleave(G, 0)[~img]
    mask = batch["prompt_mask"].repeat_interleave(G, 0)[~img]
    alone = stage.sampler.generate(stage.net, ids, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens[~img][:, : p + 12], alone.tokens)
    # diversified rewards: each applies to its own task only; image rows have no text
    for name in ("correctness", "format", "mmu_alignment"):
        assert bool(torch.isnan(out.rewards[name][img]).all())
        assert not bool(torch.isnan(out.rewards[name][~img]).any())
    assert bool(torch.isnan(out.rewards["t2i_alignment"][~img]).all())
    assert not bool(torch.isnan(out.rewards["t2i_alignment"][img]).any())
    assert all(c == "" for c, i in zip(out.completions, img.tolist()) if i)
    assert out.nfe == 4 + 3


def test_image_prompts_without_an_image_sampler_name_the_flag(tmp_path: Path) -> None:
    dm = _data(tmp_path)
    stage = _stage(image_sampler=None)
    _attach(stage, dm)
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="--model.image_sampler"):
        stage.rollout(batch, stage.sampler, G, None, None)


class Reds(Reward):
    """Share of red pixels in the generated image: a target only the image log-likelihood can raise."""

    name = "reds"

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float | None]:
        red = 1  # palette index of red
        return [None if im is None else sum(v == red for row in im for v in row) / 81 for im in fields["images"]]


def test_the_policy_gradient_through_image_codes_raises_an_image_reward(tmp_path: Path) -> None:
    trace = RewardTrace("reds")
    stage = _stage(
        rewards=[Reds()],
        reward_weights=None,
        accuracy_reward=None,
        num_generations=4,
        image_sampler=MaskGITSampler(num_image_tokens=81, steps=4, guidance_scale=0.0, codebook_size=16),
        optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=1, min_lr_scale=1.0),
    )
    dm = MultimodalPromptDataModule(task=TASK, tasks={"t2i": 1.0}, batch_size=2, cache_dir=str(tmp_path))
    fit_quietly(stage, dm, 16, callbacks=[trace])
    first, last = sum(trace.values[:3]) / 3, sum(trace.values[-3:]) / 3
    # pinned (seeded, CPU): the red share climbs from ~0.06 to ~0.5 in 8 RL steps
    assert last > first + 0.2, trace.values


def test_listing_alignment_reads_the_think_block_of_an_image_answer() -> None:
    image = TASK.render([("red", "square", 0, 0), ("blue", "plus", 1, 1)])
    reward = ShapesAlignment(TASK, "f1", caption_field=None, image_field="image", completion_part="listing")
    right = "<think>top left: red square; center: blue plus.</think> red"
    half = "<think>top left: red square.</think> 2"  # one of two objects: F1 = 2·1 / (1 + 2)
    scores = reward(["q"] * 4, [right, half, "red", "<think>a red square</think>"], image=[image] * 4)
    assert scores == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    exact = ShapesAlignment(TASK, "exact", caption_field=None, image_field="image", completion_part="listing")
    assert exact(["q"] * 2, [right, half], image=[image] * 2) == [1.0, 0.0]
    assert parse_listing(right) == [("red", "square", 0, 0), ("blue", "plus", 1, 1)]
    with pytest.raises(ValueError, match="caption_field=None"):
        ShapesAlignment(TASK, completion_part="listing")


def test_the_multimodal_config_runs_from_an_exported_backbone_and_reports_every_reward(tmp_path: Path) -> None:
    import runpy

    root = Path(__file__).resolve().parents[2]
    LLaDABackbone("tiny").save_pretrained(tmp_path / "mmada")
    main = runpy.run_path(str(root / "recipes" / "unigrpo.py"))["main"]
    small = [
        f"--model.{s}.init_args.{k}={v}"
        for s in ("sampler", "eval_sampler")
        for k, v in (("gen_length", 16), ("block_length", 16), ("steps", 2))
    ]
    main(
        [
            "fit",
            "--config",
            str(root / "recipes" / "configs" / "unigrpo" / "multimodal.yaml"),
            "--warm_start",
            str(tmp_path / "mmada"),
            *small,
            "--model.image_sampler.init_args.steps=2",
            "--model.num_generations=2",
            "--data.batch_size=2",
            "--data.task.init_args.num_val=4",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--trainer.max_steps=2",
            "--model.optim.warmup_steps=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "mini_shapes" / "version_0"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for name in ("correctness", "format", "mmu_alignment", "t2i_alignment"):
        assert f"train/reward/{name}" in scalars
        assert f"heldout_after/{name}" in scalars
    assert {"heldout_before/accuracy", "train/kl", "time/rollout"} <= scalars
