"""The backbone contract every model family implements (LLaDA full attention, SDAR block attention, …)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from dllm_zoo.tokenizers.layout import TokenLayout


@dataclass
class BackboneOutput:
    """What a backbone forward returns.

    Attributes:
        logits: ``[B, L, V]`` for every position; ``[B, K, V]`` when ``logits_at`` was a ``[B, K]`` index
            tensor; ``[N, V]`` (row-major over selected positions) when it was a ``[B, L]`` bool mask;
            ``None`` when ``return_logits=False``.
        hidden: ``[B, L, D]`` final hidden states after the final norm, when requested.
        cache: Key/value cache for samplers (family-specific object), when requested.
    """

    logits: Tensor | None
    hidden: Tensor | None = None
    cache: Any = None


class Backbone(nn.Module, ABC):
    """Base class of mask-predictor transformers.

    Contract (DESIGN.md §3): ``forward(input_ids, *, attention_mask, position_ids, cache, logits_at)``;
    ``from_pretrained`` / ``save_pretrained`` in the family's ORIGINAL file layout and key names; attention is
    never silently causal; :attr:`layout` owns every special id; :meth:`transformer_blocks` lists the repeated
    blocks (FSDP wraps and activation checkpointing act on them).

    Class attributes:
        lora_target_modules: Default LoRA targets of the family (:class:`dllm_zoo.adapters.LoRA` with
            ``target_modules=None``): names of ``nn.Linear`` layers inside :meth:`transformer_blocks`, matched by
            their path within a block, never outside the blocks. Empty: the user must name the targets.
        pretrained_from: The checkpoint directory the weights came from, or ``None`` for a fresh initialisation.
    """

    layout: TokenLayout
    lora_target_modules: ClassVar[tuple[str, ...]] = ()
    # The checkpoint directory the weights were loaded from (None: initialised here). Adapter checkpoints leave
    # the frozen base out only when it can be read back from such a directory.
    pretrained_from: str | None = None

    @abstractmethod
    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        logits_at: Tensor | None = None,
        return_hidden: bool = False,
        return_logits: bool = True,
        return_cache: bool = False,
    ) -> BackboneOutput:
        """Run the model.

        Args:
            input_ids: ``[B, L]`` token ids.
            attention_mask: ``[B, L]`` key-padding mask (1 = real token) or a ``[B, 1, L, L]`` bool mask
                (True = may attend, used as-is). ``None`` and key padding use the family's own pattern: every
                position (LLaDA) or block-causal on the grid ``position_ids // block_size`` (SDAR).
            position_ids: ``[B, L]`` RoPE positions; default ``0..L-1``.
            cache: Keys/values of context positions the input window attends to in addition to itself
                (samplers' prefix/dual/block caches); ``input_ids`` is then only the window.
            return_cache: Also return the window's own keys/values (post-RoPE) as ``BackboneOutput.cache``.
            logits_at: Compute logits only here: ``[B, L]`` bool mask or ``[B, K]`` index tensor.
            return_hidden: Also return the final hidden states.
            return_logits: Skip the vocabulary projection entirely when False.
        """

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> Backbone:
        """Load a checkpoint directory written in the family's original layout."""

    @abstractmethod
    def save_pretrained(self, path: str | Path, max_shard_size: int = 5 * 2**30) -> None:
        """Write config.json and (sharded) safetensors in the family's original layout."""

    @abstractmethod
    def transformer_blocks(self) -> nn.ModuleList:
        """The repeated transformer blocks, in order."""

    def transformer_blocks_name(self) -> str:
        """Where :meth:`transformer_blocks` sits in the module tree (``model.transformer.blocks``, ``model.layers``).

        Raises:
            ValueError: when ``transformer_blocks()`` returns a list that is not a submodule of the backbone.
        """
        blocks = self.transformer_blocks()
        for name, module in self.named_modules():
            if module is blocks:
                return name
        raise ValueError(f"{type(self).__name__}.transformer_blocks() is not a submodule of the backbone")

    @abstractmethod
    def output_head(self) -> nn.Linear:
        """The vocabulary projection (``D -> V``)."""

    @property
    def vocab_size(self) -> int:
        """Rows of the output projection."""
        return self.layout.vocab_size

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory, costs ~1/3 more compute)."""
        self.gradient_checkpointing = enabled
