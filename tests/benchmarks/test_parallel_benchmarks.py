"""The MMaDA-Parallel ablation benchmarks run end to end on a tiny model and write the JSON they promise."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.parabench import AXES

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str) -> dict:  # type: ignore[type-arg]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return runpy.run_path(str(ROOT / "benchmarks" / f"{name}.py"))


def test_parallel_modes_loads_a_directory_or_a_stage_checkpoint(tmp_path: Path) -> None:
    load_model = _script("parallel_modes")["load_model"]
    torch.manual_seed(0)
    model = LLaDABackbone("mini", layout="words")  # the default config's backbone
    model.save_pretrained(tmp_path / "backbone")
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "last.ckpt")
    for path in (tmp_path / "backbone", tmp_path / "last.ckpt"):
        loaded = load_model(path)
        assert torch.equal(loaded.state_dict()["model.transformer.wte.weight"], model.model.transformer.wte.weight)


def test_parallel_modes_reports_every_axis_per_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    LLaDABackbone("tiny", layout="words").save_pretrained(tmp_path / "backbone")
    out = tmp_path / "modes.json"
    argv = ["parallel_modes.py", str(tmp_path / "backbone"), "--modes", "parallel", "sequential"]
    monkeypatch.setattr(sys, "argv", [*argv, "--seeds", "0", "1", "--limit", "2", "--out", str(out)])
    _script("parallel_modes")["main"]()
    report = json.loads(out.read_text())
    assert sorted(report["modes"]) == ["parallel", "sequential"]
    for entry in report["modes"].values():
        assert entry["seeds"] == [0, 1]
        assert set(AXES) - {"image_consistency"} <= set(entry)  # consistency only where an edit keeps an object
        assert all(len(entry[a]["per_seed"]) == 2 for a in AXES if a in entry)
        assert all(0.0 <= entry[a]["mean"] <= 1.0 for a in AXES if a in entry)


@pytest.mark.slow
def test_pararl_ablation_runs_both_levels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    LLaDABackbone("tiny", layout="words").save_pretrained(tmp_path / "backbone")
    out = tmp_path / "ablation.json"
    argv = ["pararl_ablation.py", str(tmp_path / "backbone"), "--steps", "1", "--seeds", "0", "--limit", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--eval_seeds", "0", "--lr", "1e-4", "--out", str(out)])
    monkeypatch.chdir(tmp_path)
    _script("pararl_ablation")["main"]()
    report = json.loads(out.read_text())
    assert report["budget"]["lr"] == 1e-4
    assert sorted(report["runs"]) == ["output", "step"]
    assert report["summary"]["step"]["seeds"] == 1
    assert "output_alignment" in report["before"]
