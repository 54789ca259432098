"""Machinery shared by the transformer backbone families: LLaDA (full attention) and SDAR (block attention).

Both families are pre-norm RoPE transformers. They differ in their module names (hence checkpoint keys), their
``config.json``, a detail of the block math (SDAR/Qwen3 normalises q and k per head) and which of the input's own
keys a query may attend to by default (LLaDA: every real key; SDAR: real keys of its own and earlier blocks). A
family supplies exactly those:

* a :class:`TransformerConfig` dataclass with the original ``config.json`` field names
  (:attr:`TransformerBackbone.config_class`);
* its module tree, built by :meth:`TransformerBackbone._build_model`, whose blocks are called as
  ``block(x, cos, sin, attn_mask, context, kv_out)`` and use :func:`attend` for the attention core;
* the accessors :meth:`~TransformerBackbone.input_embedding`, :meth:`~TransformerBackbone.final_norm`,
  :meth:`~TransformerBackbone.output_head` and :meth:`~TransformerBackbone.transformer_blocks`;
* :meth:`~TransformerBackbone._self_mask`: the default attention pattern among the input's own positions.

Everything else lives here once: the forward loop (training fast path and key/value-cache path), input and cache
checks, logits at selected positions, gradient checkpointing, initialisation, vocabulary resizing, and
``from_pretrained`` (meta-device build + strict safetensors load) / ``save_pretrained`` through
:mod:`dllm_zoo.backbones.checkpoint`, plus the ``dllm_zoo_layout`` entry of config.json that round-trips our token
layout (the original modeling code ignores it).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dllm_zoo.backbones.attention import context_window_mask, fill_empty_rows, to_sdpa_mask
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
from dllm_zoo.backbones.layers import RMSNorm, RotaryEmbedding, rotate
from dllm_zoo.tokenizers.layout import TokenLayout

LAYOUT_KEY = "dllm_zoo_layout"

_C = TypeVar("_C", bound="TransformerConfig")


# ------------------------------------------------------------------------------------------------- config
class TransformerConfig(ABC):
    """What the shared machinery needs from a family's config dataclass (subclasses are ``@dataclass``es).

    Class attributes:
        FAMILY: Family name used in error messages (``"LLaDA"``, ``"SDAR"``).
        PRESET_LAYOUTS: Preset name -> token layout preset it uses by default.
        EXPECTED_ROWS: Embedding rows of released checkpoints -> layout preset (layout inference on load).

    Attributes every subclass has as dataclass fields: ``mask_token_id``, ``rope_theta``, ``rms_norm_eps`` and
    ``extra`` (unknown config.json fields, kept verbatim).
    """

    FAMILY: ClassVar[str] = "transformer"
    PRESET_LAYOUTS: ClassVar[dict[str, str]] = {}
    EXPECTED_ROWS: ClassVar[dict[int, str]] = {}

    mask_token_id: int
    rope_theta: float
    rms_norm_eps: float
    extra: dict[str, Any]

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Transformer blocks."""

    @property
    @abstractmethod
    def num_kv_heads(self) -> int:
        """Key/value heads (GQA when fewer than the query heads)."""

    @property
    @abstractmethod
    def head_dim(self) -> int:
        """Channels per attention head."""

    @property
    @abstractmethod
    def num_embeddings(self) -> int:
        """Rows of the input embedding and of the LM head."""

    @property
    @abstractmethod
    def init_std(self) -> float:
        """Standard deviation of the normal init of fresh Linear/Embedding weights."""

    @classmethod
    @abstractmethod
    def preset(cls: type[_C], name: str, layout: TokenLayout | str | None = None) -> _C:
        """A named size; ``layout`` sets the vocabulary of the small presets."""

    @abstractmethod
    def to_json_dict(self, layout: TokenLayout | None = None) -> dict[str, Any]:
        """The original-style ``config.json`` content (``layout`` is stored under ``dllm_zoo_layout``)."""

    @classmethod
    @abstractmethod
    def from_json_dict(cls: type[_C], data: dict[str, Any], source: str | Path = "config.json") -> _C:
        """Read an original ``config.json``; raises ``ValueError`` naming unsupported fields and ``source``."""

    @abstractmethod
    def resized(self: _C, new_vocab: int) -> _C:
        """A copy with ``new_vocab`` embedding / LM-head rows."""

    @classmethod
    def preset_names(cls) -> list[str]:
        """Names accepted by :meth:`preset`."""
        return list(cls.PRESET_LAYOUTS)

    @classmethod
    def from_dir(cls: type[_C], path: str | Path) -> tuple[_C, TokenLayout | None]:
        """Read ``config.json`` of a checkpoint directory.

        Returns:
            The config and the layout saved under ``"dllm_zoo_layout"`` (``None`` for original checkpoints).

        Raises:
            FileNotFoundError: naming the missing ``config.json``.
        """
        file = Path(path) / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: a {cls.FAMILY} checkpoint directory needs its config.json")
        data = read_json(file)
        saved = data.get(LAYOUT_KEY)
        layout = layout_from_json(saved, file) if saved is not None else None
        return cls.from_json_dict(data, file), layout

    def with_overrides(self: _C, overrides: dict[str, Any]) -> _C:
        """A copy with some dataclass fields replaced; unknown names raise ``ValueError`` listing the valid ones."""
        if not overrides:
            return self
        valid = {f.name for f in dataclasses.fields(cast(Any, self))}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(
                f"unknown overrides {unknown}: use gradient_checkpointing or {type(self).__name__} fields "
                f"{sorted(valid)}"
            )
        return cast(_C, dataclasses.replace(cast(Any, self), **overrides))


