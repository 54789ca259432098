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
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dllm_zoo.backbones.attention import key_padding_to_sdpa, to_sdpa_mask
from dllm_zoo.backbones.base import Backbone, BackboneOutput
from dllm_zoo.backbones.cache import KVCache
from dllm_zoo.backbones.checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    load_state_dict,
    read_json,
    save_state_dict,
    write_json_atomic,
)
from dllm_zoo.backbones.layers import RMSNorm, RotaryEmbedding, apply_rotary, swiglu
from dllm_zoo.tokenizers.layout import TokenLayout

LAYOUT_KEY = "dllm_zoo_layout"
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
_EXPECTED_ROWS = {126464: "llada", 134656: "mmada"}  # embedding rows of the released checkpoints -> layout


@dataclass
class LLaDAConfig:
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

    # ------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset_names(cls) -> list[str]:
        """Names accepted by :meth:`preset`."""
        return list(cls.PRESET_LAYOUTS)

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

    @classmethod
    def from_dir(cls, path: str | Path) -> tuple[LLaDAConfig, TokenLayout | None]:
        """Read ``config.json`` of a checkpoint directory.

        Returns:
            The config and the layout saved under ``"dllm_zoo_layout"`` (``None`` for original checkpoints).

        Raises:
            FileNotFoundError: naming the missing ``config.json``.
        """
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: a LLaDA checkpoint directory needs its config.json")
        data = read_json(file)
        saved = data.get(LAYOUT_KEY)
        layout = layout_from_json(saved, file) if saved is not None else None
        return cls.from_json_dict(data, file), layout


def layout_to_json(layout: TokenLayout) -> dict[str, Any]:
    """A token layout as a JSON object (every dataclass field)."""
    out = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    out["special_tokens"] = dict(layout.special_tokens)
    return out


