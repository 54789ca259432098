"""Train the tiny LLaDA for a few steps under a given strategy and write what happened as JSON (run as a script).

Used by test_fsdp2.py in a subprocess: Lightning launches the other ranks by running this script again, which
cannot happen inside pytest. The masking is a pure function of each sample's content and position (no random
draws), and the data is a fixed sequence split rank-interleaved (sample i to rank i % world), so a 2-process
step sees exactly the samples of the 1-process step and the mean of the two ranks' losses is the 1-process loss.

    python fsdp_train.py --out OUT --base BASE_DIR --strategy fsdp2 --devices 2 --epochs 1 --ckpt-dir DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.parallel import BlockFSDPStrategy, FSDP2Strategy
from dllm_zoo.schedules import LinearSchedule
from dllm_zoo.schedules.base import NoisedBatch
from dllm_zoo.stages import MaskedDiffusionPretraining, OptimConfig

SAMPLES, LENGTH, PROMPT = 12, 24, 4
GLOBAL_BATCH = 4


class ContentSchedule(LinearSchedule):
    """Masks a fixed, content-determined subset of each sample (the same wherever the sample lands)."""

    def add_noise(  # type: ignore[override]
        self, ids: Tensor, maskable: Tensor, mask_id: int, generator: Any = None, **_: Any
    ) -> NoisedBatch:
        t = ((ids.sum(dim=1) % 7).float() + 1.0) / 8.0  # [B] in (0, 1]
        pos = torch.arange(ids.shape[1], device=ids.device)
        u = ((ids * 31 + pos * 17) % 101).float() / 101.0
        masked = maskable & (u < t[:, None])
        return NoisedBatch(torch.where(masked, mask_id, ids), masked, t, self.mask_prob(t))


def samples() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (SAMPLES, LENGTH), generator=gen)
    prompt = torch.zeros(LENGTH, dtype=torch.bool)
    prompt[:PROMPT] = True
    ones = torch.ones(LENGTH, dtype=torch.bool)
    return [{"input_ids": ids[i], "attention_mask": ones, "prompt_mask": prompt} for i in range(SAMPLES)]


class RankSlice(torch.utils.data.IterableDataset):
    """Sample ``i`` goes to rank ``i % world``, in order (Lightning's own distributed sampler would shuffle)."""

    def __iter__(self) -> Any:
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter(samples()[rank::world])


class Record(L.Callback):
    """Per-rank losses and, once training starts, how the parameters are laid out."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.layout: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.tensor import DTensor, Shard

        params = list(pl_module.named_parameters())
        dtensors = [(n, p) for n, p in params if isinstance(p, DTensor)]
        lora = [p for n, p in params if "lora_" in n]
        self.layout = {
            "trainable_are_lora": [n for n, p in params if p.requires_grad] == [n for n, _ in params if "lora_" in n],
            "lora_b_zero": all(bool((p.full_tensor() == 0).all()) for n, p in params if "lora_B" in n),
            "lora_params": len(lora),
            "first_block_q": pl_module.net.transformer_blocks()[0]
            .get_submodule("q_proj" if not lora else "q_proj.base_layer")
            .weight.to_local()[:2, :4]
            .tolist()
            if dtensors
            else None,
            "params": len(params),
            "dtensors": len(dtensors),
            "all_shard0": all(p.placements == (Shard(0),) for _, p in dtensors),
            "local_numel": sum(p.to_local().numel() for _, p in dtensors),
            "full_numel": sum(p.numel() for _, p in params),
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", required=True, help="pretrained tiny LLaDA directory both runs start from")
    parser.add_argument("--strategy", choices=["fsdp2", "fsdp", "ddp", "model_parallel", "single"], required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--fresh", action="store_true", help="random init (meta device) instead of --base")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter")
    parser.add_argument("--offload", action="store_true", help="FSDP2 CPU offload of shards, grads and optimizer")
    args = parser.parse_args()

    torch.manual_seed(0)
    stage = MaskedDiffusionPretraining(
        backbone=(lambda: LLaDABackbone("tiny")) if args.fresh else (lambda: LLaDABackbone(pretrained=args.base)),
        adapter=LoRA(rank=4, dropout=0.0) if args.lora else None,
        schedule=ContentSchedule(),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, decay_steps=6),
    )
    record = Record()
    callbacks: list[L.Callback] = [record]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_epochs=1, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy={
            "fsdp2": FSDP2Strategy(cpu_offload=args.offload),
            "fsdp": BlockFSDPStrategy(),
            "ddp": "ddp",
            "model_parallel": ModelParallelStrategy(),
            "single": "auto",
        }[args.strategy],
        max_epochs=args.epochs,
        default_root_dir=args.out,
        enable_checkpointing=bool(args.ckpt_dir),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    loader = torch.utils.data.DataLoader(RankSlice(), batch_size=GLOBAL_BATCH // args.devices)
    trainer.fit(stage, train_dataloaders=loader, ckpt_path=args.resume)
    out = Path(args.out) / f"rank{trainer.global_rank}.json"
    out.write_text(json.dumps({"losses": record.losses, "layout": record.layout}))
    # Tear gloo down before interpreter exit: left to the atexit order, its threads were once destroyed while still
    # joinable ("terminate called without an active exception", SIGABRT after a finished fit).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
