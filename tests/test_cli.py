"""``dllm-zoo convert-checkpoint`` on single-file stage checkpoints (the sharded form: tests/parallel/test_fsdp2.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.cli import main as cli_main


def _stage_checkpoint(path: Path, backbone: LLaDABackbone) -> Path:
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, path)
    return path


def test_convert_checkpoint_takes_the_layout_the_run_trained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = LLaDABackbone("tiny", layout="words")
    ckpt = _stage_checkpoint(tmp_path / "last.ckpt", trained)
    base = ["convert-checkpoint", str(ckpt), str(tmp_path / "out"), "--backbone", "LLaDABackbone", "--preset", "tiny"]
    assert cli_main([*base, "--layout", "words"]) == 0
    converted = LLaDABackbone.from_pretrained(tmp_path / "out")
    assert converted.layout.name == "words"
    x = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(converted.eval()(x).logits, trained.eval()(x).logits)


def test_convert_checkpoint_refuses_a_wrong_layout_or_a_layout_with_pretrained(tmp_path: Path) -> None:
    ckpt = _stage_checkpoint(tmp_path / "last.ckpt", LLaDABackbone("tiny", layout="words"))
    base = ["convert-checkpoint", str(ckpt), str(tmp_path / "out"), "--backbone", "LLaDABackbone"]
    with pytest.raises(ValueError, match="mis-shaped"):  # the preset's own layout: too few vocabulary rows
        cli_main([*base, "--preset", "tiny"])
    with pytest.raises(SystemExit, match="--layout goes with --preset"):
        cli_main([*base, "--pretrained", str(tmp_path), "--layout", "words"])
