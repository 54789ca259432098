from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.data import TextDiffusionDataModule
from dllm_zoo.data.synthetic import Arithmetic
from dllm_zoo.stages import MaskedDiffusionPretraining, OptimConfig
from dllm_zoo.stages.optim import param_groups, warmup_cosine
from dllm_zoo.tokenizers import ByteTokenizer, TokenLayout


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses[trainer.global_step] = float(outputs["loss"])


def make_data(tmp_path: Path) -> TextDiffusionDataModule:
    task = Arithmetic(num_train=512, num_val=32, seed=3)
    return TextDiffusionDataModule(task=task, seq_len=64, batch_size=8, cache_dir=str(tmp_path / "cache"), seed=1)


def make_trainer(tmp_path: Path, max_steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )


def make_stage() -> MaskedDiffusionPretraining:
    torch.manual_seed(0)
    return MaskedDiffusionPretraining(
        backbone=lambda: LLaDABackbone("tiny"), optim=OptimConfig(lr=3e-3, warmup_steps=5), seed=7
    )


def test_training_lowers_loss_and_updates_every_parameter(tmp_path: Path) -> None:
    stage = make_stage()
    stage.configure_model()
    before = {k: v.clone() for k, v in stage.net.state_dict().items()}
    rec = LossRecorder()
    make_trainer(tmp_path, 60, [rec]).fit(stage, datamodule=make_data(tmp_path))
    losses = [rec.losses[s] for s in sorted(rec.losses)]
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10  # measured: 30.4 vs 47.7
    after = stage.net.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    full = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    make_trainer(tmp_path / "a", 24, [full, ckpt]).fit(make_stage(), datamodule=make_data(tmp_path))

    resumed = LossRecorder()
    make_trainer(tmp_path / "b", 24, [resumed]).fit(
        make_stage(), datamodule=make_data(tmp_path), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=10.ckpt")
    )
    assert sorted(resumed.losses) == list(range(11, 25))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-6), step


def test_layout_mismatch_is_refused_with_the_flags_named(tmp_path: Path) -> None:
    other = TokenLayout.preset("default").replace(name="other", image_codebook_size=32, vocab_size=304)
    data = TextDiffusionDataModule(
        task=Arithmetic(num_train=64, num_val=8), tokenizer=ByteTokenizer(other), cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(ValueError, match="--model.backbone.layout"):
        make_trainer(tmp_path, 2, []).fit(make_stage(), datamodule=data)


def test_masks_differ_per_step_and_validation_masks_do_not() -> None:
    stage = make_stage()
    a = torch.rand(4, generator=stage.step_generator(0))
    b = torch.rand(4, generator=stage.step_generator(0, stream=1))
    c = torch.rand(4, generator=stage.step_generator(0))
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_weight_decay_groups_by_module_type() -> None:
    model = LLaDABackbone("tiny")
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.transformer.wte.weight) not in decay_ids  # embedding
    assert id(model.transformer.ln_f.weight) not in decay_ids  # norm
    assert id(model.transformer.blocks[0].q_proj.weight) in decay_ids
    assert id(model.output_head().weight) in decay_ids
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n
    assert no_decay["weight_decay"] == 0.0


def test_warmup_cosine_values() -> None:
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)  # halfway down the cosine
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_missing_max_steps_is_a_clear_error(tmp_path: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="--trainer.max_steps"):
        trainer.fit(make_stage(), datamodule=make_data(tmp_path))


def test_a_backbone_instance_and_a_factory_give_the_same_state_dict_keys() -> None:
    from_instance = MaskedDiffusionPretraining(backbone=LLaDABackbone("tiny"))
    from_factory = MaskedDiffusionPretraining(backbone=lambda: LLaDABackbone("tiny"))
    from_factory.configure_model()
    keys = sorted(from_instance.state_dict())
    assert keys == sorted(from_factory.state_dict())
    assert all(k.startswith("backbone.") for k in keys)  # held once, never also as `backbone_factory.*`
