"""MaskGIT brute-force reference from the spec (research/mmada.md §5.2), for the tests and benchmarks/maskgit.py."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dllm_zoo.backbones import LLaDABackbone


@torch.no_grad()
def reference(
    model: LLaDABackbone,
    ids: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    steps: int,
    w: float,
    gamma: Callable[[float], float],
    tau0: float,
    compounding: bool,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force from the spec: one forward per row and branch (full logits), per-row Python selection.

    Draws the same random numbers as the sampler, in the same order: one ``multinomial`` over all ``B·N`` rows, then
    ``[B, N]`` uniforms for the Gumbel noise when ``τ_s > 0`` (not on the last step).
    """
    lay = model.layout
    ipad, t2i, soi, eoi = (lay.token_id(t) for t in ("[iPAD]", "<|t2i|>", "<|soi|>", "<|eoi|>"))
    off, codebook, mask_id = lay.image_offset, lay.image_codebook_size, lay.mask_id
    b, p = ids.shape
    canvas = torch.cat([ids, torch.full((b, 1), soi), torch.full((b, n), mask_id), torch.full((b, 1), eoi)], dim=1)
    attn = torch.cat([mask.bool(), torch.ones(b, n + 2, dtype=torch.bool)], dim=1)
    un_prefix = [ipad] * (p - 3) + [t2i, lay.bos_id, lay.eos_id]
    un_attn = torch.tensor([False] * (p - 3) + [True] * (n + 5))
    step_map = torch.zeros_like(canvas)
    tau = tau0
    for s in range(steps):
        r = (s + 1) / steps
        per_row = []
        for i in range(b):
            lc = model(canvas[i : i + 1], attention_mask=attn[i : i + 1]).logits[0, p + 1 : p + 1 + n]
            lc = lc[:, off : off + codebook].float()
            if w:
                un = torch.cat([torch.tensor(un_prefix), canvas[i, p:]])[None]
                lu = model(un, attention_mask=un_attn[None]).logits[0, p + 1 : p + 1 + n, off : off + codebook]
                lc = (1 + w) * lc - w * lu.float()
            per_row.append(lc)
        probs = torch.softmax(torch.stack(per_row), dim=-1)  # [B, N, C]
        sampled = torch.multinomial(probs.reshape(b * n, codebook), 1, generator=generator).view(b, n)
        tau = tau * (1 - r) if compounding else tau0 * (1 - r)  # the released loop reassigns tau
        last = s == steps - 1
        gumbel = None
        if not last and tau > 0:
            u = torch.rand((b, n), generator=generator).clamp(min=1e-20).double()
            gumbel = -torch.log((-torch.log(u)).clamp(min=1e-20))
        for i in range(b):
            unknown = [j for j in range(n) if canvas[i, p + 1 + j] == mask_id]
            if last:
                keep_masked: set[int] = set()
            else:
                mask_len = max(1, min(len(unknown) - 1, math.floor(n * gamma(r))))
                conf = {
                    j: math.log(probs[i, j, sampled[i, j]].item())
                    + (tau * gumbel[i, j].item() if gumbel is not None else 0)
                    for j in unknown
                }
                keep_masked = set(sorted(unknown, key=lambda j: (conf[j], j))[:mask_len])
            for j in unknown:
                if j not in keep_masked:
                    canvas[i, p + 1 + j] = off + sampled[i, j]
                    step_map[i, p + 1 + j] = s + 1
    return canvas, step_map
