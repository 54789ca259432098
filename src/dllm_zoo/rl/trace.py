r"""TraceRL training rows: replay a rollout's decoding trace (research/tracerl_llada.md §2.1, §2.3, §2.7).

TraceRL (Wang et al. 2025, "Revolutionizing Reinforcement Learning Framework for Diffusion Large Language Models")
trains a dLLM on the states its own sampler went through instead of on random re-maskings of the final answer. The
sampler records, for every generated position, the 1-based global denoising step at which it was revealed (the
rollout's ``step_map``). A training row is a partially decoded state: the tokens revealed at one step are the
targets, the tokens revealed at that step or later are masked, the tokens revealed earlier are clean.

**Shrinkage** (``shrink = s``, :func:`shrink_steps`): inside each group of tokens (one training block for block
models, the whole response for full attention) the distinct steps are sorted and cut into runs of ``s``
*consecutive distinct values* (not ``s`` consecutive integers: steps that revealed nothing in the group do not
count), and every step is mapped to the largest step of its run. ``s`` decoding steps then become one training step:
the row is the state just before the run's first step, its targets every token revealed during the run. ``s = 1``
is the exact trace.

**Block models** (SDAR/TraDo, ``block_size`` given): each training block advances independently. Round ``r`` of a
response holds, in every block, the ``r``-th shrunk step of that block: its tokens are targets, the block's tokens
revealed at or after the run's first step are masked in the noisy copy, the earlier ones are clean; a block with
fewer than ``r + 1`` runs is fully clean (it has no targets in that row). So a response yields
``max over blocks of #runs`` rows (≤ ``B / s`` for static decoding), independent of its length — the reason TraceRL
is cheap for block models. Feed the rows as ``[prompt | clean response | (prompt tail) | noisy response]`` with
:func:`~dllm_zoo.backbones.attention.trajectory_input_ids` / :func:`~dllm_zoo.backbones.attention.trajectory_mask`:
a noisy query only sees clean earlier blocks and its own noisy block, so mixing blocks at different rounds in one
row is exact.

**Full attention** (LLaDA/MMaDA, ``block_size=None``): one row per distinct shrunk step of the whole response; the
row is the whole canvas just before that run (≈ ``L / s`` rows per response).

**Block-size adaptation** (§2.7): the training ``block_size`` may differ from the rollout's (e.g. rolled out with
``B = 4``, trained with ``B = 8`` to move the model to larger blocks). With a multiple of the rollout block each
rollout block lies inside one training block, whose runs then span both halves in decoding order.

Differences from the released dLLM-RL trainers (``one_round_vectorized``, ``collapse_k_unique``; §1.4, §3.4 and
research/reference-semantics.md), all deliberate:

* **Block grid.** Blocks are ``position // block_size`` on the absolute grid from the first real prompt token, the
  grid the block sampler decodes on (the prompt's last ``p mod B`` tokens share the first generated block). The
  reference counts training blocks from the response start; the two agree only when ``p mod B = 0``.
* **Trainable tokens and ``post_num``.** One ``response_mask`` (:func:`~dllm_zoo.rl.rollout.response_mask`: the
  answer plus its first ``post_num`` padding tokens, counted per response) decides the targets, the shrinkage and
  the GAE (:mod:`dllm_zoo.rl.value`). The reference counts ``post_num`` per *row* for block models (so up to
  ``post_num`` padding targets in every row of a response), trains every padding token when ``post_num`` is unset
  while its GAE treats them as untrainable, and shrinks over padding steps too (rows without a trainable target are
  then dropped). Here non-trainable tokens never open a run, so every row has at least one target; when every
  generated token is trainable the rows equal the reference's.
* **Non-trainable generated tokens** (padding past ``post_num`` that the sampler did reveal) follow the replay rule
  in the noisy copy — masked iff revealed at or after the run's first step — so the row is the true state; the
  stage may hide them altogether (key padding). Positions the sampler never revealed (``step_map == 0``: prompt,
  rows that stopped early) are never masked and never targets.
* The rows are built straight from the rollout's tokens; the reference re-tokenises the decoded text and assumes
  the step map still lines up.

Everything is vectorised over responses, blocks and rounds (sorting and scatter; no Python loop over tokens).

Typical use in a stage (block model, prompt width ``P``)::

    rows = rollout_trace_rows(rollout, layout.mask_id, block_size=4)
    src = rows.source
    ids = trajectory_input_ids(rollout.tokens[src, :P], rollout.tokens[src, P:], rows.input_ids[:, P:], 4)
    mask = trajectory_mask(rollout.prompt_mask[src, :P] & rollout.attention_mask[src, :P], L - P, 4,
                           rollout.response_mask[src, P:])
    # logits at the last L − P columns ↔ rows.target_mask[:, P:]; advantages: rows.from_rollout(adv)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dllm_zoo.rl.rollout import Rollout

_BIG = torch.iinfo(torch.int64).max


@dataclass
class TraceRows:
    """Training rows replayed from a rollout's decoding trace, in the rollout's own ``[prompt | completion]`` layout.

    Rows of one rollout are adjacent, in round order. ``M`` = total rows, ``L`` = the rollout width.

    Attributes:
        input_ids: ``[M, L]`` int64, the rollout's tokens with the noisy positions replaced by the mask id (the noisy
            canvas; for block models its completion part is the noisy copy of a trajectory row).
        noisy_mask: ``[M, L]`` bool, positions masked in the row (targets included).
        target_mask: ``[M, L]`` bool, the row's targets (a subset of ``noisy_mask``).
        source: ``[M]`` int64, the rollout row each training row replays.
        round: ``[M]`` int64, the row's round within its rollout (``0 .. rows_per_rollout − 1``).
        target_step: ``[M, L]`` int64, the raw denoising step each target was revealed at (0 off targets).
        steps: ``[N, L]`` int64, the shrunk step of every trainable token of the rollout (0 elsewhere): the training
            step it belongs to, i.e. the step ids :func:`~dllm_zoo.rl.value.step_returns_and_gae` orders by.
        rows_per_rollout: ``[N]`` int64, rows of each rollout (0 for a rollout with no trainable token).
    """

    input_ids: Tensor
    noisy_mask: Tensor
    target_mask: Tensor
    source: Tensor
    round: Tensor
    target_step: Tensor
    steps: Tensor
    rows_per_rollout: Tensor

    @property
    def num_rows(self) -> int:
        """``M``."""
        return int(self.source.shape[0])

    def to_rollout(self, values: Tensor) -> Tensor:
        """Collect per-row target values back into the rollout layout (each trainable token is a target once).

        E.g. the value model's outputs at the noisy copy: ``V_j`` = the value of token ``j`` in the state just
        before it was decoded (research §2.5).

        Args:
            values: ``[M, L]`` (only target positions are read).

        Returns:
            ``[N, L]`` (``values``' dtype), 0 on non-trainable tokens.
        """
        if values.shape != self.target_mask.shape:
            raise ValueError(f"values must be [M, L] = {tuple(self.target_mask.shape)}, got {tuple(values.shape)}")
        out = values.new_zeros(self.steps.shape)
        rows, cols = self.target_mask.nonzero(as_tuple=True)
        out[self.source[rows], cols] = values[rows, cols]
        return out

    def from_rollout(self, values: Tensor) -> Tensor:
        """Spread per-token values of the rollout (e.g. token-level advantages) onto each row's targets.

        Args:
            values: ``[N, L]``, or ``[N]`` (one value per rollout, broadcast to its tokens).

        Returns:
            ``[M, L]``, 0 off targets.
        """
        v = values[self.source]
        if v.dim() == 1:
            v = v[:, None].expand(self.target_mask.shape)
        if v.shape != self.target_mask.shape:
            raise ValueError(f"values must be [N, L] or [N] with L = {self.target_mask.shape[1]}")
        return torch.where(self.target_mask, v, torch.zeros((), dtype=v.dtype, device=v.device))


def _dense_ranks(keys: Tensor, valid: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """1-based dense rank of each valid key among the distinct valid keys of its ``(row, group)``.

    Returns:
        ``(rank [N, L] (0 where invalid), order [N, L], new_group_sorted [N, L])`` where ``order`` sorts each row by
        ``(group, key)`` with invalid entries last.
    """
    k = torch.where(valid, keys, _BIG)
    g = torch.where(valid, groups, _BIG)
    # Lexicographic (group, key) order from two stable sorts: by key, then by group.
    by_key = k.argsort(dim=1, stable=True)
    order = torch.gather(by_key, 1, torch.gather(g, 1, by_key).argsort(dim=1, stable=True))
    sk, sg, sv = (torch.gather(x, 1, order) for x in (k, g, valid))
    first = torch.ones_like(sv[:, :1])
    new_group = torch.cat([first, sg[:, 1:] != sg[:, :-1]], dim=1)
    new_key = new_group | torch.cat([first, sk[:, 1:] != sk[:, :-1]], dim=1)
    cum = new_key.long().cumsum(dim=1)
    base = torch.where(new_group, cum - 1, torch.zeros_like(cum)).cummax(dim=1).values  # distinct keys before group
    rank_sorted = torch.where(sv, cum - base, torch.zeros_like(cum))
    return torch.zeros_like(rank_sorted).scatter(1, order, rank_sorted), order, new_group


def _shrink(step_map: Tensor, valid: Tensor, groups: Tensor, shrink: int) -> tuple[Tensor, Tensor]:
    """Shrunk steps and run index of every valid token (see :func:`shrink_steps`).

    Returns:
        ``(shrunk [N, L] (0 where invalid), run [N, L] (0-based run of the token within its group, −1 where
        invalid))``.
    """
    rank, order, new_group = _dense_ranks(step_map, valid, groups)
    run = torch.where(valid, torch.div(rank - 1, shrink, rounding_mode="floor"), torch.full_like(rank, -1))
    # A run's largest step: the max over its segment in (group, step) order; segments are contiguous there.
    run_sorted = torch.gather(run, 1, order)
    first = torch.ones_like(new_group[:, :1])
    new_seg = new_group | torch.cat([first, run_sorted[:, 1:] != run_sorted[:, :-1]], dim=1)
    seg = new_seg.long().cumsum(dim=1) - 1  # [N, L] in [0, L)
    step_sorted = torch.where(torch.gather(valid, 1, order), torch.gather(step_map, 1, order), 0)
    seg_max = torch.zeros_like(step_sorted).scatter_reduce(1, seg, step_sorted, reduce="amax", include_self=True)
    shrunk_sorted = torch.gather(seg_max, 1, seg)
    shrunk = torch.zeros_like(shrunk_sorted).scatter(1, order, shrunk_sorted)
    return torch.where(valid, shrunk, torch.zeros_like(shrunk)), run


def _check_steps(step_map: Tensor, response_mask: Tensor, shrink: int) -> Tensor:
    if step_map.dim() != 2:
        raise ValueError(f"step_map must be [N, L], got shape {tuple(step_map.shape)}")
    if response_mask.shape != step_map.shape:
        raise ValueError(f"response_mask must match step_map {tuple(step_map.shape)}, got {tuple(response_mask.shape)}")
    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {shrink}")
    valid = response_mask.to(torch.bool)
    if bool((valid & (step_map <= 0)).any()):
        raise ValueError(
            "a trainable position (response_mask True) has step_map <= 0, i.e. the sampler never revealed it; "
            "build response_mask from the generated positions only (e.g. `response_mask(...) & (step_map > 0)`)"
        )
    return valid


def training_block_ids(positions: Tensor, block_size: int | None) -> Tensor:
    """Block of every position on the absolute grid, ``position // block_size`` (all zeros when ``None``).

    Args:
        positions: ``[N, L]`` int64 absolute positions (:func:`rollout_positions`).
        block_size: Tokens per training block; ``None`` = full attention (one group per row).

    Returns:
        ``[N, L]`` int64.
    """
    if block_size is None:
        return torch.zeros_like(positions)
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0 (or None for full attention), got {block_size}")
    return torch.div(positions, block_size, rounding_mode="floor")


def shrink_steps(step_map: Tensor, response_mask: Tensor, shrink: int, block_ids: Tensor | None = None) -> Tensor:
    """Merge ``shrink`` consecutive distinct steps into one, mapped to its largest step (§2.3 ``collapse_k_unique``).

    Within each group (a training block of a row: ``block_ids``; the whole row when ``None``), the distinct steps of
    the trainable tokens are sorted and cut into runs of ``shrink`` consecutive *distinct values*; each token gets the
    largest step of its run. E.g. steps ``{1, 3, 4, 7, 9}`` with ``shrink = 2`` → ``1, 3 → 3``; ``4, 7 → 7``;
    ``9 → 9``.

    The reference shrinks over every response token, padding included; here only trainable tokens count (see the
    module docstring).

    Args:
        step_map: ``[N, L]`` int64 1-based step at which each position was revealed.
        response_mask: ``[N, L]`` bool, the trainable positions (each must have ``step_map > 0``).
        shrink: ``s >= 1``; 1 returns ``step_map`` on the trainable positions.
        block_ids: Optional ``[N, L]`` int64 group of each position (:func:`training_block_ids`).

    Returns:
        ``[N, L]`` int64, 0 on non-trainable positions.

    Example:
        >>> shrink_steps(torch.tensor([[0, 9, 1, 4, 3, 7]]), torch.tensor([[0, 1, 1, 1, 1, 1]]).bool(), 2).tolist()
        [[0, 9, 3, 7, 3, 7]]
    """
    valid = _check_steps(step_map, response_mask, shrink)
    groups = torch.zeros_like(step_map) if block_ids is None else block_ids
    if groups.shape != step_map.shape:
        raise ValueError(f"block_ids must match step_map {tuple(step_map.shape)}, got {tuple(groups.shape)}")
    return _shrink(step_map.long(), valid, groups.long(), shrink)[0]


def rollout_positions(prompt_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """Absolute positions of a ``[left-padded prompt | completion]`` rollout row, as the samplers count them.

    Real prompt tokens are ``0 .. p−1`` (left padding gets 0), completion column ``k`` is ``p + k`` — also where
    the row stopped early (positions continue the grid). Same convention as
    :func:`~dllm_zoo.backbones.attention.trajectory_position_ids`.

    Args:
        prompt_mask: ``[N, L]`` bool, True on the prompt part (real tokens and left padding).
        attention_mask: ``[N, L]`` bool, False on prompt padding (its completion part is not read).

    Returns:
        ``[N, L]`` int64.
    """
    prompt = prompt_mask.to(torch.bool)
    real = prompt & attention_mask.to(torch.bool)
    n_real = real.sum(dim=1, keepdim=True)
    width = prompt.sum(dim=1, keepdim=True)  # the (common) prompt width P
    col = torch.arange(prompt.shape[1], device=prompt.device)
    return torch.where(prompt, (real.long().cumsum(dim=1) - 1).clamp(min=0), n_real + col - width)


def trace_rows(
    tokens: Tensor,
    step_map: Tensor,
    response_mask: Tensor,
    mask_id: int,
    *,
    block_size: int | None = None,
    shrink: int = 1,
    positions: Tensor | None = None,
) -> TraceRows:
    """TraceRL's training rows of a batch of rollouts (see the module docstring for the rules).

    Args:
        tokens: ``[N, L]`` int64 final rollout tokens (prompt + completion).
        step_map: ``[N, L]`` int64 1-based global step at which each position was revealed (0 = prompt / never).
        response_mask: ``[N, L]`` bool, trainable positions (answer + first ``post_num`` pads; see
            :func:`~dllm_zoo.rl.rollout.response_mask`); every one must have ``step_map > 0``.
        mask_id: The layout's ``[MASK]`` id.
        block_size: Training block size ``B_train`` of a block model (may be a multiple of the rollout's block size,
            §2.7); ``None`` = full attention (LLaDA/MMaDA).
        shrink: ``s``, consecutive distinct steps merged into one training step (release: 1 for block models, 8 for
            LLaDA).
        positions: ``[N, L]`` absolute positions for the block grid (:func:`rollout_positions`); default
            ``0 .. L−1`` (no prompt padding). Unused for full attention.

    Returns:
        :class:`TraceRows`.

    Example:
        >>> steps = torch.tensor([[0, 0, 1, 2, 1, 3]])  # prompt of 2, B = 2: blocks {2, 3} and {4, 5}
        >>> rows = trace_rows(torch.arange(6)[None], steps, steps > 0, 99, block_size=2)
        >>> rows.input_ids.tolist()  # round 0: both blocks before their first step; round 1: before their second
        [[0, 1, 99, 99, 99, 99], [0, 1, 2, 99, 4, 99]]
        >>> rows.target_mask.long().tolist()
        [[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 1]]
    """
    if tokens.shape != step_map.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and step_map {tuple(step_map.shape)} must both be [N, L]")
    valid = _check_steps(step_map, response_mask, shrink)
    n, width = step_map.shape
    device = step_map.device
    steps = step_map.long()
    if positions is None:
        positions = torch.arange(width, device=device).expand(n, width)
    elif positions.shape != step_map.shape:
        raise ValueError(f"positions must match step_map {tuple(step_map.shape)}, got {tuple(positions.shape)}")
    groups = training_block_ids(positions.long(), block_size)
    shrunk, run = _shrink(steps, valid, groups, shrink)

    revealed = steps > 0
    # Dense block index among the revealed positions of each row (1-based; 0 = prompt / never revealed).
    block, _, _ = _dense_ranks(groups, revealed, torch.zeros_like(groups))
    zero = steps.new_zeros(1)
    per_row = torch.cat([run + 1, zero.expand(n, 1)], dim=1).amax(dim=1)  # [N] rows per rollout (run −1 = invalid)
    bounds = torch.stack([torch.cat([per_row, zero]).amax(), torch.cat([block.flatten(), zero]).amax()])
    k_max, nb = (int(v) for v in bounds.tolist())  # one host sync for the table sizes
    slots = nb * k_max + 1  # (block, run) cells of a row + one "never" cell

    # First raw step of every (row, block, run): the row of run r shows its block as it was just before that step.
    cell = torch.where(valid, (block - 1) * k_max + run, slots - 1)
    first = torch.full((n, slots), _BIG, dtype=torch.long, device=device)
    first = first.scatter_reduce(1, cell, torch.where(valid, steps, _BIG), reduce="amin", include_self=True)

    source = torch.arange(n, device=device).repeat_interleave(per_row)
    offsets = per_row.cumsum(dim=0) - per_row
    rnd = torch.arange(source.shape[0], device=device) - offsets[source]
    src_block = block[source]
    look = torch.where(src_block > 0, (src_block - 1) * k_max + rnd[:, None], slots - 1)
    start = first.view(-1)[source[:, None] * slots + look]  # [M, L]
    src_steps = steps[source]
    noisy = revealed[source] & (src_steps >= start)
    target = valid[source] & (run[source] == rnd[:, None])
    src_tokens = tokens[source]
    return TraceRows(
        input_ids=torch.where(noisy, torch.full_like(src_tokens, mask_id), src_tokens),
        noisy_mask=noisy,
        target_mask=target,
        source=source,
        round=rnd,
        target_step=torch.where(target, src_steps, torch.zeros_like(src_steps)),
        steps=shrunk,
        rows_per_rollout=per_row,
    )


def rollout_trace_rows(
    rollout: Rollout, mask_id: int, *, block_size: int | None = None, shrink: int = 1, only_kept: bool = True
) -> TraceRows:
    """:func:`trace_rows` of a :class:`~dllm_zoo.rl.rollout.Rollout` (its ``response_mask`` is the trainable set).

    Positions the sampler never revealed (``step_map == 0``, e.g. after a row stopped) are left out of the trainable
    set, and the block grid comes from :func:`rollout_positions`.

    Args:
        rollout: The rollouts.
        mask_id: The layout's ``[MASK]`` id.
        block_size: Training block size (``None`` = full attention).
        shrink: Steps merged per training step.
        only_kept: Rollouts with ``keep`` False (filtered groups) get no rows.

    Returns:
        :class:`TraceRows` whose ``source`` indexes the rollout's rows.
    """
    trainable = rollout.response_mask.to(torch.bool) & (rollout.step_map > 0)
    if only_kept and rollout.keep is not None:
        trainable = trainable & rollout.keep.to(torch.bool)[:, None]
    positions = rollout_positions(rollout.prompt_mask, rollout.attention_mask)
    return trace_rows(
        rollout.tokens,
        rollout.step_map,
        trainable,
        mask_id,
        block_size=block_size,
        shrink=shrink,
        positions=positions,
    )


__all__ = ["TraceRows", "rollout_positions", "rollout_trace_rows", "shrink_steps", "trace_rows", "training_block_ids"]
