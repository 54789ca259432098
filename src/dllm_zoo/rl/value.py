r"""Step-level returns and GAE over the denoising order, and the clipped value loss (research/tracerl_llada.md §2.5).

TraceRL with a value model (Wang et al. 2025) treats each (shrunk) denoising step of a response as one time step of
an MDP. A diffusion value model, run on the same trace rows as the policy, gives ``V_j`` for every trainable token
``j``: the value of the state just before ``j`` was decoded (read at the noisy copy of the row where ``j`` is a
target, :meth:`~dllm_zoo.rl.trace.TraceRows.to_rollout`). With ``t(j)`` the step of token ``j`` among the ``S``
distinct steps of its response, sorted in decoding order (all blocks together), and token rewards ``r_j``:

* step means ``r*_t = mean_{j: t(j)=t} r_j`` and ``V*_t = mean_{j: t(j)=t} V_j``;
* ``R*_t = r*_t + γ·R*_{t+1}``, ``δ_t = r*_t − V*_t + γ·V*_{t+1}``, ``A*_t = δ_t + γλ·A*_{t+1}`` (0 past ``S``);
* per token ``R_j = r_j + γ·R*_{t(j)+1}`` and ``A_j = (r_j − V_j) + γ·V*_{t(j)+1} + γλ·A*_{t(j)+1}`` — the step's
  advantage with the step mean ``r*_t − V*_t`` replaced by the token's own ``r_j − V_j`` (so ``A*_t`` is the mean
  of ``A_j`` over the step's tokens).

Checks: ``γ = λ = 1`` gives ``R_j`` = the response's total reward and ``A_j = R_j − V_j``; ``λ = 0`` gives the
one-step TD error ``A_j = r_j − V_j + γ·V*_{t(j)+1}``. Release defaults: ``γ = λ = 1`` with an outcome reward,
``γ = 0.99, λ = 1`` with process rewards; no advantage whitening.

Rewards (:func:`outcome_token_rewards`, :func:`process_token_rewards`): an outcome reward sits on every token of the
last step; a process reward of a chunk sits on the tokens of the step that completed the judged prefix (§2.6).

Where the reference differs (research/reference-semantics.md): its GAE and its row builder disagree on which padding
tokens are trainable (with ``post_num`` unset the rows train padding the GAE gives return and advantage 0, so its own
``γ = λ = 1`` check fails there) — here one ``response_mask`` decides both; and it pads process-reward vectors
shorter than the response with ``max + 1`` instead of 0 — here tokens outside every chunk get 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dllm_zoo.rl.objectives import Aggregation, aggregate
from dllm_zoo.rl.trace import _dense_ranks


@dataclass
class StepGAE:
    """Returns and advantages over the denoising steps of each response.

    Attributes:
        returns: ``[N, L]`` token returns ``R_j`` (0 off trainable tokens).
        advantages: ``[N, L]`` token advantages ``A_j`` (0 off trainable tokens).
        step_ids: ``[N, S]`` int64, each response's distinct step ids in decoding order (0-padded).
        step_returns: ``[N, S]`` ``R*_t`` (0 past a response's last step).
        step_advantages: ``[N, S]`` ``A*_t``.
        step_values: ``[N, S]`` ``V*_t``.
    """

    returns: Tensor
    advantages: Tensor
    step_ids: Tensor
    step_returns: Tensor
    step_advantages: Tensor
    step_values: Tensor


def _check(name: str, x: Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} must be [N, L] = {tuple(shape)} like steps, got {tuple(x.shape)}")


def outcome_token_rewards(rewards: Tensor, steps: Tensor) -> Tensor:
    """Outcome (RLVR) token rewards: each response's scalar reward on every trainable token of its last step.

    Args:
        rewards: ``[N]`` float, e.g. the group z-scored correctness.
        steps: ``[N, L]`` int64 step of each trainable token (:attr:`~dllm_zoo.rl.trace.TraceRows.steps`), 0 elsewhere.

    Returns:
        ``[N, L]`` (``rewards``' dtype).

    Example:
        >>> outcome_token_rewards(torch.tensor([2.0]), torch.tensor([[0, 1, 3, 3, 2]])).tolist()
        [[0.0, 0.0, 2.0, 2.0, 0.0]]
    """
    if steps.dim() != 2 or rewards.shape != steps.shape[:1]:
        raise ValueError(f"rewards must be [N] and steps [N, L], got {tuple(rewards.shape)} and {tuple(steps.shape)}")
    last = steps.amax(dim=1, keepdim=True) if steps.shape[1] else steps.new_zeros(steps.shape[0], 1)
    on_last = (steps > 0) & (steps == last)
    return torch.where(on_last, rewards[:, None], torch.zeros((), dtype=rewards.dtype, device=rewards.device))


def process_token_rewards(chunk_rewards: Tensor, steps: Tensor, chunk_length: int, start: int = 0) -> Tensor:
    """Process-reward token rewards (§2.6): each chunk's reward on the step that completed the judged prefix.

    Chunk ``c`` covers columns ``[start + c·chunk_length, start + (c+1)·chunk_length)``; the judge scores the prefix
    of the response up to the chunk's end, so the reward goes to the trainable tokens of that prefix decoded at the
    prefix's last step (its largest step id). For block decoding (blocks in order) this is the reference's rule:
    "the tokens within the last ``block_size`` tokens before the chunk end having the maximum step id there", and
    for the final chunk "the tokens with the global maximum step id". Chunks without a trainable token, and NaN
    rewards, are skipped; rewards of chunks that land on the same tokens add up.

    Args:
        chunk_rewards: ``[N, C]`` float (z-scored per chunk index within the group by the caller), NaN = no chunk.
        steps: ``[N, L]`` int64 step of each trainable token, 0 elsewhere.
        chunk_length: Tokens per chunk (release ``reward_chunk_length`` 200).
        start: First completion column of the rows (the prompt width ``P`` of a rollout).

    Returns:
        ``[N, L]`` (``chunk_rewards``' dtype), 0 outside the chunks' landing tokens (the reference pads with
        ``max + 1`` instead).
    """
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be >= 1, got {chunk_length}")
    if steps.dim() != 2 or chunk_rewards.dim() != 2 or chunk_rewards.shape[0] != steps.shape[0]:
        raise ValueError(
            f"chunk_rewards must be [N, C] and steps [N, L], got {tuple(chunk_rewards.shape)} and {tuple(steps.shape)}"
        )
    n, width = steps.shape
    c = chunk_rewards.shape[1]
    col = torch.arange(width, device=steps.device)
    trainable = steps > 0
    chunk = torch.div(col - start, chunk_length, rounding_mode="floor")  # [L], negative on the prompt
    ends = start + (torch.arange(c, device=steps.device) + 1) * chunk_length  # [C] exclusive chunk ends
    in_prefix = (col[None, :] >= start) & (col[None, :] < ends[:, None])  # [C, L]
    pre_steps = torch.where(in_prefix[None] & trainable[:, None], steps[:, None], 0)  # [N, C, L]
    prefix_last = pre_steps.amax(dim=2, keepdim=True) if width else pre_steps.new_zeros(n, c, 1)
    has_tokens = (chunk[None, None, :] == torch.arange(c, device=steps.device)[None, :, None]) & trainable[:, None]
    live = has_tokens.any(dim=2) & ~torch.isnan(chunk_rewards)  # [N, C]
    lands = (pre_steps > 0) & (pre_steps == prefix_last) & live[:, :, None]  # [N, C, L]
    r = torch.where(live, chunk_rewards, 0.0)
    return (lands.to(r.dtype) * r[:, :, None]).sum(dim=1)


def step_returns_and_gae(
    token_rewards: Tensor, values: Tensor, steps: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> StepGAE:
    """Step-level returns and GAE over each response's global denoising order (see the module docstring).

    Vectorised over the batch; one pass over the ``S`` step slots (the recursion is sequential in ``t``).

    Args:
        token_rewards: ``[N, L]`` float ``r_j`` (:func:`outcome_token_rewards`, :func:`process_token_rewards`); read
            on trainable tokens only.
        values: ``[N, L]`` float old values ``V_j`` (no grad); read on trainable tokens only.
        steps: ``[N, L]`` int64 (shrunk) step id of each trainable token, 0 elsewhere
            (:attr:`~dllm_zoo.rl.trace.TraceRows.steps`). Larger ids are decoded later.
        gamma: Discount ``γ`` per denoising step, in ``[0, 1]``.
        lam: GAE ``λ``, in ``[0, 1]``.

    Returns:
        :class:`StepGAE` (token tensors in the promoted dtype of ``token_rewards`` and ``values``; computed in float64).

    Example:
        >>> steps = torch.tensor([[1, 1, 2]])
        >>> out = step_returns_and_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.4, 0.5]]), steps)
        >>> out.returns.tolist(), [round(a, 6) for a in out.advantages[0].tolist()]
        ([[1.0, 1.0, 1.0]], [0.8, 0.6, 0.5])
    """
    if steps.dim() != 2:
        raise ValueError(f"steps must be [N, L], got shape {tuple(steps.shape)}")
    _check("token_rewards", token_rewards, steps.shape)
    _check("values", values, steps.shape)
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    out_dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    n, _ = steps.shape
    device = steps.device
    trainable = steps > 0
    rank, _, _ = _dense_ranks(steps.long(), trainable, torch.zeros_like(steps, dtype=torch.long))  # 1..S, 0 = off
    s = int(rank.max()) if rank.numel() else 0
    zero = torch.zeros((), dtype=torch.float64, device=device)
    r = torch.where(trainable, token_rewards.to(torch.float64), zero)
    v = torch.where(trainable, values.to(torch.float64), zero)
    # Slot 0 collects non-trainable tokens; slot S + 1 stays empty ("beyond the last step" = 0).
    count = torch.zeros(n, s + 2, dtype=torch.float64, device=device).scatter_add_(1, rank, trainable.to(torch.float64))
    r_sum = torch.zeros_like(count).scatter_add_(1, rank, r)
    v_sum = torch.zeros_like(count).scatter_add_(1, rank, v)
    r_star = r_sum / count.clamp(min=1)
    v_star = v_sum / count.clamp(min=1)
    ret = torch.zeros_like(count)
    adv = torch.zeros_like(count)
    for t in range(s, 0, -1):  # backward recursion over step slots, batched over responses
        ret[:, t] = r_star[:, t] + gamma * ret[:, t + 1]
        delta = r_star[:, t] - v_star[:, t] + gamma * v_star[:, t + 1]
        adv[:, t] = delta + gamma * lam * adv[:, t + 1]
    nxt = torch.where(trainable, rank + 1, s + 1)  # slot after the token's step
    ret_next, v_next, adv_next = (torch.gather(x, 1, nxt) for x in (ret, v_star, adv))
    tok_ret = torch.where(trainable, r + gamma * ret_next, zero)
    tok_adv = torch.where(trainable, (r - v) + gamma * v_next + gamma * lam * adv_next, zero)
    # The distinct step ids per slot (for logging / inspection).
    ids = torch.zeros(n, s + 2, dtype=torch.long, device=device).scatter_reduce(
        1, rank, torch.where(trainable, steps.long(), 0), reduce="amax", include_self=True
    )
    return StepGAE(
        returns=tok_ret.to(out_dtype),
        advantages=tok_adv.to(out_dtype),
        step_ids=ids[:, 1 : s + 1],
        step_returns=ret[:, 1 : s + 1].to(out_dtype),
        step_advantages=adv[:, 1 : s + 1].to(out_dtype),
        step_values=v_star[:, 1 : s + 1].to(out_dtype),
    )


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
    scale: float = 1.0,
) -> Tensor:
    """PPO's clipped value loss ``0.5·max((V − R)², (V_clip − R)²)``, ``V_clip = V_old + clamp(V − V_old, ±ε)``.

    The released TraceRL value trainer uses ``ε = 0.2`` and sums each row over its targets divided by the fixed
    response width ``L1``, then averages over rows: ``aggregation="sequence_sum", scale=1 / L1``.

    Args:
        values: ``[B, L]`` value predictions (with grad), e.g. at the noisy copy of trace rows.
        old_values: ``[B, L]`` the values before the update (no grad).
        returns: ``[B, L]`` targets ``R_j``.
        mask: ``[B, L]`` bool, the tokens to train (the rows' targets).
        clip: ``ε``; ``None`` = unclipped ``0.5·(V − R)²``.
        aggregation: ``token_mean``, ``sequence_mean`` or ``sequence_sum`` (:func:`~dllm_zoo.rl.objectives.aggregate`).
        scale: Multiplies the aggregated loss (``1 / L1`` for the release).

    Returns:
        Scalar loss.

    Example:
        >>> m = torch.ones(1, 2, dtype=torch.bool)
        >>> # token 0: V = R but V_clip = 0.2 -> 0.5·0.64; token 1: 0.5·1 -> mean 0.41
        >>> round(clipped_value_loss(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.ones(1, 2), m).item(), 4)
        0.41
    """
    if not values.shape == old_values.shape == returns.shape == mask.shape:
        raise ValueError(
            f"values, old_values, returns and mask must share a shape, got {tuple(values.shape)}, "
            f"{tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}"
        )
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 (or None), got {clip}")
    ret = returns.to(values.dtype)
    loss = (values - ret) ** 2
    if clip is not None:
        old = old_values.to(values.dtype).detach()
        v_clip = old + (values - old).clamp(-clip, clip)
        loss = torch.maximum(loss, (v_clip - ret) ** 2)
    return scale * aggregate(0.5 * loss, mask.to(torch.bool), aggregation)


__all__ = [
    "StepGAE",
    "clipped_value_loss",
    "outcome_token_rewards",
    "process_token_rewards",
    "step_returns_and_gae",
]
