"""LLaDA full-attention mask predictor, checkpoint-compatible with LLaDA-8B and MMaDA-8B.

LLaDA (Nie et al. 2025, "Large Language Diffusion Models") is a LLaMA-style pre-norm transformer run with
*bidirectional* attention; MMaDA (Yang et al. 2025) is the same network with the vocabulary resized for image
codes. Spec: research/tracerl_llada.md §4 (config and state-dict keys), research/mmada.md §2.1 (MMaDA config),
research/reference-semantics.md ("Checkpoint layouts").

Block math (``LLaDALlamaBlock``), with ``x`` the residual stream ``[B, L, D]``::

    n = attn_norm(x)
    h = x + attn_out(SDPA(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n), non-causal, scale 1/sqrt(head_dim)))
    m = ff_norm(h)
    y = h + ff_out(silu(ff_proj(m)) * up_proj(m))
    logits = transformer.ff_out(ln_f(x_final))          # untied LM head

The module tree mirrors the original so ``state_dict()`` has exactly the original keys
(``model.transformer.wte.weight``, ``model.transformer.blocks.{i}.q_proj.weight``, …,
``model.transformer.ff_out.weight``) and ``config.json`` uses the original OLMo-style field names. Differences
from the released modeling code, all deliberate: a ``[B, L]`` padding mask is a key-padding mask (the original
either ignored it or silently turned attention causal, research/tracerl_llada.md §4.2), RoPE is always fp32,
gradient checkpointing and logits at selected positions are supported, and so is a key/value cache that is
correct with padded batches (:class:`~dllm_zoo.backbones.cache.KVCache`: ``return_cache=True`` records every
block's post-RoPE keys/values; ``cache=`` runs a window against cached context keys, Fast-dLLM's prefix/dual
cache, research/tracerl_llada.md §7.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dllm_zoo.backbones.layers import RMSNorm, swiglu
from dllm_zoo.backbones.transformer import (
    LAYOUT_KEY,
    TransformerBackbone,
    TransformerConfig,
    WeightDType,
    attend,
    check_layout,
    gather_rows,
    infer_layout,
    layout_from_json,
    layout_to_json,
)
from dllm_zoo.tokenizers.layout import TokenLayout

# Re-exported: these lived here before the families shared them (dllm_zoo.backbones.transformer).
__all__ = [
    "LAYOUT_KEY",
    "LLaDABackbone",
    "LLaDABlock",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDATransformer",
    "check_layout",
    "infer_layout",
    "layout_from_json",
    "layout_to_json",
]

_ARCHITECTURES = {"llada": ["LLaDAModelLM"], "mmada": ["MMadaModelLM"]}

# config.json fields whose other values change the math; value -> allowed values. Checked on load, written on save.
_FIXED: dict[str, tuple[Any, ...]] = {
    "block_type": ("llama",),
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (False, None),
    "include_qkv_bias": (False, None),
    "attention_layer_norm": (False,),
    "rope": (True,),
    "alibi": (False,),
    "scale_logits": (False,),
    "input_emb_norm": (False,),
    "block_group_size": (1,),
    "clip_qkv": (None,),
    "embedding_dropout": (0.0, None),
    "attention_dropout": (0.0, None),
    "residual_dropout": (0.0, None),
}
# Informational fields of the original config.json (no effect here); written with these values unless loaded.
_INFO_DEFAULTS: dict[str, Any] = {
    "alibi_bias_max": 8.0,
    "attention_layer_norm_with_affine": True,
    "flash_attention": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "rope_full_precision": True,  # we always compute RoPE in fp32, whatever this says
    "use_cache": False,
}


@dataclass
class LLaDAConfig(TransformerConfig):
    """Hyper-parameters of a LLaDA/MMaDA network, with the ORIGINAL ``config.json`` field names.

    Attributes:
        d_model: Width ``D``.
        n_heads: Query heads.
        n_kv_heads: Key/value heads (GQA when smaller than ``n_heads``); ``None`` = ``n_heads`` (LLaDA: 32).
        n_layers: Transformer blocks.
        mlp_ratio: Inner width multiplier, used only when ``mlp_hidden_size`` is ``None``.
        mlp_hidden_size: SwiGLU inner width ``F`` (LLaDA-8B: 12288).
        max_sequence_length: Trained context length (informational; RoPE extends beyond it).
        vocab_size: Tokenizer vocabulary size.
        embedding_size: Rows of the embedding and LM head (padded vocabulary); ``None`` = ``vocab_size``.
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        mask_token_id: ``[MASK]`` id (must equal the token layout's ``mask_id``).
        eos_token_id: End-of-sequence id.
        pad_token_id: Padding id.
        init_std: Standard deviation of the normal init of fresh Linear/Embedding weights.
        weight_tying: Must be False (LLaDA's LM head is untied).
        include_bias: Must be False (no Linear biases).
        model_type: ``"llada"`` or ``"mmada"`` (written to config.json; selects ``architectures``).
        extra: Unknown config.json fields, kept verbatim so a loaded config saves back unchanged.
    """

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = None
    max_sequence_length: int = 4096
    vocab_size: int = 126464
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    init_std: float = 0.02
    weight_tying: bool = False
    include_bias: bool = False
    model_type: str = "llada"
    extra: dict[str, Any] = field(default_factory=dict)

    FAMILY: ClassVar[str] = "LLaDA"
    EXPECTED_ROWS: ClassVar[dict[int, str]] = {126464: "llada", 134656: "mmada"}  # released checkpoints' rows
    PRESET_LAYOUTS: ClassVar[dict[str, str]] = {
        "tiny": "default",
        "mini": "default",
        "small": "default",
        "llada-8b": "llada",
        "mmada-8b": "mmada",
    }

    def __post_init__(self) -> None:
        problems = []
        if self.weight_tying:
            problems.append(
                "weight_tying=True: LLaDA's LM head (transformer.ff_out) is untied; tied weights are unsupported"
            )
        if self.include_bias:
            problems.append("include_bias=True: LLaDA's Linear layers have no bias; biased checkpoints are unsupported")
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.n_heads % self.num_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.num_kv_heads}")
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            problems.append(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.num_embeddings:
                problems.append(f"{name}={getattr(self, name)} is outside the {self.num_embeddings} embedding rows")
        if self.model_type not in _ARCHITECTURES:
            problems.append(f"model_type={self.model_type!r}; expected one of {sorted(_ARCHITECTURES)}")
        if problems:
            raise ValueError("invalid LLaDAConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------- derived sizes
    @property
    def num_layers(self) -> int:
        """Transformer blocks (``n_layers``)."""
        return self.n_layers

    @property
    def head_dim(self) -> int:
        """Channels per head, ``d_model / n_heads`` (LLaDA-8B: 128)."""
        return self.d_model // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads with ``None`` resolved to ``n_heads``."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU inner width: ``mlp_hidden_size`` or ``mlp_ratio * d_model``."""
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def num_embeddings(self) -> int:
        """Rows of ``wte`` and of the LM head: ``embedding_size`` or ``vocab_size``."""
        return self.embedding_size if self.embedding_size is not None else self.vocab_size

    def resized(self, new_vocab: int) -> LLaDAConfig:
        """A copy with ``vocab_size = embedding_size = new_vocab`` (and MMaDA's ``new_vocab_size`` when present)."""
        config = dataclasses.replace(self, vocab_size=new_vocab, embedding_size=new_vocab)
        if "new_vocab_size" in config.extra:
            config.extra = {**config.extra, "new_vocab_size": new_vocab}
        return config

    # ------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, layout: TokenLayout | str | None = None) -> LLaDAConfig:
        """A named size.

        ``tiny`` (tests) and ``small`` (demo) take their vocabulary and special ids from ``layout`` (default:
        the embedded ``"default"`` layout, 336 rows); ``llada-8b`` / ``mmada-8b`` are the released 8B shapes.

        Args:
            name: ``tiny``, ``mini``, ``small``, ``llada-8b`` or ``mmada-8b``.
            layout: Token layout for ``tiny``/``small`` (ignored by the 8B presets, whose vocabularies are fixed).
        """
        if name not in cls.PRESET_LAYOUTS:
            raise ValueError(f"unknown LLaDA preset {name!r}; choose one of {cls.preset_names()}")
        if name in ("llada-8b", "mmada-8b"):
            lay = TokenLayout.preset(cls.PRESET_LAYOUTS[name])
            mmada = name == "mmada-8b"
            return cls(
                d_model=4096,
                n_heads=32,
                n_kv_heads=32,
                n_layers=32,
                mlp_hidden_size=12288,
                max_sequence_length=4096,
                vocab_size=lay.vocab_size,
                embedding_size=lay.vocab_size,
                rope_theta=500000.0,
                rms_norm_eps=1e-5,
                mask_token_id=lay.mask_id,
                eos_token_id=lay.eos_id,
                pad_token_id=lay.pad_id,
                model_type="mmada" if mmada else "llada",
                extra={"new_vocab_size": 134656, "llm_vocab_size": 126464, "codebook_size": 8192} if mmada else {},
            )
        lay = TokenLayout.resolve(layout if layout is not None else cls.PRESET_LAYOUTS[name])
        # tiny: tests; mini: the smallest that learns Arithmetic answers on a CPU in minutes; small: the benchmark.
        width, layers, heads, ffn = {"tiny": (64, 2, 4, 192), "mini": (128, 4, 4, 384)}.get(name, (512, 8, 8, 1536))
        return cls(
            d_model=width,
            n_heads=heads,
            n_kv_heads=heads,
            n_layers=layers,
            mlp_hidden_size=ffn,
            max_sequence_length=2048 if name == "small" else 1024,
            vocab_size=lay.vocab_size,
            embedding_size=lay.vocab_size,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            mask_token_id=lay.mask_id,
            eos_token_id=lay.eos_id,
            pad_token_id=lay.pad_id,
        )

    # ------------------------------------------------------------------------------------- config.json
    def to_json_dict(self, layout: TokenLayout | None = None) -> dict[str, Any]:
        """The original-style ``config.json`` content (keys sorted, as ``transformers`` writes them).

        Args:
            layout: When given, stored under ``"dllm_zoo_layout"`` so our checkpoints round-trip their layout
                (the original code ignores the key).
        """
        out: dict[str, Any] = {k: allowed[0] for k, allowed in _FIXED.items()}
        out.update(_INFO_DEFAULTS)
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["n_kv_heads"] = self.num_kv_heads
        out["mlp_hidden_size"] = self.ffn_hidden_size
        out["embedding_size"] = self.num_embeddings
        out.setdefault("architectures", _ARCHITECTURES[self.model_type])
        if layout is not None:
            out[LAYOUT_KEY] = layout_to_json(layout)
        return dict(sorted(out.items()))

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], source: str | Path = "config.json") -> LLaDAConfig:
        """Read an original LLaDA / MMaDA ``config.json`` (or one we wrote).

        Unknown fields are kept in :attr:`extra`; fields that would change the math (``weight_tying``,
        ``include_bias``, ``alibi``, ``block_type`` …) must have LLaDA's values.

        Args:
            data: Parsed JSON object.
            source: Named in error messages.

        Raises:
            ValueError: naming the offending field and ``source``.
        """
        problems = [
            f"{key}={data[key]!r} (supported: {' or '.join(repr(v) for v in allowed)})"
            for key, allowed in _FIXED.items()
            if key in data and data[key] not in allowed
        ]
        for key in ("weight_tying", "include_bias"):
            if data.get(key):
                problems.append(f"{key}={data[key]!r} (supported: False)")
        if problems:
            raise ValueError(f"{source}: unsupported LLaDA config: " + "; ".join(problems))
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {k: data[k] for k in names if k in data and data[k] is not None}
        if data.get("multi_query_attention"):  # OLMo: MQA = one key/value head
            if kwargs.get("n_kv_heads", 1) != 1:
                raise ValueError(f"{source}: multi_query_attention=true contradicts n_kv_heads={kwargs['n_kv_heads']}")
            kwargs["n_kv_heads"] = 1
        if "embedding_size" not in kwargs and data.get("new_vocab_size"):  # MMaDA's resized vocabulary
            kwargs["embedding_size"] = max(int(data["new_vocab_size"]), int(kwargs.get("vocab_size", 0)))
        if "rope_theta" in kwargs:
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        skip = names | set(_FIXED) | {LAYOUT_KEY}
        extra = {k: v for k, v in data.items() if k not in skip and _INFO_DEFAULTS.get(k, object()) != v}
        if extra.get("architectures") == _ARCHITECTURES.get(str(kwargs.get("model_type", "llada"))):
            del extra["architectures"]
        try:
            return cls(**kwargs, extra=extra)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err


