"""Per-device training-memory estimator for the dllm_zoo backbones and stages.

``estimate_memory(backbone="llada", preset="llada-8b", stage="sft", adapter="lora", ...)`` returns a
:class:`MemoryEstimate`: the bytes of every term of one training step on one device (weights, gradients, AdamW
state, sharded working set, activations, optimizer-step transient) plus a fixed overhead reported apart, and a
readable :meth:`~MemoryEstimate.table`. ``dllm-zoo estimate-memory`` prints that table.

What is counted, and how (each helper below states its own assumptions)
-------------------------------------------------------------------------
* **Parameters** come from the real module tree: the backbone is built on the meta device (nothing allocated,
  an 8B model in well under a second) and its ``nn.Linear``/``nn.Embedding``/RMSNorm shapes are read off, so the
  counts follow the code, not a copied formula. LoRA factors are ``rank · (in + out)`` for every layer that
  :func:`dllm_zoo.adapters.lora_targets` selects (the family's ``lora_target_modules`` by default). QLoRA stores
  every block Linear as bitsandbytes NF4 (:func:`nf4_bytes`); embeddings, norms and the LM head stay unquantised.
* **Precision** follows what Lightning does (checked against ``lightning.pytorch.plugins.precision``):
  ``"32-true"`` keeps everything in fp32; ``"bf16-true"`` builds the backbone in bf16 and then casts the whole
  module (LoRA factors included) to bf16, so gradients and AdamW states are bf16 too and there is **no** fp32 master
  copy; ``"bf16-mixed"`` is ``torch.autocast``: weights stay fp32 (they ARE the master weights, no second copy),
  gradients and AdamW states are fp32, and autocast's bf16 copies of the matmul weights live from the forward to
  the backward (saved for backward; trainable ones are also cached until the forward ends).
* **Optimizer**: AdamW (:func:`dllm_zoo.stages.optim.build_optimizer`), two states per trainable parameter in the
  parameter's dtype, and the ``foreach`` step's one temporary (``sqrt(exp_avg_sq)``) over the largest parameter
  group. DeepSpeed instead keeps fp32 master weights + two fp32 states per trainable parameter (ZeRO's ``K = 12``).
* **Activations** are derived tensor by tensor from OUR forward code (``transformer.py``, ``llada.py``, ``sdar.py``,
  ``layers.py``, peft's LoRA layer, ``MaskedDiffusionLoss``): what autograd saves for backward per block (RMSNorm,
  projections, RoPE, SDPA, SwiGLU, LoRA dropout), the final norm, the vocabulary projection at the masked positions
  only and the cross-entropy. :func:`saved_activation_bytes` is the exact count of tensors saved for backward after
  the forward without checkpointing (the tests compare it byte for byte with ``torch.autograd.graph.
  saved_tensors_hooks``); the peak adds the transients of the loss, the blocks and the backward, which are
  modelled, not exact. Two things differ between devices: LoRA dropout masks are bool on CUDA (fused dropout) but
  a noise tensor in the input dtype on CPU; and SDPA's kernel (``sdpa_kernel``): fused kernels keep no ``[T, T]``
  matrix, but on CUDA a backbone with GQA and a mask (SDAR) falls back to the math kernel, which does.
* **Step timeline** (Lightning's automatic optimisation): ``training_step`` runs, THEN ``zero_grad(set_to_none)``,
  then ``backward``, then ``optimizer.step``. So the previous step's gradients are still allocated during the
  forward; the peak is the largest of four phases, each on top of parameters + optimizer states + working set:
  forward end (gradients + saved activations + logits and log-softmax), loss backward (saved activations + three
  ``[N, V]`` fp32 tensors; gradients were just freed), block backward (saved activations + a recomputed block under
  checkpointing + its backward temporaries + the head's gradient), optimizer step (gradients + the AdamW temporary).
* **Strategies** (per device, ``devices = N``): ``single`` and ``ddp`` replicate everything (DDP also keeps its
  gradient buckets, a second gradient-sized buffer, since Lightning leaves ``gradient_as_bucket_view`` off);
  ``fsdp``/``fsdp2`` shard parameters, gradients and optimizer states over ``N`` (per-block wrapping as
  :func:`dllm_zoo.parallel.shard_backbone` does) and keep the root module (embeddings, final norm, head) plus two
  blocks (current + prefetched) unsharded during compute, with one block's unsharded gradients before the
  reduce-scatter; ``deepspeed_stage_2`` shards gradients and optimizer states (weights replicated),
  ``deepspeed_stage_3`` also the weights (working set modelled like FSDP's), both with Lightning's default
  ``reduce_bucket_size = allgather_bucket_size = 2e8`` elements. ``cpu_offload`` moves what the strategy offloads to
  host memory (reported as ``host_offload``, not in the device total). These sharded terms follow the ZeRO paper's
  accounting (Rajbhandari et al. 2020, "ZeRO", §5) and FSDP2's per-block all-gather; they were NOT measured here
  (no multi-GPU machine), unlike the single-device terms.
* **Overhead**: a fixed :data:`CUDA_OVERHEAD_BYTES` (1 GiB: ~0.5 GiB CUDA context + kernels, ~0.5 GiB allocator
  fragmentation and cuBLAS workspaces), reported separately and added only to ``total``. It is an allowance,
  not a derivation; set ``overhead_bytes`` to what ``nvidia-smi`` shows on your machine. ``device="cpu"`` uses 0.

Validation (tests/test_memory.py, benchmarks/memory.py, docs/memory.md): the static terms and the saved activations
equal real models' bytes exactly; the peak is within 8% of the resident peak of real CPU training steps (fp32) on
18 proxies. Nothing here was measured on a GPU.

Known limits: the masked-token count ``N`` defaults to its worst case (every answer token masked, ``t → 1``), the
memory peak of a long run; pass ``masked_fraction`` for a typical step. Padding and packing masks of
``pretrain``/``sft`` batches are ignored (no padding assumed); custom LoRA targets are counted exactly for
parameters but block 0's activations assume the default targets. QLoRA under ``bf16-mixed`` assumes bf16 weights.
The GPU allocator's fragmentation is only covered by the fixed overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dllm_zoo.adapters import LoRA, lora_targets
from dllm_zoo.backbones.llada import LLaDABackbone, LLaDAConfig
from dllm_zoo.backbones.sdar import SDARBackbone, SDARConfig
from dllm_zoo.backbones.transformer import TransformerBackbone, TransformerConfig

__all__ = [
    "ADAPTERS",
    "CUDA_OVERHEAD_BYTES",
    "FAMILIES",
    "PRECISIONS",
    "STAGES",
    "STRATEGIES",
    "MemoryEstimate",
    "ModelInventory",
    "add_arguments",
    "build_meta",
    "estimate_memory",
    "inventory",
    "nf4_bytes",
    "resolve_config",
    "run_cli",
    "saved_activation_bytes",
]

GiB = 2**30

#: Fixed per-device allowance for the CUDA context, kernels, cuBLAS workspaces and allocator fragmentation.
CUDA_OVERHEAD_BYTES = 1 * GiB

FAMILIES: dict[str, tuple[type[TransformerBackbone[Any]], type[TransformerConfig]]] = {
    "llada": (LLaDABackbone, LLaDAConfig),
    "sdar": (SDARBackbone, SDARConfig),
}
STAGES = ("pretrain", "sft", "block_sft")
ADAPTERS = ("none", "lora", "qlora")
STRATEGIES = ("single", "ddp", "fsdp", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3")
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")

# Lightning's DeepSpeedStrategy defaults (elements per bucket).
_DS_REDUCE_BUCKET = int(2e8)
_DS_ALLGATHER_BUCKET = int(2e8)
# bitsandbytes' Linear4bit defaults: 64 weights per absmax block; double quantisation groups 256 absmax values.
_NF4_BLOCK = 64
_NF4_NESTED_BLOCK = 256
# Linear layers of a block by the tensor they read: (family, path inside the block) -> role.
_ROLES: dict[str, dict[str, str]] = {
    "llada": {
        "q_proj": "attn_in",
        "k_proj": "attn_in",
        "v_proj": "attn_in",
        "attn_out": "attn_out",
        "ff_proj": "mlp_in",
        "up_proj": "mlp_in",
        "ff_out": "mlp_out",
    },
    "sdar": {
        "self_attn.q_proj": "attn_in",
        "self_attn.k_proj": "attn_in",
        "self_attn.v_proj": "attn_in",
        "self_attn.o_proj": "attn_out",
        "mlp.gate_proj": "mlp_in",
        "mlp.up_proj": "mlp_in",
        "mlp.down_proj": "mlp_out",
    },
}


# ------------------------------------------------------------------------------------------------ inventory
@dataclass(frozen=True)
class ModelInventory:
    """Shapes of a backbone, read from its module tree built on the meta device.

    Attributes:
        family: ``"llada"`` or ``"sdar"``.
        config: The family config.
        num_layers: Transformer blocks.
        width: Model width ``D``.
        heads: Query heads ``H``.
        kv_heads: Key/value heads ``H_kv``.
        head_dim: Channels per head.
        ffn: SwiGLU inner width ``F``.
        vocab: Rows of the LM head ``V``.
        qk_norm: Whether queries and keys get a per-head RMSNorm (SDAR/Qwen3).
        embedding_params: Elements of the input embedding.
        head_params: Elements of the LM head.
        final_norm_params: Elements of the final norm.
        block_linears: ``(path inside the block, in_features, out_features)`` of each block's Linear layers.
        block_other_params: Elements of a block that are not Linear weights (its norms).
        lora_shapes: ``(block index, path, in, out)`` of the layers the adapter targets (empty without adapter).
        lora_rank: The adapter's rank (0 without adapter).
    """

    family: str
    config: TransformerConfig
    num_layers: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    qk_norm: bool
    embedding_params: int
    head_params: int
    final_norm_params: int
    block_linears: tuple[tuple[str, int, int], ...]
    block_other_params: int
    lora_shapes: tuple[tuple[int, str, int, int], ...] = ()
    lora_rank: int = 0

    @property
    def block_linear_params(self) -> int:
        """Elements of one block's Linear weights."""
        return sum(i * o for _, i, o in self.block_linears)

    @property
    def block_params(self) -> int:
        """Elements of one block."""
        return self.block_linear_params + self.block_other_params

    @property
    def total_params(self) -> int:
        """Elements of the whole backbone (no adapter)."""
        return self.embedding_params + self.head_params + self.final_norm_params + self.num_layers * self.block_params

    @property
    def lora_params(self) -> int:
        """Elements of all LoRA factors (``rank · (in + out)`` per target; see :func:`inventory`)."""
        return sum(self.lora_rank * (i + o) for _, _, i, o in self.lora_shapes)

    def lora_roles(self) -> dict[str, int]:
        """How many LoRA targets of one block read each tensor (``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out``).

        Counted over the targets of block 1 (or block 0 with a single block); blocks are identical under the
        default targets.
        """
        roles = _ROLES[self.family]
        probe = 1 if self.num_layers > 1 else 0
        out = {"attn_in": 0, "attn_out": 0, "mlp_in": 0, "mlp_out": 0}
        for block, path, _, _ in self.lora_shapes:
            if block == probe and path in roles:
                out[roles[path]] += 1
        return out


