r"""Step replay for RL on a denoising trajectory: chosen steps, replayed canvases, per-step rewards and advantages.

ParaRL (MMaDA-Parallel §3.3, App. H; research/mmada.md §6.2) optimises a sparse set of denoising steps of each
rollout instead of re-masked copies of its final answer (UniGRPO):

* ``s`` step indices per prompt, shared by the ``G`` rollouts of its group and drawn independently (uniformly,
  without replacement) for each group (:func:`choose_steps`);
* the training row of rollout ``i`` at step ``t`` is the canvas just before ``t`` with the tokens committed at
  ``t`` as targets (:func:`replay_rows`, built on :func:`~dllm_zoo.samplers.parallel.canvas_after` /
  :func:`~dllm_zoo.samplers.parallel.committed_at`); the likelihood ratio is taken on exactly those tokens;
* a raw score ``c`` of the state after each chosen step becomes ``R = ½(1 + clip((c − μ)/σ, −1, 1)) ∈ [0, 1]``
  with dataset statistics ``μ, σ`` (:func:`normalize_rewards`), and ``R`` is standardised per step over the group
  (:func:`step_advantages`).

Everything is vectorised over rollouts and steps (no Python loop over samples, no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dllm_zoo.rl.advantages import StdKind, group_advantages
from dllm_zoo.samplers.parallel import canvas_after, committed_at


def choose_steps(num_groups: int, candidates: Tensor, num_steps: int, generator: torch.Generator | None) -> Tensor:
    """Draw ``num_steps`` distinct steps per group, uniformly among ``candidates``, sorted ascending.

    Args:
        num_groups: Groups (prompts); each gets its own draw, which all its rollouts share.
        candidates: ``[K]`` int64 allowed steps (1-based), e.g. ``1..S``.
        num_steps: ``s`` steps per group, ``1 <= s <= K``.
        generator: Random source (one ``[num_groups, K]`` uniform draw).

    Returns:
        ``[num_groups, s]`` int64 on ``candidates``' device.

    Example:
        >>> steps = choose_steps(2, torch.arange(1, 9), 3, torch.Generator().manual_seed(0))
        >>> steps.shape, bool((steps.diff(dim=1) > 0).all())
        (torch.Size([2, 3]), True)
    """
    k = candidates.shape[0]
    if not 1 <= num_steps <= k:
        raise ValueError(f"cannot choose {num_steps} distinct steps among {k} candidate steps")
    u = torch.rand(num_groups, k, generator=generator, device=candidates.device)
    picked = u.argsort(dim=1)[:, :num_steps]  # a uniformly random subset of each row
    return candidates[picked].sort(dim=1).values


def replay_rows(tokens: Tensor, step_map: Tensor, steps: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """The canvas just before each chosen step and the tokens committed at it, one row per (rollout, step).

    Exact for samplers that never re-mask (see :func:`~dllm_zoo.samplers.parallel.canvas_after`): the canvas before
    step ``t`` is the final tokens with every position revealed at ``t`` or later masked.

    Args:
        tokens: ``[N, L]`` int64 final rollout tokens.
        step_map: ``[N, L]`` int64 step (1-based) at which each position was revealed, 0 = given.
        steps: ``[N, s]`` int64 chosen steps of each rollout.
        mask_id: The layout's ``[MASK]`` id.

    Returns:
        ``(canvas [N·s, L], committed [N·s, L] bool)``; row ``i·s + j`` is rollout ``i`` at its ``j``-th step.
    """
    s = steps.shape[1]
    tok = tokens.repeat_interleave(s, dim=0)
    sm = step_map.repeat_interleave(s, dim=0)
    flat = steps.reshape(-1)
    return canvas_after(tok, sm, flat - 1, mask_id), committed_at(sm, flat)


def normalize_rewards(scores: Tensor, mean: float | Tensor, std: float | Tensor) -> Tensor:
    """ParaRL's normalised reward ``R = ½(1 + clip((c − μ)/σ, −1, 1))``, in ``[0, 1]``.

    Args:
        scores: Raw scores ``c`` (any shape).
        mean: ``μ`` of the scores on the reference data.
        std: ``σ`` (> 0).

    Returns:
        ``R``, the shape of ``scores``.

    Example:
        >>> normalize_rewards(torch.tensor([0.2, 0.5, 0.9, 2.0]), 0.5, 0.25).tolist()
        [0.0, 0.5, 1.0, 1.0]
    """
    return 0.5 * (1.0 + ((scores - mean) / std).clamp(-1.0, 1.0))


def step_advantages(rewards: Tensor, group: Tensor, std: StdKind = "population", eps: float = 0.0) -> Tensor:
    """Per-step group advantages: column ``j`` of ``rewards`` standardised over the rows of each group.

    The ``j``-th chosen step is the same step for every rollout of a group (:func:`choose_steps`), so each
    ``(group, j)`` is one GRPO group: ``(R − mean) / (std + eps)``, 0 without spread.

    Args:
        rewards: ``[N, s]`` normalised rewards.
        group: ``[N]`` int64 group id of each rollout, in ``[0, N)``.
        std: Standard deviation kind (default population, as the released GRPO code).
        eps: Added to the standard deviation.

    Returns:
        ``[N, s]``.

    Example:
        >>> step_advantages(torch.tensor([[1.0, 0.5], [0.0, 0.5]]), torch.tensor([0, 0])).tolist()
        [[1.0, 0.0], [-1.0, 0.0]]
    """
    n, s = rewards.shape
    ids = group[:, None] * s + torch.arange(s, device=group.device)  # < N·s
    return group_advantages(rewards.reshape(-1), ids.reshape(-1), std, eps).view(n, s)


__all__ = ["choose_steps", "normalize_rewards", "replay_rows", "step_advantages"]
