"""Key/value cache of context positions for windowed forwards of full-attention backbones (samplers' caches).

A bidirectional mask predictor has no exact KV cache: every key depends on every token of the canvas, so keys
computed before some masks were filled in are *stale*. Fast-dLLM (research/peers.md §1.2,
research/tracerl_llada.md §7.2) reuses them anyway, approximately: one full forward over the canvas at the start
of a block records every layer's keys/values; the block's later steps feed only a window (the block, or the
block plus a horizon) whose queries attend to the recorded context keys (the *prefix* ``[0, s)``, and for the
"dual cache" also the *suffix* ``[e, L)``) and to the window's own fresh keys.

:class:`KVCache` is the container both directions use: a backbone forward with ``return_cache=True`` fills one,
:meth:`KVCache.select` / :meth:`KVCache.cat` cut and join it along the sequence, and ``forward(cache=...)``
attends to it. Unlike Fast-dLLM (research/reference-semantics.md, "Fast-dLLM v1"), keys are stored after RoPE
(positions are baked in; nothing is re-rotated per step) and each cache carries its key-padding mask, so padded
batches with different padding per row stay correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(eq=False)
class KVCache:
    """Keys/values (post-RoPE) of context positions that a window forward attends to, one entry per layer.

    The order of positions along ``S`` does not matter to attention (keys carry their RoPE positions), only that
    ``keys``, ``values`` and ``key_mask`` agree. Tensors produced by a backbone forward are views of the
    projection outputs (``[B, S, H_kv, head_dim]`` memory transposed to ``[B, H_kv, S, head_dim]``), so they are
    not contiguous; :meth:`cat` returns fresh contiguous tensors.

    Attributes:
        keys: ``n_layers`` tensors ``[B, H_kv, S, head_dim]``, after RoPE, in the dtype of the activations.
        values: ``n_layers`` tensors ``[B, H_kv, S, head_dim]``.
        key_mask: ``[B, S]`` bool, True = real key that may be attended; ``None`` = every key is real. Integer
            0/1 masks are converted to bool on construction.
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(
                f"KVCache needs one key and one value tensor per layer (at least one layer), got {len(self.keys)} "
                f"keys and {len(self.values)} values"
            )
        shape = tuple(self.keys[0].shape)
        if len(shape) != 4:
            raise ValueError(f"KVCache keys must be [B, H_kv, S, head_dim], got shape {shape}")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if tuple(k.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(
                    f"KVCache layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both have the shape "
                    f"of layer 0's keys {shape} [B, H_kv, S, head_dim]"
                )
        if self.key_mask is not None:
            if tuple(self.key_mask.shape) != (shape[0], shape[2]):
                raise ValueError(
                    f"KVCache key_mask must be [B, S] = {(shape[0], shape[2])}, got {tuple(self.key_mask.shape)}"
                )
            if self.key_mask.dtype != torch.bool:
                self.key_mask = self.key_mask != 0

    @property
    def seq_len(self) -> int:
        """``S``: cached positions."""
        return int(self.keys[0].shape[2])

    @property
    def batch_size(self) -> int:
        """``B``: rows."""
        return int(self.keys[0].shape[0])

    @property
    def n_layers(self) -> int:
        """Layers (entries of :attr:`keys`)."""
        return len(self.keys)

    def select(self, index: Tensor | slice) -> KVCache:
        """Keep some positions along ``S`` (the same ones in every row and layer).

        Args:
            index: A ``slice`` (returns views that share memory with, and keep alive, this cache's tensors) or a
                1-D integer tensor of positions (returns copies, via ``index_select``, in the given order). A 1-D
                bool tensor of length ``S`` is accepted too and turned into its True positions (host sync).

        Returns:
            A :class:`KVCache` with ``S'`` positions; ``key_mask`` is selected the same way.
        """
        if isinstance(index, slice):
            keys = [k[:, :, index] for k in self.keys]
            values = [v[:, :, index] for v in self.values]
            mask = None if self.key_mask is None else self.key_mask[:, index]
            return KVCache(keys, values, mask)
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or index.is_complex():
            raise ValueError(
                "KVCache.select takes a slice or a 1-D integer (or bool) position tensor, got "
                + (f"{index.dtype} of shape {tuple(index.shape)}" if isinstance(index, Tensor) else repr(index))
            )
        if index.dtype == torch.bool:
            if index.shape[0] != self.seq_len:
                raise ValueError(f"a bool KVCache.select index must have length S={self.seq_len}, got {index.shape[0]}")
            index = index.nonzero().squeeze(1)
        index = index.to(device=self.keys[0].device, dtype=torch.long)
        keys = [k.index_select(2, index) for k in self.keys]
        values = [v.index_select(2, index) for v in self.values]
        mask = None if self.key_mask is None else self.key_mask.index_select(1, index.to(self.key_mask.device))
        return KVCache(keys, values, mask)

    @staticmethod
    def cat(caches: Sequence[KVCache]) -> KVCache:
        """Concatenate caches along ``S`` (e.g. prefix + suffix for a dual cache).

        Args:
            caches: One or more caches with the same layers, batch, heads and head size.

        Returns:
            A :class:`KVCache` with contiguous fresh tensors ``[B, H_kv, sum(S_i), head_dim]`` (also for a single
            input). ``key_mask`` is ``None`` when every input's is ``None``; otherwise a ``None`` mask counts as
            all True.
        """
        if not caches:
            raise ValueError("KVCache.cat needs at least one cache")
        first = caches[0]
        for c in caches[1:]:
            if c.n_layers != first.n_layers:
                raise ValueError(f"KVCache.cat: caches have {first.n_layers} and {c.n_layers} layers")
            a, b = tuple(first.keys[0].shape), tuple(c.keys[0].shape)
            if (a[0], a[1], a[3]) != (b[0], b[1], b[3]):
                raise ValueError(
                    f"KVCache.cat: caches must agree in [B, H_kv, *, head_dim], got key shapes {a} and {b}"
                )
        keys = [torch.cat([c.keys[i] for c in caches], dim=2) for i in range(first.n_layers)]
        values = [torch.cat([c.values[i] for c in caches], dim=2) for i in range(first.n_layers)]
        mask = None
        if any(c.key_mask is not None for c in caches):
            device = next(c.key_mask.device for c in caches if c.key_mask is not None)
            parts = [
                c.key_mask.to(device)
                if c.key_mask is not None
                else torch.ones(c.batch_size, c.seq_len, dtype=torch.bool, device=device)
                for c in caches
            ]
            mask = torch.cat(parts, dim=1)
        return KVCache(keys, values, mask)
