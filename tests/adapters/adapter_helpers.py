"""Shared pieces of the adapter tests: tiny backbones of both families, a fixed batch, non-zero LoRA factors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from dllm_zoo.adapters import adapter_layers
from dllm_zoo.backbones import LLaDABackbone, SDARBackbone
from dllm_zoo.backbones.base import Backbone

FAMILIES = [pytest.param(LLaDABackbone, id="llada"), pytest.param(SDARBackbone, id="sdar")]

# The full names the family defaults must adapt in the 2-block tiny presets (LLaDA's head ff_out is NOT among them).
EXPECTED_TARGETS = {
    LLaDABackbone: [
        f"model.transformer.blocks.{i}.{n}"
        for i in range(2)
        for n in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    ],
    SDARBackbone: [
        f"model.layers.{i}.{n}"
        for i in range(2)
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ],
}


def tiny(cls: type[Backbone], seed: int = 0, **kwargs: object) -> Callable[[], Backbone]:
    """A factory of the tiny preset with a fixed init."""

    def build() -> Backbone:
        torch.manual_seed(seed)
        return cls("tiny", **kwargs)  # type: ignore[call-arg]

    return build


def fixed_batch(batch: int = 4, length: int = 32, prompt: int = 8, seed: int = 0) -> dict[str, Tensor]:
    """Byte tokens with an 8-token prompt: what both stages accept (input_ids, attention_mask, prompt_mask)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=gen)
    prompt_mask = torch.zeros(batch, length, dtype=torch.bool)
    prompt_mask[:, :prompt] = True
    return {"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.bool), "prompt_mask": prompt_mask}


def randomize_lora(backbone: Backbone, std: float = 0.05, seed: int = 1) -> None:
    """Give every ``lora_B`` (zero at init) random values, so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(backbone):
            for linear in layer.lora_B.values():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * std)
