"""The one LightningCLI setup every recipe script shares (recipes stay a few lines of wiring)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI


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
