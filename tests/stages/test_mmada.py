"""MMaDA multi-task stages: per-task losses as specified, caption dropout, coefficients, CoT-SFT checks, a fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.data import DataSource, MultiTaskDataModule, TaskData
from dllm_zoo.data.multimodal import unconditional_t2i_prefix
from dllm_zoo.data.synthetic import Arithmetic, ShapesWorld
from dllm_zoo.stages import MixedCoTSFT, MMaDAPretraining, OptimConfig


def tasks(cot: bool = False) -> dict[str, TaskData]:
    shapes = ShapesWorld(num_train=64, num_val=8)
    out = {
        "t2i": TaskData("t2i", 3, [DataSource(task=shapes)]),
        "lm": TaskData("lm_chat" if cot else "lm", 2, [DataSource(task=Arithmetic(num_train=64, num_val=8))]),
        "mmu": TaskData("mmu", 2, [DataSource(task=shapes)], response_field="cot" if cot else "answer"),
    }
    if cot:
        out["r2i"] = TaskData("r2i", 2, [DataSource(task=shapes)])
    return out


def datamodule(tmp_path: Path, cot: bool = False) -> MultiTaskDataModule:
    dm = MultiTaskDataModule(tasks=tasks(cot), text_len=240 if cot else 96, cache_dir=str(tmp_path), shuffle_buffer=8)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def stage(cls: type[MMaDAPretraining] = MMaDAPretraining, **kwargs: object) -> MMaDAPretraining:
    torch.manual_seed(0)
    s = cls(backbone=LLaDABackbone("tiny"), optim=OptimConfig(warmup_steps=1), **kwargs)  # type: ignore[arg-type]
    s.configure_model()
    return s


def first_batch(dm: MultiTaskDataModule) -> dict:
    return next(iter(dm.train_dataloader()))[0]


def test_task_losses_follow_mmada(tmp_path: Path) -> None:
    """Recompute every task's term from the same corruption by hand: image mean CE, text Σ CE/p ÷ |answer|."""
    dm = datamodule(tmp_path)
    st = stage(cond_dropout_prob=0.0)
    batch = first_batch(dm)
    out = st.forward_loss(batch, 0)
    # replay the corruption with the same generator to get the masks
    names = list(batch)
    ids = torch.cat([batch[n]["input_ids"] for n in names])
    att = torch.cat([batch[n]["attention_mask"] for n in names])
    prompt = torch.cat([batch[n]["prompt_mask"] for n in names])
    image_t = torch.cat([batch[n]["image_mask"] for n in names])
    gen = st.step_generator(0)
    text_t = att & ~prompt & ~image_t
    text = st.text_schedule.add_noise(ids, text_t, st.layout.mask_id, generator=gen)
    image = st.image_schedule.add_noise(text.noisy, image_t & att, st.layout.mask_id, generator=gen)
    logits = st.net(image.noisy, attention_mask=att).logits
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    rows = {"t2i": slice(0, 3), "lm": slice(3, 5), "mmu": slice(5, 7)}
    # t2i: unweighted mean CE over the masked image tokens; MaskGIT count round(N cos(pi u / 2)) >= 1 per row
    r = rows["t2i"]
    want_t2i = ce[r][image.masked[r]].mean()
    assert torch.allclose(out.tasks["t2i"].loss, want_t2i, atol=1e-5)
    counts = image.masked[r].sum(1)
    assert torch.equal(counts, torch.round(81 * image.p_mask[r]).long().clamp(min=1))
    assert out.tasks["t2i"].text is None
    # text tasks: Σ_masked CE / p ÷ |answer| per row, mean over rows (lm: |answer| = L, MMaDA's ÷ B·L)
    for name in ("lm", "mmu"):
        r = rows[name]
        per_row = (ce[r] * text.masked[r]).sum(1) / text.p_mask[r] / text_t[r].sum(1)
        assert torch.allclose(out.tasks[name].loss, per_row.mean(), atol=1e-5), name
        assert out.tasks[name].image is None
    assert torch.equal(text_t[rows["lm"]].sum(1), torch.full((2,), dm.seq_len))
    assert not text.masked[rows["t2i"]].any()
    assert not image.masked[3:].any()
    total = out.tasks["t2i"].loss * 1.0 + out.tasks["lm"].loss * 0.1 + out.tasks["mmu"].loss * 1.0
    assert torch.allclose(out.loss, total, atol=1e-6)