def _family_of(config: TransformerConfig) -> str:
    for name, (_, cfg_cls) in FAMILIES.items():
        if isinstance(config, cfg_cls):
            return name
    raise ValueError(f"no backbone family for a {type(config).__name__}: use one of {sorted(FAMILIES)}")


def resolve_config(
    backbone: str, preset: str | None = None, config: TransformerConfig | None = None
) -> TransformerConfig:
    """The family config of ``--backbone`` + ``--preset`` (or ``config`` itself).

    Raises:
        ValueError: naming ``--backbone`` or ``--preset`` and the valid choices.
    """
    if config is not None:
        return config
    if backbone not in FAMILIES:
        raise ValueError(f"unknown --backbone {backbone!r}: choose one of {sorted(FAMILIES)}")
    cfg_cls = FAMILIES[backbone][1]
    if preset is None:
        raise ValueError(f"--preset is required for --backbone {backbone}: one of {cfg_cls.preset_names()}")
    if preset not in cfg_cls.preset_names():
        raise ValueError(
            f"unknown --preset {preset!r} for --backbone {backbone}: choose one of {cfg_cls.preset_names()}"
        )
    return cfg_cls.preset(preset)


def build_meta(config: TransformerConfig) -> TransformerBackbone[Any]:
    """The backbone of ``config`` on the meta device (shapes only, no memory)."""
    cls = FAMILIES[_family_of(config)][0]
    with torch.device("meta"):
        return cls(config)