# ------------------------------------------------------------------------------------------------- layouts
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


def check_layout(config: TransformerConfig, layout: TokenLayout) -> None:
    """Raise ``ValueError`` naming both when a layout does not fit a config (rows, mask id)."""
    problems = []
    if config.num_embeddings < layout.vocab_size:
        problems.append(
            f"the config has {config.num_embeddings} embedding rows < layout vocab_size={layout.vocab_size}"
        )
    if config.mask_token_id != layout.mask_id:
        problems.append(f"config mask_token_id={config.mask_token_id} != layout mask_id={layout.mask_id}")
    if problems:
        raise ValueError(
            f"token layout {layout.name!r} does not fit the {config.FAMILY} config: " + "; ".join(problems)
        )


def infer_layout(config: TransformerConfig, saved: TokenLayout | None = None) -> TokenLayout | None:
    """The token layout that belongs to a config, or ``None`` when it cannot be told.

    In order: the layout saved in config.json; the family's released vocabularies by embedding rows
    (``config.EXPECTED_ROWS``, e.g. 126464 -> ``llada``, 151936 -> ``sdar``); the embedded ``default`` layout when
    the config has exactly its rows and mask id.
    """
    if saved is not None:
        return saved
    name = config.EXPECTED_ROWS.get(config.num_embeddings)
    if name is not None:
        return TokenLayout.preset(name)
    default = TokenLayout.preset("default")
    if config.num_embeddings == default.vocab_size and config.mask_token_id == default.mask_id:
        return default
    return None


