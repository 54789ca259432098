"""MMaDA's multi-task stages: pretraining (t2i + lm + mmu) and mixed long-CoT SFT (+ r2i).

MMaDA (Yang et al. 2025, arXiv 2505.15809, §3; research/mmada.md §4.1–4.2) trains one masked-diffusion model on
text and image tokens with a per-task loss, every step on a batch that concatenates all tasks:

* **image targets** (t2i, r2i images): MaskGIT cosine masking — ``n = max(1, round(N·cos(π u / 2)))`` of the
  ``N`` image tokens, ``u ~ U(0, 1)`` per row — and an **unweighted** mean CE over the masked image tokens
  (:meth:`MaskedDiffusionLoss.maskgit`); the caption never masked, 10 % of captions dropped for CFG;
* **text targets** (lm, lm_chat, mmu answers, r2i reasoning): each token masked i.i.d. with ``p = (1 − ε)t + ε``
  per row, prompt kept clean, ``Σ CE/p ÷ |answer|`` per row averaged over rows (:meth:`MaskedDiffusionLoss.sft`;
  for ``lm`` rows without prompt ``|answer| = L``, which is MMaDA's ``÷ B·L``);
* total ``Σ_task c_task · L_task`` with per-task coefficients (stage 1.1: t2i 1.0, lm 0.1, mmu 1.0).

All rows have the same length, so one forward computes every task; logits only at masked positions, CE once, and
each task's rows reduced by its loss. Differences from the released code (research/mmada.md §1.1), by design: the
padding of t2i rows is masked out of attention (the released checkpoints attended to it), ``<|soi|>``/``<|eoi|>``
carry no identity labels, and caption dropout happens per step on device (new captions dropped every epoch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.llada import LLaDABackbone
from dllm_zoo.losses.masked_diffusion import LossOutput, MaskedDiffusionLoss
from dllm_zoo.schedules.base import NoiseSchedule
from dllm_zoo.schedules.cosine import CosineSchedule
from dllm_zoo.schedules.linear import LinearSchedule
from dllm_zoo.stages.base import BackboneFactory, DiffusionStage
from dllm_zoo.stages.optim import OptimConfig

PRETRAIN_COEFFICIENTS = {"t2i": 1.0, "lm": 0.1, "mmu": 1.0}
COT_SFT_COEFFICIENTS = {"t2i": 1.0, "lm": 0.5, "mmu": 0.5, "r2i": 1.0}


@dataclass
class TaskLoss:
    """One task's share of a multi-task step.

    Attributes:
        loss: Scalar: text term + image term (those the task has).
        text: Text term (``None`` when the task has no text targets).
        image: Image term (``None`` when the task has no image targets).
        text_ce: Mean CE over the masked text tokens (``None`` without text targets).
        image_ce: Mean CE over the masked image tokens (``None`` without image targets).
        rows: Rows of the task in the batch.
    """

    loss: Tensor
    text: Tensor | None
    image: Tensor | None
    text_ce: Tensor | None
    image_ce: Tensor | None
    rows: int


@dataclass
class MultiTaskOutput:
    """The combined loss and each task's terms.

    Attributes:
        loss: ``Σ_task coefficient · task loss``.
        tasks: Task name -> :class:`TaskLoss`.
        num_masked: Masked tokens in the whole batch.
    """

    loss: Tensor
    tasks: dict[str, TaskLoss]
    num_masked: Tensor


class MMaDAPretraining(DiffusionStage):
    """MMaDA multi-task training on ``{task: batch}`` batches from :class:`~dllm_zoo.data.MultiTaskDataModule`.

    Every task batch carries ``input_ids``, ``attention_mask``, ``prompt_mask`` and ``image_mask`` ``[b, L]``; image
    targets are the ``image_mask`` positions, text targets every other real, non-prompt position. Any task name and
    any mix of formats works; each needs a coefficient.

    Args:
        backbone: Backbone factory (see :class:`DiffusionStage`); default the ``tiny`` LLaDA preset.
        coefficients: Task name -> loss coefficient (default MMaDA stage 1.1: t2i 1.0, lm 0.1, mmu 1.0).
        text_schedule: Corruption of text targets (default LLaDA's linear ``p = (1 − ε)t + ε``).
        image_schedule: Corruption of image targets (default MaskGIT cosine, exact count per row).
        text_loss: Weighting / normalisation of text targets (default ``Σ CE/p ÷ |answer|``).
        image_loss: Weighting / normalisation of image targets (default unweighted mean CE).
        cond_dropout_prob: Probability that a t2i row's caption is replaced by the empty caption (CFG training).
        optim: Optimizer settings.
        seed: Seed of the per-step masking and dropout.
        adapter: Train a LoRA / QLoRA adapter instead of every weight.
    """

    def __init__(
        self,
        backbone: BackboneFactory | Backbone = lambda: LLaDABackbone("tiny"),
        coefficients: dict[str, float] | None = None,
        text_schedule: NoiseSchedule = lazy_instance(LinearSchedule),
        image_schedule: NoiseSchedule = lazy_instance(CosineSchedule),
        text_loss: MaskedDiffusionLoss = lazy_instance(MaskedDiffusionLoss, normalization="answer_length"),
        image_loss: MaskedDiffusionLoss = lazy_instance(
            MaskedDiffusionLoss, weighting="none", normalization="masked_mean"
        ),
        cond_dropout_prob: float = 0.1,
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
        adapter: LoRA | None = None,
    ) -> None:
        super().__init__(backbone, optim, seed, adapter)
        if not 0.0 <= cond_dropout_prob <= 1.0:
            raise ValueError(f"--model.cond_dropout_prob must be in [0, 1], got {cond_dropout_prob}")
        self.coefficients = dict(coefficients if coefficients is not None else self.default_coefficients())
        self.text_schedule = text_schedule
        self.image_schedule = image_schedule
        self.text_loss = text_loss
        self.image_loss = image_loss
        self.cond_dropout_prob = cond_dropout_prob
        self.save_hyperparameters(
            ignore=["backbone", "text_schedule", "image_schedule", "text_loss", "image_loss", "optim", "adapter"]
        )
        self.hparams["coefficients"] = self.coefficients
        self.hparams["optim"] = dataclasses.asdict(optim)
        self.hparams["adapter"] = None if self.adapter is None else self.adapter.to_dict()

    @staticmethod
    def default_coefficients() -> dict[str, float]:
        """MMaDA stage 1.1: t2i 1.0, lm 0.1, mmu 1.0."""
        return dict(PRETRAIN_COEFFICIENTS)

    # ----------------------------------------------------------------- batches
    def _tasks(self, batch: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        tasks = [(name, b) for name, b in batch.items() if b is not None]
        if not tasks:
            raise ValueError("the multi-task batch is empty (every task loader returned None)")
        missing = [name for name, _ in tasks if name not in self.coefficients]
        if missing:
            raise ValueError(
                f"no loss coefficient for task(s) {missing}; set --model.coefficients "
                f"(it has {sorted(self.coefficients)})"
            )
        for name, b in tasks:
            if "image_mask" not in b:
                raise ValueError(f"task {name!r} has no image_mask; MMaDA stages need batches from MultiTaskDataModule")
        return tasks

    def drop_captions(self, ids: Tensor, attention: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Replace the caption of a random ``cond_dropout_prob`` share of t2i rows by the empty caption.

        A t2i row's text part ``[iPAD]… <|t2i|> BOS caption EOS`` (ending right before ``<|soi|>``) becomes
        ``[iPAD]… <|t2i|> BOS EOS`` of the same length, pads out of attention. Vectorised, no host sync.

        Args:
            ids: ``[B, L]`` token ids.
            attention: ``[B, L]`` bool key-padding mask.
            generator: Random source.

        Returns:
            ``(ids, attention)``, new tensors.
        """
        lay = self.layout
        b, length = ids.shape
        draw = torch.rand(b, generator=generator, device=ids.device)
        if self.cond_dropout_prob == 0.0 or "<|t2i|>" not in lay.special_tokens:
            return ids, attention
        t2i, soi = lay.token_id("<|t2i|>"), lay.token_id("<|soi|>")
        is_t2i = (ids == t2i).any(dim=1)
        drop = is_t2i & (draw < self.cond_dropout_prob)
        soi_pos = (ids == soi).int().argmax(dim=1)  # first <|soi|>: end of the text part
        pos = torch.arange(length, device=ids.device)[None, :]
        offset = pos - soi_pos[:, None]  # -3 → <|t2i|>, -2 → BOS, -1 → EOS, < -3 → [iPAD]
        uncond = torch.full_like(ids, lay.token_id("[iPAD]"))
        uncond = torch.where(offset == -3, t2i, uncond)
        uncond = torch.where(offset == -2, lay.bos_id, uncond)
        uncond = torch.where(offset == -1, lay.eos_id, uncond)
        region = drop[:, None] & (offset < 0)
        new_ids = torch.where(region, uncond, ids)
        new_attention = torch.where(region, offset >= -3, attention)
        return new_ids, new_attention

    # -------------------------------------------------------------------- loss
    def forward_loss(  # type: ignore[override]
        self, batch: Mapping[str, Any], batch_idx: int, stream: int = 0, per_step: bool = True
    ) -> MultiTaskOutput:
        """Corrupt every task's rows, run one forward, and reduce each task with its losses."""
        tasks = self._tasks(batch)
        ids = torch.cat([b["input_ids"] for _, b in tasks])
        attention = torch.cat([b["attention_mask"] for _, b in tasks]).bool()
        prompt = torch.cat([b["prompt_mask"] for _, b in tasks]).bool()
        image_target = torch.cat([b["image_mask"] for _, b in tasks]).bool()
        gen = self.step_generator(batch_idx, stream, per_step)
        if self.training and self.cond_dropout_prob > 0:
            ids, attention = self.drop_captions(ids, attention, gen)
        text_target = attention & ~prompt & ~image_target
        mask_id = self.layout.mask_id
        text = self.text_schedule.add_noise(ids, text_target, mask_id, generator=gen)
        image = self.image_schedule.add_noise(text.noisy, image_target & attention, mask_id, generator=gen)
        masked = text.masked | image.masked
        out = self.net(image.noisy, attention_mask=attention, logits_at=masked)
        assert out.logits is not None
        ce_flat = F.cross_entropy(out.logits.float(), ids[masked], reduction="none")
        ce = torch.zeros(masked.shape, device=ce_flat.device, dtype=ce_flat.dtype).masked_scatter_(masked, ce_flat)
        answer_length = text_target.sum(dim=1)
        terms: dict[str, TaskLoss] = {}
        total = ce.new_zeros(())
        start = 0
        for name, b in tasks:
            rows = slice(start, start + b["input_ids"].shape[0])
            start = rows.stop
            has_text, has_image = self._parts(name, b)
            text_out = image_out = None
            if has_text:
                text_out = self.text_loss.reduce(
                    ce[rows],
                    text.masked[rows],
                    p_mask=text.p_mask[rows],
                    t=text.t[rows],
                    answer_length=answer_length[rows],
                )
            if has_image:
                image_out = self.image_loss.reduce(
                    ce[rows], image.masked[rows], p_mask=image.p_mask[rows], t=image.t[rows]
                )
            loss = sum(o.loss for o in (text_out, image_out) if o is not None)
            assert isinstance(loss, Tensor)
            terms[name] = _task_loss(loss, text_out, image_out, rows.stop - rows.start)
            total = total + self.coefficients[name] * loss
        return MultiTaskOutput(loss=total, tasks=terms, num_masked=masked.sum())

    def _parts(self, name: str, batch: Mapping[str, Any]) -> tuple[bool, bool]:
        """Whether task ``name`` has text / image targets: its format from the datamodule, else read once."""
        cache: dict[str, tuple[bool, bool]] = self.__dict__.setdefault("_task_parts", {})
        if name not in cache:
            fmt = None
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            spec = getattr(dm, "tasks", {}).get(name) if dm is not None else None
            fmt = getattr(spec, "format", None)
            if fmt is not None:
                cache[name] = (fmt != "t2i", fmt in ("t2i", "r2i"))
            else:  # one host read per task name, on the first batch only
                image = batch["image_mask"].bool()
                text = batch["attention_mask"].bool() & ~batch["prompt_mask"].bool() & ~image
                cache[name] = (bool(text.any()), bool(image.any()))
        return cache[name]

    # ------------------------------------------------------------------- steps
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:  # type: ignore[override]
        """One optimisation step; logs the total and every task's terms."""
        out = self.forward_loss(batch, batch_idx)
        self._log_terms("train", out, batch, sync=False)
        return out.loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:  # type: ignore[override]
        """Held-out losses with masks that depend only on ``batch_idx`` (no caption dropout)."""
        if all(b is None for b in batch.values()):
            return
        out = self.forward_loss(batch, batch_idx, stream=1, per_step=False)
        self._log_terms("val", out, batch, sync=True)

    def _log_terms(self, split: str, out: MultiTaskOutput, batch: Mapping[str, Any], sync: bool) -> None:
        rows = sum(t.rows for t in out.tasks.values())
        self.log(f"{split}/loss", out.loss, prog_bar=True, batch_size=rows, sync_dist=sync)
        for name, term in out.tasks.items():
            self.log(f"{split}/{name}_loss", term.loss, batch_size=term.rows, sync_dist=sync)
            if term.text_ce is not None:
                self.log(f"{split}/{name}_text_ce", term.text_ce, batch_size=term.rows, sync_dist=sync)
            if term.image_ce is not None:
                self.log(f"{split}/{name}_image_ce", term.image_ce, batch_size=term.rows, sync_dist=sync)
        if split == "train":
            self.log("train/masked_tokens", out.num_masked.float(), batch_size=rows)
            for key in ("data_errors", "dropped", "truncated"):
                counts = [b[key] for b in batch.values() if b is not None and key in b]
                if counts:
                    self.log(f"data/{key}", torch.stack(counts).sum().float(), reduce_fx="sum", batch_size=rows)


def _task_loss(loss: Tensor, text: LossOutput | None, image: LossOutput | None, rows: int) -> TaskLoss:
    return TaskLoss(
        loss=loss,
        text=None if text is None else text.loss,
        image=None if image is None else image.loss,
        text_ce=None if text is None else text.ce,
        image_ce=None if image is None else image.ce,
        rows=rows,
    )


class MixedCoTSFT(MMaDAPretraining):
    """MMaDA mixed long-CoT SFT (stage 2.1/2.2; research/mmada.md §4.2): text reasoning, mmu and r2i in one format.

    Every text sample is a chat turn whose response is ``<think>reasoning</think> answer``; the prompt is kept
    clean and the response masked (``Σ CE/p ÷ |answer|``), r2i rows mask both the reasoning and the image, and
    t2i continues with the cosine-masked image loss. The stage is :class:`MMaDAPretraining` with the CoT-SFT
    coefficients (t2i 1.0, lm 0.5, mmu 0.5, r2i 1.0) and one check: a task with text targets but no prompt (plain
    ``lm`` rows) is refused, since CoT SFT never trains on unprompted text.

    Args: see :class:`MMaDAPretraining`.
    """

    @staticmethod
    def default_coefficients() -> dict[str, float]:
        """t2i 1.0, lm 0.5, mmu 0.5, r2i 1.0 (MMaDA stage 2.1: t2i 1.0, lm 0.5, mmu 0.5; r2i has no released value)."""
        return dict(COT_SFT_COEFFICIENTS)

    def _parts(self, name: str, batch: Mapping[str, Any]) -> tuple[bool, bool]:
        first = name not in self.__dict__.get("_task_parts", {})
        parts = super()._parts(name, batch)
        if first and parts[0] and not bool(batch["prompt_mask"].bool().any(dim=1).all()):
            raise ValueError(
                f"task {name!r} has rows without a prompt; mixed CoT SFT keeps the prompt clean and masks the "
                "response: use format lm_chat / mmu / r2i for it (--data.tasks)"
            )
        return parts
