"""Helpers for the sampler tests: a tiny LLaDA with a scaled-up init (peaked logits, no argmax ties)."""

from __future__ import annotations

import dataclasses

import torch

from dllm_zoo.backbones import LLaDABackbone, LLaDAConfig


def make_model(seed: int = 0, init_std: float = 0.2) -> LLaDABackbone:
    torch.manual_seed(seed)
    return LLaDABackbone(dataclasses.replace(LLaDAConfig.preset("tiny"), init_std=init_std)).eval()


def prompts(b: int, p: int, seed: int = 1) -> torch.Tensor:
    """Random byte-range prompts ``[b, p]`` (never the mask id)."""
    return torch.randint(0, 256, (b, p), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts to one length: ``(ids [B, P], mask [B, P] long)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


class LogitBias(torch.nn.Module):
    """Wraps a backbone and adds constants to some logits (makes EOS/EoT frequent for the suppression tests)."""

    def __init__(self, inner: LLaDABackbone, bias: dict[int, float]) -> None:
        super().__init__()
        self.inner = inner
        self.layout = inner.layout
        self.bias = bias

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if out.logits is not None:
            for token, value in self.bias.items():
                out.logits[..., token] += value
        return out


class Spy(torch.nn.Module):
    """Wraps a backbone and records every call's keyword arguments, inputs and logits."""

    def __init__(self, inner: LLaDABackbone) -> None:
        super().__init__()
        self.inner = inner
        self.layout = inner.layout
        self.calls: list[dict] = []

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids, **kwargs)
        self.calls.append({"input_ids": input_ids.clone(), "logits": out.logits.clone(), **kwargs})
        return out
