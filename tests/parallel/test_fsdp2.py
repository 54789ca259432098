"""FSDP2 (and DDP) for real on CPU: 2 processes over gloo against 1, sharding, resharded resume, HF conversion.

Each run is a subprocess (``fsdp_train.py``): Lightning starts the second rank by running the script again,
which it cannot do with pytest. About 45 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.cli import main as cli_main

SCRIPT = Path(__file__).with_name("fsdp_train.py")


def launch(out: Path, base: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--base", str(base), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=out,
    )


def run(out: Path, base: Path, *args: str) -> list[dict]:
    proc = launch(out, base, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp2")
    torch.manual_seed(0)
    LLaDABackbone("tiny").save_pretrained(root / "base")
    base = root / "base"
    return {
        "root": root,
        "single": run(root / "single", base, "--strategy", "single", "--epochs", "2", "--ckpt-dir", str(root / "ck1")),
        "fsdp2": run(
            root / "fsdp2",
            base,
            *("--strategy", "fsdp2", "--devices", "2", "--epochs", "1", "--ckpt-dir", str(root / "ck2")),
        ),
        "resumed": run(
            root / "resumed",
            base,
            *("--strategy", "fsdp2", "--devices", "1", "--epochs", "2"),
            *("--resume", str(root / "ck2" / "epoch=0-step=3.ckpt")),
        ),
    }


def test_two_processes_train_like_one(runs: dict) -> None:
    (single,) = runs["single"]
    ranks = runs["fsdp2"]
    assert len(ranks) == 2
    for step in ("1", "2", "3"):  # every rank saw half the global batch; their mean is the 1-process loss
        mean = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert mean == pytest.approx(single["losses"][step], abs=1e-5), step
    assert ranks[0]["losses"]["1"] != pytest.approx(ranks[1]["losses"]["1"], abs=1e-3)  # really different halves


def test_ddp_on_two_processes_trains_like_one_and_like_fsdp2(runs: dict, tmp_path: Path) -> None:
    ranks = run(tmp_path / "ddp", runs["root"] / "base", "--strategy", "ddp", "--devices", "2")
    for rank, sharded in zip(ranks, runs["fsdp2"]):
        assert rank["layout"]["dtensors"] == 0  # replicas, not shards
        for step, loss in rank["losses"].items():
            assert loss == pytest.approx(sharded["losses"][step], abs=1e-5), step


def test_parameters_are_sharded_over_the_two_ranks(runs: dict) -> None:
    for rank in runs["fsdp2"]:
        layout = rank["layout"]
        assert layout["dtensors"] == layout["params"] == 21  # every parameter, the head and embeddings included
        assert layout["all_shard0"]
        assert layout["local_numel"] * 2 == layout["full_numel"]  # each rank holds half
    assert runs["single"][0]["layout"]["dtensors"] == 0


def test_sharded_checkpoint_of_two_ranks_resumes_on_one(runs: dict) -> None:
    ckpt = runs["root"] / "ck2" / "epoch=0-step=3.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    (resumed,) = runs["resumed"]
    assert sorted(resumed["losses"]) == ["4", "5", "6"]
    for step, loss in resumed["losses"].items():  # model and optimizer state resharded from 2 ranks to 1
        assert loss == pytest.approx(runs["single"][0]["losses"][step], abs=1e-5), step


def test_sharded_checkpoint_converts_to_the_original_layout(runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    root = runs["root"]
    out = root / "hf"
    ckpt = root / "ck2" / "epoch=0-step=3.ckpt"
    assert cli_main(["convert-checkpoint", str(ckpt), str(out), "--backbone", "LLaDABackbone", "--preset", "tiny"]) == 0
    assert "original layout" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    converted = LLaDABackbone.from_pretrained(out).eval()
    # The same 3 steps trained on one process, from its (single-file) checkpoint.
    state = torch.load(root / "ck1" / "epoch=0-step=3.ckpt", weights_only=True)["state_dict"]
    reference = LLaDABackbone("tiny")
    reference.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()})
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(converted(x).logits, reference.eval()(x).logits, rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match=r"does not fit LLaDABackbone.*mis-shaped"):
        cli_main(["convert-checkpoint", str(ckpt), str(root / "bad"), "--backbone", "LLaDABackbone", "--preset=mini"])
    with pytest.raises(FileNotFoundError, match="not a sharded Lightning checkpoint"):
        cli_main(["convert-checkpoint", str(root), str(root / "bad"), "--backbone", "LLaDABackbone"])


def test_fresh_init_on_the_meta_device_with_lora_and_cpu_offload(tmp_path: Path) -> None:
    ranks = run(tmp_path / "lora", tmp_path, "--strategy", "fsdp2", "--devices", "2", "--fresh", "--lora", "--offload")
    assert len(ranks) == 2
    for rank in ranks:
        layout = rank["layout"]
        assert layout["lora_params"] == 28
        assert layout["trainable_are_lora"]  # the base stays frozen under sharding
        assert layout["lora_b_zero"]  # the backbone's init reached the LoRA layers; B is zero again
        assert layout["dtensors"] == layout["params"]
        assert all(v == v for v in rank["losses"].values())  # finite: nothing left uninitialised
    assert ranks[0]["layout"]["first_block_q"] != ranks[1]["layout"]["first_block_q"]  # each rank drew its shard


def test_qlora_is_refused_under_sharding() -> None:
    pytest.importorskip("bitsandbytes")
    from torch.distributed.device_mesh import DeviceMesh

    from dllm_zoo.adapters import LoRA, apply_lora
    from dllm_zoo.parallel import shard_backbone

    backbone = apply_lora(LLaDABackbone("tiny"), LoRA(rank=4, quantize="nf4"))
    with pytest.raises(ValueError, match="QLoRA.*cannot be sharded with FSDP2"):
        shard_backbone(backbone, mesh=DeviceMesh.__new__(DeviceMesh))


def test_plain_model_parallel_strategy_with_tensor_parallel_ranks_is_refused(tmp_path: Path) -> None:
    # Lightning's default puts both local ranks in the tensor-parallel dimension: without a refusal each rank would
    # train its own copy with no gradient averaging.
    proc = launch(tmp_path / "tp", tmp_path, "--strategy", "model_parallel", "--devices", "2", "--fresh")
    assert proc.returncode != 0
    assert "tensor_parallel_size=2 is not supported" in proc.stderr
    assert "dllm_zoo.parallel.FSDP2Strategy" in proc.stderr


def test_sdar_recipe_runs_under_the_fsdp2_fragment_on_two_processes(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    args = [
        *("fit", "--config", str(root / "recipes" / "configs" / "strategies" / "fsdp2.yaml")),
        *("--trainer.devices=2", "--trainer.accelerator=cpu"),
        *("--trainer.strategy.init_args.param_dtype=null", "--trainer.strategy.init_args.reduce_dtype=null"),
        *("--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1"),
        "--trainer.log_every_n_steps=1",
        *("--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"),
        *("--model.optim.warmup_steps=1", "--data.batch_size=4", f"--data.cache_dir={tmp_path / 'cache'}"),
    ]
    proc = subprocess.run(
        [sys.executable, str(root / "recipes" / "sdar.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = tmp_path / "runs" / "tiny_arithmetic" / "version_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    assert {"val/accuracy", "val/loss", "train/loss"} <= set(events.Tags()["scalars"])  # TaskAccuracy ran sharded
    shards = sorted(p.name for p in (version / "checkpoints" / "last.ckpt").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
