r"""MMaDA-Parallel's parallel SFT: the output text and image of an interleaved row denoised with one shared ``t``.

MMaDA-Parallel (Tian et al. 2025, §3.2 and the loss ablation; research/mmada.md §6.1) fine-tunes on interleaved rows
(:mod:`dllm_zoo.data.interleave`): the input part (task token, input image, instruction) stays clean and the output
part (image codes and reasoning) is corrupted at ONE time per row, so the model learns to denoise text and image
jointly, as its sampler does:

* ``t ~ U(ε, 1)`` per row;
* output image: exactly ``max(1, ⌈t·N⌉)`` of the ``N`` codes masked, at uniformly random positions;
* output text (``text_mask``: the reasoning after its BOS, EOS padding included): each token masked i.i.d. with
  ``p = (1 − ε)t + ε``, at least one per row;
* ``L_text = Σ_masked CE / p ÷ |text targets|`` (the paper's ``w_text(t) = 1/t``; ``p`` is ``t`` floored at ε),
  ``L_img = mean CE over the masked image codes`` (``w_img(t) = 1``), total ``c_text·L_text + c_img·L_img``.

The paper's ablation (Output Alignment 59.8 for this choice vs 56.3 / 57.0) also tried both modalities ``1/t``
(``weighting="both_inverse"``: the image term becomes ``Σ CE / t ÷ N``) and both unweighted
(``"both_unit"``: the text term becomes the mean CE over its masked tokens).

Condition dropout (the classifier-free-guidance branches the joint sampler uses): per training row, independently,
the instruction is dropped with ``text_dropout`` and an editing row's input image with ``image_dropout`` (paper: 10 %
each), in the form of :func:`~dllm_zoo.data.interleave.drop_conditions`.

Differences from the released MMaDA-Parallel-M code, by design: the released text and image share
``cos(π/2·schedule(t))`` (a double cosine with its default schedule) instead of the paper's linear ``t``; its text
loss is divided by ``T`` summed over the batch (not averaged over rows) and its image loss averages over all 1026
image-slot positions including unmasked ones; its padding "mask" is a +1 attention bias. Here the padding (the
``[iPAD]`` slot of generation rows) is out of attention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.llada import LLaDABackbone
from dllm_zoo.data.interleave import TASK_TOKENS, InterleaveSpans, drop_conditions
from dllm_zoo.losses.masked_diffusion import MaskedDiffusionLoss, Normalization, Weighting
from dllm_zoo.schedules.base import rank_mask
from dllm_zoo.schedules.linear import LinearSchedule
from dllm_zoo.stages.base import BackboneFactory, DiffusionStage
from dllm_zoo.stages.optim import OptimConfig

ParallelWeighting = Literal["paper", "both_inverse", "both_unit"]

# (text loss, image loss) per weighting; see the module docstring.
_LOSSES: dict[str, tuple[tuple[Weighting, Normalization], tuple[Weighting, Normalization]]] = {
    "paper": (("inverse_p", "answer_length"), ("none", "masked_mean")),
    "both_inverse": (("inverse_p", "answer_length"), ("inverse_t", "answer_length")),
    "both_unit": (("none", "masked_mean"), ("none", "masked_mean")),
}


@dataclass
class ParallelCorruption:
    """One step's corruption of a batch of interleaved rows.

    Attributes:
        input_ids: ``[B, L]`` the model's input: output targets masked, conditions dropped where drawn.
        attention_mask: ``[B, L]`` bool (a dropped input image is out of attention).
        text_masked: ``[B, L]`` bool, masked output-text positions.
        image_masked: ``[B, L]`` bool, masked output-image positions.
        t: ``[B]`` float32 time of each row, in ``[ε, 1)``.
        p_text: ``[B]`` float32 text mask probability ``(1 − ε)t + ε``.
        drop_text: ``[B]`` bool, rows whose instruction was dropped.
        drop_image: ``[B]`` bool, rows whose input image was dropped (editing rows only).
    """

    input_ids: Tensor
    attention_mask: Tensor
    text_masked: Tensor
    image_masked: Tensor
    t: Tensor
    p_text: Tensor
    drop_text: Tensor
    drop_image: Tensor


@dataclass
class ParallelLossOutput:
    """The parallel-SFT loss and its terms (all scalars).

    Attributes:
        loss: ``text_coeff·text_loss + image_coeff·image_loss``.
        text_loss: Weighted text term.
        image_loss: Weighted image term.
        text_ce: Mean CE over the masked text tokens (comparable across weightings).
        image_ce: Mean CE over the masked image tokens.
        num_masked: Masked tokens in the batch (int64).
        ce: Mean CE over every masked token.
    """

    loss: Tensor
    text_loss: Tensor
    image_loss: Tensor
    text_ce: Tensor
    image_ce: Tensor
    num_masked: Tensor
    ce: Tensor


class ParallelSFT(DiffusionStage):
    """MMaDA-Parallel parallel SFT on batches from :class:`~dllm_zoo.data.parallel.ParallelDataModule`.

    Batches hold ``input_ids``, ``attention_mask``, ``prompt_mask``, ``image_mask`` and ``text_mask`` ``[B, L]`` of
    interleaved rows (any mix of editing and generation). See the module docstring for the corruption and losses.

    Args:
        backbone: Backbone factory (see :class:`DiffusionStage`); default the ``tiny`` LLaDA preset.
        weighting: ``"paper"`` (text ``1/t``, image unweighted), ``"both_inverse"`` or ``"both_unit"`` (ablation).
        text_coeff: Coefficient of the text term.
        image_coeff: Coefficient of the image term.
        text_dropout: Probability that a training row's instruction is dropped.
        image_dropout: Probability that a training editing row's input image is dropped.
        eps: Floor ``ε`` of ``t`` and of the text mask probability.
        spans: The rows' spans; default: the datamodule's ``spans``, else read once from the first batch.
        optim: Optimizer settings (paper: AdamW 2e-5, cosine, 500 warm-up steps at 8B scale).
        seed: Seed of the per-step masking and dropout.
        adapter: Train a LoRA / QLoRA adapter instead of every weight.
    """

    def __init__(
        self,
        backbone: BackboneFactory | Backbone = lambda: LLaDABackbone("tiny"),
        weighting: ParallelWeighting = "paper",
        text_coeff: float = 1.0,
        image_coeff: float = 1.0,
        text_dropout: float = 0.1,
        image_dropout: float = 0.1,
        eps: float = 1e-3,
        spans: InterleaveSpans | None = None,
        optim: OptimConfig = OptimConfig(),
        seed: int = 0,
        adapter: LoRA | None = None,
    ) -> None:
        super().__init__(backbone, optim, seed, adapter)
        if weighting not in _LOSSES:
            raise ValueError(f"--model.weighting must be one of {sorted(_LOSSES)}, got {weighting!r}")
        for flag, value in (("text_dropout", text_dropout), ("image_dropout", image_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--model.{flag} must be in [0, 1], got {value}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"--model.eps must be in [0, 1), got {eps}")
        self.weighting: ParallelWeighting = weighting
        self.text_coeff = text_coeff
        self.image_coeff = image_coeff
        self.text_dropout = text_dropout
        self.image_dropout = image_dropout
        self.eps = eps
        # load_from_checkpoint passes the plain dict stored in hparams back in
        self.spans = InterleaveSpans(**spans) if isinstance(spans, Mapping) else spans
        self.text_schedule = LinearSchedule(eps)  # p = (1 − ε)t + ε, i.i.d. masking
        text_loss, image_loss = _LOSSES[weighting]
        self.text_loss = MaskedDiffusionLoss(*text_loss)
        self.image_loss = MaskedDiffusionLoss(*image_loss)
        self.save_hyperparameters(ignore=["backbone", "optim", "adapter", "spans"])
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.hparams["optim"] = dataclasses.asdict(optim)
        self.hparams["adapter"] = None if self.adapter is None else self.adapter.to_dict()
        self.hparams["spans"] = None if self.spans is None else dataclasses.asdict(self.spans)

    # ---------------------------------------------------------------- spans
    def row_spans(self, batch: Mapping[str, Any]) -> InterleaveSpans:
        """The rows' spans: ``spans``, else the datamodule's, else read once from ``batch`` (one host sync)."""
        if self.spans is None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            spans = getattr(dm, "spans", None)
            if not isinstance(spans, InterleaveSpans):
                n = int(batch["image_mask"][0].sum())
                spans = InterleaveSpans(int(batch["text_mask"][0].sum()) + 1, n)
            self.spans = spans
        length = batch["input_ids"].shape[1]
        if length != self.spans.length:
            raise ValueError(
                f"batch rows have {length} tokens but the spans (text_len {self.spans.text_len}, "
                f"{self.spans.num_image_tokens} image tokens) give {self.spans.length}; set --model.spans to the data's"
            )
        return self.spans

    # ----------------------------------------------------------- corruption
    def corrupt_rows(self, batch: Mapping[str, Any], generator: torch.Generator, dropout: bool) -> ParallelCorruption:
        """Draw ``t``, drop conditions (if ``dropout``) and mask the output text and image with the same ``t``.

        Vectorised over the batch, no host sync. Random draws, in order: ``t`` ``[B]``; the dropout uniforms
        ``[2, B]`` (only with ``dropout``); the text uniforms ``[B, L]``; the image ranking scores ``[B, L]``.

        Args:
            batch: Interleaved rows (``input_ids``, ``attention_mask``, ``image_mask``, ``text_mask`` ``[B, L]``).
            generator: Random source (:meth:`step_generator`).
            dropout: Apply condition dropout.

        Returns:
            :class:`ParallelCorruption`.
        """
        ids: Tensor = batch["input_ids"]
        attention = batch["attention_mask"].bool()
        image_target = batch["image_mask"].bool() & attention
        text_target = batch["text_mask"].bool() & attention
        b, device = ids.shape[0], ids.device
        lay = self.layout
        t = self.eps + (1.0 - self.eps) * torch.rand(b, generator=generator, device=device)
        drop_text = drop_image = torch.zeros(b, dtype=torch.bool, device=device)
        if dropout:
            u = torch.rand(2, b, generator=generator, device=device)
            drop_text = u[0] < self.text_dropout
            # only an editing row has an input image to drop (a generation row's slot is already [iPAD])
            drop_image = (u[1] < self.image_dropout) & (ids[:, 0] == lay.token_id(TASK_TOKENS["edit"]))
            ids, attention = drop_conditions(ids, attention, drop_text, drop_image, lay, self.row_spans(batch))
        text = self.text_schedule.add_noise(ids, text_target, lay.mask_id, t=t, generator=generator, at_least_one=True)
        # exact count ⌈t·N⌉ ≥ 1 at random positions: the image ratio follows the same t as the text
        n_image = torch.ceil(t * image_target.sum(dim=1)).long().clamp(min=1)
        image_masked = rank_mask(image_target, n_image, generator=generator)
        noisy = text.noisy.masked_fill(image_masked, lay.mask_id)
        return ParallelCorruption(noisy, attention, text.masked, image_masked, t, text.p_mask, drop_text, drop_image)

    # ----------------------------------------------------------------- loss
    def forward_loss(  # type: ignore[override]
        self, batch: Mapping[str, Any], batch_idx: int, stream: int = 0, per_step: bool = True
    ) -> ParallelLossOutput:
        """Corrupt the rows (:meth:`corrupt_rows`), run one forward with logits at the masked positions, reduce."""
        gen = self.step_generator(batch_idx, stream, per_step)
        dropout = self.training and (self.text_dropout > 0 or self.image_dropout > 0)
        c = self.corrupt_rows(batch, gen, dropout)
        targets: Tensor = batch["input_ids"]
        masked = c.text_masked | c.image_masked
        out = self.net(c.input_ids, attention_mask=c.attention_mask, logits_at=masked)
        assert out.logits is not None
        ce_flat = F.cross_entropy(out.logits.float(), targets[masked], reduction="none")
        ce = torch.zeros(masked.shape, device=ce_flat.device, dtype=ce_flat.dtype).masked_scatter_(masked, ce_flat)
        attention = batch["attention_mask"].bool()
        text = self.text_loss.reduce(
            ce,
            c.text_masked,
            p_mask=c.p_text,
            t=c.t,
            answer_length=(batch["text_mask"].bool() & attention).sum(dim=1),
        )
        image = self.image_loss.reduce(
            ce,
            c.image_masked,
            t=c.t,
            answer_length=(batch["image_mask"].bool() & attention).sum(dim=1),
        )
        num_masked = masked.sum()
        return ParallelLossOutput(
            loss=self.text_coeff * text.loss + self.image_coeff * image.loss,
            text_loss=text.loss,
            image_loss=image.loss,
            text_ce=text.ce,
            image_ce=image.ce,
            num_masked=num_masked,
            ce=(ce_flat.sum() / num_masked.clamp(min=1)).detach(),
        )

    # ---------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One optimisation step; logs the loss, its text and image terms, and the data counters."""
        out = self.forward_loss(batch, batch_idx)
        self._log_terms("train", out, batch)
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out losses with masks that depend only on ``batch_idx`` (no condition dropout)."""
        out = self.forward_loss(batch, batch_idx, stream=1, per_step=False)
        self._log_terms("val", out, batch)

    def _log_terms(self, split: str, out: ParallelLossOutput, batch: Mapping[str, Any]) -> None:
        rows = batch["input_ids"].shape[0]
        sync = split == "val"  # each rank validates its own share: average over ranks
        self.log(f"{split}/loss", out.loss, prog_bar=True, batch_size=rows, sync_dist=sync)
        for name in ("text_loss", "image_loss", "text_ce", "image_ce", "ce"):
            self.log(f"{split}/{name}", getattr(out, name), batch_size=rows, sync_dist=sync)
        if split != "train":
            return
        self.log("train/masked_tokens", out.num_masked.float(), batch_size=rows)
        # data/truncated: rows whose instruction or reasoning was cut to text_len
        for key in ("data_errors", "dropped", "truncated"):
            if key in batch:
                self.log(f"data/{key}", batch[key].float(), reduce_fx="sum", batch_size=rows)


__all__ = ["ParallelCorruption", "ParallelLossOutput", "ParallelSFT", "ParallelWeighting"]
