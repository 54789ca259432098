"""The sampler contract: ``generate(model, prompt_ids, prompt_mask) -> SamplerOutput`` (DESIGN.md §3 "Samplers").

Samplers are plain classes with typed ``__init__`` arguments, so LightningCLI / jsonargparse can build them from
YAML (``class_path: LLaDASampler``); they hold no model and no state between calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from dllm_zoo.backbones.base import Backbone


@dataclass
class SamplerOutput:
    """What a sampler returns.

    Attributes:
        tokens: ``[B, P + G]`` int64: the (left-padded) prompt followed by the ``G`` generated tokens.
        step_map: ``[B, P + G]`` int64: the 1-based denoising step, counted globally across blocks, at which each
            position was first revealed; 0 for prompt (and prompt padding) positions. TraceRL / ParaRL replay it.
        nfe: Number of model forward passes (function evaluations). A classifier-free-guidance forward that runs
            the conditional and unconditional branches as one batch of ``2B`` rows counts as one.
        snapshots: Canvas ``[B, P + G]`` int64 after each global step listed in ``record`` (keys are those
            steps; steps that were never executed, e.g. after an early stop, are absent), or ``None`` when nothing
            was recorded.
        attention_mask: ``[B, P + G]`` bool: the prompt's padding mask followed by ones for the generated part.
    """

    tokens: Tensor
    step_map: Tensor
    nfe: int
    snapshots: dict[int, Tensor] | None
    attention_mask: Tensor


class Sampler(ABC):
    """Base class of all samplers: backbone-agnostic, batched, vectorised over rows."""

    @abstractmethod
    def generate(
        self,
        model: Backbone,
        prompt_ids: Tensor,
        prompt_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        record: frozenset[int] | set[int] = frozenset(),
    ) -> SamplerOutput:
        """Generate completions for a batch of prompts.

        Args:
            model: Any :class:`~dllm_zoo.backbones.base.Backbone`; its ``layout`` supplies the mask/EOS ids.
            prompt_ids: ``[B, P]`` int64 prompt tokens, LEFT-padded (padding id must differ from the mask id).
            prompt_mask: ``[B, P]`` 0/1 or bool, 1 = real token; ``None`` = no padding.
            generator: Random source for temperature sampling and random remasking (on the model's device).
            record: Global steps (1-based) after which to keep a copy of the canvas in ``snapshots``.

        Returns:
            A :class:`SamplerOutput`.
        """
