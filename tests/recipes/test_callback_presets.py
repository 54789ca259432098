"""Every YAML preset in the top-level callbacks/ parses with a recipe and appends (never replaces) callbacks."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_callback_preset_parses_and_appends(preset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = runpy.run_path(str(ROOT / "recipes" / "pretrain.py"))["main"]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(preset), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in printed  # the recipe's own callbacks are kept
    assert "dllm_zoo.callbacks." in printed


def test_presets_exist() -> None:
    assert {p.name for p in PRESETS} >= {
        "throughput.yaml",
        "accuracy_full_attention.yaml",
        "accuracy_block_attention.yaml",
    }
