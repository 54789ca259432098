"""Attention-mask builders for ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

Conventions (DESIGN.md §3, "Backbones"): masks are **bool, True = may attend**; a model never falls back to
causal attention when given a padding mask (the OLMo/MMaDA code did, research/tracerl_llada.md §4.2 and
mmada.md §2.1). ``None`` means "attend everywhere" and lets SDPA take its unmasked fast path.

A query row with no allowed key would make softmax return NaN in some SDPA kernels; :func:`fill_empty_rows`
lets such a query attend everywhere instead. Its output is meaningless (it is padding) but finite, so a NaN
can never leak into a loss through a ``0 * NaN`` product.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fill_empty_rows(mask: Tensor) -> Tensor:
    """Let query rows that may attend to nothing attend to everything.

    Args:
        mask: Bool ``[..., Lq, Lk]`` (True = may attend).

    Returns:
        Bool mask of the same shape with every all-False row set to all-True.
    """
    return mask | ~mask.any(dim=-1, keepdim=True)


def key_padding_to_sdpa(attention_mask: Tensor, *, skip_if_full: bool = True) -> Tensor | None:
    """Turn a ``[B, L]`` key-padding mask (1 = real token) into an SDPA bool mask.

    Every query (padding queries included) attends to every real key of its row; rows without any real token
    attend everywhere (see :func:`fill_empty_rows`).

    Args:
        attention_mask: ``[B, L]`` bool or integer 0/1 (float 0/1 accepted too).
        skip_if_full: Return ``None`` when no position is padding, so SDPA uses its unmasked kernel. Costs one
            host-device sync on accelerators; pass False to always build the mask.

    Returns:
        ``[B, 1, 1, L]`` bool mask broadcasting over heads and queries, or ``None``.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"key-padding mask must be [B, L], got shape {tuple(attention_mask.shape)}")
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    if skip_if_full and bool(keep.all()):
        return None
    keep = fill_empty_rows(keep)
    return keep[:, None, None, :]


def padding_pair_mask(attention_mask: Tensor) -> Tensor:
    """Pairwise mask ``m_i & m_j`` from a ``[B, L]`` padding mask (MMaDA's T2I rows, research/mmada.md §2.1).

    Real queries see only real keys, exactly as with :func:`key_padding_to_sdpa`, so the two give the same outputs
    at real positions; padding queries have no allowed key and attend everywhere (:func:`fill_empty_rows`).

    Args:
        attention_mask: ``[B, L]`` bool or 0/1.

    Returns:
        ``[B, 1, L, L]`` bool mask.
    """
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return fill_empty_rows(keep[:, None, :, None] & keep[:, None, None, :])


def to_sdpa_mask(attention_mask: Tensor | None, batch: int, q_len: int, k_len: int | None = None) -> Tensor | None:
    """Normalise the ``attention_mask`` argument of a backbone's ``forward`` to what SDPA takes.

    Args:
        attention_mask: ``None`` (attend everywhere), a ``[B, Lk]`` key-padding mask (1 = real token), or a
            ``[B, 1, Lq, Lk]`` / ``[B, H, Lq, Lk]`` bool (or integer 0/1) mask with True = may attend. Float 4-D
            masks are refused: 0/1 and additive (0/-inf) conventions cannot be told apart.
        batch: ``B`` of the inputs, to check the mask against.
        q_len: ``Lq``.
        k_len: ``Lk`` (default ``Lq``).

    Returns:
        ``None`` (no masking; also for an all-ones key-padding mask) or a bool mask broadcastable to
        ``[B, H, Lq, Lk]`` with no all-False query rows.

    Raises:
        ValueError: on a wrong shape or dtype; the message names the expected shapes.
    """
    if attention_mask is None:
        return None
    k_len = q_len if k_len is None else k_len
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() == 2:
        if shape != (batch, k_len):
            raise ValueError(f"attention_mask [B, L] must have shape {(batch, k_len)}, got {shape}")
        return key_padding_to_sdpa(attention_mask)
    if attention_mask.dim() == 4:
        if shape[0] not in (1, batch) or shape[2:] != (q_len, k_len):
            raise ValueError(
                f"attention_mask [B, 1, Lq, Lk] must have shape ({batch}, 1, {q_len}, {k_len}), got {shape}"
            )
        if attention_mask.is_floating_point():
            raise ValueError(
                "a 4-D attention_mask must be bool (True = may attend) or integer 0/1; got a float mask, which could "
                "be 0/1 or additive -inf: convert it with `mask.bool()` (0/1) or `mask == 0` (additive)"
            )
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        return fill_empty_rows(keep)
    raise ValueError(f"attention_mask must be [B, L] (key padding) or [B, 1, L, L] (bool), got shape {shape}")