def inventory(config: TransformerConfig, adapter: LoRA | None = None) -> ModelInventory:
    """Read the shapes of ``config``'s backbone (and of ``adapter``'s LoRA targets) from a meta-device build.

    Args:
        config: A family config (``LLaDAConfig.preset("llada-8b")``, …).
        adapter: The adapter whose targets to resolve (``target_modules=None``: the family default).

    Raises:
        ValueError: from :func:`dllm_zoo.adapters.lora_targets` on targets that do not fit the family.
    """
    family = _family_of(config)
    model = build_meta(config)
    blocks = model.transformer_blocks()
    first = blocks[0]
    linears = tuple((p, m.in_features, m.out_features) for p, m in first.named_modules() if isinstance(m, nn.Linear))
    linear_ids = {id(m.weight) for m in first.modules() if isinstance(m, nn.Linear)}
    other = sum(p.numel() for p in first.parameters() if id(p) not in linear_ids)
    lora: list[tuple[int, str, int, int]] = []
    if adapter is not None:
        prefix_len = len(model.transformer_blocks_name()) + 1
        for name in lora_targets(model, adapter.target_modules):
            block, _, path = name[prefix_len:].partition(".")
            module = model.get_submodule(name)
            assert isinstance(module, nn.Linear)
            lora.append((int(block), path, module.in_features, module.out_features))
    cfg: Any = config
    return ModelInventory(
        family=family,
        config=config,
        num_layers=config.num_layers,
        width=int(cfg.d_model if family == "llada" else cfg.hidden_size),
        heads=int(cfg.n_heads if family == "llada" else cfg.num_attention_heads),
        kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        ffn=int(cfg.ffn_hidden_size if family == "llada" else cfg.intermediate_size),
        vocab=model.output_head().out_features,
        qk_norm=family == "sdar",
        embedding_params=model.input_embedding().weight.numel(),
        head_params=model.output_head().weight.numel(),
        final_norm_params=sum(p.numel() for p in model.final_norm().parameters()),
        block_linears=linears,
        block_other_params=other,
        lora_shapes=tuple(lora),
        lora_rank=adapter.rank if adapter is not None else 0,
    )


