"""The one LightningCLI setup every recipe script shares (recipes stay a few lines of wiring)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


def run_recipe(
    model_class: type[L.LightningModule],
    datamodule_class: type[L.LightningDataModule],
    default_config: str | Path,
    args: Sequence[str] | None = None,
    run: bool = True,
    cli_class: type[LightningCLI] = LightningCLI,
) -> LightningCLI:
    """Run ``LightningCLI`` with a recipe's embedded default config.

    With no arguments beyond the subcommand (``fit``), ``default_config`` gives a complete tiny run; any
    ``--config`` file or ``--section.key`` flag overrides it. The resolved config is saved next to the logs.

    Args:
        model_class: The stage (LightningModule) the recipe trains; subclasses are accepted from the config.
        datamodule_class: The DataModule base; subclasses are accepted from the config.
        default_config: YAML read before any user config.
        args: Command-line arguments (default: ``sys.argv[1:]``).
        run: Run the subcommand (``False``: only parse and instantiate, for tests).
        cli_class: ``LightningCLI`` or a subclass adding recipe-level arguments (e.g. UniGRPO's ``--warm_start``).
    """
    config = str(default_config)
    if not Path(config).is_file():
        raise FileNotFoundError(f"recipe default config {config!r} is missing")
    defaults = {"default_config_files": [config]}
    # With subcommands (fit, validate, …) the defaults belong to each subcommand's parser.
    parser_kwargs = {sub: defaults for sub in ("fit", "validate", "test", "predict")} if run else defaults
    return cli_class(
        model_class,
        datamodule_class,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs=parser_kwargs,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
        run=run,
    )


# ------------------------------------------------------------------------------------------------- warm starts
# RL recipes start from a policy that our own SFT recipes train once and cache. What differs between them is which
# recipe and configs train it; the caching (hash-keyed, atomic, phase by phase) and the `--warm_start` flag are here.


@dataclass(frozen=True)
class SFTRecipe:
    """The recipe that trains a warm start: its stage, DataModule base and embedded default config.

    Attributes:
        model_class: The SFT stage.
        datamodule_class: Its DataModule base.
        default_config: The recipe's embedded default YAML.
        backbone_class_path: Class path of the backbone a later phase reloads from the previous phase's directory.
    """

    model_class: type[L.LightningModule]
    datamodule_class: type[L.LightningDataModule]
    default_config: Path
    backbone_class_path: str = "dllm_zoo.backbones.LLaDABackbone"


WarmStartPhases = Sequence[tuple[str, Sequence[Path]]]


def warm_start_dirs(
    prefix: str, recipe: SFTRecipe, phases: WarmStartPhases, cache_dir: str | Path | None = None
) -> list[tuple[Path, tuple[Path, ...]]]:
    """``(directory, configs)`` of each phase; a phase's configs include those of the phases before it.

    The directory ``<cache>/warm_start/<prefix>-<phase>-<hash>`` carries the hash of the recipe's default config and
    of every config up to that phase, so editing a config trains a new warm start instead of reusing a stale one.
    """
    from dllm_zoo.data.synthetic.base import default_cache_dir

    digest = hashlib.sha256(Path(recipe.default_config).read_bytes())
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "warm_start"
    out: list[tuple[Path, tuple[Path, ...]]] = []
    configs: tuple[Path, ...] = ()
    for name, files in phases:
        for path in files:
            digest.update(Path(path).read_bytes())
        configs = (*configs, *(Path(p) for p in files))
        out.append((root / f"{prefix}-{name}-{digest.hexdigest()[:12]}", configs))
    return out


def _train_phase(out: Path, recipe: SFTRecipe, configs: tuple[Path, ...], start: Path | None) -> None:
    """Run ``recipe`` with ``configs`` (from the backbone directory ``start``) and save the backbone atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sft-") as work:
        print(f"warm start: training {out.name} (cached in {out.parent})", flush=True)
        args = ["fit", *(f"--config={p}" for p in configs), f"--trainer.default_root_dir={work}"]
        args += [f"--trainer.logger.init_args.save_dir={work}"]
        if start is not None:  # a YAML file, because `config: null` cannot be given as a flag
            init = Path(work) / "init.yaml"
            init.write_text(
                f"model:\n  init_args:\n    backbone:\n      class_path: {recipe.backbone_class_path}\n"
                f"      init_args:\n        config: null\n        pretrained: {json.dumps(str(start))}\n"
            )
            args.append(f"--config={init}")
        cli = run_recipe(recipe.model_class, recipe.datamodule_class, recipe.default_config, args)
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


def cached_warm_start(
    prefix: str, recipe: SFTRecipe, phases: WarmStartPhases, cache_dir: str | Path | None = None
) -> Path:
    """The cached warm-start backbone directory, trained phase by phase by ``recipe`` where missing.

    Each phase continues from the previous phase's backbone and is written atomically (a temporary sibling renamed
    into place), so an interrupted run never leaves a half-written warm start behind, and a finished phase is reused.

    Args:
        prefix: Name prefix of the cache directories (e.g. ``"unigrpo-arithmetic"``).
        recipe: The SFT recipe that trains every phase.
        phases: ``(name, extra configs)`` per phase, in order (at least one).
        cache_dir: Cache root (default ``$DLLM_ZOO_CACHE``).

    Returns:
        The last phase's backbone directory.
    """
    if not phases:
        raise ValueError("a warm start needs at least one phase")
    start: Path | None = None
    for out, configs in warm_start_dirs(prefix, recipe, phases, cache_dir):
        if not (out / "config.json").is_file():
            _train_phase(out, recipe, configs, start)
        start = out
    assert start is not None
    return start


@dataclass(frozen=True)
class WarmStart:
    """A recipe's cached warm start: ``phases`` of the SFT ``recipe``, trained once and cached as backbone directories.

    Attributes:
        prefix: Name prefix of the cache directories (e.g. ``"unigrpo-arithmetic"``).
        recipe: The SFT recipe that trains every phase; its ``backbone_class_path`` is the only backbone it fits.
        phases: ``(name, extra configs)`` per phase, in order (at least one).
    """

    prefix: str
    recipe: SFTRecipe
    phases: tuple[tuple[str, tuple[Path, ...]], ...]

    def directory(self, cache_dir: str | Path | None = None) -> Path:
        """Where the last phase lives; the name carries the hash of the SFT configs."""
        return warm_start_dirs(self.prefix, self.recipe, self.phases, cache_dir)[-1][0]

    def ensure(self, cache_dir: str | Path | None = None, extra_configs: Sequence[Path] = ()) -> Path:
        """The last phase's backbone directory, trained phase by phase where missing (:func:`cached_warm_start`).

        ``extra_configs`` go on top of every phase and into its cache key (e.g. a test's shorter run), so they never
        reuse a warm start trained without them.
        """
        phases = tuple((name, (*files, *extra_configs)) for name, files in self.phases)
        return cached_warm_start(self.prefix, self.recipe, phases, cache_dir)


class WarmStartCLI(LightningCLI):
    """LightningCLI with ``--warm_start auto|none|<dir>``: where the policy's weights come from.

    ``auto`` calls :meth:`ensure_warm_start` (the recipe's cached :class:`WarmStart`, ``warm_start``), ``none`` keeps
    the backbone as configured, a path is a backbone checkpoint directory. The chosen directory becomes ``pretrained``
    of every backbone :meth:`warm_start_backbones` returns (under ``auto``, only of those without a ``pretrained`` of
    their own), and their preset is dropped (it comes from the checkpoint's config.json).
    """

    auto_help: ClassVar[str] = "the recipe's cached SFT warm start (trained once if missing)"
    warm_start: ClassVar[WarmStart | None] = None

    def ensure_warm_start(self, config: Any) -> Path:
        """The directory of ``--warm_start auto``: ``warm_start``, refused for a backbone it does not fit."""
        if self.warm_start is None:
            raise ValueError(
                f"{type(self).__name__} has no automatic warm start: give --warm_start a directory or none"
            )
        fits = self.warm_start.recipe.backbone_class_path.rsplit(".", 1)[-1]
        kind = str(config.model.init_args.backbone.class_path)
        if kind.rsplit(".", 1)[-1] != fits:
            raise ValueError(
                f"--warm_start auto trains a {fits} ({self.warm_start.recipe.default_config.name} of "
                f"{self.warm_start.recipe.model_class.__name__}), which does not fit {kind}: give --warm_start a "
                "checkpoint directory of that backbone, or none"
            )
        return self.warm_start.ensure()

    def warm_start_backbones(self, config: Any) -> list[Any]:
        """The backbone config nodes that load the warm start (default: the policy's)."""
        return [config.model.init_args.backbone]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--warm_start``."""
        parser.add_argument(
            "--warm_start",
            type=str,
            default="auto",
            help=f"auto: {self.auto_help}; none: the backbone as configured; a path: a backbone checkpoint "
            "directory (config.json + safetensors) to start from",
        )

    def before_instantiate_classes(self) -> None:
        """Point the backbones at the warm start before anything is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        choice = config.get("warm_start", "none")
        if choice in (None, "none", "None"):
            return
        backbones = self.warm_start_backbones(config)
        if choice == "auto":  # a backbone that names its own checkpoint (e.g. a ParaRL config's) keeps it
            backbones = [b for b in backbones if not b.init_args.get("pretrained")]
        if not backbones:
            return
        if choice == "auto":
            path = self.ensure_warm_start(config)
        else:
            path = Path(choice)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"--warm_start {choice}: not a backbone checkpoint directory (no config.json); give the directory "
                    "written by save_pretrained / `dllm-zoo convert-checkpoint`, or auto / none"
                )
        for backbone in backbones:
            backbone.init_args.pretrained = str(path)
            if "config" in backbone.init_args:
                backbone.init_args.config = None  # the preset comes from the checkpoint's config.json
