"""Transformer building blocks shared by the backbone families (LLaDA full attention, SDAR/Qwen3 block attention).

* :class:`RMSNorm`: weight-only RMS normalisation computed in fp32 and cast back (LLaDA and Qwen3 both do this).
* :class:`RotaryEmbedding` / :func:`apply_rotary`: rotate-half ("NeoX") RoPE with ``inv_freq_i = θ^(-2i/d)``,
  tables computed in fp32 and cached per ``(seq_len, device)`` (research/tracerl_llada.md §4.2; mmada.md §2.1).
* :func:`swiglu` / :class:`SwiGLUMLP`: ``down(silu(gate(x)) * up(x))``. The functional form takes the three
  projections as arguments so each family keeps its own checkpoint attribute names (LLaDA stores them flat on
  the block as ``ff_proj``/``up_proj``/``ff_out``; Qwen3 under ``mlp.{gate,up,down}_proj``).

Nothing here owns persistent state besides weights: RoPE tables are plain cached tensors, never in a state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias, computed in fp32.

    ``y = weight * cast(x * rsqrt(mean(x², -1) + eps))``: normalisation in fp32 whatever the input dtype (bf16
    activations would lose the small-variance tail), then cast back to the input dtype before the scale, as in
    LLaDA's OLMo code and HF Llama/Qwen3.

    Args:
        dim: Size of the last (normalised) dimension.
        eps: Added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._eps_over_dim: dict[int, Tensor] = {}  # CPU path: eps / dim as a 0-d tensor (no scalar wrapping)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` ``[..., dim]`` -> ``[..., dim]`` (dtype of ``x``, or promoted with the weight's)."""
        weight = self.weight
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            if not x.is_cpu:  # one fused kernel instead of four elementwise passes (same math)
                return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
            # On CPU F.rms_norm is a composite of ~10 ops, the cost that dominates small sampler forwards; this is
            # three: eps + mean(x²) as one fused multiply-add and a sum, then the scaling.
            dim = x.shape[-1]
            eps = self._eps_over_dim.get(dim)
            if eps is None:
                eps = self._eps_over_dim[dim] = torch.tensor(self.eps / dim)
            return x * torch.rsqrt(torch.addcmul(eps, x, x, value=1.0 / dim).sum(-1, keepdim=True)) * weight
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def extra_repr(self) -> str:
        """Width and epsilon, shown in ``print(model)``."""
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotary_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """RoPE inverse frequencies ``θ^(-2i/head_dim)`` for ``i = 0 .. head_dim/2 - 1``, fp32 ``[head_dim/2]``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponent)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary position embedding tables (fp32), cached per ``(seq_len, device)``.

    :meth:`head_tables` gives the form the backbones' forwards use (broadcast over heads, rotate-half's sign
    folded into the sine, see :func:`rotate`); :meth:`forward` the plain ``(cos, sin)`` that :func:`apply_rotary`
    takes. The cache is a plain dict, not a buffer: the tables are never saved, do not exist on the meta device,
    and follow whatever device the activations are on. Contiguous positions ``0..L-1`` (the common case) hit the
    cache; explicit ``position_ids`` are computed on the fly (three ops on ``[B, L, head_dim]``), which avoids a
    device sync to size a table.

    Args:
        head_dim: Per-head channel count (even).
        theta: RoPE base (LLaDA-8B: 500000; tiny presets: 10000).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}  # (L, device) -> head tables
        self._freqs: dict[torch.device, Tensor] = {}

    def _inv_freq(self, device: torch.device) -> Tensor:
        """``cat(-inv_freq, inv_freq)`` fp32 ``[head_dim]``, once per device (sampler forwards need it every step).

        The first half carries rotate-half's sign: ``cos`` is even, so ``cos(p·f)`` is unchanged, and ``sin(p·f)``
        comes out as the signed table :func:`rotate` takes (``[-sin₁, sin₂]``) without another op.
        """
        inv_freq = self._freqs.get(device)
        if inv_freq is None:
            half = rotary_inv_freq(self.head_dim, self.theta, device)
            inv_freq = self._freqs[device] = torch.cat((-half, half))
        return inv_freq

    def _signed_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        # positions [...] (int or float) -> cos, signed sin [..., 1, head_dim]; int64 * fp32 promotes to fp32.
        emb = (positions[..., None] * self._inv_freq(positions.device)).unsqueeze(-2)
        return emb.cos(), emb.sin()

    def head_tables(
        self, seq_len: int, device: torch.device, position_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The tables :func:`rotate` takes: ``(cos, signed_sin)``, fp32, broadcast over heads.

        Args:
            seq_len: ``L``.
            device: Device of the activations.
            position_ids: Optional ``[B, L]`` integer positions.

        Returns:
            Each ``[L, 1, head_dim]`` for default positions (cached) or ``[B, L, 1, head_dim]`` for explicit ones.
        """
        if position_ids is not None:
            floating = position_ids.is_floating_point()  # integer positions promote to fp32 in the product
            return self._signed_tables(position_ids.to(device, torch.float32) if floating else position_ids.to(device))
        key = (seq_len, device)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 16:  # many lengths (sampler canvases): keep memory bounded
                self._cache.clear()
            hit = self._signed_tables(torch.arange(seq_len, device=device, dtype=torch.float32))
            self._cache[key] = hit
        return hit

    def forward(self, seq_len: int, device: torch.device, position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Cos/sin tables for a sequence, in the plain rotate-half layout (:func:`apply_rotary` takes them).

        Args:
            seq_len: ``L``.
            device: Device of the activations.
            position_ids: Optional ``[B, L]`` integer positions.

        Returns:
            ``(cos, sin)``, fp32, each ``[L, head_dim]`` for default positions or ``[B, L, head_dim]`` for
            explicit ones.
        """
        cos, signed = self.head_tables(seq_len, device, position_ids)
        half = self.head_dim // 2
        sin = torch.cat((-signed[..., :half], signed[..., half:]), dim=-1)
        return cos.squeeze(-2), sin.squeeze(-2)

    def extra_repr(self) -> str:
        """Head size and base, shown in ``print(model)``."""
        return f"head_dim={self.head_dim}, theta={self.theta}"


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension split in halves ``[..., D] -> [..., D]``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def head_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Plain ``(cos, sin)`` in the form :func:`rotate` takes: broadcast over heads, rotate-half's sign in ``sin``.

    (:meth:`RotaryEmbedding.head_tables` builds this form directly.) With it each of a model's ``2·layers``
    rotations is three elementwise ops and a ``roll`` (``rotate_half(x) · sin = roll(x, D/2) · [-sin₁, sin₂]``).

    Args:
        cos: ``[L, D]`` or ``[B, L, D]`` fp32 (from :class:`RotaryEmbedding`).
        sin: Same shape as ``cos``.

    Returns:
        ``(cos, signed_sin)``, each ``[L, 1, D]`` or ``[B, L, 1, D]``.
    """
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(-2), signed.unsqueeze(-2)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, L, H, D]`` by tables from :func:`head_tables`, in fp32, returning the dtype of ``x``."""
    half = x.shape[-1] // 2
    if x.dtype == torch.float32:  # no casts: small sampler forwards pay per op
        return x * cos + torch.roll(x, half, dims=-1) * signed_sin
    xf = x.float()
    return (xf * cos + torch.roll(xf, half, dims=-1) * signed_sin).to(x.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` by the RoPE tables, in fp32, returning the dtype of ``x``.

    Args:
        x: ``[B, L, H, D]`` (heads after the sequence dimension, the layout a projection produces).
        cos: ``[L, D]`` or ``[B, L, D]`` fp32.
        sin: Same shape as ``cos``.

    Returns:
        ``[B, L, H, D]``: ``x * cos + rotate_half(x) * sin``.
    """
    return rotate(x, *head_tables(cos, sin))


def swiglu(x: Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> Tensor:
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))`` on ``[..., D] -> [..., D]``.

    Args:
        x: Input activations ``[..., D]``.
        gate: Projection ``D -> F`` that goes through SiLU (LLaDA ``ff_proj``, Qwen3 ``gate_proj``).
        up: Projection ``D -> F`` (``up_proj``).
        down: Projection ``F -> D`` (LLaDA block ``ff_out``, Qwen3 ``down_proj``).
    """
    return down(F.silu(gate(x)) * up(x))


class SwiGLUMLP(nn.Module):
    """SwiGLU MLP with HF Llama/Qwen3 attribute names ``gate_proj``, ``up_proj``, ``down_proj`` (no biases).

    Args:
        dim: Model width ``D``.
        hidden_dim: Inner width ``F``.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``."""
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)