# ------------------------------------------------------------------------------------------------------ NF4
def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one NF4-quantised weight of ``numel`` elements (``Linear4bit`` defaults).

    Two 4-bit codes per byte (``ceil(numel / 2)``), one absmax per block of 64 weights and the 16-entry NF4 code
    table (fp32). Without double quantisation each absmax is fp32 (0.5 bits/weight). With it (QLoRA §3) each
    absmax is an 8-bit code, plus per 256 absmax values one fp32 scale, one fp32 offset and the 256-entry fp32
    dynamic code table of the nested quantiser, i.e. ``0.5 + 1/64 + 4/(64·256)`` bytes/weight ≈ 4.13 bits/weight
    plus ~1.1 KB per layer. Matches ``Params4bit`` + ``QuantState`` storage in bitsandbytes 0.4x–0.50 (tested).
    """
    packed = (numel + 1) // 2
    blocks = math.ceil(numel / _NF4_BLOCK)
    code = 16 * 4
    if not double_quant:
        return packed + 4 * blocks + code
    nested = math.ceil(blocks / _NF4_NESTED_BLOCK)
    return packed + blocks + 4 * nested + 4 + 256 * 4 + code


# ------------------------------------------------------------------------------------------------ precision
@dataclass(frozen=True)
class _Dtypes:
    """Bytes per element of each kind of tensor under a precision (see the module docstring)."""

    weight: int  # stored base weights
    lora: int  # LoRA factors (and their gradients/states)
    act: int  # matmul outputs and SDPA tensors
    stream: int  # the residual stream between blocks
    autocast: bool  # bf16-mixed: matmuls cast fp32 inputs/weights to bf16 copies

    @property
    def norm_fp32_path(self) -> bool:
        """Block RMSNorms see an fp32 stream and fp32 weight (one decomposed fp32 path, no copies)."""
        return self.stream == 4 and self.weight == 4


def _dtypes(precision: str, weights_dtype: str | None, quantized: bool) -> _Dtypes:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {precision!r}: choose one of {list(PRECISIONS)}")
    if weights_dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"unknown --weights-dtype {weights_dtype!r}: choose float32 or bfloat16")
    if weights_dtype is not None and precision != "bf16-mixed":
        raise ValueError(
            f"--weights-dtype only applies to --precision bf16-mixed (autocast keeps stored weights as they are); "
            f"{precision} casts every weight itself"
        )
    if precision == "32-true":
        return _Dtypes(weight=4, lora=4, act=4, stream=4, autocast=False)
    if precision == "bf16-true":
        return _Dtypes(weight=2, lora=2, act=2, stream=2, autocast=False)
    # bf16-mixed: a bf16 checkpoint keeps its bf16 weights (from_pretrained keeps the stored dtype); QLoRA is only
    # modelled with bf16 weights (bitsandbytes computes in the dtype the weights had when quantised).
    weight = 2 if weights_dtype == "bfloat16" or (weights_dtype is None and quantized) else 4
    return _Dtypes(weight=weight, lora=4, act=2, stream=weight, autocast=True)


# ---------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Run:
    """The forward being modelled."""

    inv: ModelInventory
    dt: _Dtypes
    full: bool  # every weight trains (no adapter)
    dropout: bool  # LoRA dropout > 0 (peft then saves a dropout copy + a mask per target)
    batch: int
    tokens: int  # T: row length the backbone sees (2L for block_sft)
    masked: int  # N: positions with logits
    mask_rows: int  # leading size of the [*, 1, T, T] bool mask SDPA converts to a float bias (0: no mask)
    explicit_positions: bool  # position_ids passed: RoPE tables [B, T, hd] per forward instead of cached [T, hd]
    stage: str
    dropout_mask: int  # bytes per element of a dropout mask: bool on CUDA (native_dropout), the input dtype on CPU
    sdpa_kernel: str  # "efficient" (fused kernels) or "math" (materialises [B, H, T, T])


def _norm_saved(width: int, rows: int, x_bytes: int, fp32_path: bool, trainable: bool) -> int:
    """Bytes per token RMSNorm saves (``layers.RMSNorm``; x requires grad).

    fp32 path (fp32 input and weight, ``F.rms_norm`` decomposed): ``x`` itself, ``rstd`` per row, and ``x·rstd``
    when the weight trains. Other dtypes: the fp32 copy ``x.float()``, ``rstd``, and ``x·rstd`` cast back to the
    input dtype when the weight trains. The output is saved (or not) by its consumers.
    """
    y = (4 if fp32_path else x_bytes) if trainable else 0
    return 4 * width + 4 * rows + y * width


def _lora_saved(run: _Run, width: int, in_bytes: int, targets: int, input_grad: bool, input_saved: bool) -> int:
    """Bytes per token saved by ``targets`` peft LoRA layers reading the same ``[.., width]`` input.

    With dropout each layer keeps its own mask (when the input requires grad; CUDA's fused dropout keeps a bool
    mask, the CPU kernel a scaled noise tensor in the input's dtype) and its dropout output (the input of
    ``lora_A``; under autocast its bf16 cast); without dropout ``lora_A`` keeps the shared input (a bf16
    cast per layer under autocast). Each ``lora_A`` output ``[.., rank]`` is kept by ``lora_B``.
    """
    if targets == 0:
        return 0
    rank = run.inv.lora_rank
    out_bytes = 2 if run.dt.autocast else run.dt.lora
    lora_a_out = targets * rank * out_bytes
    if run.dropout:
        per = (run.dropout_mask if input_grad else 0) + (2 if run.dt.autocast else run.dt.lora)
        return targets * per * width + lora_a_out
    if run.dt.autocast and (in_bytes == 4 or run.dt.lora == 4):
        return targets * 2 * width + lora_a_out
    return (0 if input_saved else in_bytes * width) + lora_a_out


def _matmul_inputs(run: _Run, width: int, in_bytes: int, consumers: int, input_saved: bool) -> int:
    """Bytes per token the trainable Linear layers reading one ``[.., width]`` tensor save (their input).

    Shared when the input already has the compute dtype; under autocast an fp32 input is cast once per call.
    """
    if run.dt.autocast and in_bytes == 4:
        return consumers * 2 * width
    return 0 if input_saved else in_bytes * width


def _block_saved(run: _Run, first: bool = False) -> int:
    """Bytes saved for backward by one transformer block over ``B·T`` tokens (no checkpointing).

    Per token (see the module docstring for the dtype rules): the two RMSNorms (:func:`_norm_saved`), the inputs
    of the trainable projections or the LoRA dropout copies, SDAR's per-head q/k RMSNorms, the attention, and
    SwiGLU's gate and up outputs, ``silu(gate)`` and their product. RoPE itself saves only the shared cos/sin tables.

    Attention with a fused kernel (``sdpa_kernel="efficient"``: flash / memory-efficient / CPU flash) keeps the
    rotated q, k, v, its output and an fp32 log-sum-exp per head, no ``[T, T]`` matrix; with a 4-D bool mask
    (block_sft's ``[B, 1, T, T]``, SDAR's own block-causal ``[1, 1, T, T]``) also SDPA's float bias of that shape in
    the compute dtype (converted per call, so per block). The math kernel (``"math"``) upcasts to fp32 and keeps
    the scaled q, the scaled k and v repeated to ``H`` heads and the ``[B, H, T, T]`` fp32 probabilities, and its
    output is copied once more for the output projection. ``first``: block 0 under an adapter, whose input (the
    frozen embedding) needs no gradient.
    """
    inv, dt = run.inv, run.dt
    d, f, q, k = inv.width, inv.ffn, inv.heads * inv.head_dim, inv.kv_heads * inv.head_dim
    roles = inv.lora_roles()
    stream_grad = run.full or not first
    per = 0
    # attention RMSNorm on the stream
    n_bytes = 4 if dt.norm_fp32_path else max(dt.weight, dt.stream)
    if stream_grad:
        per += _norm_saved(d, 1, dt.stream, dt.norm_fp32_path, run.full)
    if run.full:
        per += _matmul_inputs(run, d, n_bytes, 3, False)
    else:
        per += _lora_saved(run, d, n_bytes, roles["attn_in"], stream_grad, False)
    attn_grad = run.full or stream_grad or roles["attn_in"] > 0
    # SDAR: per-head q/k RMSNorm on the projections' outputs (bf16 path unless everything is fp32)
    q_bytes = dt.act
    if inv.qk_norm and attn_grad:
        fp32_path = dt.act == 4 and dt.weight == 4
        per += _norm_saved(q, inv.heads, dt.act, fp32_path, run.full)
        per += _norm_saved(k, inv.kv_heads, dt.act, fp32_path, run.full)
        q_bytes = 4 if fp32_path else max(dt.weight, dt.act)  # k's alike
    sdpa = 2 if dt.autocast else q_bytes
    math = run.sdpa_kernel == "math"
    if attn_grad and math:
        # fp32 (upcast) scaled q, scaled k and v repeated to H heads, and the [T, T] softmax probabilities
        per += 4 * 3 * q + 4 * inv.heads * run.tokens
    elif attn_grad:
        per += sdpa * (2 * q + 2 * k) + 4 * inv.heads  # q, k, v, out, logsumexp
    out_bytes = 2 if dt.autocast else sdpa
    if run.full and math:
        per += out_bytes * q  # the math kernel's [B, H, T, hd] output is copied to [B, T, H·hd] for the projection
    if not run.full:
        per += _lora_saved(run, q, out_bytes, roles["attn_out"], attn_grad, not math)
    # MLP RMSNorm on h = x + attention
    per += _norm_saved(d, 1, dt.stream, dt.norm_fp32_path, run.full)
    if run.full:
        per += _matmul_inputs(run, d, n_bytes, 2, False)
    else:
        per += _lora_saved(run, d, n_bytes, roles["mlp_in"], True, False)
    per += 3 * dt.act * f  # gate output (silu), silu(gate) and up output (their product)
    if run.full:
        per += dt.act * f  # the product, read by the down projection
    else:
        per += _lora_saved(run, f, dt.act, roles["mlp_out"], True, False)
    total = per * run.batch * run.tokens
    if run.mask_rows and attn_grad and not math:
        total += run.mask_rows * run.tokens * run.tokens * sdpa
    return total


def _head_saved(run: _Run) -> dict[str, int]:
    """Bytes saved for backward outside the blocks (no checkpointing), by term.

    ``final_norm``: the final RMSNorm over all ``B·T`` positions. ``head_input``: the ``[N, D]`` hidden states at
    the masked positions, kept by a trainable head. ``log_softmax``: cross-entropy's fp32 ``[N, V]`` output.
    ``loss_vectors``: the ``[N]`` targets (int64) and per-token weights (fp32) and, for answer-length
    normalisation (``sft``, ``block_sft``), the ``[N]`` sample index (int64) and weighted CE (fp32).
    ``inputs``: token ids kept by a trainable embedding, the ``[B, T]`` bool mask
    kept by the gather of the masked positions, the RoPE tables.
    """
    inv, dt = run.inv, run.dt
    d, bt, n = inv.width, run.batch * run.tokens, run.masked
    h_bytes = 4 if dt.norm_fp32_path else max(dt.weight, dt.stream)
    head_in = 0
    if run.full:
        head_in = n * d * (2 if dt.autocast and h_bytes == 4 else h_bytes)
    rope_rows = bt if run.explicit_positions else run.tokens
    inputs = bt * (8 if run.full else 0) + bt + 2 * rope_rows * inv.head_dim * 4
    # targets (int64) + per-token weights (fp32) + two scalars; answer-length normalisation adds the sample index
    # (int64) and the weighted CE (fp32) kept by index_add_, and the [B] lengths.
    loss_vectors = 12 * n + 12 + (12 * n + 4 * run.batch if run.stage != "pretrain" else 0)
    return {
        "final_norm": bt * _norm_saved(d, 1, dt.stream, dt.norm_fp32_path, run.full),
        "head_input": head_in,
        "log_softmax": 4 * n * inv.vocab,
        "loss_vectors": loss_vectors,
        "inputs": inputs,
    }


def _weight_casts(run: _Run, checkpointing: bool) -> tuple[int, int]:
    """Autocast's bf16 weight copies under ``bf16-mixed``: bytes (at forward end, during backward).

    A Linear's bf16 weight copy is saved for backward whenever its input requires grad; trainable (leaf) weights
    are also cached until the autocast region (``training_step``) ends. Under checkpointing only the cache and
    the (uncheckpointed) head keep copies across the forward; inside blocks they are transient.
    """
    inv, dt = run.inv, run.dt
    if not dt.autocast:
        return 0, 0
    base = dt.weight == 4  # bf16 base weights need no copy; fp32 LoRA factors always get one
    blocks = inv.num_layers * inv.block_linear_params if base else 0
    head = inv.head_params if base else 0
    lora = inv.lora_params
    if run.full:
        forward = 2 * (blocks + head)
        return forward, (2 * head if checkpointing else forward)
    # Block 0's attention projections read the frozen embedding's output (no grad): nothing keeps their base
    # weight copies nor their lora_A copies.
    first_in = [(i, o) for b, p, i, o in inv.lora_shapes if b == 0 and _ROLES[inv.family].get(p) == "attn_in"]
    frozen_first = sum(i * o for p, i, o in inv.block_linears if _ROLES[inv.family].get(p) == "attn_in") if base else 0
    lora_saved = lora - sum(inv.lora_rank * i for i, _ in first_in)
    if checkpointing:
        return 2 * (head + lora), 2 * head
    saved_blocks = blocks - frozen_first
    return 2 * (saved_blocks + head + lora), 2 * (saved_blocks + head + lora_saved)


def _run(
    inv: ModelInventory,
    dt: _Dtypes,
    adapter: LoRA | None,
    stage: str,
    batch_size: int,
    seq_len: int,
    masked_fraction: float,
    device: str,
    sdpa_kernel: str = "auto",
) -> _Run:
    doubled = stage == "block_sft"
    # block_sft passes a [B, 1, 2L, 2L] mask; SDAR's own block-causal pattern is one [1, 1, L, L] mask; LLaDA: none.
    mask_rows = batch_size if doubled else (1 if inv.family == "sdar" else 0)
    if sdpa_kernel not in ("auto", "efficient", "math"):
        raise ValueError(f"unknown --sdpa-kernel {sdpa_kernel!r}: choose auto, efficient or math")
    if sdpa_kernel == "auto":
        # CUDA's fused kernels take a mask (memory-efficient) or GQA (flash), not both: SDPA then falls back to math.
        gqa = inv.kv_heads != inv.heads
        sdpa_kernel = "math" if device == "cuda" and gqa and mask_rows else "efficient"
    return _Run(
        inv=inv,
        dt=dt,
        full=adapter is None,
        dropout=adapter is not None and adapter.dropout > 0,
        batch=batch_size,
        tokens=2 * seq_len if doubled else seq_len,
        masked=round(masked_fraction * batch_size * seq_len),
        mask_rows=mask_rows,
        explicit_positions=doubled,
        stage=stage,
        dropout_mask=1 if device == "cuda" else dt.lora,
        sdpa_kernel=sdpa_kernel,
    )


def saved_activation_bytes(
    config: TransformerConfig,
    *,
    stage: str = "sft",
    adapter: LoRA | str | None = None,
    precision: str = "32-true",
    weights_dtype: str | None = None,
    batch_size: int = 1,
    seq_len: int = 1024,
    masked: int | None = None,
    device: Literal["cuda", "cpu"] = "cpu",
    sdpa_kernel: str = "auto",
) -> int:
    """Bytes of the distinct tensors autograd holds for backward right after a stage's forward (no checkpointing).

    Parameters (and frozen weights) are excluded; autocast weight copies are included. This is the quantity the
    tests compare exactly with ``torch.autograd.graph.saved_tensors_hooks`` on real forwards.

    Args:
        config: Backbone config.
        stage: ``pretrain``/``sft`` (one row of ``L``) or ``block_sft`` (``[x_t | x_0]``, ``2L`` with a 4-D mask).
        adapter: A :class:`~dllm_zoo.adapters.LoRA`, ``"lora"``/``"qlora"`` (rank 16, dropout 0.05, default
            targets), or ``None``/``"none"`` for full training.
        precision: Lightning precision.
        weights_dtype: bf16-mixed only: stored dtype of the base weights.
        batch_size: ``B``.
        seq_len: ``L``.
        masked: ``N``, masked positions with logits (default ``B·L``).
        device: Where the forward runs: the dtype of LoRA dropout masks and the ``auto`` SDPA kernel depend on it.
        sdpa_kernel: ``auto`` (math on CUDA for GQA with a mask, else efficient), ``efficient`` or ``math``.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown --stage {stage!r}: choose one of {list(STAGES)}")
    adapter = _adapter(adapter, 16, 0.05, None, True)
    inv = inventory(config, adapter)
    dt = _dtypes(precision, weights_dtype, adapter is not None and adapter.quantize is not None)
    fraction = 1.0 if masked is None else masked / (batch_size * seq_len)
    run = _run(inv, dt, adapter, stage, batch_size, seq_len, fraction, device, sdpa_kernel)
    blocks = _all_blocks_saved(run)
    return blocks + sum(_head_saved(run).values()) + _weight_casts(run, False)[1]


