"""QLoRA: LoRA on a frozen base whose block Linear layers are bitsandbytes 4-bit NF4 (runs on CPU, compute fp32)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from adapter_helpers import EXPECTED_TARGETS, FAMILIES, fixed_batch, randomize_lora, tiny
from safetensors import safe_open
from torch import nn

from dllm_zoo.adapters import LoRA, adapter_layers, adapter_parameters, apply_lora, is_quantized, merge_and_export
from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.stages import MaskedDiffusionPretraining, OptimConfig
from dllm_zoo.stages.optim import build_optimizer

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes>=0.48 (pip install 'dllm_zoo[quant]')")

QLORA = LoRA(rank=4, alpha=8.0, dropout=0.0, quantize="nf4")


def block_linears(backbone: Backbone) -> dict[str, nn.Module]:
    """Every Linear-like layer of the blocks that is not part of an adapter's own factors."""
    return {
        n: m for n, m in backbone.transformer_blocks().named_modules() if isinstance(m, nn.Linear) and "lora_" not in n
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_base_is_frozen_nf4_and_the_forward_stays_close_to_fp32(family: type[Backbone]) -> None:
    fp32 = tiny(family)().eval()
    net = apply_lora(copy.deepcopy(fp32), QLORA).eval()
    linears = block_linears(net)
    assert len(linears) == len(EXPECTED_TARGETS[family])  # every block Linear (here all are targeted) is 4-bit
    for name, layer in linears.items():
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert isinstance(layer.weight, bnb.nn.Params4bit), name
        assert layer.weight.dtype == torch.uint8, name
        assert layer.weight.quant_type == "nf4", name
        assert layer.weight.requires_grad is False, name
        assert layer.compute_dtype == torch.float32, name
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in adapter_parameters(net)}
    # embeddings, norms and the LM head are not quantised
    assert type(net.output_head()) is nn.Linear
    torch.testing.assert_close(net.output_head().weight, fp32.output_head().weight, rtol=0, atol=0)

    # NF4 error: per weight ||dequant(W) - W|| / ||W|| measured 0.093 (normal init); logits of the 2-block tiny
    # models, relative Frobenius error measured 0.069-0.076 (LLaDA) and 0.115-0.123 (SDAR) over 3 seeds.
    for name, layer in linears.items():
        ref = fp32.transformer_blocks().get_submodule(name.replace(".base_layer", "")).weight
        dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert 0.0 < float((dense - ref).norm() / ref.norm()) < 0.12, name
    x = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    expected = fp32(x).logits
    got = net(x).logits
    rel = float((got - expected).norm() / expected.norm())
    assert 0.0 < rel < 0.2, rel
    torch.testing.assert_close(net.train()(x).logits, got, rtol=0, atol=0)  # eval == train (no bf16 CPU path)


def test_lora_factors_train_on_a_fixed_batch_while_the_4bit_base_stays_put() -> None:
    stage = MaskedDiffusionPretraining(
        backbone=tiny(LLaDABackbone), adapter=QLORA, optim=OptimConfig(lr=2e-2, warmup_steps=1, weight_decay=0.0)
    )
    stage.configure_model()
    net = stage.net
    frozen = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in block_linears(net).items()}
    head = net.output_head().weight.detach().clone()
    opt, _ = build_optimizer(stage, stage.optim, max_steps=100)
    batch = fixed_batch()
    stage.train()
    losses = []
    for _ in range(12):
        out = stage.forward_loss(batch, batch_idx=0, per_step=False)  # the same masks every step: a fixed problem
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    # measured: 8.23 -> 6.75 (random bytes: rank-4 factors learn the token statistics, not the noise itself)
    assert max(losses[-3:]) < 0.85 * losses[0], losses
    for name, layer in block_linears(net).items():
        data, absmax = frozen[name]
        assert isinstance(layer.weight, bnb.nn.Params4bit), name
        assert layer.weight.grad is None, name
        assert torch.equal(layer.weight.data, data), name
        assert torch.equal(layer.weight.quant_state.absmax, absmax), name
    assert torch.equal(net.output_head().weight, head)
    assert all(bool(layer.lora_B["default"].weight.abs().sum() > 0) for layer in adapter_layers(net))  # trained


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_export_dequantises_into_the_original_layout(family: type[Backbone], tmp_path: Path) -> None:
    net = apply_lora(tiny(family)(), QLORA).eval()
    randomize_lora(net)
    x = torch.randint(0, 300, (2, 24))
    adapted = net(x).logits
    out = merge_and_export(net, tmp_path / "merged")
    original = tiny(family)()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(original.state_dict())  # no base_layer / lora_* / quant_state keys
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118  # dequantised to the original dtype
    reloaded = family.from_pretrained(out).eval()
    torch.testing.assert_close(reloaded(x).logits, adapted, rtol=1e-5, atol=1e-5)
    assert not is_quantized(reloaded)
    assert is_quantized(net)
    assert all(isinstance(layer, bnb.nn.Linear4bit) for layer in block_linears(net).values())  # still QLoRA
    torch.testing.assert_close(net(x).logits, adapted, rtol=0, atol=0)
