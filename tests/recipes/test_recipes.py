import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Fragment folders hold pieces any recipe takes with a second --config (adapters, strategies): parsed with each
# recipe in their own tests, not as a recipe's config.
FRAGMENTS = {"adapters", "strategies"}
CONFIGS = sorted(p for p in (ROOT / "recipes" / "configs").rglob("*.yaml") if p.parent.name not in FRAGMENTS)


def recipe_main(name: str):  # type: ignore[no-untyped-def]
    return runpy.run_path(str(ROOT / "recipes" / f"{name}.py"))["main"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "recipes" / "configs")))
def test_every_shipped_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = config.parent.name  # recipes/configs/<recipe>/*.yaml
    with pytest.raises(SystemExit) as exc:
        recipe_main(recipe)(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    expected = {
        "pretrain": ("LLaDABackbone", "MaskedDiffusionPretraining"),
        "sdar": ("SDARBackbone", "BlockDiffusionSFT"),
    }
    for name in expected[recipe]:
        assert name in printed


def test_pretrain_recipe_runs_a_few_steps_and_writes_logs_and_checkpoints(tmp_path: Path) -> None:
    recipe_main("pretrain")(
        [
            "fit",
            "--trainer.max_steps=6",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.optim.warmup_steps=2",
            "--data.batch_size=4",
        ]
    )
    version = tmp_path / "tiny_arithmetic" / "version_0"
    assert list(version.glob("events.out.tfevents.*"))
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "config.yaml").is_file()  # the resolved config is saved next to the logs


def test_cli_lists_components(capsys: pytest.CaptureFixture[str]) -> None:
    from dllm_zoo.cli import main

    assert main(["list", "backbone"]) == 0
    out = capsys.readouterr().out
    assert "LLaDABackbone" in out
    assert "dllm_zoo.backbones.llada" in out


def test_sdar_recipe_runs_a_few_steps_and_logs_accuracy(tmp_path: Path) -> None:
    recipe_main("sdar")(
        [
            "fit",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.optim.warmup_steps=2",
            "--data.batch_size=4",
        ]
    )
    version = tmp_path / "tiny_arithmetic" / "version_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    assert "val/accuracy" in events.Tags()["scalars"]
    assert (version / "checkpoints" / "last.ckpt").is_file()
