"""Shared building blocks (layers.py) and mask builders (attention.py), against plain-math references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dllm_zoo.backbones.attention import fill_empty_rows, key_padding_to_sdpa, padding_pair_mask, to_sdpa_mask
from dllm_zoo.backbones.layers import (
    RMSNorm,
    RotaryEmbedding,
    SwiGLUMLP,
    apply_rotary,
    rotary_inv_freq,
    rotate,
    rotate_half,
)


# ------------------------------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_fp32_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 4
    ref = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-6)


def test_rmsnorm_bf16_is_normalised_in_fp32():
    torch.manual_seed(0)
    norm = RMSNorm(64).to(torch.bfloat16)
    x = (torch.randn(4, 64) * 1e-3).to(torch.bfloat16)  # tiny activations: bf16 squares would underflow
    out = norm(x)
    assert out.dtype == torch.bfloat16
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------------- RoPE
def _rope_complex(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Reference: rotate channel pairs (i, i + D/2) by pos * θ^(-2i/D) with complex multiplication (fp64)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = pos.double()[..., None] * inv  # [B, L, D/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    z = z * torch.polar(torch.ones_like(angle), angle).unsqueeze(-2)  # broadcast over heads
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_rope_matches_complex_rotation(explicit_positions):
    torch.manual_seed(0)
    b, seq, h, d = 2, 9, 3, 16
    x = torch.randn(b, seq, h, d)
    rope = RotaryEmbedding(d, theta=10000.0)
    pos = (
        torch.stack([torch.arange(seq), torch.arange(seq) + 40])
        if explicit_positions
        else torch.arange(seq).expand(b, seq)
    )
    cos, sin = rope(seq, x.device, pos if explicit_positions else None)
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), _rope_complex(x, pos, 10000.0), atol=1e-5, rtol=0)


def test_rope_is_relative_and_fp32():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, theta=500000.0)
    q, k = torch.randn(1, 1, 1, 8).to(torch.bfloat16), torch.randn(1, 1, 1, 8).to(torch.bfloat16)

    def score(i: int, j: int) -> float:
        ci, si = rope(1, q.device, torch.tensor([[i]]))
        cj, sj = rope(1, q.device, torch.tensor([[j]]))
        assert ci.dtype == torch.float32
        rq, rk = apply_rotary(q.float(), ci, si), apply_rotary(k.float(), cj, sj)
        return (rq * rk).sum().item()

    assert score(3, 1) == pytest.approx(score(103, 101), abs=1e-4)
    assert apply_rotary(q, *rope(1, q.device)).dtype == torch.bfloat16
    torch.testing.assert_close(
        rotary_inv_freq(8, 500000.0), torch.tensor([1.0, 500000**-0.25, 500000**-0.5, 500000**-0.75])
    )


def test_head_tables_are_the_plain_tables_with_rotate_half_folded_in():
    rope = RotaryEmbedding(8, theta=500000.0)
    pos = torch.tensor([[0, 3, 7], [5, 5, 2]])
    x = torch.randn(2, 3, 2, 8)
    for positions in (pos, None):
        cos, sin = rope(3, x.device, positions)
        hc, hs = rope.head_tables(3, x.device, positions)
        assert hc.shape[-2:] == (1, 8)
        expected = x * cos.unsqueeze(-2) + rotate_half(x) * sin.unsqueeze(-2)
        torch.testing.assert_close(rotate(x, hc, hs), expected, atol=1e-6, rtol=0)
    float_pos = rope.head_tables(3, x.device, pos.double())[0]
    assert float_pos.dtype == torch.float32  # float64 positions do not promote the activations


def test_rope_tables_are_cached_and_never_saved():
    rope = RotaryEmbedding(8)
    a = rope.head_tables(12, torch.device("cpu"))
    assert rope.head_tables(12, torch.device("cpu"))[0] is a[0]  # same (seq_len, device): no recomputation
    assert rope.head_tables(13, torch.device("cpu"))[0].shape == (13, 1, 8)
    assert rope(13, torch.device("cpu"))[0].shape == (13, 8)
    assert rope.state_dict() == {}
    assert list(rope.buffers()) == []
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)


def test_swiglu_mlp_matches_formula():
    torch.manual_seed(0)
    mlp = SwiGLUMLP(8, 24)
    x = torch.randn(2, 3, 8)
    ref = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), ref)
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}


# ------------------------------------------------------------------------------------------------- masks
def test_key_padding_mask():
    keep = torch.tensor([[0, 1, 1], [1, 1, 1]])
    m = key_padding_to_sdpa(keep)
    assert m is not None
    assert m.shape == (2, 1, 1, 3)
    assert m.dtype == torch.bool
    assert m[:, 0, 0].tolist() == [[False, True, True], [True, True, True]]
    assert key_padding_to_sdpa(torch.ones(2, 3)) is None  # fast path
    assert key_padding_to_sdpa(torch.ones(2, 3), skip_if_full=False) is not None
    empty = key_padding_to_sdpa(torch.tensor([[0, 0, 0], [1, 0, 1]]))
    assert empty is not None
    assert empty[0].all()


def test_no_nan_rows_in_sdpa():
    torch.manual_seed(0)
    q = k = v = torch.randn(2, 2, 4, 8)
    keep = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    pair = padding_pair_mask(keep)
    assert pair.shape == (2, 1, 4, 4)
    assert pair.any(-1).all()
    for mask in (pair, to_sdpa_mask(keep, 2, 4), fill_empty_rows(torch.zeros(2, 1, 4, 4, dtype=torch.bool))):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.isfinite(out).all()
    # real queries attend exactly to real keys under both forms
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=pair)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=to_sdpa_mask(keep, 2, 4))
    torch.testing.assert_close(a[0, :, :2], b[0, :, :2])


def test_to_sdpa_mask_validation():
    assert to_sdpa_mask(None, 2, 4) is None
    four = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    assert torch.equal(to_sdpa_mask(four, 2, 4), four)  # 4-D masks are never skipped (checking costs L²)
    with pytest.raises(ValueError, match=r"\[B, 1, Lq, Lk\] must have shape \(2, 1, 4, 4\)"):
        to_sdpa_mask(torch.ones(2, 1, 4, 5, dtype=torch.bool), 2, 4)
    with pytest.raises(ValueError, match="must be bool"):
        to_sdpa_mask(torch.zeros(2, 1, 4, 4), 2, 4)
    with pytest.raises(ValueError, match=r"\[B, L\] \(key padding\) or \[B, 1, L, L\]"):
        to_sdpa_mask(torch.ones(2, 4, 4), 2, 4)


def test_transformer_blocks_name_points_at_the_blocks() -> None:
    from dllm_zoo.backbones import LLaDABackbone, SDARBackbone

    llada, sdar = LLaDABackbone("tiny"), SDARBackbone("tiny")
    assert llada.transformer_blocks_name() == "model.transformer.blocks"
    assert sdar.transformer_blocks_name() == "model.layers"
    assert sdar.get_submodule(sdar.transformer_blocks_name()) is sdar.transformer_blocks()