def test_loss_is_pinned(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    out = stage().forward_loss(first_batch(dm), 0)
    got = {k: round(float(v.loss), 3) for k, v in out.tasks.items()}
    assert got == pytest.approx({"t2i": 5.81, "lm": 5.745, "mmu": 4.794}, abs=2e-3)


def test_caption_dropout_writes_the_empty_caption_prefix(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    st = stage(cond_dropout_prob=1.0)
    batch = first_batch(dm)
    ids, att = batch["t2i"]["input_ids"], batch["t2i"]["attention_mask"]
    lm_ids = batch["lm"]["input_ids"]
    gen = torch.Generator().manual_seed(0)
    new_ids, new_att = st.drop_captions(torch.cat([ids, lm_ids]), torch.cat([att, batch["lm"]["attention_mask"]]), gen)
    uncond, pads = unconditional_t2i_prefix(st.layout, dm.text_len)
    prefix = len(uncond)
    assert (new_ids[:3, :prefix] == torch.tensor(uncond)).all()
    assert (new_att[:3, :prefix] == (torch.arange(prefix) >= pads)).all()
    assert torch.equal(new_ids[:3, prefix:], ids[:, prefix:])  # the image part is untouched
    assert torch.equal(new_ids[3:], lm_ids)  # other tasks are untouched
    none = stage(cond_dropout_prob=0.0).drop_captions(ids, att, gen)
    assert torch.equal(none[0], ids)


def test_coefficients_and_bad_batches(tmp_path: Path) -> None:
    dm = datamodule(tmp_path)
    batch = first_batch(dm)
    base = stage(cond_dropout_prob=0.0).forward_loss(batch, 0)
    scaled = stage(cond_dropout_prob=0.0, coefficients={"t2i": 2.0, "lm": 0.0, "mmu": 0.5}).forward_loss(batch, 0)
    want = 2.0 * base.tasks["t2i"].loss + 0.5 * base.tasks["mmu"].loss
    assert torch.allclose(scaled.loss, want, atol=1e-5)
    with pytest.raises(ValueError, match="--model.coefficients"):
        stage(coefficients={"t2i": 1.0}).forward_loss(batch, 0)
    with pytest.raises(ValueError, match="image_mask"):
        stage().forward_loss({"lm": {k: v for k, v in batch["lm"].items() if k != "image_mask"}}, 0)


def test_cot_sft_masks_reasoning_and_image_of_r2i_rows_and_refuses_unprompted_text(tmp_path: Path) -> None:
    dm = datamodule(tmp_path, cot=True)
    st = stage(MixedCoTSFT)
    batch = first_batch(dm)
    out = st.forward_loss(batch, 0)
    r2i = out.tasks["r2i"]
    assert r2i.text is not None
    assert r2i.image is not None
    assert torch.allclose(r2i.loss, r2i.text + r2i.image)
    assert set(out.tasks) == {"t2i", "lm", "mmu", "r2i"}
    assert st.coefficients == {"t2i": 1.0, "lm": 0.5, "mmu": 0.5, "r2i": 1.0}
    plain = datamodule(tmp_path)  # an `lm` task without prompts
    with pytest.raises(ValueError, match="without a prompt"):
        stage(MixedCoTSFT, coefficients={"t2i": 1.0, "lm": 1.0, "mmu": 1.0}).forward_loss(first_batch(plain), 0)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: object, *_: object) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])  # type: ignore[index]


def fit(tmp_path: Path, callbacks: list, ckpt_path: str | None = None) -> None:
    st = MMaDAPretraining(backbone=lambda: LLaDABackbone("tiny"), optim=OptimConfig(lr=3e-3, warmup_steps=2))
    trainer = L.Trainer(
        max_steps=10,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        val_check_interval=5,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(st, datamodule(tmp_path / "data"), ckpt_path=ckpt_path)
    metrics = trainer.callback_metrics
    assert {"train/t2i_loss", "train/lm_loss", "train/mmu_loss", "val/loss", "val/t2i_image_ce"} <= set(metrics)


def test_fit_and_resume_continue_exactly(tmp_path: Path) -> None:
    """Multi-task loaders (CombinedLoader, one resumable loader per task) and masks resume exactly."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(tmp_path / "a", [full, ckpt])
    assert full.losses[10] < full.losses[1]
    resumed = LossRecorder()
    fit(tmp_path / "b", [resumed], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert sorted(resumed.losses) == list(range(5, 11))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-5), step
    # the next stage starts from these weights: a single-file checkpoint exports to the original layout
    from dllm_zoo.parallel import convert_checkpoint

    ckpt_file = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    out = convert_checkpoint(ckpt_file, tmp_path / "export", LLaDABackbone("tiny"))
    loaded = LLaDABackbone(pretrained=str(out))
    stored = torch.load(ckpt_file, weights_only=True)["state_dict"]
    assert all(torch.equal(stored[f"backbone.{k}"], v) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="does not fit"):
        convert_checkpoint(ckpt_file, tmp_path / "bad", LLaDABackbone("mini"))
