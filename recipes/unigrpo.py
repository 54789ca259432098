"""UniGRPO (MMaDA §3.3) of a masked-diffusion LM: in-process rollouts, rewards, group advantages, μ inner iterations.

python recipes/unigrpo.py fit                                   # warm-start SFT (cached) -> UniGRPO on Arithmetic, CPU
python recipes/unigrpo.py fit --warm_start /path/to/backbone    # start from your own checkpoint directory
python recipes/unigrpo.py fit --warm_start none --config my.yaml  # the backbone exactly as the config builds it
python recipes/unigrpo.py fit --print_config                    # every option, resolved

``--warm_start auto`` (the default) trains the policy's starting point with our own SFT recipe
in two phases, once: ``recipes/pretrain.py`` + ``configs/pretrain/sft_arithmetic.yaml`` +
``configs/unigrpo/warm_start.yaml`` teaches the worked procedure, then ``configs/unigrpo/warm_start_terse.yaml``
continues from it on mostly direct answers. Each phase is cached as a backbone directory under
``$DLLM_ZOO_CACHE/warm_start/`` (keyed by the hash of its configs); later runs load it.
The run logs the held-out accuracy before and after RL on the same prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dllm_zoo.data import PromptDataModule, TextDiffusionDataModule
from dllm_zoo.data.synthetic.base import default_cache_dir
from dllm_zoo.recipe import run_recipe
from dllm_zoo.stages import MaskedDiffusionPretraining, UniGRPO

CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIGS / "unigrpo" / "default.yaml"
# The warm start: the SFT recipe's embedded default plus these files, in two cached phases. Phase 1 teaches the
# worked procedure; phase 2 continues from it on answers that are mostly direct, so the policy can reason but
# rarely does. RL then has something to discover (reasoning pays) that greedy decoding of the warm start misses.
WARM_START_PHASES: tuple[tuple[str, tuple[Path, ...]], ...] = (
    ("sft", (CONFIGS / "pretrain" / "sft_arithmetic.yaml", CONFIGS / "unigrpo" / "warm_start.yaml")),
    ("terse", (CONFIGS / "unigrpo" / "warm_start_terse.yaml",)),
)


def _phase_dirs(cache_dir: str | Path | None) -> list[tuple[Path, tuple[Path, ...]]]:
    """``(directory, configs)`` of each phase; a phase's configs include those of the phases before it."""
    digest = hashlib.sha256((CONFIGS / "pretrain" / "default.yaml").read_bytes())
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "warm_start"
    out, configs = [], ()
    for name, files in WARM_START_PHASES:
        for path in files:
            digest.update(path.read_bytes())
        configs = (*configs, *files)
        out.append((root / f"unigrpo-arithmetic-{name}-{digest.hexdigest()[:12]}", configs))
    return out


def warm_start_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the cached warm start (the last phase) lives; the name carries the hash of the SFT configs."""
    return _phase_dirs(cache_dir)[-1][0]


def _train_phase(out: Path, configs: tuple[Path, ...], start: Path | None) -> None:
    """Run the SFT recipe with ``configs`` (from the backbone directory ``start``) and save it atomically to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sft-") as work:
        print(f"warm start: training {out.name} with recipes/pretrain.py (cached in {out.parent})", flush=True)
        args = ["fit", *(f"--config={p}" for p in configs), f"--trainer.default_root_dir={work}"]
        args += [f"--trainer.logger.init_args.save_dir={work}"]
        if start is not None:  # a YAML file, because `config: null` cannot be given as a flag
            init = Path(work) / "init.yaml"
            init.write_text(
                "model:\n  init_args:\n    backbone:\n      class_path: dllm_zoo.backbones.LLaDABackbone\n"
                f"      init_args:\n        config: null\n        pretrained: {json.dumps(str(start))}\n"
            )
            args.append(f"--config={init}")
        cli = run_recipe(
            MaskedDiffusionPretraining, TextDiffusionDataModule, CONFIGS / "pretrain" / "default.yaml", args
        )
        staged = Path(work) / "backbone"
        cli.model.net.save_pretrained(staged)
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        record = {
            "steps": cli.trainer.global_step,
            "configs": [str(p) for p in configs],
            "start": None if start is None else str(start),
            **metrics,
        }
        (staged / "warm_start.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"warm start: {record}", flush=True)
        try:
            os.replace(staged, out)
        except OSError:  # another process won the race: its copy is as good as ours
            if not (out / "config.json").is_file():
                raise
        shutil.rmtree(staged, ignore_errors=True)


def ensure_warm_start(cache_dir: str | Path | None = None) -> Path:
    """The cached warm-start backbone directory, trained phase by phase by the SFT recipe where missing.

    Each phase is written atomically (a temporary sibling renamed into place), so an interrupted SFT run never
    leaves a half-written warm start behind, and a finished phase is reused.
    """
    start: Path | None = None
    for out, configs in _phase_dirs(cache_dir):
        if not (out / "config.json").is_file():
            _train_phase(out, configs, start)
        start = out
    assert start is not None
    return start


class UniGRPOCLI(LightningCLI):
    """LightningCLI with ``--warm_start auto|none|<dir>`` (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--warm_start``."""
        parser.add_argument(
            "--warm_start",
            type=str,
            default="auto",
            help="auto: the cached SFT warm start (trained once if missing); none: the backbone as configured; "
            "a path: a backbone checkpoint directory (config.json + safetensors) to start from",
        )

    def before_instantiate_classes(self) -> None:
        """Point ``--model.backbone`` at the warm start before anything is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        choice = config.get("warm_start", "none")
        if choice in (None, "none", "None"):
            return
        if choice == "auto":
            path = ensure_warm_start()
        else:
            path = Path(choice)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"--warm_start {choice}: not a backbone checkpoint directory (no config.json); give the directory "
                    "written by save_pretrained / `dllm-zoo convert-checkpoint`, or auto / none"
                )
        backbone = config.model.init_args.backbone
        backbone.init_args.pretrained = str(path)
        if "config" in backbone.init_args:
            backbone.init_args.config = None  # the preset comes from the checkpoint's config.json


def main(args: list[str] | None = None) -> None:
    run_recipe(UniGRPO, PromptDataModule, DEFAULT_CONFIG, args, cli_class=UniGRPOCLI)


if __name__ == "__main__":
    main()
