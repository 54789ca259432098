"""SDAR / TraDo block-attention mask predictor, checkpoint-compatible with SDAR-4B/8B-Chat and TraDo.

SDAR (JetAstra) is the Qwen3 architecture with the causal mask replaced by a *block-causal* one: position ``p`` lies
in block ``p // block_size``; a query attends to every key of its own block (bidirectionally) and of all earlier
blocks, never to a later block. TraDo (dLLM-RL, TraceRL) checkpoints are ``save_pretrained`` of the same class.
Spec: research/tracerl_llada.md §3.1 (architecture, config.json, state-dict keys), §3.4–3.5 (absolute block grid,
sampling with a KV cache).

Block math (Qwen3 decoder layer), with ``x`` the residual stream ``[B, L, D]``::

    n = input_layernorm(x)
    q = q_norm(q_proj(n) per head);  k = k_norm(k_proj(n) per head)      # RMSNorm over head_dim, BEFORE RoPE
    h = x + o_proj(SDPA(RoPE(q), RoPE(k), v_proj(n), block-causal mask, GQA, scale 1/sqrt(head_dim)))
    m = post_attention_layernorm(h)
    y = h + down_proj(silu(gate_proj(m)) * up_proj(m))
    logits = lm_head(norm(x_final))                                        # untied LM head

The module tree mirrors HF Qwen3 so ``state_dict()`` has exactly the original keys (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ``model.layers.{i}.self_attn.q_norm.weight``, …, ``model.norm.weight``,
``lm_head.weight``) and ``config.json`` is SDAR's (``model_type: "sdar"``, ``architectures: ["SDARForCausalLM"]``,
``block_size``, ``mask_token_id``, HF Qwen3 field names). Differences from the released modeling code, all
deliberate: the block grid is always absolute (``position_ids // block_size``, so a left-padded row passing
``position_ids = cumsum(mask) - 1`` sees its batch-1 grid; research/tracerl_llada.md §3.4), a ``[B, L]`` padding
mask is a key-padding mask combined with the block mask, RoPE is fp32, and the key/value cache, gradient
checkpointing and logits at selected positions are the shared :class:`TransformerBackbone` machinery. Training
layouts (``[x_t | x_0]``, research/tracerl_llada.md §3.2–3.3) pass their own 4-D masks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dllm_zoo.backbones.attention import block_causal_mask
from dllm_zoo.backbones.layers import RMSNorm, SwiGLUMLP
from dllm_zoo.backbones.transformer import (
    LAYOUT_KEY,
    TransformerBackbone,
    TransformerConfig,
    WeightDType,
    attend,
    gather_rows,
    layout_to_json,
)
from dllm_zoo.tokenizers.layout import TokenLayout

MODEL_TYPE = "sdar"
ARCHITECTURES = ["SDARForCausalLM"]
AUTO_MAP = {
    "AutoConfig": "configuration_sdar.SDARConfig",
    "AutoModel": "modeling_sdar.SDARModel",
    "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
}

# config.json fields (not dataclass fields) whose other values change the math -> allowed values.
_FIXED: dict[str, tuple[Any, ...]] = {
    "model_type": (MODEL_TYPE,),
    "rope_scaling": (None,),
    "use_sliding_window": (False, None),
    "attention_dropout": (0.0, None),
    "mlp_bias": (False, None),
}
# Informational fields of SDAR's config.json (no effect here); written with these values unless loaded.
_INFO_DEFAULTS: dict[str, Any] = {
    "attention_dropout": 0.0,
    "rope_scaling": None,
    "sliding_window": None,
    "torch_dtype": "bfloat16",  # replaced by the weights' dtype on save
    "use_cache": True,
    "use_sliding_window": False,
}
# Read but not kept: transformers >= 5 writes rope_parameters / layer_types / dtype instead of SDAR's rope_theta /
# (nothing) / torch_dtype, and the dtype is whatever the weights are when saved again.
_CONSUMED = ("rope_parameters", "layer_types", "dtype", "torch_dtype")


@dataclass
class SDARConfig(TransformerConfig):
    """Hyper-parameters of an SDAR / TraDo network, with the HF Qwen3/SDAR ``config.json`` field names.

    Defaults are SDAR-8B-Chat's (research/tracerl_llada.md §3.1).

    Attributes:
        vocab_size: Rows of ``embed_tokens`` and ``lm_head`` (Qwen3: 151936).
        hidden_size: Width ``D``.
        intermediate_size: SwiGLU inner width ``F``.
        num_hidden_layers: Decoder layers.
        num_attention_heads: Query heads ``H``.
        num_key_value_heads: Key/value heads ``H_kv`` (GQA; must divide ``H``).
        head_dim: Channels per head (Qwen3 sets it explicitly: ``H * head_dim`` may differ from ``D``).
        hidden_act: Must be ``"silu"`` (SwiGLU).
        max_position_embeddings: Trained context length (informational; RoPE extends beyond it).
        initializer_range: Standard deviation of the normal init of fresh Linear/Embedding weights.
        rms_norm_eps: RMSNorm epsilon (all norms, the per-head q/k norms included).
        rope_theta: RoPE base.
        tie_word_embeddings: Must be False (SDAR's ``lm_head`` is untied).
        attention_bias: Must be False (no q/k/v/o biases).
        block_size: Tokens per attention block ``B`` (SDAR/TraDo: 4).
        mask_token_id: ``<|MASK|>`` id (must equal the token layout's ``mask_id``).
        bos_token_id: Beginning-of-sequence id.
        eos_token_id: End-of-sequence id (an int, or a list as some HF configs write).
        pad_token_id: Padding id, or ``None`` (HF Qwen3 configs often have none).
        extra: Unknown config.json fields, kept verbatim so a loaded config saves back unchanged.
    """

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    block_size: int = 4
    mask_token_id: int = 151669
    bos_token_id: int = 151643
    eos_token_id: int | list[int] = 151643
    pad_token_id: int | None = 151643
    extra: dict[str, Any] = field(default_factory=dict)

    FAMILY: ClassVar[str] = "SDAR"
    EXPECTED_ROWS: ClassVar[dict[int, str]] = {151936: "sdar"}  # Qwen3 vocabulary rows -> layout
    PRESET_LAYOUTS: ClassVar[dict[str, str]] = {
        "tiny": "default",
        "small": "default",
        "sdar-4b": "sdar",
        "sdar-8b": "sdar",
    }

    def __post_init__(self) -> None:
        problems = []
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings=True: SDAR's lm_head is untied; tied weights are unsupported")
        if self.attention_bias:
            problems.append("attention_bias=True: SDAR's q/k/v/o projections have no bias; unsupported")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.block_size <= 0:
            problems.append(f"block_size={self.block_size} must be > 0")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        ids = [("mask_token_id", self.mask_token_id), ("bos_token_id", self.bos_token_id)]
        ids += [("eos_token_id", i) for i in eos]
        if self.pad_token_id is not None:
            ids.append(("pad_token_id", self.pad_token_id))
        for name, value in ids:
            if not 0 <= value < self.vocab_size:
                problems.append(f"{name}={value} is outside the {self.vocab_size} embedding rows")
        if problems:
            raise ValueError("invalid SDARConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------- derived sizes
    @property
    def num_layers(self) -> int:
        """Decoder layers (``num_hidden_layers``)."""
        return self.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (``num_key_value_heads``)."""
        return self.num_key_value_heads

    @property
    def num_embeddings(self) -> int:
        """Rows of ``embed_tokens`` and ``lm_head`` (``vocab_size``)."""
        return self.vocab_size

    @property
    def init_std(self) -> float:
        """``initializer_range``."""
        return self.initializer_range

    def resized(self, new_vocab: int) -> SDARConfig:
        """A copy with ``vocab_size = new_vocab``."""
        return dataclasses.replace(self, vocab_size=new_vocab)

    # ------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, layout: TokenLayout | str | None = None) -> SDARConfig:
        """A named size.

        ``tiny`` (tests) and ``small`` (demo) take their vocabulary and special ids from ``layout`` (default: the
        embedded ``"default"`` layout, 336 rows); ``sdar-4b`` / ``sdar-8b`` are the released SDAR-*-Chat shapes
        (research/tracerl_llada.md §3.1) with the ``sdar`` layout.

        Args:
            name: ``tiny``, ``small``, ``sdar-4b`` or ``sdar-8b``.
            layout: Token layout for ``tiny``/``small`` (ignored by the released shapes, whose vocabulary is fixed).
        """
        if name not in cls.PRESET_LAYOUTS:
            raise ValueError(f"unknown SDAR preset {name!r}; choose one of {cls.preset_names()}")
        if name in ("sdar-4b", "sdar-8b"):
            lay = TokenLayout.preset(cls.PRESET_LAYOUTS[name])
            width, ffn = (2560, 9728) if name == "sdar-4b" else (4096, 12288)
            return cls(
                vocab_size=lay.vocab_size,
                hidden_size=width,
                intermediate_size=ffn,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                max_position_embeddings=32768,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                block_size=4,
                mask_token_id=lay.mask_id,
                bos_token_id=lay.bos_id,
                eos_token_id=lay.eos_id,
                pad_token_id=lay.pad_id,
            )
        lay = TokenLayout.resolve(layout if layout is not None else cls.PRESET_LAYOUTS[name])
        # (width, layers, heads, kv heads, head_dim, ffn): tiny costs about what LLaDA's tiny does.
        sizes = {"tiny": (64, 2, 4, 2, 16, 192), "small": (512, 8, 8, 4, 64, 1536)}[name]
        width, layers, heads, kv_heads, head_dim, ffn = sizes
        return cls(
            vocab_size=lay.vocab_size,
            hidden_size=width,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=2048 if name == "small" else 1024,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            block_size=4,
            mask_token_id=lay.mask_id,
            bos_token_id=lay.bos_id,
            eos_token_id=lay.eos_id,
            pad_token_id=lay.pad_id,
        )

    # ------------------------------------------------------------------------------------- config.json
    def to_json_dict(self, layout: TokenLayout | None = None) -> dict[str, Any]:
        """SDAR's ``config.json`` content (keys sorted, as ``transformers`` writes them).

        Args:
            layout: When given, stored under ``"dllm_zoo_layout"`` so our checkpoints round-trip their layout
                (the original code ignores the key).
        """
        out: dict[str, Any] = dict(_INFO_DEFAULTS)
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["model_type"] = MODEL_TYPE
        out.setdefault("architectures", list(ARCHITECTURES))
        out.setdefault("auto_map", dict(AUTO_MAP))
        if layout is not None:
            out[LAYOUT_KEY] = layout_to_json(layout)
        return dict(sorted(out.items()))

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], source: str | Path = "config.json") -> SDARConfig:
        """Read an SDAR / TraDo ``config.json`` (or one we wrote, or one written by transformers >= 5).

        Unknown fields are kept in :attr:`extra`. Fields that would change the math must have SDAR's values:
        ``tie_word_embeddings`` and ``attention_bias`` false, ``hidden_act`` silu, no ``rope_scaling`` (nor a
        non-default ``rope_parameters.rope_type``), no sliding window, no attention dropout, ``model_type`` sdar.
        A missing ``head_dim`` is ``hidden_size / num_attention_heads`` and a missing ``num_key_value_heads`` is
        ``num_attention_heads``, as in HF Qwen3.

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
        for key in ("tie_word_embeddings", "attention_bias"):
            if data.get(key):
                problems.append(f"{key}={data[key]!r} (supported: False)")
        if data.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={data['hidden_act']!r} (supported: 'silu')")
        layer_types = data.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            problems.append(f"layer_types={layer_types!r} (supported: only 'full_attention')")
        rope = data.get("rope_parameters")
        rope_theta = data.get("rope_theta")
        if rope is not None:
            if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
                problems.append(f"rope_parameters={rope!r} (supported: rope_type 'default')")
            elif rope.get("rope_theta") is not None:
                if rope_theta is not None and float(rope_theta) != float(rope["rope_theta"]):
                    problems.append(f"rope_theta={rope_theta!r} contradicts rope_parameters={rope!r}")
                rope_theta = rope["rope_theta"]
        if problems:
            raise ValueError(f"{source}: unsupported SDAR config: " + "; ".join(problems))
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {k: data[k] for k in names if k in data and data[k] is not None}
        if rope_theta is not None:
            kwargs["rope_theta"] = float(rope_theta)
        if "head_dim" not in kwargs and "hidden_size" in kwargs and "num_attention_heads" in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "pad_token_id" in data and data["pad_token_id"] is None:
            kwargs["pad_token_id"] = None  # HF Qwen3 writes an explicit null: keep it
        skip = names | set(_CONSUMED) | {LAYOUT_KEY, "model_type"}
        extra = {k: v for k, v in data.items() if k not in skip and _INFO_DEFAULTS.get(k, object()) != v}
        for key, standard in (("architectures", ARCHITECTURES), ("auto_map", AUTO_MAP)):
            if extra.get(key) == standard:
                del extra[key]
        try:
            return cls(**kwargs, extra=extra)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err


# ------------------------------------------------------------------------------------------------ modules
class SDARAttention(nn.Module):
    """``self_attn``: q/k/v/o projections and the per-head q/k RMSNorms (applied before RoPE), HF Qwen3 names.

    Args:
        config: Network sizes.
    """

    def __init__(self, config: SDARConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

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
        """Attention of the normalised stream ``x`` ``[B, L, D]`` -> ``[B, L or K, D]`` (arguments: :func:`attend`)."""
        b, seq, _ = x.shape
        xq = x if queries is None else gather_rows(x, queries)
        q = self.q_norm(self.q_proj(xq).view(b, -1, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, seq, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, seq, self.n_kv_heads, self.head_dim)
        return self.o_proj(attend(q, k, v, cos, sin, attn_mask, context, kv_out, queries))


class SDARDecoderLayer(nn.Module):
    """``model.layers.{i}``: one pre-norm Qwen3 decoder layer.

    Args:
        config: Network sizes.
    """

    def __init__(self, config: SDARConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SDARAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

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
        """One layer on the residual stream ``x`` ``[B, L, D]`` -> ``[B, L, D]`` (``[B, K, D]`` with ``queries``).

        Args:
            x: Residual stream ``[B, L, D]``.
            cos: RoPE tables from :meth:`~dllm_zoo.backbones.layers.RotaryEmbedding.head_tables` (see :func:`attend`).
            sin: Same shape as ``cos``.
            attn_mask: ``None`` or bool mask broadcastable to ``[B, H, L, S + L]`` (True = may attend), ``S`` the
                context length (0 without ``context``); context keys come first.
            context: Cached ``(keys, values)``, each ``[B, H_kv, S, head_dim]`` (keys after RoPE).
            kv_out: When given, this layer's own post-RoPE ``(keys, values)`` ``[B, H_kv, L, head_dim]`` are
                appended to it.
            queries: ``[B, K]`` positions whose output is wanted (the last layer under ``logits_at``); ``None`` = all.
        """
        residual = x if queries is None else gather_rows(x, queries)
        h = residual + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, context, kv_out, queries)
        return h + self.mlp(self.post_attention_layernorm(h))


class SDARModel(nn.Module):
    """``model``: embedding, decoder layers and final norm (keys ``model.embed_tokens``, ``model.layers``, …)."""

    def __init__(self, config: SDARConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SDARDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class SDARBackbone(TransformerBackbone[SDARConfig]):
    """SDAR / TraDo block-attention mask predictor (see the module docstring for the math and key names).

    Forward, caches, checkpoints and resizing are the shared :class:`TransformerBackbone` machinery; this class
    supplies the Qwen3 module tree and its default attention: block-causal on the absolute grid
    ``position_ids // config.block_size`` (``0..L-1`` without ``position_ids``), restricted to real keys by a
    ``[B, L]`` padding mask. A ``[B, 1, L, L]`` bool mask replaces it (training layouts). With ``cache`` the window
    attends to every real cached key and block-causally to its own keys, so sampling is: prefill the full prompt
    blocks with ``return_cache=True``, run the active block against the cache, and append each finished block's
    ``return_cache`` output with :meth:`KVCache.cat` (exact: earlier blocks never see later ones). Exactness needs
    every cut to fall on a block boundary of every row: a cached key must have seen its whole block. Left-padded
    rows (``position_ids = cumsum(mask) - 1``) therefore need padding by whole blocks, or rows shifted by whole
    blocks as :class:`~dllm_zoo.samplers.block.BlockSampler` does.

    Args:
        config: A preset name (``tiny``, ``small``, ``sdar-4b``, ``sdar-8b``) or an :class:`SDARConfig`; ``None``
            means ``tiny``. Must stay ``None`` when ``pretrained`` is given (the config then comes from
            config.json).
        layout: Token layout or preset name. Default: the preset's (``default`` for tiny/small, ``sdar`` for the
            released shapes), the layout saved in a checkpoint, or one inferred from the vocabulary (151936 rows ->
            ``sdar``).
        pretrained: A checkpoint directory (config.json + safetensors, original layout) to load, so that YAML
            ``init_args: {pretrained: /dir}`` works. Weights keep their stored dtype.
        gradient_checkpointing: Recompute each layer in the backward pass while training.
        dtype: Weight dtype (``float32`` / ``bfloat16`` / ``float16``); ``None`` keeps a checkpoint's stored dtype
            (fresh weights: float32). Full fine-tuning of a bf16 release wants ``float32`` master weights.

    Example:
        >>> model = SDARBackbone("tiny")
        >>> out = model(torch.randint(0, 256, (2, 16)))
        >>> out.logits.shape
        torch.Size([2, 16, 336])
    """

    config_class = SDARConfig
    # HF Qwen3 names, matched inside model.layers.{i} (self_attn.* and mlp.*); lm_head is never adapted.
    lora_target_modules: ClassVar[tuple[str, ...]] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __init__(
        self,
        config: SDARConfig | str | None = None,
        layout: TokenLayout | str | None = None,
        pretrained: str | None = None,
        gradient_checkpointing: bool = False,
        dtype: WeightDType | None = None,
    ) -> None:
        super().__init__(config, layout, pretrained, gradient_checkpointing, dtype)

    def _build_model(self, config: SDARConfig) -> None:
        self.model = SDARModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def block_size(self) -> int:
        """Tokens per attention block (``config.block_size``)."""
        return self.config.block_size

    def input_embedding(self) -> nn.Embedding:
        """The token embedding ``model.embed_tokens``."""
        return self.model.embed_tokens

    def final_norm(self) -> nn.Module:
        """The final RMSNorm ``model.norm``."""
        return self.model.norm

    def output_head(self) -> nn.Linear:
        """The untied vocabulary projection ``lm_head``."""
        return self.lm_head

    def transformer_blocks(self) -> nn.ModuleList:
        """The :class:`SDARDecoderLayer` list (``model.layers``)."""
        return self.model.layers

    def _self_mask(
        self, padding: Tensor | None, position_ids: Tensor | None, batch: int, length: int, device: torch.device
    ) -> Tensor | None:
        """Block-causal on the absolute grid, real keys only: ``[B or 1, 1, L, L]`` bool."""
        if position_ids is None:  # one [1, L] grid broadcasts over the batch
            position_ids = torch.arange(length, device=device)[None]
        return block_causal_mask(position_ids.to(device), self.config.block_size, padding)

    def _config_json(self) -> dict[str, Any]:
        """SDAR's config.json with ``torch_dtype`` naming the dtype the weights are saved in."""
        data = super()._config_json()
        data["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        return data
