"""ParaBench during and after MMaDA-Parallel training: the six-axis table on held-out ShapesWorld prompts.

:class:`ParaBenchEvaluation` runs :func:`~dllm_zoo.parabench.parabench` (edit and generation prompts of the val split
through the joint :class:`~dllm_zoo.samplers.ParallelSampler`, scored by ShapesWorld's exact checker) every
``every_n_val`` validations and once more at the end of training, and

* logs the means as scalars ``parabench/<task>/<axis>`` and ``parabench/overall/<axis>`` (plus ``…/mean``, the
  paper's "Overall"), through ``LightningModule.log`` after a validation (so checkpoints can monitor them) and
  straight to the loggers at the end of training (``log`` is not allowed there);
* writes ``parabench.json`` (the whole report: means, counts, per edit kind, raw completions and images, plus the
  history of earlier evaluations) and ``parabench.md`` (the tables) into ``trainer.log_dir``;
* with a TensorBoard logger, adds per task a picture whose rows are samples, columns input image | output image |
  target image (generation prompts have no input image: a gray square), and the samples' prompts, reasoning and
  scores as text; other loggers get the scalars only;
* prints the final table to the console.

Distributed runs: with a replicated model (DDP, single device) only rank 0 generates and the others wait for its
report in a broadcast, which then every rank logs (identical values). A sharded model (FSDP2) needs every rank in
each forward, so there every rank generates the same prompts with the same seed (the same report); only rank 0
writes files, images and the table. The broadcast is a collective: a very long evaluation on rank 0 must stay
within the process group's timeout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.callbacks.multimodal import image_grid
from dllm_zoo.parabench import ParaBenchReport, parabench
from dllm_zoo.parallel import is_sharded
from dllm_zoo.samplers.parallel import ParallelSampler
from dllm_zoo.tokenizers.image import PaletteTokenizer

_GRAY = 10  # palette index of "gray": the missing input image of a generation prompt


class ParaBenchEvaluation(Callback):
    """Run, log and save the ParaBench report (see the module docstring).

    Args:
        sampler: The joint sampler; its ``text_len`` and ``num_image_tokens`` must be the datamodule's.
        limit: Prompts per task (the first ``limit`` val samples).
        batch_size: Rows per ``generate`` call.
        every_n_val: Evaluate after every ``every_n_val``-th validation (sanity check excluded); 0 = only at the end.
        final: Evaluate at the end of training (reusing the last report when it was made at the same step) and
            print the table.
        tasks: ``"edit"`` and/or ``"generate"``; default the datamodule's tasks.
        log_images: Samples per task shown in the TensorBoard picture and text (0 = none).
        seed: Seed of the sampler's random source (the same draws at every evaluation).
        filename: Stem of the files written into the log dir.
    """

    def __init__(
        self,
        sampler: ParallelSampler,
        limit: int = 32,
        batch_size: int = 32,
        every_n_val: int = 1,
        final: bool = True,
        tasks: list[str] | None = None,
        log_images: int = 8,
        seed: int = 0,
        filename: str = "parabench",
    ) -> None:
        if limit < 1 or batch_size < 1:
            raise ValueError(f"limit and batch_size must be >= 1, got limit={limit}, batch_size={batch_size}")
        if every_n_val < 0 or log_images < 0:
            raise ValueError(f"every_n_val and log_images must be >= 0, got {every_n_val}, {log_images}")
        self.sampler = sampler
        self.limit = limit
        self.batch_size = batch_size
        self.every_n_val = every_n_val
        self.final = final
        self.tasks = list(tasks) if tasks is not None else None
        self.log_images = log_images
        self.seed = seed
        self.filename = filename
        self.validations = 0
        self.report: ParaBenchReport | None = None  # the latest report
        self.report_step: int | None = None  # the global step it was made at
        self.history: list[dict[str, Any]] = []  # {"global_step", "scalars"} of every evaluation

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate every ``every_n_val``-th validation and log the scalars through ``pl_module.log``."""
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.every_n_val == 0 or self.validations % self.every_n_val:
            return
        report = self.evaluate(trainer, pl_module)
        for key, value in report.scalars().items():
            # Every rank holds the same report (broadcast or the same generation), so no reduction is needed.
            pl_module.log(key, value, prog_bar=key == "parabench/overall/output_alignment", sync_dist=False)
        self._publish(trainer, report, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The final report (still inside the strategy: model on its device, process group up); printed."""
        if not self.final:
            return
        if self.report is not None and self.report_step == trainer.global_step:
            report = self.report  # the last validation already evaluated these weights
        else:
            report = self.evaluate(trainer, pl_module)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(report.scalars(), step=trainer.global_step)
        self._publish(trainer, report, final=True)

    # --------------------------------------------------------------- evaluate
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> ParaBenchReport:
        """The report of the current weights, the same on every rank (see the module docstring)."""
        net = getattr(pl_module, "net", None)
        if not isinstance(net, Backbone):
            raise TypeError(f"ParaBenchEvaluation needs a stage whose `net` is a Backbone, got {type(net)!r}")
        dm: Any = getattr(trainer, "datamodule", None)
        if dm is None:
            raise ValueError("ParaBenchEvaluation needs the trainer's datamodule (a ParallelDataModule)")
        sharded = is_sharded(net)
        report: ParaBenchReport | None = None
        if sharded or trainer.global_rank == 0:
            report = parabench(
                net,
                self.sampler,
                dm,
                tasks=self.tasks,
                limit=self.limit,
                batch_size=self.batch_size,
                seed=self.seed,
            )
        if trainer.world_size > 1 and not sharded:
            report = trainer.strategy.broadcast(report, src=0)  # the other ranks wait here for rank 0
        assert report is not None
        self.report, self.report_step = report, trainer.global_step
        self.history.append({"global_step": trainer.global_step, "scalars": report.scalars()})
        return report

    # ---------------------------------------------------------------- outputs
    def _publish(self, trainer: L.Trainer, report: ParaBenchReport, final: bool) -> None:
        """Files, TensorBoard images and text, and (final) the console table; rank 0 only."""
        if not trainer.is_global_zero:
            return
        root = Path(trainer.log_dir or trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        payload = {"global_step": trainer.global_step, "final": final, **report.to_dict(), "history": self.history}
        (root / f"{self.filename}.json").write_text(json.dumps(payload, indent=2))
        table = report.to_markdown()
        (root / f"{self.filename}.md").write_text(f"Global step {trainer.global_step}.\n\n{table}")
        self._log_pictures(trainer, report)
        if final:
            print(f"\nParaBench at global step {trainer.global_step} (written to {root}):\n\n{table}")

    def _log_pictures(self, trainer: L.Trainer, report: ParaBenchReport) -> None:
        if self.log_images == 0:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or not hasattr(experiment, "add_text"):
            return  # not TensorBoard: scalars only
        palette = PaletteTokenizer()
        for name in report.tasks:
            shown = [s for s in report.samples if s.task == name][: self.log_images]
            if not shown:
                continue
            rows = []
            for s in shown:
                output = torch.tensor(s.image)
                source = torch.tensor(s.input_image) if s.input_image is not None else torch.full_like(output, _GRAY)
                rows += [source, output, torch.tensor(s.target_image)]
            picture = image_grid(palette.render(torch.stack(rows)), columns=3)  # one sample per row
            experiment.add_image(f"parabench/{name}/samples", picture, trainer.global_step)
            lines = [
                f"**{i}** ({s.edit_kind or name}) `{s.instruction}`  \n"
                f"reasoning: `{s.reasoning}`  \n"
                f"target: `{s.target_caption}`  \n"
                "scores: " + ", ".join(f"{k}={v:.2f}" for k, v in s.scores.items() if v is not None)
                for i, s in enumerate(shown)
            ]
            experiment.add_text(f"parabench/{name}/reasoning", "\n\n".join(lines), trainer.global_step)


__all__ = ["ParaBenchEvaluation"]
