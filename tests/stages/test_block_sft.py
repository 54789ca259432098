"""BlockDiffusionSFT: SDAR's ``[x_t | x_0]`` SFT (research/tracerl_llada.md §3.2) on any backbone."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from dllm_zoo.backbones import LLaDABackbone, SDARBackbone
from dllm_zoo.backbones.attention import sdar_training_mask
from dllm_zoo.backbones.base import Backbone, BackboneOutput
from dllm_zoo.data import TextDiffusionDataModule
from dllm_zoo.data.synthetic import Arithmetic
from dllm_zoo.schedules import NoisedBatch
from dllm_zoo.stages import BlockDiffusionSFT, OptimConfig
from dllm_zoo.tokenizers import TokenLayout

LAYOUT = TokenLayout.preset("default")
MASK = LAYOUT.mask_id
EPS = 1e-3

BACKBONES = [
    pytest.param(lambda: LLaDABackbone("tiny"), id="llada"),
    pytest.param(lambda: SDARBackbone("tiny"), id="sdar"),
]


class FixedLogits(Backbone):
    """Logits depend only on the input token: a mask token predicts token 7 with 3x the weight of any other."""

    def __init__(self) -> None:
        super().__init__()
        self.layout = LAYOUT
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[dict[str, Any]] = []

    def forward(self, input_ids: Tensor, **kw: Any) -> BackboneOutput:  # type: ignore[override]
        self.calls.append({"input_ids": input_ids, **kw})
        table = torch.zeros(LAYOUT.vocab_size, LAYOUT.vocab_size)
        table[MASK, 7] = math.log(3.0)
        logits = table[input_ids] * self.scale
        at = kw.get("logits_at")
        return BackboneOutput(logits=logits if at is None else logits[at])

    @classmethod
    def from_pretrained(cls, path: Any, **overrides: Any) -> Backbone:
        raise NotImplementedError

    def save_pretrained(self, path: Any, max_shard_size: int = 0) -> None:
        raise NotImplementedError

    def transformer_blocks(self) -> nn.ModuleList:
        return nn.ModuleList()

    def output_head(self) -> nn.Linear:
        return nn.Linear(1, LAYOUT.vocab_size)


def noised_by_hand(ids: Tensor, masked: Tensor, t: Tensor) -> NoisedBatch:
    p = (1 - EPS) * t + EPS
    return NoisedBatch(noisy=torch.where(masked, torch.full_like(ids, MASK), ids), masked=masked, t=t, p_mask=p)


def unpacked_example() -> tuple[dict[str, Tensor], NoisedBatch]:
    ids = torch.tensor([[1, 2, 7, 9, 7, 257], [3, 4, 5, 7, 8, 257]])
    prompt = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.bool), "prompt_mask": prompt}
    masked = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    return batch, noised_by_hand(ids, masked, torch.tensor([0.5, 0.25]))


def test_loss_equals_hand_computation() -> None:
    stage = BlockDiffusionSFT(backbone=FixedLogits(), block_size=2)
    batch, noised = unpacked_example()
    out = stage.loss_for(batch, noised)
    v = LAYOUT.vocab_size
    ce_7, ce_other = math.log((v + 2) / 3), math.log(v + 2)
    # row 0: targets 7 (pos 2) and 9 (pos 3), p = 0.5005, 4 answer tokens; row 1: target 257, p = 0.25075, 3 tokens
    row0 = (ce_7 + ce_other) / 0.5005 / 4
    row1 = ce_other / 0.25075 / 3
    assert out.loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert out.loss.item() == pytest.approx(6.5046549, rel=1e-6)  # pinned
    assert out.ce.item() == pytest.approx((ce_7 + 2 * ce_other) / 3, rel=1e-6)
    assert int(out.num_masked) == 3
    assert out.per_sample is not None
    assert out.per_sample.tolist() == pytest.approx([row0, row1], rel=1e-6)


def test_the_model_sees_xt_then_x0_and_logits_only_at_masked_xt() -> None:
    net = FixedLogits()
    stage = BlockDiffusionSFT(backbone=net, block_size=2)
    batch, noised = unpacked_example()
    stage.loss_for(batch, noised)
    (call,) = net.calls
    ids = batch["input_ids"]
    assert torch.equal(call["input_ids"], torch.cat([noised.noisy, ids], 1))
    pos = torch.arange(6).expand(2, 6)
    assert torch.equal(call["position_ids"], torch.cat([pos, pos], 1))
    assert torch.equal(call["attention_mask"], sdar_training_mask(pos, 2, batch["attention_mask"]))
    at = call["logits_at"]
    assert at.shape == (2, 12)
    assert torch.equal(at[:, :6], noised.masked)
    assert not at[:, 6:].any()  # the x_0 half gets no logits, hence no loss


def data(tmp_path: Path, pack: bool, batch_size: int = 4) -> TextDiffusionDataModule:
    return TextDiffusionDataModule(
        task=Arithmetic(num_train=48, num_val=8, seed=5),
        format="lm_chat",
        seq_len=192 if pack else 112,
        batch_size=batch_size,
        cache_dir=str(tmp_path / "cache"),
        pack=pack,
    )


@pytest.mark.parametrize("pack", [False, True])
def test_prompt_is_never_masked_and_every_sample_gets_a_mask(tmp_path: Path, pack: bool) -> None:
    stage = BlockDiffusionSFT(backbone=FixedLogits())
    batches = list(data(tmp_path, pack, batch_size=8).train_dataloader())[:3]
    for seed, batch in enumerate(batches):
        noised = stage.corrupt(batch, stage.schedule, torch.Generator().manual_seed(seed), at_least_one=True)
        assert not (noised.masked & batch["prompt_mask"]).any()
        assert not (noised.masked & ~batch["attention_mask"]).any()
        assert torch.equal(noised.noisy[~noised.masked], batch["input_ids"][~noised.masked])
        segments = batch.get("segment_ids", torch.zeros_like(batch["input_ids"]))
        for r in range(segments.shape[0]):
            for s in segments[r].unique().tolist():
                if s >= 0:
                    assert noised.masked[r][segments[r] == s].any(), (r, s)
        if pack:
            assert noised.t.shape == (batch["input_ids"].numel(),)  # one t per sample slot
            assert (segments.max(dim=1).values > 0).any()  # rows really hold several samples


@pytest.mark.parametrize("factory", BACKBONES)
def test_packed_and_unpacked_rows_give_the_same_per_sample_terms(factory: Callable[[], Backbone]) -> None:
    torch.manual_seed(0)
    stage = BlockDiffusionSFT(backbone=factory(), block_size=3)
    stage.configure_model()
    stage.eval()
    g = torch.Generator().manual_seed(1)
    s1, s2 = torch.randint(0, 250, (7,), generator=g), torch.randint(0, 250, (5,), generator=g)
    p1, p2 = torch.arange(7) < 3, torch.arange(5) < 2
    m1 = torch.tensor([0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    m2 = torch.tensor([0, 0, 1, 0, 1], dtype=torch.bool)
    t = torch.tensor([0.6, 0.3])

    def pad(x: Tensor, n: int, value: Any) -> Tensor:
        return torch.cat([x, torch.full((n - len(x),), value, dtype=x.dtype)])

    unpacked = {
        "input_ids": torch.stack([pad(s1, 8, 257), pad(s2, 8, 257)]),
        "attention_mask": torch.stack([torch.arange(8) < 7, torch.arange(8) < 5]),
        "prompt_mask": torch.stack([pad(p1, 8, False), pad(p2, 8, False)]),
    }
    masked_u = torch.stack([pad(m1, 8, False), pad(m2, 8, False)])
    packed = {
        "input_ids": torch.cat([s1, s2, torch.full((2,), 257)])[None],
        "attention_mask": (torch.arange(14) < 12)[None],
        "prompt_mask": torch.cat([p1, p2, torch.zeros(2, dtype=torch.bool)])[None],
        "segment_ids": torch.tensor([[0] * 7 + [1] * 5 + [-1] * 2]),
        "position_ids": torch.cat([torch.arange(7), torch.arange(5), torch.zeros(2, dtype=torch.long)])[None],
    }
    masked_p = torch.cat([m1, m2, torch.zeros(2, dtype=torch.bool)])[None]
    t_packed = torch.zeros(14)
    t_packed[:2] = t  # packed_sample_ids: sample s of row 0 has id s
    with torch.no_grad():
        out_u = stage.loss_for(unpacked, noised_by_hand(unpacked["input_ids"], masked_u, t))
        out_p = stage.loss_for(packed, noised_by_hand(packed["input_ids"], masked_p, t_packed))
    assert out_u.per_sample is not None
    assert out_p.per_sample is not None
    torch.testing.assert_close(out_p.per_sample[:2], out_u.per_sample, rtol=1e-5, atol=1e-5)
    assert out_p.loss.item() == pytest.approx(out_u.loss.item(), rel=1e-5)  # both: mean over the 2 samples
    assert out_p.per_sample[2:].abs().sum() == 0


def test_block_size_comes_from_the_argument_or_the_backbone() -> None:
    llada = BlockDiffusionSFT(backbone=lambda: LLaDABackbone("tiny"))
    llada.configure_model()
    assert llada.block_size == 4  # no config.block_size: the default
    assert BlockDiffusionSFT(backbone=FixedLogits(), block_size=8).block_size == 8
    sdar = SDARBackbone("tiny")
    assert BlockDiffusionSFT(backbone=sdar).block_size == sdar.config.block_size == 4
    assert BlockDiffusionSFT(backbone=SDARBackbone(dataclasses.replace(sdar.config, block_size=2))).block_size == 2
    with pytest.raises(ValueError, match="block_size"):
        BlockDiffusionSFT(backbone=FixedLogits(), block_size=0)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses.append(float(outputs["loss"]))


FIT_CASES = [
    pytest.param(lambda: LLaDABackbone("tiny"), False, id="llada-padded"),
    pytest.param(lambda: LLaDABackbone("tiny"), True, id="llada-packed"),
    pytest.param(lambda: SDARBackbone("tiny"), True, id="sdar-packed"),
]


@pytest.mark.parametrize(("factory", "pack"), FIT_CASES)
def test_trainer_fit_runs_on_arithmetic_chat(tmp_path: Path, factory: Callable[[], Backbone], pack: bool) -> None:
    torch.manual_seed(0)
    stage = BlockDiffusionSFT(backbone=factory, optim=OptimConfig(lr=1e-3, warmup_steps=1), seed=3)
    rec = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        val_check_interval=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[rec],
    )
    trainer.fit(stage, datamodule=data(tmp_path, pack))
    assert len(rec.losses) == 3
    assert all(math.isfinite(x) and x > 0 for x in rec.losses)
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert int(trainer.callback_metrics["train/masked_tokens"]) > 0