# ------------------------------------------------------------------------------------------------ modules
class LLaDABlock(nn.Module):
    """One pre-norm LLaMA block with LLaDA's attribute names (``LLaDALlamaBlock``).

    Args:
        config: Network sizes.
    """

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads = config.n_heads
        self.n_kv_heads = config.num_kv_heads
        self.head_dim = hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        # q/k/v stay three Linear layers: the checkpoint keys are separate, and fusing them at run time would copy
        # the weights every step for no measurable gain at these widths.
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.ffn_hidden_size, bias=False)  # gate (through SiLU)
        self.up_proj = nn.Linear(d, config.ffn_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.ffn_hidden_size, d, bias=False)  # down projection

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None,
        context: tuple[Tensor, Tensor] | None = None,
        kv_out: list[tuple[Tensor, Tensor]] | None = None,
        queries: Tensor | None = None,
    ) -> Tensor:
        """One block.

        Args:
            x: Residual stream ``[B, L, D]``.
            cos: RoPE tables from :meth:`~dllm_zoo.backbones.layers.RotaryEmbedding.head_tables` (see :func:`attend`).
            sin: Same shape as ``cos``.
            attn_mask: ``None`` or bool mask broadcastable to ``[B, H, L, S + L]`` (True = may attend), ``S`` the
                context length (0 without ``context``); context keys come first.
            context: Cached ``(keys, values)``, each ``[B, H_kv, S, head_dim]`` (keys after RoPE), that the ``L``
                queries attend to in addition to their own keys.
            kv_out: When given, this block's own ``(keys, values)`` ``[B, H_kv, L, head_dim]`` (keys after RoPE;
                transposed views of ``[B, L, H_kv, head_dim]`` memory) are appended to it.
            queries: ``[B, K]`` positions whose output is wanted (the last block under ``logits_at``); ``None`` = all.

        Returns:
            ``[B, L, D]`` (``[B, K, D]`` with ``queries``).
        """
        b, seq, _ = x.shape
        n = self.attn_norm(x)
        if queries is not None:  # only these positions' outputs are needed (keys/values still from all)
            x = gather_rows(x, queries)
        q = self.q_proj(n if queries is None else gather_rows(n, queries)).view(b, -1, self.n_heads, self.head_dim)
        k = self.k_proj(n).view(b, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(n).view(b, seq, self.n_kv_heads, self.head_dim)
        h = x + self.attn_out(attend(q, k, v, cos, sin, attn_mask, context, kv_out, queries))
        return h + swiglu(self.ff_norm(h), self.ff_proj, self.up_proj, self.ff_out)


class LLaDATransformer(nn.Module):
    """``model.transformer``: embedding, blocks, final norm and the (untied) LM head ``ff_out``."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.num_embeddings, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_out = nn.Linear(config.d_model, config.num_embeddings, bias=False)


class LLaDAModel(nn.Module):
    """``model``: holds ``transformer`` so state-dict keys start with ``model.transformer.`` as in the original."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDABackbone(TransformerBackbone[LLaDAConfig]):
    """LLaDA / MMaDA full-attention mask predictor (see the module docstring for the math and key names).

    Forward, caches, checkpoints and resizing are the shared :class:`TransformerBackbone` machinery; this class
    supplies LLaDA's module tree and its default attention: bidirectional over every real key.

    Args:
        config: A preset name (``tiny``, ``mini``, ``small``, ``llada-8b``, ``mmada-8b``) or a :class:`LLaDAConfig`;
            ``None`` means ``tiny``. Must stay ``None`` when ``pretrained`` is given (the config then comes from
            config.json).
        layout: Token layout or preset name. Default: the preset's (``default`` for tiny/small, ``llada`` /
            ``mmada`` for the 8B presets), the layout saved in a checkpoint, or one inferred from the vocabulary.
        pretrained: A checkpoint directory (config.json + safetensors, original layout) to load, so that YAML
            ``init_args: {pretrained: /dir}`` works. Weights keep their stored dtype.
        gradient_checkpointing: Recompute each block in the backward pass while training.
        dtype: Weight dtype (``float32`` / ``bfloat16`` / ``float16``); ``None`` keeps a checkpoint's stored dtype
            (fresh weights: float32). Full fine-tuning of a bf16 release wants ``float32`` master weights.

    Example:
        >>> model = LLaDABackbone("tiny")
        >>> out = model(torch.randint(0, 256, (2, 16)))
        >>> out.logits.shape
        torch.Size([2, 16, 336])
    """

    config_class = LLaDAConfig
    # Matched inside the blocks only: `ff_out` is each block's down projection (model.transformer.blocks.{i}.ff_out),
    # never the LM head of the same leaf name (model.transformer.ff_out), which lies outside the blocks.
    lora_target_modules: ClassVar[tuple[str, ...]] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "attn_out",
        "ff_proj",
        "up_proj",
        "ff_out",
    )

    def __init__(
        self,
        config: LLaDAConfig | str | None = None,
        layout: TokenLayout | str | None = None,
        pretrained: str | None = None,
        gradient_checkpointing: bool = False,
        dtype: WeightDType | None = None,
    ) -> None:
        super().__init__(config, layout, pretrained, gradient_checkpointing, dtype)

    def _build_model(self, config: LLaDAConfig) -> None:
        self.model = LLaDAModel(config)

    @property
    def transformer(self) -> LLaDATransformer:
        """``self.model.transformer`` (embedding, blocks, final norm, LM head)."""
        return self.model.transformer

    def input_embedding(self) -> nn.Embedding:
        """The token embedding ``model.transformer.wte``."""
        return self.model.transformer.wte

    def final_norm(self) -> nn.Module:
        """The final RMSNorm ``model.transformer.ln_f``."""
        return self.model.transformer.ln_f

    def output_head(self) -> nn.Linear:
        """The untied vocabulary projection ``model.transformer.ff_out``."""
        return self.model.transformer.ff_out

    def transformer_blocks(self) -> nn.ModuleList:
        """The :class:`LLaDABlock` list (``model.transformer.blocks``)."""
        return self.model.transformer.blocks

    def _self_mask(
        self, padding: Tensor | None, position_ids: Tensor | None, batch: int, length: int, device: torch.device
    ) -> Tensor | None:
        """Bidirectional: every query attends to every real key (``[B, 1, 1, L]`` key padding, or ``None``)."""
        return None if padding is None else padding[:, None, None, :]