def layout_from_json(data: Any, source: str | Path = "config.json") -> TokenLayout:
    """Inverse of :func:`layout_to_json`; raises ``ValueError`` naming ``source`` on a malformed entry."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {LAYOUT_KEY!r} must be an object of TokenLayout fields")
    known = {f.name for f in dataclasses.fields(TokenLayout)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: {LAYOUT_KEY!r} has unknown TokenLayout fields {unknown}")
    try:
        return TokenLayout(**data)
    except TypeError as err:
        raise ValueError(f"{source}: {LAYOUT_KEY!r} is incomplete: {err}") from err


def check_layout(config: LLaDAConfig, layout: TokenLayout) -> None:
    """Raise ``ValueError`` naming both when a layout does not fit a config (rows, mask id)."""
    problems = []
    if config.num_embeddings < layout.vocab_size:
        problems.append(
            f"the config has {config.num_embeddings} embedding rows < layout vocab_size={layout.vocab_size}"
        )
    if config.mask_token_id != layout.mask_id:
        problems.append(f"config mask_token_id={config.mask_token_id} != layout mask_id={layout.mask_id}")
    if problems:
        raise ValueError(f"token layout {layout.name!r} does not fit the LLaDA config: " + "; ".join(problems))


def infer_layout(config: LLaDAConfig, saved: TokenLayout | None = None) -> TokenLayout | None:
    """The token layout that belongs to a config, or ``None`` when it cannot be told.

    In order: the layout saved in config.json; the released vocabularies by embedding rows (126464 -> ``llada``,
    134656 -> ``mmada``); the embedded ``default`` layout when the config has exactly its rows and mask id.
    """
    if saved is not None:
        return saved
    name = _EXPECTED_ROWS.get(config.num_embeddings)
    if name is not None:
        return TokenLayout.preset(name)
    default = TokenLayout.preset("default")
    if config.num_embeddings == default.vocab_size and config.mask_token_id == default.mask_id:
        return default
    return None


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
    ) -> Tensor:
        """One block.

        Args:
            x: Residual stream ``[B, L, D]``.
            cos: RoPE table, fp32 ``[L, head_dim]`` or ``[B, L, head_dim]``.
            sin: Same shape as ``cos``.
            attn_mask: ``None`` or bool mask broadcastable to ``[B, H, L, S + L]`` (True = may attend), ``S`` the
                context length (0 without ``context``); context keys come first.
            context: Cached ``(keys, values)``, each ``[B, H_kv, S, head_dim]`` (keys after RoPE), that the ``L``
                queries attend to in addition to their own keys.
            kv_out: When given, this block's own ``(keys, values)`` ``[B, H_kv, L, head_dim]`` (keys after RoPE;
                transposed views of ``[B, L, H_kv, head_dim]`` memory) are appended to it.

        Returns:
            ``[B, L, D]``.
        """
        b, seq, _ = x.shape
        n = self.attn_norm(x)
        # RoPE on the [B, L, H, hd] projection layout, then a free transpose to SDPA's [B, H, L, hd].
        q = apply_rotary(self.q_proj(n).view(b, seq, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rotary(self.k_proj(n).view(b, seq, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(n).view(b, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if kv_out is not None:
            kv_out.append((k, v))
        if context is not None:
            k = torch.cat((context[0], k), dim=2)
            v = torch.cat((context[1], v), dim=2)
        # Never causal (masked diffusion). SDPA's default scale is 1/sqrt(head_dim), as in LLaDA.
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=False, enable_gqa=self.n_kv_heads != self.n_heads
        )
        h = x + self.attn_out(a.transpose(1, 2).reshape(b, seq, self.n_heads * self.head_dim))
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


class LLaDABackbone(Backbone):
    """LLaDA / MMaDA full-attention mask predictor (see the module docstring for the math and key names).

    Args:
        config: A preset name (``tiny``, ``small``, ``llada-8b``, ``mmada-8b``) or a :class:`LLaDAConfig`;
            ``None`` means ``tiny``. Must stay ``None`` when ``pretrained`` is given (the config then comes from
            config.json).
        layout: Token layout or preset name. Default: the preset's (``default`` for tiny/small, ``llada`` /
            ``mmada`` for the 8B presets), the layout saved in a checkpoint, or one inferred from the vocabulary.
        pretrained: A checkpoint directory (config.json + safetensors, original layout) to load, so that YAML
            ``init_args: {pretrained: /dir}`` works. Weights keep their stored dtype.
        gradient_checkpointing: Recompute each block in the backward pass while training.

    Example:
        >>> model = LLaDABackbone("tiny")
        >>> out = model(torch.randint(0, 256, (2, 16)))
        >>> out.logits.shape
        torch.Size([2, 16, 336])
    """

    def __init__(
        self,
        config: LLaDAConfig | str | None = None,
        layout: TokenLayout | str | None = None,
        pretrained: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        if pretrained is not None:
            if config is not None:
                raise ValueError(
                    f"pass either `config` or `pretrained`, not both: the config of {pretrained} comes from its "
                    f"config.json (got config={config!r})"
                )
            cfg, lay = _pretrained_config(pretrained, layout, {})
            with torch.device("meta"):  # no allocation: the checkpoint tensors are assigned as parameters
                self._build(cfg, lay)
            self._load_weights(pretrained)
            return
        if config is None:
            config = "tiny"
        if isinstance(config, str):
            lay_arg = layout if layout is not None else LLaDAConfig.PRESET_LAYOUTS.get(config)
            cfg = LLaDAConfig.preset(config, lay_arg)
            resolved = TokenLayout.resolve(lay_arg) if lay_arg is not None else None
        else:
            cfg = config
            resolved = TokenLayout.resolve(layout) if layout is not None else infer_layout(cfg)
            if resolved is None:
                raise ValueError(
                    f"cannot infer the token layout of a LLaDAConfig with {cfg.num_embeddings} embedding rows and "
                    f"mask_token_id={cfg.mask_token_id}: pass `layout=` (one of {TokenLayout.preset_names()} or a "
                    "TokenLayout)"
                )
        assert resolved is not None
        self._build(cfg, resolved)
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------- construction
    def _build(self, config: LLaDAConfig, layout: TokenLayout) -> None:
        check_layout(config, layout)
        self.config = config
        self.layout = layout
        self.model = LLaDAModel(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def reset_parameters(self) -> None:
        """Fresh init: normal(0, ``init_std``) for every Linear and Embedding weight, ones for the norms.

        Deterministic under ``torch.manual_seed`` (modules are visited in registration order).
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def transformer(self) -> LLaDATransformer:
        """``self.model.transformer`` (embedding, blocks, final norm, LM head)."""
        return self.model.transformer

    def output_head(self) -> nn.Linear:
        """The untied vocabulary projection ``model.transformer.ff_out``."""
        return self.transformer.ff_out

    def transformer_blocks(self) -> nn.ModuleList:
        """The :class:`LLaDABlock` list (``model.transformer.blocks``)."""
        return self.model.transformer.blocks

    # --------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: Tensor | None = None,
        return_hidden: bool = False,
        return_logits: bool = True,
        return_cache: bool = False,
    ) -> BackboneOutput:
        """Run the mask predictor with bidirectional attention, over a whole canvas or over a window.

        Without ``cache`` the ``L`` input positions attend to each other. With ``cache`` they are a *window* of
        ``W`` positions whose queries attend to the ``S`` context keys of the cache and to the window's own keys
        (bidirectionally, never causally); outputs exist only for the window. Exact when the cached keys were
        computed from the current canvas (e.g. a prefix/suffix cut of ``return_cache=True`` of a full forward
        over the same tokens); otherwise the context is as stale as the canvas it was computed from (Fast-dLLM
        prefix/dual cache, research/tracerl_llada.md §7.2).

        Args:
            input_ids: ``[B, L]`` token ids (``[B, W]`` with ``cache``).
            attention_mask: Without ``cache``: ``None`` (attend everywhere), ``[B, L]`` key padding (1 = real
                token; padding keys are never attended, padding queries get finite but meaningless outputs) or a
                ``[B, 1, L, L]`` bool mask (True = may attend); never turned causal; an all-ones ``[B, L]`` mask
                takes the unmasked SDPA path. With ``cache``: ``None`` or ``[B, W]`` key padding of the window's
                own keys (the context's padding is ``cache.key_mask``).
            position_ids: ``[B, L]`` RoPE positions (default ``0..L-1``; left-padded rows may pass
                ``cumsum(mask) - 1`` so real tokens start at position 0). Required with ``cache``: the window's
                absolute positions, as used for the cached keys' canvas.
            cache: A :class:`KVCache` of context keys/values (post-RoPE) with one entry per block, batch ``B`` and
                this model's ``H_kv`` and ``head_dim``.
            logits_at: ``[B, L]`` bool -> logits ``[N, V]`` at the True positions (row-major);
                ``[B, K]`` integer -> logits ``[B, K, V]`` at those positions. The hidden states are gathered before
                the vocabulary projection, which dominates memory at 126k rows.
            return_hidden: Also return the final (post-``ln_f``) hidden states ``[B, L, D]``.
            return_logits: False skips the vocabulary projection (``logits=None``).
            return_cache: Also return this forward's own keys/values for the ``L`` input positions as a
                :class:`KVCache` (``[B, H_kv, L, head_dim]`` per block, keys after RoPE, ``key_mask`` = the
                ``[B, L]`` padding mask as bool or ``None``); with ``cache``, the window's keys only, not the
                concatenation. Turns gradient checkpointing off for this call.

        Returns:
            :class:`BackboneOutput` with ``logits`` ``[B, L, V]`` (or as selected by ``logits_at``) and ``cache``
            when ``return_cache``.

        Raises:
            ValueError: on wrong shapes, a missing ``position_ids`` with ``cache``, a cache that does not fit the
                model or batch, or ``return_cache`` with a 4-D ``attention_mask`` (it has no per-key padding).
            TypeError: when ``cache`` is not a :class:`KVCache`.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        b, seq = input_ids.shape
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != seq):
            raise ValueError(f"position_ids must be [B, L] = [{b}, {seq}], got shape {tuple(position_ids.shape)}")
        tr = self.model.transformer
        if cache is None and not return_cache:  # the training path: nothing extra per forward
            mask = to_sdpa_mask(attention_mask, b, seq)
            cos, sin = self.rotary(seq, input_ids.device, position_ids)
            x = tr.wte(input_ids)
            recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
            for block in tr.blocks:
                if recompute:
                    x = cast(Tensor, checkpoint(block, x, cos, sin, mask, use_reentrant=False))
                else:
                    x = block(x, cos, sin, mask)
            h = tr.ln_f(x)
            logits = tr.ff_out(_select(h, logits_at)) if return_logits else None
            return BackboneOutput(logits=logits, hidden=h if return_hidden else None)

        if attention_mask is not None and attention_mask.dim() != 2:  # cache path from here on
            raise ValueError(
                "with `cache` or `return_cache`, attention_mask must be None or a [B, L] key-padding mask, got shape "
                f"{tuple(attention_mask.shape)} (a 4-D mask has no per-key padding to cache or combine)"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (b, seq):
            raise ValueError(f"attention_mask [B, L] must have shape {(b, seq)}, got {tuple(attention_mask.shape)}")
        own_mask = None if attention_mask is None else _as_bool(attention_mask)
        if cache is None:
            mask = to_sdpa_mask(own_mask, b, seq)
        else:
            self._check_cache(cache, b, position_ids)
            mask = _window_mask(cache, own_mask, b, seq)
        cos, sin = self.rotary(seq, input_ids.device, position_ids)
        x = tr.wte(input_ids)
        kv: list[tuple[Tensor, Tensor]] | None = [] if return_cache else None
        for i, block in enumerate(tr.blocks):
            context = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, cos, sin, mask, context, kv)
        h = tr.ln_f(x)
        logits = tr.ff_out(_select(h, logits_at)) if return_logits else None
        out_cache = None
        if kv is not None:
            out_cache = KVCache([k for k, _ in kv], [v for _, v in kv], own_mask)
        return BackboneOutput(logits=logits, hidden=h if return_hidden else None, cache=out_cache)

    def _check_cache(self, cache: Any, batch: int, position_ids: Tensor | None) -> None:
        """Refuse a cache that is no fitting :class:`KVCache`, or a window without ``position_ids``."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (from forward(..., return_cache=True)), got {type(cache)!r}")
        if position_ids is None:
            raise ValueError(
                "forward(cache=...) needs position_ids [B, W]: the window's absolute RoPE positions (the cached keys "
                "carry theirs), e.g. position_ids[:, s:e] of the full canvas"
            )
        cfg = self.config
        _, h_kv, _, hd = cache.keys[0].shape
        if (
            cache.n_layers != cfg.n_layers
            or cache.batch_size != batch
            or (h_kv, hd) != (cfg.num_kv_heads, cfg.head_dim)
        ):
            raise ValueError(
                f"cache does not fit: it has {cache.n_layers} layers and keys {tuple(cache.keys[0].shape)} "
                f"[B, H_kv, S, head_dim]; this model and input need {cfg.n_layers} layers and "
                f"[{batch}, {cfg.num_kv_heads}, S, {cfg.head_dim}]"
            )

    # ------------------------------------------------------------------------------------------ vocabulary
    def resize_token_embeddings(self, new_vocab: int, layout: TokenLayout | str | None = None) -> None:
        """Grow ``wte`` and the LM head to ``new_vocab`` rows (MMaDA adds 8192 image codes to LLaDA's 126464).

        New rows of both matrices are set to the mean of the existing rows, so new tokens start from an
        "average token" and the output distribution over old tokens is unchanged at first. (HF's
        ``resize_token_embeddings`` is version dependent: random init in older releases, mean-resizing in newer
        ones; research/mmada.md §2.2.) ``config.vocab_size`` and ``config.embedding_size`` become ``new_vocab``.
        Resize before building the optimizer: the two weights are new Parameters.

        Args:
            new_vocab: Rows after resizing (>= the current rows).
            layout: New token layout to adopt at the same time (e.g. ``"mmada"``), checked against the config.
        """
        tr = self.model.transformer
        old = tr.wte.num_embeddings
        if new_vocab < old:
            raise ValueError(f"resize_token_embeddings only grows the vocabulary: {new_vocab} < {old} rows")
        new_layout = TokenLayout.resolve(layout) if layout is not None else self.layout
        if new_vocab > old:
            for module in (tr.wte, tr.ff_out):
                w = module.weight
                with torch.no_grad():
                    mean = w.float().mean(dim=0, keepdim=True).to(w.dtype)
                    grown = torch.cat([w.detach(), mean.expand(new_vocab - old, -1)], dim=0)
                module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
            tr.wte.num_embeddings = new_vocab
            tr.ff_out.out_features = new_vocab
        config = dataclasses.replace(self.config, vocab_size=new_vocab, embedding_size=new_vocab)
        if "new_vocab_size" in config.extra:
            config.extra = {**config.extra, "new_vocab_size": new_vocab}
        check_layout(config, new_layout)
        self.config = config
        self.layout = new_layout

    # --------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        layout: TokenLayout | str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> LLaDABackbone:
        """Load an original LLaDA / MMaDA checkpoint directory (or one written by :meth:`save_pretrained`).

        The module is built on the meta device and the loaded tensors are assigned as its parameters, so an 8B
        model is allocated once. Keys and shapes are checked strictly before any data is read.

        Args:
            path: Directory with ``config.json`` and ``model.safetensors`` or shards + index.
            layout: Token layout; default: the one saved in config.json (``dllm_zoo_layout``), else inferred from
                the rows (126464 -> ``llada``, 134656 -> ``mmada``).
            dtype: Cast floating weights to this dtype (``None`` keeps the stored dtype, bf16 for the releases).
            device: Where the weights are created.
            **overrides: ``gradient_checkpointing=`` or :class:`LLaDAConfig` fields to replace after reading
                config.json (e.g. ``max_sequence_length``).

        Raises:
            FileNotFoundError: naming a missing config.json or weights file.
            ValueError: on an unsupported config field, a layout mismatch or a key/shape mismatch.
        """
        gradient_checkpointing = bool(overrides.pop("gradient_checkpointing", False))
        cfg, lay = _pretrained_config(path, layout, overrides)
        with torch.device("meta"):
            model = cls(cfg, layout=lay, gradient_checkpointing=gradient_checkpointing)
        model._load_weights(path, dtype=dtype, device=device)
        return model

    def _load_weights(
        self, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> None:
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        state = load_state_dict(path, expected, device=device, dtype=dtype)
        self.load_state_dict(state, strict=True, assign=True)

    def save_pretrained(self, path: str | Path, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
        """Write ``config.json`` (original field names + ``dllm_zoo_layout``) and safetensors in the original keys.

        One ``model.safetensors`` when everything fits in ``max_shard_size`` bytes, else
        ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, as ``transformers`` does. Every
        file is written to a temporary name and renamed.

        Args:
            path: Output directory (created if needed; other files in it are left alone).
            max_shard_size: Byte budget per shard (default 5 GiB).
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config.to_json_dict(self.layout), root / CONFIG_NAME)
        save_state_dict(self.state_dict(), root, max_shard_size=max_shard_size)


def _as_bool(mask: Tensor) -> Tensor:
    """A 0/1 (or bool) mask as bool."""
    return mask if mask.dtype == torch.bool else mask != 0


def _window_mask(cache: KVCache, own: Tensor | None, batch: int, width: int) -> Tensor | None:
    """SDPA mask ``[B, 1, 1, S + W]`` of a window forward (context keys first), or ``None`` when no key is padding.

    Args:
        cache: The context; its ``key_mask`` (``None`` = all real) covers the first ``S`` keys.
        own: ``[B, W]`` bool key padding of the window's own keys, or ``None`` (all real).
        batch: ``B``.
        width: ``W``.
    """
    if cache.key_mask is None and own is None:
        return None
    device = cache.keys[0].device
    ctx = cache.key_mask
    if ctx is None:
        ctx = torch.ones(batch, cache.seq_len, dtype=torch.bool, device=device)
    if own is None:
        own = torch.ones(batch, width, dtype=torch.bool, device=device)
    return key_padding_to_sdpa(torch.cat((ctx.to(device), own.to(device)), dim=1))


def _select(h: Tensor, logits_at: Tensor | None) -> Tensor:
    """Hidden states ``[B, L, D]`` at the positions where logits are wanted (see ``LLaDABackbone.forward``)."""
    if logits_at is None:
        return h
    b, seq, d = h.shape
    if logits_at.dtype == torch.bool:
        if tuple(logits_at.shape) != (b, seq):
            raise ValueError(f"bool logits_at must be [B, L] = [{b}, {seq}], got shape {tuple(logits_at.shape)}")
        return h[logits_at]
    if logits_at.is_floating_point() or logits_at.dim() != 2 or logits_at.shape[0] != b:
        raise ValueError(
            f"logits_at must be a [B, L] bool mask or a [B, K] integer index tensor with B={b}, got "
            f"{logits_at.dtype} of shape {tuple(logits_at.shape)}"
        )
    return torch.gather(h, 1, logits_at.long().unsqueeze(-1).expand(-1, -1, d))


def _pretrained_config(
    path: str | Path, layout: TokenLayout | str | None, overrides: dict[str, Any]
) -> tuple[LLaDAConfig, TokenLayout]:
    """Config (with overrides) and layout of a checkpoint directory."""
    cfg, saved = LLaDAConfig.from_dir(path)
    if overrides:
        valid = {f.name for f in dataclasses.fields(LLaDAConfig)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(
                f"unknown overrides {unknown}: use gradient_checkpointing or LLaDAConfig fields {sorted(valid)}"
            )
        cfg = dataclasses.replace(cfg, **overrides)
    lay = TokenLayout.resolve(layout) if layout is not None else infer_layout(cfg, saved)
    if lay is None:
        raise ValueError(
            f"cannot infer the token layout of {Path(path) / CONFIG_NAME} ({cfg.num_embeddings} embedding rows, "
            f"no {LAYOUT_KEY!r} entry): pass layout= (one of {TokenLayout.preset_names()} or a TokenLayout)"
        )
    check_layout(cfg, lay)
    return cfg, lay
