"""ParallelSFT: one t masks output text and image, clean input, the paper's loss and its ablations, dropout, a fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.data import ParallelDataModule
from dllm_zoo.data.interleave import BuildInterleaveRow, InterleaveSpans
from dllm_zoo.data.parallel import collate_parallel_rows
from dllm_zoo.data.synthetic import ShapesWorld
from dllm_zoo.stages import OptimConfig, ParallelSFT
from dllm_zoo.tokenizers import ByteTokenizer, PaletteTokenizer

BOS, EOS, IPAD, MASK = 256, 257, 266, 258  # the `default` layout's ids


def rows(n: int, text_len: int) -> dict[str, Any]:
    """``n`` ShapesWorld rows, editing and generation alternating (edit first)."""
    tok, img = ByteTokenizer(), PaletteTokenizer()
    build = [BuildInterleaveRow(name, tok, img, text_len, 9) for name in ("edit", "generate")]  # type: ignore[arg-type]
    samples = ShapesWorld(num_train=n, num_val=1).generate("train")
    return collate_parallel_rows([build[i % 2](s) for i, s in enumerate(samples)])


def stage(**kwargs: Any) -> ParallelSFT:
    torch.manual_seed(0)
    st = ParallelSFT(backbone=LLaDABackbone("tiny", layout="default"), optim=OptimConfig(warmup_steps=1), **kwargs)
    st.configure_model()
    return st


def test_one_t_masks_output_text_and_image_and_never_the_input() -> None:
    batch = rows(256, 192)
    st = stage()
    c = st.corrupt_rows(batch, st.step_generator(0), dropout=False)
    assert torch.allclose(c.t[:3], torch.tensor([0.1988, 0.8974, 0.0094]), atol=1e-4)  # pinned draw
    assert ((c.t >= 1e-3) & (c.t < 1)).all()
    assert torch.allclose(c.p_text, (1 - 1e-3) * c.t + 1e-3)
    # image: exactly max(1, ceil(t N)) of the N = 81 output codes
    n_image = c.image_masked.sum(1)
    assert torch.equal(n_image, torch.ceil(c.t * 81).long().clamp(min=1))
    assert not (c.image_masked & ~batch["image_mask"]).any()
    assert not (c.text_masked & ~batch["text_mask"]).any()
    # text: i.i.d. with p = (1 - eps) t + eps over the 191 targets, at least one; realised fractions follow the same t
    text_frac = c.text_masked.sum(1) / 191
    image_frac = n_image / 81
    assert (c.text_masked.sum(1) >= 1).all()
    assert (text_frac - c.p_text).abs().mean() < 0.03
    assert torch.corrcoef(torch.stack([text_frac, image_frac]))[0, 1] > 0.98
    # the input part (and the output's <|soi|>, <|eoi|>, BOS) is clean
    masked = c.text_masked | c.image_masked
    assert not (masked & batch["prompt_mask"]).any()
    assert torch.equal(c.input_ids[batch["prompt_mask"]], batch["input_ids"][batch["prompt_mask"]])
    assert (c.input_ids[masked] == MASK).all()
    assert (c.input_ids[~masked] != MASK).all()
    assert torch.equal(c.attention_mask, batch["attention_mask"])


@pytest.mark.parametrize(
    ("weighting", "pinned"),
    [("paper", 19.20223), ("both_inverse", 20.43149), ("both_unit", 14.53668)],
)
def test_losses_match_hand_computed_values(weighting: str, pinned: float) -> None:
    batch = rows(4, 24)
    st = stage(weighting=weighting, text_coeff=0.5, image_coeff=2.0)
    st.eval()  # no condition dropout
    out = st.forward_loss(batch, 0)
    # replay the corruption and recompute from full logits
    c = st.corrupt_rows(batch, st.step_generator(0), dropout=False)
    with torch.no_grad():
        logits = st.net(c.input_ids, attention_mask=c.attention_mask).logits
    ids = batch["input_ids"]
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    text_ce = (ce * c.text_masked).sum(1)
    image_ce = (ce * c.image_masked).sum(1)
    if weighting == "both_unit":
        text = text_ce.sum() / c.text_masked.sum()
    else:  # Σ CE / p over masked text tokens ÷ the 23 text targets of each row, mean over rows
        text = (text_ce / c.p_text / 23).mean()
    if weighting == "both_inverse":  # Σ CE / t ÷ the 81 image targets, mean over rows
        image = (image_ce / c.t / 81).mean()
    else:  # unweighted mean over the masked image codes
        image = image_ce.sum() / c.image_masked.sum()
    assert torch.allclose(out.text_loss, text, rtol=1e-5)
    assert torch.allclose(out.image_loss, image, rtol=1e-5)
    assert torch.allclose(out.loss, 0.5 * text + 2.0 * image, rtol=1e-5)
    assert torch.allclose(out.text_ce, ce[c.text_masked].mean(), rtol=1e-5)
    assert torch.allclose(out.image_ce, ce[c.image_masked].mean(), rtol=1e-5)
    assert out.num_masked == (c.text_masked | c.image_masked).sum()
    assert out.loss.item() == pytest.approx(pinned, rel=1e-4)


def test_logits_are_computed_only_at_masked_positions() -> None:
    batch = rows(4, 24)
    st = stage()
    st.eval()
    seen: dict[str, Any] = {}
    forward = st.net.forward

    def spy(input_ids: torch.Tensor, **kwargs: Any) -> Any:
        seen.update(kwargs, input_ids=input_ids)
        return forward(input_ids, **kwargs)

    st.net.forward = spy  # type: ignore[method-assign]
    st.forward_loss(batch, 0)
    c = st.corrupt_rows(batch, st.step_generator(0), dropout=False)
    assert torch.equal(seen["logits_at"], c.text_masked | c.image_masked)
    assert torch.equal(seen["input_ids"], c.input_ids)  # eval: no condition dropout


def test_condition_dropout_frequencies_and_format() -> None:
    batch = rows(1000, 8)
    spans = InterleaveSpans(8, 81)
    st = stage()
    c = st.corrupt_rows(batch, st.step_generator(0), dropout=True)
    is_edit = torch.arange(1000) % 2 == 0
    assert (c.drop_text.sum().item(), c.drop_image.sum().item()) == (102, 44)  # pinned
    assert c.drop_text.float().mean() == pytest.approx(0.1, abs=0.03)
    assert c.drop_image[is_edit].float().mean() == pytest.approx(0.1, abs=0.03)
    assert not c.drop_image[~is_edit].any()  # a generation row has no input image to drop
    assert (c.drop_text & c.drop_image).sum() < 15  # independent draws: ~1 % of edit rows lose both
    ids, att, it, im = c.input_ids, c.attention_mask, spans.input_text, spans.input_image
    empty = torch.tensor([BOS] + [EOS] * 7)
    assert (ids[c.drop_text][:, it] == empty).all()
    assert att[c.drop_text][:, it].all()
    assert (ids[c.drop_image][:, im] == IPAD).all()
    assert not att[c.drop_image][:, im].any()
    kept_text, kept_image = ~c.drop_text, ~c.drop_image
    assert torch.equal(ids[kept_text][:, it], batch["input_ids"][kept_text][:, it])
    assert torch.equal(ids[kept_image][:, im], batch["input_ids"][kept_image][:, im])
    assert torch.equal(att[kept_image][:, im], batch["attention_mask"][kept_image][:, im])
    # the outputs are corrupted as without dropout: the same targets, masked with the same t
    assert torch.equal(ids[:, spans.prompt_len :] == MASK, (c.text_masked | c.image_masked)[:, spans.prompt_len :])


def test_bad_arguments_and_mismatched_spans() -> None:
    with pytest.raises(ValueError, match="--model.weighting"):
        ParallelSFT(weighting="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--model.text_dropout"):
        ParallelSFT(text_dropout=1.5)
    st = stage(spans=InterleaveSpans(16, 81))
    with pytest.raises(ValueError, match="--model.spans"):
        st.corrupt_rows(rows(2, 8), st.step_generator(0), dropout=True)
    assert ParallelSFT(spans={"text_len": 8, "num_image_tokens": 81}).spans == InterleaveSpans(8, 81)  # type: ignore[arg-type]


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *_: Any) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(root: Path, steps: int, callbacks: list[L.Callback], ckpt_path: str | None = None) -> tuple[L.Trainer, Any]:
    task = ShapesWorld(grid_size=2, num_train=512, num_val=8)  # 6x6 images: 36 image tokens, rows of 141
    dm = ParallelDataModule(
        task=task, text_len=32, image_size=6, batch_size=8, shuffle_buffer=16, cache_dir=str(root.parent / "data")
    )
    st = ParallelSFT(
        backbone=lambda: LLaDABackbone("tiny", layout="default"), optim=OptimConfig(lr=1e-2, warmup_steps=2)
    )
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        limit_val_batches=1,
        val_check_interval=steps,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=str(root),
    )
    torch.manual_seed(0)
    trainer.fit(st, dm, ckpt_path=ckpt_path)
    return trainer, (st, dm)


def test_fit_learns_and_logs_every_term(tmp_path: Path) -> None:
    rec = LossRecorder()
    trainer, (st, dm) = fit(tmp_path / "run", 30, [rec])
    losses = [rec.losses[s] for s in sorted(rec.losses)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    metrics = trainer.callback_metrics
    want = {"train/loss", "train/text_loss", "train/image_loss", "val/loss", "val/text_loss", "val/image_loss"}
    assert want | {"data/truncated", "train/masked_tokens"} <= set(metrics)
    assert st.spans == dm.spans  # taken from the datamodule


def test_resumed_fit_continues_exactly(tmp_path: Path) -> None:
    """The data position (datamodule state) and the per-step masks and dropout resume exactly."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = LossRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(tmp_path / "a", 8, [full, ckpt])
    resumed = LossRecorder()
    fit(tmp_path / "b", 8, [resumed], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert sorted(resumed.losses) == list(range(5, 9))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(full.losses[step], abs=1e-5), step