def _all_blocks_saved(run: _Run) -> int:
    first = _block_saved(run, first=not run.full)
    return first + (run.inv.num_layers - 1) * _block_saved(run)


# --------------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device memory of one training step, in bytes (see the module docstring for every assumption).

    Attributes:
        settings: The inputs the estimate was made for.
        total_params: Backbone parameters (adapter factors included).
        trainable_params: Parameters the optimizer updates.
        parameters: Stored weights on this device (NF4 blocks under QLoRA; this device's shard when sharded).
        gradients: Gradients on this device (+ DDP buckets; this device's shard when sharded).
        optimizer_states: AdamW states (+ DeepSpeed's fp32 master weights) on this device.
        working_set: Unsharded parameters/gradients and communication buckets of sharded strategies.
        activations: The largest activation footprint over the step's phases (saved tensors, logits and loss
            temporaries, recomputed block and backward temporaries); ``activation_terms`` breaks it down.
        optimizer_step: The AdamW ``foreach`` temporary during ``optimizer.step``.
        overhead: Fixed allowance (CUDA context, allocator slack); only in :attr:`total`.
        host_offload: Bytes kept in host RAM by CPU offload (not on the device).
        peak: Largest live bytes over the step: parameters + optimizer states + working set + the largest phase.
        peak_phase: Which phase sets the peak (``forward``, ``loss backward``, ``block backward``,
            ``optimizer step``).
        phases: Bytes of each phase on top of parameters + optimizer states + working set.
        activation_terms: Components of the activations (bytes; saved tensors, transients).
    """

    settings: dict[str, Any]
    total_params: int
    trainable_params: int
    parameters: int
    gradients: int
    optimizer_states: int
    working_set: int
    activations: int
    optimizer_step: int
    overhead: int
    host_offload: int
    peak: int
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    activation_terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """:attr:`peak` + :attr:`overhead`: what the device must hold."""
        return self.peak + self.overhead

    @property
    def sum_of_terms(self) -> int:
        """All terms added as if they coexisted (an upper bound of :attr:`peak`, without overhead)."""
        return (
            self.parameters
            + self.gradients
            + self.optimizer_states
            + self.working_set
            + self.activations
            + self.optimizer_step
        )

    def fits(self, capacity_bytes: float) -> bool:
        """Whether :attr:`total` fits ``capacity_bytes`` of device memory."""
        return self.total <= capacity_bytes

    def table(self) -> str:
        """A readable per-device table (GiB)."""
        s = self.settings
        head = (
            f"{s['backbone']} {s['preset'] or '(config)'} | {s['stage']} | adapter={s['adapter']} | "
            f"{s['precision']} | strategy={s['strategy']} x{s['devices']}"
            f"{' +cpu_offload' if s['cpu_offload'] else ''} | batch={s['batch_size']} seq={s['seq_len']} | "
            f"checkpointing={'on' if s['gradient_checkpointing'] else 'off'} | masked={s['masked_fraction']:.0%}"
        )
        rows: list[tuple[str, float, str]] = [
            ("parameters", self.parameters, f"{self.total_params / 1e9:.3f}B params stored"),
            ("gradients", self.gradients, f"{self.trainable_params / 1e6:.1f}M trainable"),
            ("optimizer states", self.optimizer_states, "AdamW exp_avg + exp_avg_sq"),
            ("sharded working set", self.working_set, "unsharded blocks/root + buckets"),
            ("activations (peak)", self.activations, f"largest over the step's phases ({self.peak_phase})"),
            ("optimizer step temp", self.optimizer_step, "foreach sqrt(exp_avg_sq)"),
        ]
        lines = [head, f"{'term':<26}{'GiB':>10}  note", "-" * 78]
        lines += [f"{name:<26}{val / GiB:>10.2f}  {note}" for name, val, note in rows]
        lines.append("-" * 78)
        lines.append(f"{'peak of a training step':<26}{self.peak / GiB:>10.2f}  phase: {self.peak_phase}")
        lines.append(f"{'fixed overhead':<26}{self.overhead / GiB:>10.2f}  CUDA context + allocator slack")
        lines.append(f"{'total per device':<26}{self.total / GiB:>10.2f}")
        if self.host_offload:
            lines.append(f"{'host RAM (offloaded)':<26}{self.host_offload / GiB:>10.2f}")
        lines.append(
            "activation terms (GiB): " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in self.activation_terms.items())
        )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- estimate
def _adapter(
    adapter: LoRA | str | None, rank: int, dropout: float, targets: Sequence[str] | None, dq: bool
) -> LoRA | None:
    if adapter is None or isinstance(adapter, LoRA):
        return adapter
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown --adapter {adapter!r}: choose one of {list(ADAPTERS)}")
    if adapter == "none":
        return None
    return LoRA(
        rank=rank,
        dropout=dropout,
        target_modules=tuple(targets) if targets else None,
        quantize="nf4" if adapter == "qlora" else None,
        double_quant=dq,
    )


def estimate_memory(
    backbone: str = "llada",
    preset: str | None = None,
    *,
    config: TransformerConfig | None = None,
    stage: str = "sft",
    adapter: LoRA | str | None = None,
    lora_rank: int = 16,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] | None = None,
    double_quant: bool = True,
    strategy: str = "single",
    devices: int = 1,
    cpu_offload: bool = False,
    precision: str = "bf16-true",
    weights_dtype: str | None = None,
    batch_size: int = 1,
    seq_len: int = 1024,
    gradient_checkpointing: bool = False,
    masked_fraction: float = 1.0,
    device: Literal["cuda", "cpu"] = "cuda",
    sdpa_kernel: str = "auto",
    overhead_bytes: int | None = None,
) -> MemoryEstimate:
    """Estimate the per-device memory of training ``backbone``/``preset`` with a stage, adapter and strategy.

    Args:
        backbone: Family, ``"llada"`` (LLaDA/MMaDA) or ``"sdar"`` (SDAR/TraDo); ignored when ``config`` is given.
        preset: Size preset of the family (``llada-8b``, ``mmada-8b``, ``sdar-4b``, ``sdar-8b``, ``tiny``, …).
        config: A family config instead of ``backbone`` + ``preset``.
        stage: ``pretrain`` / ``sft`` (:class:`~dllm_zoo.stages.MaskedDiffusionPretraining`, rows of ``L``; ``sft``
            uses answer-length normalisation) or ``block_sft`` (:class:`~dllm_zoo.stages.BlockDiffusionSFT`, rows of
            ``2L`` with a 4-D block mask).
        adapter: ``"none"``, ``"lora"``, ``"qlora"`` or a :class:`~dllm_zoo.adapters.LoRA`.
        lora_rank: LoRA rank (string ``adapter`` only).
        lora_dropout: LoRA dropout (string ``adapter`` only); > 0 makes peft keep a dropout copy per target.
        lora_targets: LoRA targets (string ``adapter`` only); ``None`` = the family's ``lora_target_modules``.
        double_quant: QLoRA double quantisation of the absmax statistics.
        strategy: ``single``, ``ddp``, ``fsdp``, ``fsdp2``, ``deepspeed_stage_2`` or ``deepspeed_stage_3``.
        devices: Devices the strategy spreads over (``N``; ``single`` needs 1).
        cpu_offload: Offload what the strategy can offload to host RAM (FSDP: sharded parameters, gradients and
            optimizer; DeepSpeed: optimizer states, master weights and gradient partitions).
        precision: Lightning precision: ``32-true``, ``bf16-true`` or ``bf16-mixed``.
        weights_dtype: bf16-mixed only: dtype of the stored base weights (``bfloat16`` for a bf16 checkpoint loaded
            with ``pretrained=``, which keeps its dtype); default fp32 (fresh init).
        batch_size: Per-device batch ``B``.
        seq_len: Row length ``L`` before block_sft's doubling.
        gradient_checkpointing: Per-block activation checkpointing (``gradient_checkpointing=True`` on the backbone).
        masked_fraction: Fraction of the ``B·L`` positions masked (logits are computed there only). 1.0 (default)
            is the worst step of a run (``t → 1`` with no prompt), which sets the memory a run needs.
        device: ``"cuda"`` adds :data:`CUDA_OVERHEAD_BYTES` as overhead, keeps LoRA dropout masks as bool, and
            picks SDPA's kernel as CUDA does; ``"cpu"``: no overhead, dropout masks in the input dtype, CPU flash.
        sdpa_kernel: ``auto``: ``math`` on CUDA when the backbone has GQA (fewer key/value heads, SDAR) AND a mask
            is passed (SDAR always passes its block-causal mask) — CUDA's flash kernel takes GQA but no mask and the
            memory-efficient one a mask but no GQA, so SDPA falls back to math and materialises ``[B, H, T, T]``
            fp32 probabilities; ``efficient`` otherwise. Force either with ``efficient`` / ``math``.
        overhead_bytes: Override the fixed overhead.

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        ValueError: naming the flag to fix (unknown backbone/preset/stage/adapter/strategy/precision, a
            strategy that cannot run the adapter, bad sizes).
    """
    cfg = resolve_config(backbone, preset, config)
    family = _family_of(cfg)
    if stage not in STAGES:
        raise ValueError(f"unknown --stage {stage!r}: choose one of {list(STAGES)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown --strategy {strategy!r}: choose one of {list(STRATEGIES)}")
    if devices < 1 or (strategy == "single" and devices != 1):
        raise ValueError(f"--devices {devices} does not fit --strategy {strategy} (single needs 1, others >= 1)")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"--batch-size ({batch_size}) and --seq-len ({seq_len}) must be >= 1")
    if not 0.0 < masked_fraction <= 1.0:
        raise ValueError(f"--masked-fraction must be in (0, 1], got {masked_fraction}")
    lora = _adapter(adapter, lora_rank, lora_dropout, lora_targets, double_quant)
    quantized = lora is not None and lora.quantize is not None
    sharded_params = strategy in ("fsdp", "fsdp2", "deepspeed_stage_3")
    if quantized and sharded_params:
        raise ValueError(
            f"--adapter qlora cannot run under --strategy {strategy}: bitsandbytes' 4-bit weights cannot be sharded; "
            "use single, ddp or deepspeed_stage_2"
        )
    if cpu_offload and strategy in ("single", "ddp"):
        raise ValueError(
            f"--cpu-offload needs a strategy that offloads (fsdp, fsdp2, deepspeed_stage_2/3), "
            f"not --strategy {strategy}"
        )
    dt = _dtypes(precision, weights_dtype, quantized)
    deepspeed = strategy.startswith("deepspeed")
    if deepspeed and precision != "32-true":
        dt = dataclasses.replace(dt, weight=2, lora=2, stream=2)  # DeepSpeed casts the module to bf16 itself
    inv = inventory(cfg, lora)
    run = _run(inv, dt, lora, stage, batch_size, seq_len, masked_fraction, device, sdpa_kernel)
    n = devices

    # ---- parameters, gradients, optimizer states (whole model, then per device)
    block_lin = inv.num_layers * inv.block_linear_params
    rest = inv.total_params - block_lin
    if quantized:
        assert lora is not None
        nf4 = inv.num_layers * sum(nf4_bytes(i * o, lora.double_quant) for _, i, o in inv.block_linears)
        base_bytes = nf4 + rest * dt.weight
    else:
        base_bytes = inv.total_params * dt.weight
    if lora is None:
        trainable, train_bytes = inv.total_params, dt.weight
        groups = [
            block_lin + inv.head_params,
            inv.embedding_params + inv.final_norm_params + inv.num_layers * inv.block_other_params,
        ]
    else:
        trainable, train_bytes = inv.lora_params, dt.lora
        groups = [inv.lora_params]
    params_bytes = base_bytes + (inv.lora_params * dt.lora if lora is not None else 0)
    grad_bytes = trainable * train_bytes
    if deepspeed:
        opt_bytes = trainable * (12 if precision != "32-true" else 8)  # fp32 master + m + v (ZeRO's K)
        step_tmp = 4 * max(groups)
    else:
        opt_bytes = 2 * trainable * train_bytes
        step_tmp = max(groups) * train_bytes

    host = 0
    working = 0
    largest_block = inv.block_params + (sum(inv.lora_rank * (i + o) for b, _, i, o in inv.lora_shapes if b == 0))
    root = inv.embedding_params + inv.head_params + inv.final_norm_params
    if strategy == "ddp":
        grad_bytes *= 2  # DDP's gradient buckets (gradient_as_bucket_view=False, Lightning's default)
    elif strategy in ("fsdp", "fsdp2"):
        params_bytes, grad_bytes, opt_bytes, step_tmp = (
            math.ceil(params_bytes / n),
            math.ceil(grad_bytes / n),
            math.ceil(opt_bytes / n),
            math.ceil(step_tmp / n),
        )
        working = (root + 2 * largest_block) * dt.weight + (largest_block if lora is None else 0) * train_bytes
        if cpu_offload:
            host = params_bytes + grad_bytes + opt_bytes + step_tmp
            params_bytes = grad_bytes = opt_bytes = step_tmp = 0
    elif deepspeed:
        grad_bytes = math.ceil(grad_bytes / n)
        opt_bytes = math.ceil(opt_bytes / n)
        step_tmp = math.ceil(step_tmp / n)
        working = min(_DS_REDUCE_BUCKET, trainable) * train_bytes
        if strategy == "deepspeed_stage_3":
            params_bytes = math.ceil(params_bytes / n)
            working += (root + 2 * largest_block) * dt.weight
        else:
            working += min(_DS_ALLGATHER_BUCKET, trainable) * train_bytes
        if cpu_offload:
            host = grad_bytes + opt_bytes + step_tmp
            grad_bytes = opt_bytes = step_tmp = 0

    # ---- activations by phase
    ckpt = gradient_checkpointing
    bt = batch_size * run.tokens
    nv = run.masked * inv.vocab
    head = _head_saved(run)
    head_saved = head["final_norm"] + head["head_input"] + head["loss_vectors"] + head["inputs"]
    casts_fwd, casts_bwd = _weight_casts(run, ckpt)
    if ckpt:
        blocks_saved = (inv.num_layers) * bt * inv.width * dt.stream  # each block's input, kept by checkpoint()
        recompute = _block_saved(run)
    else:
        blocks_saved = _all_blocks_saved(run)
        recompute = 0
    logits_fwd = nv * dt.act + (4 * nv if dt.act != 4 else 0) + head["log_softmax"]
    logits_bwd = 3 * 4 * nv  # log_softmax output + nll grad + log_softmax grad, all fp32 [N, V]
    # Temporaries of one block beyond what it saves: in backward the gradients of SwiGLU's [T, F] tensors (the
    # product's, then silu's and up's together) and of the stream; in forward (they matter under checkpointing,
    # where nothing else is kept) up to four [T, F] tensors at once (gate/up outputs, LoRA branch, their product).
    block_tmp = bt * (3 * dt.act * inv.ffn + 2 * dt.stream * inv.width)
    block_fwd_tmp = bt * (4 * dt.act * inv.ffn + 4 * dt.stream * inv.width)
    if run.sdpa_kernel == "math":  # [B, H, T, T] fp32 scores + probabilities (forward), their gradients (backward)
        scores = 2 * 4 * batch_size * inv.heads * run.tokens * run.tokens
        block_tmp += scores
        block_fwd_tmp += scores
    if quantized:  # bitsandbytes dequantises one 4-bit weight at a time, forward and backward
        largest = max(i * o for _, i, o in inv.block_linears) * dt.weight
        block_tmp += largest
        block_fwd_tmp += largest
    head_grad = inv.head_params * dt.weight if lora is None else 0
    if strategy in ("fsdp", "fsdp2", "deepspeed_stage_3") or (deepspeed and cpu_offload):
        head_grad = 0  # reduce-scattered/offloaded as it is produced (within the working set)
    terms = {
        "blocks (saved)" if not ckpt else "checkpointed block inputs": blocks_saved,
        "head + loss (saved)": head_saved,
        "logits + cross-entropy": max(logits_fwd, logits_bwd),
        "recomputed block": recompute,
        "block temporaries": max(block_tmp, block_fwd_tmp),
        "autocast weight copies": casts_fwd,
    }
    act_forward = blocks_saved + head_saved + max(logits_fwd, block_fwd_tmp) + casts_fwd
    act_loss = blocks_saved + head_saved + logits_bwd + casts_bwd
    act_block = blocks_saved + head_saved + recompute + block_tmp + casts_bwd
    phases = {
        "forward": grad_bytes + act_forward,
        "loss backward": act_loss,
        "block backward": head_grad + act_block,
        "optimizer step": grad_bytes + step_tmp,
    }
    peak_phase = max(phases, key=lambda k: phases[k])
    static = params_bytes + opt_bytes + working
    overhead = overhead_bytes if overhead_bytes is not None else (CUDA_OVERHEAD_BYTES if device == "cuda" else 0)
    settings = {
        "backbone": family,
        "preset": preset if config is None else None,
        "stage": stage,
        "adapter": "none" if lora is None else ("qlora" if quantized else "lora"),
        "lora_rank": lora.rank if lora is not None else None,
        "strategy": strategy,
        "devices": devices,
        "cpu_offload": cpu_offload,
        "precision": precision,
        "weights_dtype": weights_dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "masked_fraction": masked_fraction,
        "device": device,
    }
    return MemoryEstimate(
        settings=settings,
        total_params=inv.total_params + (inv.lora_params if lora is not None else 0),
        trainable_params=trainable,
        parameters=params_bytes,
        gradients=grad_bytes,
        optimizer_states=opt_bytes,
        working_set=working,
        activations=max(act_forward, act_loss, act_block),
        optimizer_step=step_tmp,
        overhead=overhead,
        host_offload=host,
        peak=static + phases[peak_phase],
        peak_phase=peak_phase,
        phases=phases,
        activation_terms=terms,
    )


# ------------------------------------------------------------------------------------------------------ CLI
_CLASS_NAMES = {"lladabackbone": "llada", "sdarbackbone": "sdar"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dllm-zoo estimate-memory`` flags to ``parser``."""
    parser.add_argument("--backbone", default="llada", help="family: llada (LLaDA/MMaDA) or sdar (SDAR/TraDo)")
    parser.add_argument("--preset", required=True, help="size preset, e.g. llada-8b, mmada-8b, sdar-4b, sdar-8b")
    parser.add_argument("--stage", default="sft", choices=STAGES, help="pretrain/sft: rows of L; block_sft: 2L")
    parser.add_argument("--adapter", default="none", choices=ADAPTERS)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--lora-targets", nargs="+", default=None, help="default: the family's lora_target_modules")
    parser.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantisation")
    parser.add_argument("--seq-len", type=int, default=1024, help="row length L (block_sft doubles it)")
    parser.add_argument("--batch-size", type=int, default=1, help="per-device batch")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="per-block activation checkpointing")
    parser.add_argument("--precision", default="bf16-true", choices=PRECISIONS, help="Lightning precision")
    parser.add_argument(
        "--weights-dtype", default=None, choices=("float32", "bfloat16"), help="bf16-mixed: stored weight dtype"
    )
    parser.add_argument("--strategy", default="single", choices=STRATEGIES)
    parser.add_argument("--devices", type=int, default=1, help="devices the strategy spreads over")
    parser.add_argument("--cpu-offload", action="store_true", help="offload what the strategy can to host RAM")
    parser.add_argument(
        "--masked-fraction", type=float, default=1.0, help="fraction of positions masked (1.0: worst step)"
    )
    parser.add_argument(
        "--sdpa-kernel",
        default="auto",
        choices=("auto", "efficient", "math"),
        help="attention kernel (auto: math on CUDA for GQA with a mask, i.e. SDAR; else fused)",
    )
    parser.add_argument("--overhead-gib", type=float, default=None, help="fixed overhead (default 1 GiB)")
    parser.add_argument("--capacity-gib", type=float, default=None, help="also say whether it fits this much")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``dllm-zoo estimate-memory`` with parsed ``args``; print the table (or JSON).

    Raises:
        SystemExit: with the estimator's message (it names the flag to fix) on bad input.
    """
    backbone = _CLASS_NAMES.get(args.backbone.lower(), args.backbone.lower())
    try:
        est = estimate_memory(
            backbone,
            args.preset,
            stage=args.stage,
            adapter=args.adapter,
            lora_rank=args.lora_rank,
            lora_dropout=args.lora_dropout,
            lora_targets=args.lora_targets,
            double_quant=not args.no_double_quant,
            strategy=args.strategy,
            devices=args.devices,
            cpu_offload=args.cpu_offload,
            precision=args.precision,
            weights_dtype=args.weights_dtype,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            gradient_checkpointing=args.gradient_checkpointing,
            masked_fraction=args.masked_fraction,
            sdpa_kernel=args.sdpa_kernel,
            overhead_bytes=None if args.overhead_gib is None else round(args.overhead_gib * GiB),
        )
    except ValueError as err:
        raise SystemExit(f"dllm-zoo estimate-memory: {err}") from err
    if args.json:
        out = dataclasses.asdict(est)
        out.update(peak_gib=est.peak / GiB, total_gib=est.total / GiB)
        print(json.dumps(out, indent=2))
    else:
        print(est.table())
    if args.capacity_gib is not None:
        verdict = "fits" if est.fits(args.capacity_gib * GiB) else "does NOT fit"
        print(f"{est.total / GiB:.2f} GiB per device {verdict} in {args.capacity_gib:g} GiB")
    return 0
