"""Monte-Carlo ELBO estimate of ``log p(answer | prompt)`` for masked-diffusion LMs (LLaDA, Nie et al. 2025).

The reference ``get_log_likelihood`` of ML-GSAI/LLaDA (research/tracerl_llada.md §5.2) repeats ``[prompt |
answer]`` ``batch_size`` times per mini-batch, masks a stratified set of answer-token counts (one count per row,
low-discrepancy over ``1..A``), and averages ``Σ_masked CE / p_mask ÷ batch_size`` over ``mc_num / batch_size``
mini-batches. The negative of that is a lower bound on ``log p(answer | prompt)`` — exact when ``A = 1``.

Differences from the reference: many examples are scored at once (all ``B`` examples' rows of a mini-batch share
one forward, and the prompts may be left-padded), logits are computed only at answer positions, the cross
entropy runs in float32, and the random draws (``k``, the permutations) come from ``generator`` in a different
order, so individual estimates differ while their distribution is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dllm_zoo.backbones.base import Backbone


def stratified_mask_counts(k: Tensor, num: int, length: int) -> Tensor:
    """LLaDA's stratified numbers of masked answer tokens, ``((round(linspace(k, k + (b−1)·A/b, b)) − 1) mod A) + 1``.

    Args:
        k: ``[N]`` int64 start counts in ``[1, A]`` (the reference draws ``k ~ randint(1, A)`` inclusive).
        num: ``b``, counts per start (the mini-batch size).
        length: ``A``, answer length.

    Returns:
        ``[N, b]`` int64 counts in ``[1, A]``. ``round`` is round-half-to-even like ``torch.round``; the grid
        ``k + i·A/b`` is computed in float64 (the reference's float32 ``linspace`` agrees except possibly at
        half-integers that float32 cannot represent).

    Example:
        >>> stratified_mask_counts(torch.tensor([3]), 4, 10).tolist()
        [[3, 6, 8, 10]]
    """
    grid = k.to(torch.float64).unsqueeze(-1) + torch.arange(num, dtype=torch.float64, device=k.device) * (length / num)
    return (torch.round(grid).long() - 1) % length + 1


@torch.no_grad()
def elbo_log_likelihood(
    model: Backbone,
    prompt_ids: Tensor,
    answer_ids: Tensor,
    *,
    prompt_mask: Tensor | None = None,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte-Carlo ELBO of ``log p(answer | prompt)`` per example (a lower bound; exact for one-token answers).

    For each of ``mc_num // batch_size`` mini-batches and each example: draw ``k ~ U{1..A}``, take the
    ``batch_size`` stratified counts ``x_i`` (:func:`stratified_mask_counts`), mask exactly ``x_i`` answer
    positions of row ``i`` (uniformly, via random ranks), and compute ``loss = Σ_i Σ_masked CE / (x_i / A) ÷
    batch_size``. The estimate is ``−mean(loss)`` over mini-batches. Prompt positions are never masked.

    Args:
        model: Backbone; ``model.layout.mask_id`` is the mask id.
        prompt_ids: ``[B, P]`` int64 prompts, left-padded when ``prompt_mask`` is given.
        answer_ids: ``[B, A]`` int64 answers (one length for all; pad with EOS as LLaDA's evaluation does).
        prompt_mask: ``[B, P]`` 1 = real token; ``None`` = no padding.
        mc_num: Monte-Carlo samples per example; must be a multiple of ``batch_size``.
        batch_size: Rows per example per mini-batch (``B·batch_size`` rows, ``2×`` with CFG, per forward).
        cfg_scale: Classifier-free guidance ``w``: ``un + (w + 1)·(cond − un)``, prompt masked in ``un``.
        generator: Random source (``k`` and the masked positions).

    Returns:
        ``[B]`` float32 estimates of ``log p(answer | prompt)``.
    """
    if mc_num <= 0 or batch_size <= 0 or mc_num % batch_size:
        raise ValueError(f"mc_num={mc_num} must be a positive multiple of batch_size={batch_size}")
    if prompt_ids.dim() != 2 or answer_ids.dim() != 2 or prompt_ids.shape[0] != answer_ids.shape[0]:
        raise ValueError(
            f"prompt_ids [B, P] and answer_ids [B, A] must share B, got {tuple(prompt_ids.shape)} and "
            f"{tuple(answer_ids.shape)}"
        )
    device = prompt_ids.device
    mask_id = model.layout.mask_id
    n, p = prompt_ids.shape
    a = answer_ids.shape[1]
    if a == 0:
        raise ValueError("answer_ids must have at least one token")
    bs = batch_size
    rows = n * bs
    seq = torch.cat([prompt_ids.long(), answer_ids.long().to(device)], dim=1)  # [B, P + A]
    seq = seq.repeat_interleave(bs, dim=0)  # [B·bs, P + A], example-major
    target = answer_ids.long().to(device).repeat_interleave(bs, dim=0)  # [B·bs, A]
    attn: Tensor | None = None
    if prompt_mask is not None:
        ones = torch.ones(n, a, dtype=torch.bool, device=device)
        attn = torch.cat([prompt_mask.to(device) != 0, ones], dim=1).repeat_interleave(bs, dim=0)
    cfg = cfg_scale > 0
    if cfg and attn is not None:
        attn = torch.cat([attn, attn], dim=0)
    logits_at = torch.arange(p, p + a, device=device).expand(2 * rows if cfg else rows, a)

    losses = []
    for _ in range(mc_num // bs):
        k = torch.randint(1, a + 1, (n,), generator=generator, device=device)
        counts = stratified_mask_counts(k, bs, a).reshape(rows)  # [B·bs]
        scores = torch.rand(rows, a, generator=generator, device=device)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        masked = ranks < counts.unsqueeze(1)  # [B·bs, A], exactly counts[r] True per row
        noisy = seq.clone()
        noisy[:, p:] = torch.where(masked, torch.full_like(target, mask_id), target)
        inp = noisy
        if cfg:
            un = noisy.clone()
            un[:, :p] = mask_id
            inp = torch.cat([noisy, un], dim=0)
        logits = model(inp, attention_mask=attn, logits_at=logits_at).logits
        assert logits is not None
        logits = logits.float()
        if cfg:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + (cfg_scale + 1) * (cond - uncond)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        p_mask = counts.to(torch.float32) / a
        per_row = (ce.reshape(rows, a) * masked).sum(dim=1) / p_mask  # [B·bs]
        losses.append(per_row.reshape(n, bs).sum(dim=1) / bs)  # [B]
    return -torch.stack(losses, dim=0).mean(dim=0)