# ---------------------------------------------------------------------------------------------- attention
def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    attn_mask: Tensor | None,
    context: tuple[Tensor, Tensor] | None = None,
    kv_out: list[tuple[Tensor, Tensor]] | None = None,
    queries: Tensor | None = None,
) -> Tensor:
    """Attention core of every block: RoPE, optional cached context keys, SDPA (never causal), GQA.

    Args:
        q: Queries ``[B, L, H, head_dim]`` before RoPE (after any per-head norm), the layout a projection produces.
        k: Keys ``[B, L, H_kv, head_dim]`` before RoPE.
        v: Values ``[B, L, H_kv, head_dim]``.
        cos: RoPE table from :meth:`~dllm_zoo.backbones.layers.RotaryEmbedding.head_tables`, fp32
            ``[L, 1, head_dim]`` or ``[B, L, 1, head_dim]``.
        sin: Its signed sine table, same shape as ``cos``.
        attn_mask: ``None`` or bool mask broadcastable to ``[B, H, L, S + L]`` (True = may attend), ``S`` the
            context length (0 without ``context``); context keys come first.
        context: Cached ``(keys, values)``, each ``[B, H_kv, S, head_dim]`` (keys after RoPE), that the ``L``
            queries attend to in addition to their own keys.
        kv_out: When given, this call's own ``(keys, values)`` ``[B, H_kv, L, head_dim]`` (keys after RoPE;
            transposed views of ``[B, L, H_kv, head_dim]`` memory) are appended to it.
        queries: ``[B, K]`` positions (among the ``L``) that ``q`` holds, ``[B, K, H, head_dim]``; only those
            queries are computed (a last layer whose output is needed at a few positions). ``None``: all ``L``.

    Returns:
        ``[B, L, H * head_dim]`` (``[B, K, …]`` with ``queries``), ready for the output projection.
    """
    b, seq, heads, hd = q.shape
    cos_q, sin_q = cos, sin
    if queries is not None:
        cos_q, sin_q = _rows(cos, queries), _rows(sin, queries)
        if attn_mask is not None and attn_mask.shape[2] != 1:  # one mask row per query: keep the chosen ones
            full = attn_mask.expand(b, -1, -1, -1)
            attn_mask = torch.gather(full, 2, queries[:, None, :, None].expand(b, full.shape[1], -1, full.shape[3]))
    # RoPE on the [B, L, H, hd] projection layout, then a free transpose to SDPA's [B, H, L, hd].
    q = rotate(q, cos_q, sin_q).transpose(1, 2)
    k = rotate(k, cos, sin).transpose(1, 2)
    v = v.transpose(1, 2)
    if kv_out is not None:
        kv_out.append((k, v))
    if context is not None:
        k = torch.cat((context[0], k), dim=2)
        v = torch.cat((context[1], v), dim=2)
    # Never is_causal (masked diffusion): the mask says everything. SDPA's default scale is 1/sqrt(head_dim).
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False, enable_gqa=k.shape[1] != heads)
    return a.transpose(1, 2).reshape(b, seq, heads * hd)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``[B, L, …]`` at positions ``index`` ``[B, K]`` -> ``[B, K, …]``."""
    shape = index.shape + x.shape[2:]
    flat = index.long().reshape(index.shape[0], -1, *([1] * (x.dim() - 2)))
    return torch.gather(x, 1, flat.expand(shape))


def _rows(table: Tensor, index: Tensor) -> Tensor:
    """A RoPE table ``[L, 1, hd]`` or ``[B, L, 1, hd]`` at positions ``index`` ``[B, K]`` -> ``[B, K, 1, hd]``."""
    if table.dim() == 3:
        return table[index.long()]
    return gather_rows(table.expand(index.shape[0], -1, -1, -1), index)


def _as_bool(mask: Tensor) -> Tensor:
    """A 0/1 (or bool) mask as bool."""
    return mask if mask.dtype == torch.bool else mask != 0


def _select(h: Tensor, logits_at: Tensor | None) -> Tensor:
    """Hidden states ``[B, L, D]`` at the positions where logits are wanted (see ``TransformerBackbone.forward``)."""
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
    return gather_rows(h, logits_at)


# ------------------------------------------------------------------------------------------------ backbone
WeightDType = Literal["float32", "bfloat16", "float16"]
_WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_dtype(name: str | None, flag: str = "--model.init_args.backbone.init_args.dtype") -> torch.dtype | None:
    """The torch dtype of a dtype name (``None`` stays ``None``).

    Raises:
        ValueError: naming ``flag`` for an unknown name.
    """
    if name is None:
        return None
    if name not in _WEIGHT_DTYPES:
        raise ValueError(f"{flag}={name!r}: use one of {sorted(_WEIGHT_DTYPES)} or null")
    return _WEIGHT_DTYPES[name]


ConfigT = TypeVar("ConfigT", bound=TransformerConfig)
_B = TypeVar("_B", bound="TransformerBackbone[Any]")


class TransformerBackbone(Backbone, Generic[ConfigT]):
    """A RoPE transformer mask predictor; subclasses supply the family-specific pieces (see the module docstring).

    Args:
        config: A preset name (see the family's config ``preset_names()``) or a config object; ``None`` means
            ``tiny``. Must stay ``None`` when ``pretrained`` is given (the config then comes from config.json).
        layout: Token layout or preset name. Default: the preset's, the layout saved in a checkpoint, or one
            inferred from the vocabulary.
        pretrained: A checkpoint directory (config.json + safetensors, original layout) to load, so that YAML
            ``init_args: {pretrained: /dir}`` works. Weights keep their stored dtype.
        gradient_checkpointing: Recompute each block in the backward pass while training.
        dtype: Weight dtype (``float32`` / ``bfloat16`` / ``float16``); ``None`` keeps a checkpoint's stored dtype
            (fresh weights: float32). Full fine-tuning of a bf16 release wants ``float32`` master weights.
    """

    config_class: ClassVar[type[TransformerConfig]]
    config: ConfigT

    def __init__(
        self,
        config: ConfigT | str | None = None,
        layout: TokenLayout | str | None = None,
        pretrained: str | None = None,
        gradient_checkpointing: bool = False,
        dtype: WeightDType | None = None,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        family = self.config_class
        torch_dtype = weight_dtype(dtype)
        if pretrained is not None:
            if config is not None:
                raise ValueError(
                    f"pass either `config` or `pretrained`, not both: the config of {pretrained} comes from its "
                    f"config.json (got config={config!r})"
                )
            cfg, lay = self._pretrained_config(pretrained, layout, {})
            with torch.device("meta"):  # no allocation: the checkpoint tensors are assigned as parameters
                self._build(cfg, lay)
            self._load_weights(pretrained, dtype=torch_dtype)
            return
        if config is None:
            config = "tiny"
        if isinstance(config, str):
            lay_arg = layout if layout is not None else family.PRESET_LAYOUTS.get(config)
            cfg = cast(ConfigT, family.preset(config, lay_arg))  # raises on an unknown preset name
            resolved = TokenLayout.resolve(lay_arg) if lay_arg is not None else None
        else:
            cfg = config
            resolved = TokenLayout.resolve(layout) if layout is not None else infer_layout(cfg)
            if resolved is None:
                raise ValueError(
                    f"cannot infer the token layout of a {type(cfg).__name__} with {cfg.num_embeddings} embedding "
                    f"rows and mask_token_id={cfg.mask_token_id}: pass `layout=` (one of "
                    f"{TokenLayout.preset_names()} or a TokenLayout)"
                )
        assert resolved is not None
        self._build(cfg, resolved)
        self.reset_parameters()
        if torch_dtype is not None:
            self.to(torch_dtype)

    # ---------------------------------------------------------------------------------- family hooks
    @abstractmethod
    def _build_model(self, config: ConfigT) -> None:
        """Create the family's modules (embedding, blocks, final norm, LM head) under their original names."""

    @abstractmethod
    def input_embedding(self) -> nn.Embedding:
        """The token embedding (``V -> D``)."""

    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm applied after the last block, before the LM head."""

    @abstractmethod
    def _self_mask(
        self, padding: Tensor | None, position_ids: Tensor | None, batch: int, length: int, device: torch.device
    ) -> Tensor | None:
        """Which of the input's own keys each query may attend to by default.

        Args:
            padding: ``[B, L]`` bool key padding (True = real token) or ``None`` (all real).
            position_ids: ``[B, L]`` positions, or ``None`` for ``0..L-1``.
            batch: ``B``.
            length: ``L``.
            device: Device of the activations.

        Returns:
            Bool mask broadcastable to ``[B, 1, L, L]`` (``[B, 1, 1, L]`` for a pure key-padding pattern; True = may
            attend), or ``None`` when every query may attend to every key. Rows need not be non-empty: the caller
            fills empty rows after adding any context keys.
        """

    # ---------------------------------------------------------------------------------- construction
    def _build(self, config: ConfigT, layout: TokenLayout) -> None:
        check_layout(config, layout)
        self.config = config
        self.layout = layout
        self._build_model(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def reset_parameters(self) -> None:
        """Fresh init: normal(0, ``config.init_std``) for every Linear and Embedding weight, ones for the norms.

        Deterministic under ``torch.manual_seed`` (modules are visited in registration order).
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # --------------------------------------------------------------------------------------- forward
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
        """Run the mask predictor over a whole canvas or over a window against cached context keys.

        Without ``cache`` the ``L`` input positions attend to each other with the family's default pattern
        (LLaDA: bidirectional; SDAR: block-causal on the absolute grid ``position // block_size``), restricted to
        real keys by a ``[B, L]`` padding mask; a 4-D mask replaces the pattern. With ``cache`` they are a
        *window* of ``W`` positions whose queries attend to ALL ``S`` real context keys of the cache and to the
        window's own keys with the family's pattern (by the window's ``position_ids``); outputs exist only for the
        window. Exact when the cached keys were computed from the current canvas (a cut of ``return_cache=True``
        of a forward over the same tokens, e.g. SDAR's prefill + clean blocks); otherwise the context is as stale
        as the canvas it came from (Fast-dLLM prefix/dual cache, research/tracerl_llada.md §7.2).

        Args:
            input_ids: ``[B, L]`` token ids (``[B, W]`` with ``cache``).
            attention_mask: Without ``cache``: ``None`` (the family's pattern over all keys), ``[B, L]`` key padding
                (1 = real token; padding keys are never attended, padding queries get finite but meaningless
                outputs) or a ``[B, 1, L, L]`` bool mask (True = may attend) used as-is; never turned causal. An
                all-ones ``[B, L]`` mask equals ``None``. With ``cache``: ``None`` or ``[B, W]`` key padding of the
                window's own keys (the context's padding is ``cache.key_mask``), a ``[B, 1, W, W]`` bool pattern
                among the window's own keys (e.g. a sampler's own block grid) replacing the family's, or the whole
                ``[B, 1, W, S + W]`` bool mask over context keys (first) and own keys, used as-is (``key_mask``
                ignored): a sampler that runs several steps against one cache builds it once.
            position_ids: ``[B, L]`` RoPE positions (default ``0..L-1``; left-padded rows may pass
                ``cumsum(mask) - 1`` so real tokens start at position 0, which also puts them on their batch-1
                block grid). Required with ``cache``: the window's absolute positions.
            cache: A :class:`KVCache` of context keys/values (post-RoPE) with one entry per block, batch ``B`` and
                this model's ``H_kv`` and ``head_dim``.
            logits_at: ``[B, L]`` bool -> logits ``[N, V]`` at the True positions (row-major);
                ``[B, K]`` integer -> logits ``[B, K, V]`` at those positions. The hidden states are gathered before
                the vocabulary projection, which dominates memory at 126k–152k rows.
            return_hidden: Also return the final (post-norm) hidden states ``[B, L, D]``.
            return_logits: False skips the vocabulary projection (``logits=None``).
            return_cache: Also return this forward's own keys/values for the ``L`` input positions as a
                :class:`KVCache` (``[B, H_kv, L, head_dim]`` per block, keys after RoPE, ``key_mask`` = the
                ``[B, L]`` padding mask as bool, or ``None`` when there was none or the mask was 4-D — set it with
                ``dataclasses.replace(cache, key_mask=...)`` then); with ``cache``, the window's keys only, not the
                concatenation (join them with :meth:`KVCache.cat`). Turns gradient checkpointing off for this call.

        Returns:
            :class:`BackboneOutput` with ``logits`` ``[B, L, V]`` (or as selected by ``logits_at``) and ``cache``
            when ``return_cache``.

        Raises:
            ValueError: on wrong shapes, a missing ``position_ids`` with ``cache``, a cache that does not fit the
                model or batch.
            TypeError: when ``cache`` is not a :class:`KVCache`.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        b, seq = input_ids.shape
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != seq):
            raise ValueError(f"position_ids must be [B, L] = [{b}, {seq}], got shape {tuple(position_ids.shape)}")
        blocks = self.transformer_blocks()
        if cache is None and not return_cache:  # the training path: nothing extra per forward
            mask = self._input_mask(attention_mask, position_ids, b, seq, input_ids.device)
            cos, sin = self.rotary.head_tables(seq, input_ids.device, position_ids)
            x = self.input_embedding()(input_ids)
            recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
            trim = self._trim(x, logits_at, return_hidden, return_logits)
            for i, block in enumerate(blocks):
                queries = trim if i == len(blocks) - 1 else None
                if recompute:
                    x = cast(Tensor, checkpoint(block, x, cos, sin, mask, None, None, queries, use_reentrant=False))
                else:
                    x = block(x, cos, sin, mask, None, None, queries)
            return self._head(x, None if trim is not None else logits_at, return_hidden, return_logits)

        own_mask: Tensor | None = None  # cache path from here on: [B, L] key padding of the input's own keys
        own_pattern: Tensor | None = None  # or an explicit [B, 1, L, L] pattern among them
        window_mask: Tensor | None = None  # or the whole [B, 1, L, S + L] mask over context and own keys
        if attention_mask is not None and attention_mask.dim() == 4:
            shape = tuple(attention_mask.shape)
            context_len = 0 if cache is None else cache.seq_len
            widths = {seq, seq + context_len}
            if shape[0] not in (1, b) or shape[1] != 1 or shape[2] != seq or shape[3] not in widths:
                whole = f" or (…, {seq + context_len}) over the cache's keys and its own" if cache is not None else ""
                raise ValueError(f"a 4-D attention_mask must have shape ({b}, 1, {seq}, {seq}){whole}, got {shape}")
            if shape[3] == seq:
                own_pattern = to_sdpa_mask(attention_mask, b, seq)
            else:
                window_mask = to_sdpa_mask(attention_mask, b, seq, shape[3])
        elif attention_mask is not None:
            if tuple(attention_mask.shape) != (b, seq):
                raise ValueError(
                    f"attention_mask [B, L] must have shape {(b, seq)} (or be a [B, 1, L, L] bool mask), got "
                    f"{tuple(attention_mask.shape)}"
                )
            own_mask = _as_bool(attention_mask)
        if cache is None:
            mask = (
                own_pattern
                if own_pattern is not None
                else self._input_mask(own_mask, position_ids, b, seq, input_ids.device)
            )
        else:
            self._check_cache(cache, b, position_ids)
            if window_mask is not None:
                mask = window_mask
            else:
                mask = self._window_mask(cache, own_mask, position_ids, b, seq, own_pattern)
        cos, sin = self.rotary.head_tables(seq, input_ids.device, position_ids)
        x = self.input_embedding()(input_ids)
        kv: list[tuple[Tensor, Tensor]] | None = [] if return_cache else None
        trim = self._trim(x, logits_at, return_hidden, return_logits)
        for i, block in enumerate(blocks):
            context = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, cos, sin, mask, context, kv, trim if i == len(blocks) - 1 else None)
        out = self._head(x, None if trim is not None else logits_at, return_hidden, return_logits)
        if kv is not None:
            out.cache = KVCache([k for k, _ in kv], [v for _, v in kv], own_mask)
        return out

    @staticmethod
    def _trim(x: Tensor, logits_at: Tensor | None, return_hidden: bool, return_logits: bool) -> Tensor | None:
        """``[B, K]`` positions the last block needs to compute (its queries, residual and MLP), or ``None`` = all.

        With an index ``logits_at`` and no hidden states requested, the last block's output is only read at those
        positions; its keys/values still come from every position. Exact, and it saves ``(L − K)/L`` of the last
        block (the full forwards of samplers compute logits for one block of a long canvas).
        """
        if logits_at is None or logits_at.dtype == torch.bool or return_hidden or not return_logits:
            return None
        if logits_at.dim() == 2 and logits_at.shape[1] >= x.shape[1]:  # every position wanted: nothing to save
            return None
        _select(x, logits_at)  # validates the index tensor's shape and dtype
        return logits_at.long()

    def _head(self, x: Tensor, logits_at: Tensor | None, return_hidden: bool, return_logits: bool) -> BackboneOutput:
        """Final norm and (selected) vocabulary projection of the last block's output ``[B, L, D]``."""
        h = self.final_norm()(x)
        logits = self.output_head()(_select(h, logits_at)) if return_logits else None
        return BackboneOutput(logits=logits, hidden=h if return_hidden else None)

    def _input_mask(
        self,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
    ) -> Tensor | None:
        """SDPA mask of a forward without cache: a 4-D mask as given, else the family's pattern with key padding."""
        if attention_mask is not None and attention_mask.dim() != 2:
            return to_sdpa_mask(attention_mask, batch, length)  # explicit masks (training layouts): used as-is
        padding = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(
                    f"attention_mask [B, L] must have shape {(batch, length)}, got {tuple(attention_mask.shape)}"
                )
            padding = _as_bool(attention_mask)
            if bool(padding.all()):  # no padding: let LLaDA take SDPA's unmasked kernel (one host sync)
                padding = None
        allowed = self._self_mask(padding, position_ids, batch, length, device)
        return None if allowed is None else fill_empty_rows(allowed)

    def _window_mask(
        self,
        cache: KVCache,
        own: Tensor | None,
        position_ids: Tensor | None,
        batch: int,
        width: int,
        pattern: Tensor | None = None,
    ) -> Tensor | None:
        """SDPA mask ``[B, 1, 1 or W, S + W]`` of a window forward (context keys first), or ``None`` (all allowed).

        Every query may attend to every real context key (``cache.key_mask``); among the window's own keys the
        family's pattern (:meth:`_self_mask`) applies, or ``pattern`` when given.

        Args:
            cache: The context; its ``key_mask`` (``None`` = all real) covers the first ``S`` keys.
            own: ``[B, W]`` bool key padding of the window's own keys, or ``None`` (all real).
            position_ids: ``[B, W]`` positions of the window.
            batch: ``B``.
            width: ``W``.
            pattern: ``[B, 1, W, W]`` bool mask among the window's own keys, replacing the family's pattern.
        """
        device = cache.keys[0].device
        allowed = pattern if pattern is not None else self._self_mask(own, position_ids, batch, width, device)
        if cache.key_mask is None and allowed is None:
            return None
        if allowed is None:
            allowed = torch.ones(1, 1, 1, width, dtype=torch.bool, device=device)
        mask = context_window_mask(cache.key_mask, allowed.to(device), batch, cache.seq_len)
        if mask.shape[2] == 1 and bool(mask.all()):  # pure key padding with nothing padded: unmasked kernel
            return None
        return mask

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
            cache.n_layers != cfg.num_layers
            or cache.batch_size != batch
            or (h_kv, hd) != (cfg.num_kv_heads, cfg.head_dim)
        ):
            raise ValueError(
                f"cache does not fit: it has {cache.n_layers} layers and keys {tuple(cache.keys[0].shape)} "
                f"[B, H_kv, S, head_dim]; this model and input need {cfg.num_layers} layers and "
                f"[{batch}, {cfg.num_kv_heads}, S, {cfg.head_dim}]"
            )

    # ------------------------------------------------------------------------------------ vocabulary
    def resize_token_embeddings(self, new_vocab: int, layout: TokenLayout | str | None = None) -> None:
        """Grow the input embedding and the LM head to ``new_vocab`` rows (e.g. MMaDA's 8192 image codes).

        New rows of both matrices are set to the mean of the existing rows, so new tokens start from an
        "average token" and the output distribution over old tokens is unchanged at first. (HF's
        ``resize_token_embeddings`` is version dependent: random init in older releases, mean-resizing in newer
        ones; research/mmada.md §2.2.) The config's vocabulary size(s) become ``new_vocab``. Resize before
        building the optimizer: the two weights are new Parameters.

        Args:
            new_vocab: Rows after resizing (>= the current rows).
            layout: New token layout to adopt at the same time (e.g. ``"mmada"``), checked against the config.
        """
        emb, head = self.input_embedding(), self.output_head()
        old = emb.num_embeddings
        if new_vocab < old:
            raise ValueError(f"resize_token_embeddings only grows the vocabulary: {new_vocab} < {old} rows")
        new_layout = TokenLayout.resolve(layout) if layout is not None else self.layout
        if new_vocab > old:
            for module in (emb, head):
                w = module.weight
                with torch.no_grad():
                    mean = w.float().mean(dim=0, keepdim=True).to(w.dtype)
                    grown = torch.cat([w.detach(), mean.expand(new_vocab - old, -1)], dim=0)
                module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
            emb.num_embeddings = new_vocab
            head.out_features = new_vocab
        config = self.config.resized(new_vocab)
        check_layout(config, new_layout)
        self.config = config
        self.layout = new_layout

    # ----------------------------------------------------------------------------------- checkpoints
    @classmethod
    def _pretrained_config(
        cls, path: str | Path, layout: TokenLayout | str | None, overrides: dict[str, Any]
    ) -> tuple[ConfigT, TokenLayout]:
        """Config (with overrides) and layout of a checkpoint directory."""
        cfg, saved = cls.config_class.from_dir(path)
        cfg = cfg.with_overrides(overrides)
        lay = TokenLayout.resolve(layout) if layout is not None else infer_layout(cfg, saved)
        if lay is None:
            raise ValueError(
                f"cannot infer the token layout of {Path(path) / CONFIG_NAME} ({cfg.num_embeddings} embedding rows, "
                f"no {LAYOUT_KEY!r} entry): pass layout= (one of {TokenLayout.preset_names()} or a TokenLayout)"
            )
        check_layout(cfg, lay)
        return cast(ConfigT, cfg), lay

    @classmethod
    def from_pretrained(
        cls: type[_B],
        path: str | Path,
        layout: TokenLayout | str | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> _B:
        """Load a checkpoint directory in the family's original layout (or one written by :meth:`save_pretrained`).

        The module is built on the meta device and the loaded tensors are assigned as its parameters, so an 8B
        model is allocated once. Keys and shapes are checked strictly before any data is read: missing,
        unexpected and mis-shaped keys are all listed in one ``ValueError``.

        Args:
            path: Directory with ``config.json`` and ``model.safetensors`` or shards + index.
            layout: Token layout; default: the one saved in config.json (``dllm_zoo_layout``), else inferred from
                the embedding rows of the family's released checkpoints (LLaDA 126464 -> ``llada``, MMaDA 134656 ->
                ``mmada``, SDAR 151936 -> ``sdar``). The config's ``mask_token_id`` must match it.
            dtype: Cast floating weights to this dtype (``None`` keeps the stored dtype, bf16 for the releases).
            device: Where the weights are created.
            **overrides: ``gradient_checkpointing=`` or config fields to replace after reading config.json (e.g.
                ``max_sequence_length`` for LLaDA, ``block_size`` for SDAR).

        Raises:
            FileNotFoundError: naming a missing config.json or weights file.
            ValueError: on an unsupported config field, a layout mismatch or a key/shape mismatch.
        """
        gradient_checkpointing = bool(overrides.pop("gradient_checkpointing", False))
        cfg, lay = cls._pretrained_config(path, layout, overrides)
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
        self.pretrained_from = str(path)

    def _config_json(self) -> dict[str, Any]:
        """The ``config.json`` content :meth:`save_pretrained` writes (families may add fields)."""
        return self.config.to_json_dict(self.layout)

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
        write_json_atomic(self._config_json(), root / CONFIG_NAME)
        save_state_dict(self.state_dict(), root, max_shard_size=max_shard_size)
