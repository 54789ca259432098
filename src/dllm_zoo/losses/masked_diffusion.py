"""Masked-diffusion cross-entropy with pluggable weighting and normalisation.

Presets reproduce each paper's choice (research/tracerl_llada.md §5.2, research/mmada.md §4.1):

* LLaDA / MMaDA ``lm`` pretraining: ``Σ_{i∈M} CE_i / p  ÷  (B·L)``.
* LLaDA SFT, MMaDA ``mmu`` and CoT SFT: prompt never masked, ``Σ_{i∈M} CE_i / p ÷ |answer|`` per row,
  averaged over the batch (``|answer|`` counts the EOS padding).
* MMaDA t2i (MaskGIT): unweighted mean CE over the masked image tokens.
* MMaDA-Parallel text: ``1/t`` weighting.

With packed rows (several samples per row, research/tracerl_llada.md §3.2) pass ``sample_ids``: the weights and
the answer-length normalisation are then per packed sample, and the batch mean is over samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Weighting = Literal["inverse_p", "inverse_t", "none"]
Normalization = Literal["batch_tokens", "answer_length", "masked_mean"]


@dataclass
class LossOutput:
    """Loss and diagnostics.

    Attributes:
        loss: Scalar training loss.
        ce: Scalar unweighted mean cross-entropy over the masked tokens (comparable across weightings).
        num_masked: Scalar int64 number of masked tokens in the batch.
        per_sample: With ``answer_length`` normalisation, each row's (each sample's, with ``sample_ids``) term
            ``Σ w·CE ÷ |answer|``: ``[B]`` (``[S]``; 0 for ids that name no sample); ``None`` otherwise.
    """

    loss: Tensor
    ce: Tensor
    num_masked: Tensor
    per_sample: Tensor | None = None


class MaskedDiffusionLoss:
    """Cross-entropy over masked positions, weighted per row and normalised as a paper prescribes.

    Args:
        weighting: ``"inverse_p"`` (``1/p``, LLaDA), ``"inverse_t"`` (``1/t``, MMaDA-Parallel text) or ``"none"``.
        normalization: ``"batch_tokens"`` (divide the sum by ``B·L``), ``"answer_length"`` (divide each row's
            sum by its answer length, then average rows) or ``"masked_mean"`` (divide by the number of masked
            tokens).

    Example:
        >>> loss_fn = MaskedDiffusionLoss.pretraining()
        >>> logits = torch.zeros(1, 4)  # one masked token, uniform over 4 classes
        >>> out = loss_fn(logits, torch.tensor([2]), torch.tensor([[True, False]]), p_mask=torch.tensor([0.5]))
        >>> round(out.loss.item(), 4)  # ln(4) / 0.5 / (1·2)
        1.3863
    """

    def __init__(self, weighting: Weighting = "inverse_p", normalization: Normalization = "batch_tokens") -> None:
        if weighting not in ("inverse_p", "inverse_t", "none"):
            raise ValueError(f"weighting must be 'inverse_p', 'inverse_t' or 'none', got {weighting!r}")
        if normalization not in ("batch_tokens", "answer_length", "masked_mean"):
            raise ValueError(
                f"normalization must be 'batch_tokens', 'answer_length' or 'masked_mean', got {normalization!r}"
            )
        self.weighting = weighting
        self.normalization = normalization

    @classmethod
    def pretraining(cls) -> MaskedDiffusionLoss:
        """LLaDA/MMaDA pretraining: ``Σ CE/p ÷ (B·L)``."""
        return cls("inverse_p", "batch_tokens")

    @classmethod
    def sft(cls) -> MaskedDiffusionLoss:
        """LLaDA SFT / MMaDA mmu and CoT SFT: ``Σ CE/p ÷ |answer|``, mean over rows."""
        return cls("inverse_p", "answer_length")

    @classmethod
    def maskgit(cls) -> MaskedDiffusionLoss:
        """MMaDA t2i: unweighted mean CE over masked tokens."""
        return cls("none", "masked_mean")

    def __call__(
        self,
        logits: Tensor,
        targets: Tensor,
        masked: Tensor,
        *,
        p_mask: Tensor | None = None,
        t: Tensor | None = None,
        answer_length: Tensor | None = None,
        sample_ids: Tensor | None = None,
    ) -> LossOutput:
        """Compute the loss.

        Args:
            logits: ``[N, V]`` logits at the masked positions, row-major (``N = masked.sum()``), as a backbone
                returns them for ``logits_at=masked``.
            targets: ``[N]`` clean token ids at those positions.
            masked: ``[B, L]`` bool mask of the masked positions.
            p_mask: ``[B]`` per-row mask probability (needed for ``inverse_p``).
            t: ``[B]`` per-row time (needed for ``inverse_t``).
            answer_length: ``[B]`` per-row count of maskable (answer) tokens (needed for ``answer_length``).
            sample_ids: Optional ``[B, L]`` long sample index of each position for packed rows
                (:func:`~dllm_zoo.data.packing.packed_sample_ids`; −1 = no sample). ``p_mask``, ``t`` and
                ``answer_length`` are then ``[S]``, indexed by it, and ``answer_length`` normalisation averages the
                per-sample terms over the samples present in ``sample_ids`` (``batch_tokens`` still divides by
                ``B·L``).

        Returns:
            :class:`LossOutput`.
        """
        b, length = masked.shape
        n = logits.shape[0]
        if targets.shape != (n,):
            raise ValueError(f"targets must have shape [{n}] to match logits [N, V], got {tuple(targets.shape)}")
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        if sample_ids is None:
            units, present = b, None
            unit = torch.arange(b, device=masked.device)[:, None].expand(b, length)[masked]
        else:
            if sample_ids.shape != masked.shape:
                raise ValueError(f"sample_ids must be [B, L] = {tuple(masked.shape)}, got {tuple(sample_ids.shape)}")
            units = self._num_units(p_mask, t, answer_length, b * length)
            unit = sample_ids[masked]
            # mean over the samples that occur, without a host sync to count them
            flat = sample_ids.flatten()
            occurs = torch.zeros(units, device=flat.device).index_add_(0, flat.clamp(min=0), (flat >= 0).float())
            present = (occurs > 0).to(ce.dtype)
        weight = self._unit_weight(p_mask, t, units, masked.device)
        weighted = ce * weight[unit] if weight is not None else ce
        return self._normalise(
            weighted.sum(),
            lambda: torch.zeros(units, device=weighted.device, dtype=weighted.dtype).index_add_(0, unit, weighted),
            answer_length,
            present,
            b * length,
            masked.sum(),
            ce,
        )

    def reduce(
        self,
        ce: Tensor,
        masked: Tensor,
        *,
        p_mask: Tensor | None = None,
        t: Tensor | None = None,
        answer_length: Tensor | None = None,
    ) -> LossOutput:
        """Weight and normalise per-position cross-entropies of unpacked rows.

        The multi-task stages compute CE once for a batch that concatenates several tasks and reduce each task's
        rows with its own loss object (:class:`~dllm_zoo.stages.MMaDAPretraining`).

        Args:
            ce: ``[B, L]`` float cross-entropy at each position (any value where ``masked`` is False: ignored).
            masked: ``[B, L]`` bool, the positions that count.
            p_mask: ``[B]`` mask probability per row (``inverse_p``).
            t: ``[B]`` time per row (``inverse_t``).
            answer_length: ``[B]`` answer tokens per row (``answer_length``).

        Returns:
            :class:`LossOutput` (``per_sample`` ``[B]`` with ``answer_length`` normalisation).
        """
        b, length = masked.shape
        ce = torch.where(masked, ce.float(), torch.zeros((), device=ce.device))
        weight = self._unit_weight(p_mask, t, b, masked.device)
        weighted = ce * weight[:, None] if weight is not None else ce
        return self._normalise(
            weighted.sum(), lambda: weighted.sum(dim=1), answer_length, None, b * length, masked.sum(), ce
        )

    def _normalise(
        self,
        total: Tensor,
        per_unit: Callable[[], Tensor],
        answer_length: Tensor | None,
        present: Tensor | None,
        positions: int,
        num_masked: Tensor,
        ce: Tensor,
    ) -> LossOutput:
        """Apply the normalisation to the weighted CE (``total``; ``per_unit()`` sums per row / sample)."""
        per_sample = None
        if self.normalization == "batch_tokens":
            loss = total / positions
        elif self.normalization == "masked_mean":
            loss = total / num_masked.clamp(min=1)
        else:
            if answer_length is None:
                raise ValueError("normalization='answer_length' needs answer_length [B] ([S] with sample_ids)")
            sums = per_unit()
            per_sample = sums / answer_length.to(sums.dtype).clamp(min=1)
            loss = per_sample.mean() if present is None else (per_sample * present).sum() / present.sum().clamp(min=1)
        ce_mean = ce.sum() / num_masked.clamp(min=1)
        return LossOutput(loss=loss, ce=ce_mean.detach(), num_masked=num_masked, per_sample=per_sample)

    @staticmethod
    def _num_units(p_mask: Tensor | None, t: Tensor | None, answer_length: Tensor | None, default: int) -> int:
        """``S``: the length shared by the per-sample tensors given (``B·L`` if none is)."""
        sizes = {int(x.shape[0]) for x in (p_mask, t, answer_length) if x is not None}
        if len(sizes) > 1:
            raise ValueError(
                f"p_mask, t and answer_length must all be [S] with sample_ids, got lengths {sorted(sizes)}"
            )
        return sizes.pop() if sizes else default

    def _unit_weight(self, p_mask: Tensor | None, t: Tensor | None, units: int, device: torch.device) -> Tensor | None:
        if self.weighting == "none":
            return None
        value = p_mask if self.weighting == "inverse_p" else t
        if value is None:
            needed = "p_mask" if self.weighting == "inverse_p" else "t"
            raise ValueError(f"weighting={self.weighting!r} needs `{needed}` [B]")
        if value.shape != (units,):
            raise ValueError(f"per-row (per-sample) weights must have shape [{units}], got {tuple(value.shape)}")
        return 1.0 / value.to(device=device, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"MaskedDiffusionLoss(weighting={self.weighting!r}, normalization={self.normalization!r})"
