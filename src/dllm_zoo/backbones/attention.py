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


def context_window_mask(context_keys: Tensor | None, own: Tensor, batch: int, context_len: int) -> Tensor:
    """Mask of a window forward against a key/value cache: every real context key, then ``own`` among its keys.

    Args:
        context_keys: ``[B, S]`` bool, the cached keys that are real (``KVCache.key_mask``); ``None`` = all real.
        own: ``[B or 1, 1, Q, W]`` bool pattern among the window's own keys (``Q`` = 1 for pure key padding).
        batch: ``B``.
        context_len: ``S``.

    Returns:
        ``[B, 1, Q, S + W]`` bool (context keys first) with no all-False query rows.
    """
    q, w = own.shape[-2], own.shape[-1]
    keys = own.new_ones(batch, context_len) if context_keys is None else context_keys.to(own.device)
    both = torch.cat((keys[:, None, None, :].expand(batch, 1, q, context_len), own.expand(batch, 1, q, w)), dim=-1)
    return fill_empty_rows(both)


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


def packed_mask(segment_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Bidirectional attention inside each packed sample, none across samples (full-attention packed rows).

    Args:
        segment_ids: ``[B, L]`` packed-sample index of each position.
        attention_mask: Optional ``[B, L]`` key padding (1 = real token).

    Returns:
        Bool ``[B, 1, L, L]`` (True = may attend) with no all-False query rows.
    """
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if attention_mask is not None:
        mask = mask & _keep(attention_mask)[:, None, :]
    return fill_empty_rows(mask[:, None])


def block_causal_mask(
    position_ids: Tensor,
    block_size: int,
    attention_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """Block-causal mask on the absolute block grid (SDAR inference, research/tracerl_llada.md §3.4–3.5).

    Position ``p`` lies in block ``p // block_size``; a query may attend to a key iff the key's block is not later
    than the query's (bidirectional inside a block, causal across blocks). Blocks are counted from position 0 of
    each sample, so a left-padded row passing ``position_ids = cumsum(mask) - 1`` gets the same grid as its unpadded
    batch-1 run, and training (which aligns blocks to position 0 too) sees the grid inference uses.

    Args:
        position_ids: ``[B, L]`` integer positions (restarting at 0 for each packed sample).
        block_size: Tokens per block (``B`` in the papers), > 0.
        attention_mask: Optional ``[B, L]`` key padding (1 = real token); padding keys are never attended.
        segment_ids: Optional ``[B, L]`` packed-sample index; keys of another sample are never attended.

    Returns:
        Bool ``[B, 1, L, L]`` (True = may attend) with no all-False query rows (:func:`fill_empty_rows`).
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, L], got shape {tuple(position_ids.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    blocks = torch.div(position_ids, block_size, rounding_mode="floor")
    mask = blocks[:, :, None] >= blocks[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if attention_mask is not None:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        mask = mask & keep[:, None, :]
    return fill_empty_rows(mask[:, None])


# ------------------------------------------------------------------------------------------ block diffusion
def _keep(attention_mask: Tensor) -> Tensor:
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def block_diffusion_mask(
    position_ids: Tensor,
    noisy: Tensor,
    block_size: int,
    attention_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """Training mask of block diffusion over any arrangement of clean and noisy columns (research §3.2–3.4).

    Each column is a token of the clean sequence ``x_0`` or of a noisy copy ``x_t`` (``noisy`` True) and sits in
    block ``position_ids // block_size`` (the absolute grid, as at inference). A query may attend to a key iff
    they belong to the same packed sample, the key is not padding, and

    * clean query, clean key: key block ≤ query block (block-causal ``x_0``, what the block KV cache holds);
    * noisy query, clean key: key block < query block (the committed context of earlier blocks);
    * noisy query, noisy key: same block (the block being denoised, bidirectional);
    * clean query, noisy key: never (clean states must not depend on the noise).

    This single rule is SDAR's ``[x_t | x_0]`` mask (:func:`sdar_training_mask`) and, with a prompt-tail copy,
    the trajectory rows of TraceRL (:func:`trajectory_mask`). No information reaches a noisy query from a clean
    token of its own or a later block through any number of layers: clean keys of earlier blocks only ever
    attend to clean keys of blocks that are earlier still.

    Args:
        position_ids: ``[B, N]`` integer positions (restarting at 0 for each packed sample).
        noisy: ``[B, N]`` or ``[N]`` bool, True for columns of a noisy copy.
        block_size: Tokens per block (``B`` in the papers), > 0.
        attention_mask: Optional ``[B, N]`` key padding (1 = real token); padding keys are never attended.
        segment_ids: Optional ``[B, N]`` packed-sample index; keys of another sample are never attended.

    Returns:
        Bool ``[B, 1, N, N]`` (True = may attend) with no all-False query rows (:func:`fill_empty_rows`).
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, N], got shape {tuple(position_ids.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    b, n = position_ids.shape
    if noisy.shape not in ((n,), (b, n)):
        raise ValueError(f"noisy must be [N] or [B, N] = [{b}, {n}], got shape {tuple(noisy.shape)}")
    noisy = noisy.to(torch.bool).expand(b, n)
    blocks = torch.div(position_ids, block_size, rounding_mode="floor")
    bq, bk = blocks[:, :, None], blocks[:, None, :]
    nq, nk = noisy[:, :, None], noisy[:, None, :]
    mask = torch.where(nq, torch.where(nk, bk == bq, bk < bq), ~nk & (bk <= bq))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if attention_mask is not None:
        mask = mask & _keep(attention_mask)[:, None, :]
    return fill_empty_rows(mask[:, None])


def sdar_training_mask(
    position_ids: Tensor,
    block_size: int,
    attention_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """SDAR's training mask for rows laid out as ``[x_t | x_0]`` (research/tracerl_llada.md §3.2).

    A row of ``n`` tokens is doubled to ``2n``: the noisy copy ``x_t`` (columns ``[0, n)``) then the clean
    ``x_0`` (columns ``[n, 2n)``), both with the same ``position_ids``. Query ``i`` may attend to key ``j`` iff
    (a) same block and same half, (b) ``i`` in ``x_t``, ``j`` in ``x_0`` and block(j) < block(i), or (c) both in
    ``x_0`` and block(j) ≤ block(i); never across packed samples, never to padding keys.

    Block grid: ``block = position // block_size`` with positions restarting at 0 for each packed sample, i.e.
    blocks are aligned to position 0 of each sample, prompt included — as SDAR's official training does and as
    inference does (JetEngine and our block sampler prefill ``floor(p/B)·B`` prompt tokens, so the prompt tail
    shares the first generated block; research §3.4). Training and inference therefore use the same grid. (The
    dLLM-RL trainers instead count response blocks from the response start; see :func:`trajectory_mask`.)

    Args:
        position_ids: ``[B, n]`` positions of the un-doubled row (restarting at 0 per packed sample).
        block_size: Tokens per block, > 0.
        attention_mask: Optional ``[B, n]`` key padding of the un-doubled row (1 = real token), applied to both
            halves.
        segment_ids: Optional ``[B, n]`` packed-sample index of the un-doubled row.

    Returns:
        Bool ``[B, 1, 2n, 2n]`` (True = may attend), no all-False query rows. Feed the model
        ``input_ids = cat([x_t, x_0], 1)`` and ``position_ids = cat([position_ids, position_ids], 1)``.

    Example:
        >>> m = sdar_training_mask(torch.arange(4)[None], 2)[0, 0].int()
        >>> ["".join(map(str, row)) for row in m.tolist()]  # rows/cols: x_t blocks 0, 1 | x_0 blocks 0, 1
        ['11000000', '11000000', '00111100', '00111100', '00001100', '00001100', '00001111', '00001111']
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, n], got shape {tuple(position_ids.shape)}")
    n = position_ids.shape[1]
    noisy = torch.arange(2 * n, device=position_ids.device) < n
    return block_diffusion_mask(
        torch.cat([position_ids, position_ids], dim=1),
        noisy,
        block_size,
        None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=1),
        None if segment_ids is None else torch.cat([segment_ids, segment_ids], dim=1),
    )


def trajectory_tail_width(prompt_width: int, block_size: int) -> int:
    """Columns ``T = min(block_size − 1, P)`` of the noisy prompt-tail copy in a trajectory row."""
    return max(0, min(block_size - 1, prompt_width))


def _trajectory_columns(
    prompt_mask: Tensor, response_len: int, block_size: int, response_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Positions ``[B, N]``, noisy flags ``[N]`` and key padding ``[B, N]`` of a trajectory row."""
    if prompt_mask.dim() != 2:
        raise ValueError(f"prompt_mask must be [B, P], got shape {tuple(prompt_mask.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    if response_len < 0:
        raise ValueError(f"response_len must be >= 0, got {response_len}")
    b, p = prompt_mask.shape
    device = prompt_mask.device
    real = _keep(prompt_mask)
    n_prompt = real.sum(dim=1)  # [B] real prompt tokens (left padding excluded)
    prompt_pos = (real.cumsum(dim=1) - 1).clamp(min=0)  # pads share position 0, as the samplers do
    resp_pos = n_prompt[:, None] + torch.arange(response_len, device=device)
    t = trajectory_tail_width(p, block_size)
    tail_pos = prompt_pos[:, p - t :]
    # A tail copy column is a real noisy token only if it is a prompt token in the first response block.
    first_block = torch.div(n_prompt, block_size, rounding_mode="floor")
    tail_real = real[:, p - t :] & (torch.div(tail_pos, block_size, rounding_mode="floor") == first_block[:, None])
    if response_mask is None:
        resp_real = torch.ones(b, response_len, dtype=torch.bool, device=device)
    else:
        if tuple(response_mask.shape) != (b, response_len):
            raise ValueError(
                f"response_mask must be [B, R] = [{b}, {response_len}], got shape {tuple(response_mask.shape)}"
            )
        resp_real = _keep(response_mask)
    positions = torch.cat([prompt_pos, resp_pos, tail_pos, resp_pos], dim=1)
    noisy = torch.arange(p + 2 * response_len + t, device=device) >= p + response_len
    keep = torch.cat([real, resp_real, tail_real, resp_real], dim=1)
    return positions, noisy, keep


def trajectory_position_ids(prompt_mask: Tensor, response_len: int, block_size: int) -> Tensor:
    """RoPE positions of a trajectory row (see :func:`trajectory_mask` for the layout).

    Args:
        prompt_mask: ``[B, P]`` bool, True on real prompt tokens (prompts are left-padded).
        response_len: ``R``, the (right-padded) response width.
        block_size: Tokens per block (sets the tail width ``T``).

    Returns:
        ``[B, P + R + T + R]`` long: prompt ``0..p−1`` (padding 0), responses ``p..p+R−1`` in both copies, and the
        tail copy with the positions of the last ``T`` prompt columns.
    """
    return _trajectory_columns(prompt_mask, response_len, block_size, None)[0]


def trajectory_input_ids(
    prompt_ids: Tensor, response_ids: Tensor, noisy_response_ids: Tensor, block_size: int
) -> Tensor:
    """Assemble the tokens of a trajectory row ``[prompt | clean response | prompt tail | noisy response]``.

    Args:
        prompt_ids: ``[B, P]`` left-padded prompts.
        response_ids: ``[B, R]`` clean responses.
        noisy_response_ids: ``[B, R]`` the responses with the positions being trained replaced by the mask id.
        block_size: Tokens per block (sets the tail width ``T``).

    Returns:
        ``[B, P + 2R + T]`` long; logits for the loss are read at the last ``R`` columns.
    """
    t = trajectory_tail_width(prompt_ids.shape[1], block_size)
    tail = prompt_ids[:, prompt_ids.shape[1] - t :]
    return torch.cat([prompt_ids, response_ids, tail, noisy_response_ids], dim=1)


def trajectory_mask(
    prompt_mask: Tensor, response_len: int, block_size: int, response_mask: Tensor | None = None
) -> Tensor:
    """Block mask of trajectory rows ``[prompt | clean response | noisy copy]`` on the absolute block grid.

    dLLM-RL trains block models on rows ``[prompt (P) | clean response (R) | noisy response (R)]``
    (research/tracerl_llada.md §3.3, §2.3) and counts response blocks from the response start and prompt blocks
    backwards from the prompt end. Inference puts blocks at absolute positions ``k·B`` instead (§3.4), so when
    ``p mod B ≠ 0`` the last ``p mod B`` prompt tokens share the first generated block and are processed *with*
    its noisy tokens. We use the inference grid (the same as :func:`sdar_training_mask` and
    :func:`block_causal_mask`): ``block = position // B`` with positions counted from the first real prompt token.

    To reproduce what inference computes for that shared block, the noisy part starts with a copy of the prompt
    tail, so the row is ``[prompt (P) | clean response (R) | prompt tail (T) | noisy response (R)]`` with
    ``T = min(B − 1, P)``: the tail columns copy the last ``T`` prompt columns (tokens and positions); only those in
    the first response block (position ≥ ``⌊p/B⌋·B``) are real, the others are padding. Letting noisy queries read
    the clean prompt-tail columns of ``x_0`` instead would leak the answer: in ``x_0`` the tail attends to the clean
    response tokens of its own block, and a second layer hands that on to the noisy query.

    The mask is :func:`block_diffusion_mask` with prompt and clean response as ``x_0`` and tail copy and noisy
    response as ``x_t``:

    * prompt and clean-response queries: clean keys of blocks ≤ their own (block-causal ``x_0``), never noisy keys;
    * noisy queries of block ``b`` (tail copy or noisy response): clean keys of blocks < ``b`` and noisy keys of
      block ``b`` (the real tail copy and the noisy response tokens of that block);
    * padding keys (prompt left padding, tail slots outside the first response block, ``response_mask`` False in
      either copy) are never attended; query rows left without keys attend everywhere (:func:`fill_empty_rows`).

    When every ``p`` is a multiple of ``B`` the tail columns are all padding and, on the other columns, the mask
    equals dLLM-RL's (tested).

    Args:
        prompt_mask: ``[B, P]`` bool, True on real prompt tokens (left padding False).
        response_len: ``R``, the response width.
        block_size: Tokens per block, > 0.
        response_mask: Optional ``[B, R]`` bool, True on real response tokens (default all True).

    Returns:
        Bool ``[B, 1, N, N]`` with ``N = P + 2R + T``. Use :func:`trajectory_input_ids` and
        :func:`trajectory_position_ids` for the matching tokens and positions.
    """
    positions, noisy, keep = _trajectory_columns(prompt_mask, response_len, block_size, response_mask)
    return block_diffusion_mask(positions, noisy, block_size, keep)
