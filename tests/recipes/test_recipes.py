import json
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
        "unigrpo": (
            "LLaDABackbone",
            "UniGRPO",
            "PromptDataModule",
            *(
                ("MaskGITSampler", "ShapesAlignment")
                if config.name == "multimodal.yaml"
                else ("ArithmeticCorrectness",)
            ),
        ),
        "mmada": (
            "LLaDABackbone",
            "MultiTaskDataModule",
            "MMaDAPretraining" if "cot" not in config.name else "MixedCoTSFT",
        ),
        "mmada_parallel": (
            "LLaDABackbone",
            "ParallelDataModule",
            "ParallelSampler",
            "ParallelSFT" if config.name == "default.yaml" else "ParaRL",
        ),
        "tracerl": (
            "TraceRL",
            "PromptDataModule",
            "ArithmeticCorrectness",
            "LLaDABackbone" if config.name == "full_attention.yaml" else "SDARBackbone",
            *(("ValueModel",) if config.name == "value.yaml" else ()),
        ),
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


def test_mmada_recipe_runs_a_few_steps_and_logs_generation_metrics_and_images(tmp_path: Path) -> None:
    small_eval = tmp_path / "eval.yaml"
    small_eval.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
    - class_path: dllm_zoo.callbacks.MultimodalEvaluation
      init_args:
        t2i_sampler:
          class_path: dllm_zoo.samplers.MaskGITSampler
          init_args: {num_image_tokens: 81, steps: 2, codebook_size: 16}
        text_sampler:
          class_path: dllm_zoo.samplers.LLaDASampler
          init_args: {gen_length: 8, block_length: 8, steps: 2}
        limit: 4
        batch_size: 4
        log_images: 4
"""
    )
    recipe_main("mmada")(
        [
            "fit",
            "--config",
            str(small_eval),
            "--trainer.log_every_n_steps=1",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.init_args.backbone.init_args.config=tiny",
            "--model.optim.warmup_steps=2",
            "--data.init_args.tasks.t2i.batch_size=2",
            "--data.init_args.tasks.lm.batch_size=2",
            "--data.init_args.tasks.mmu.batch_size=2",
        ]
    )
    version = tmp_path / "tiny_shapes" / "version_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/t2i_alignment", "val/t2i_f1", "val/mmu_accuracy", "val/text_accuracy", "train/t2i_loss"} <= scalars
    assert "val/t2i_samples" in events.Tags()["images"]
    assert (version / "checkpoints" / "last.ckpt").is_file()


def test_mmada_parallel_recipe_runs_a_few_steps_and_prints_the_parabench_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small_eval = tmp_path / "eval.yaml"
    small_eval.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
    - class_path: dllm_zoo.callbacks.ParaBenchEvaluation
      init_args:
        sampler:
          class_path: dllm_zoo.samplers.ParallelSampler
          init_args: {text_len: 24, num_image_tokens: 81, codebook_size: 16, steps: 2}
        limit: 2
        batch_size: 4
        every_n_val: 0
"""
    )
    recipe_main("mmada_parallel")(
        [
            "fit",
            "--config",
            str(small_eval),
            "--warm_start=none",  # the MMaDA warm start is tested on its own below
            "--trainer.log_every_n_steps=1",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.optim.warmup_steps=1",
            "--data.init_args.batch_size=2",
        ]
    )
    version = tmp_path / "tiny_shapes" / "version_0"
    assert "| edit | 2 |" in capsys.readouterr().out
    assert (version / "parabench.md").is_file()
    assert (version / "parabench.json").is_file()
    assert (version / "checkpoints" / "last.ckpt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/text_loss", "train/image_loss", "val/loss", "parabench/overall/output_alignment"} <= scalars


def test_mmada_parallel_pararl_config_runs_from_an_exported_backbone(tmp_path: Path) -> None:
    from dllm_zoo.backbones import LLaDABackbone

    LLaDABackbone("tiny", layout="words").save_pretrained(tmp_path / "sft")  # the default's WordTokenizer layout
    small = tmp_path / "small.yaml"
    small.write_text(
        f"""
trainer:
  callbacks:
    - class_path: dllm_zoo.callbacks.ParaBenchEvaluation
      init_args:
        sampler:
          class_path: dllm_zoo.samplers.ParallelSampler
          init_args: {{text_len: 24, num_image_tokens: 81, codebook_size: 16, steps: 2}}
        limit: 2
        batch_size: 4
        every_n_val: 0
model:
  init_args:
    backbone:
      class_path: dllm_zoo.backbones.LLaDABackbone
      init_args: {{config: null, pretrained: {str(tmp_path / "sft")!r}}}
    sampler:
      class_path: dllm_zoo.samplers.ParallelSampler
      init_args: {{text_len: 24, num_image_tokens: 81, codebook_size: 16, steps: 8, image_guidance_scale: 1.5}}
    num_generations: 2
    stats_samples: 4
"""
    )
    # no --warm_start: under the default auto, a backbone with its own `pretrained` keeps it (nothing is trained)
    recipe_main("mmada_parallel")(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "configs" / "mmada_parallel" / "pararl.yaml"),
            "--config",
            str(small),
            "--trainer.log_every_n_steps=1",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.init_args.batch_size=2",
        ]
    )
    version = tmp_path / "tiny_shapes_pararl" / "version_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/output_alignment", "train/kl", "time/rollout", "parabench/overall/output_alignment"} <= scalars
    assert (version / "parabench.md").is_file()


def test_mmada_parallel_warm_start_is_the_cached_mmada_pretraining(tmp_path: Path) -> None:
    from dllm_zoo.backbones import LLaDABackbone

    recipe = runpy.run_path(str(ROOT / "recipes" / "mmada_parallel.py"))
    tiny = tmp_path / "tiny_pretrain.yaml"
    tiny.write_text(
        """
trainer:
  max_steps: 2
  val_check_interval: 2
  limit_val_batches: 1
  callbacks: []
  enable_checkpointing: false
model:
  init_args:
    backbone:
      init_args: {config: tiny}
    optim: {warmup_steps: 1}
"""
    )
    out = recipe["WARM_START"].ensure(tmp_path / "cache", extra_configs=(tiny,))
    assert out.name.startswith("mmada-parallel-shapes-pretrain-")
    assert LLaDABackbone(pretrained=str(out)).config == LLaDABackbone("tiny", layout="words").config
    assert json.loads((out / "warm_start.json").read_text())["steps"] == 2
