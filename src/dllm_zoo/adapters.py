"""LoRA and QLoRA adapters on any backbone, through peft, injected in place.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1) freezes a pretrained weight
``W [out, in]`` and trains a low-rank update: ``y = W x + (alpha / r) · B A dropout(x)`` with ``A [r, in]``
(random init) and ``B [out, r]`` (zero init, so training starts exactly at the pretrained model). QLoRA (Dettmers
et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3) additionally stores the frozen ``W`` as 4-bit
NormalFloat (NF4, blocks of 64 weights with one absmax each; "double quantisation" quantises those absmax values
again) and dequantises it on the fly to the compute dtype; gradients flow through the dequantised weight into the
LoRA factors only.

How it plugs into the library
-----------------------------
The adapter is injected **into the backbone in place** with :func:`peft.inject_adapter_in_model`: each targeted
``nn.Linear`` becomes a peft LoRA layer that holds the original layer as ``base_layer``. The backbone stays the
same :class:`~dllm_zoo.backbones.base.Backbone` object, so everything that uses the contract keeps working
unchanged: stages call ``self.net(input_ids, attention_mask=..., logits_at=...)`` with keyword arguments, samplers
call the model the same way, ``layout``, ``transformer_blocks()`` (FSDP wrapping, activation checkpointing),
``output_head()`` and the KV cache are untouched. Wrapping the backbone in a ``PeftModel`` instead would hide all of
that behind ``__getattr__`` forwarding and change the module tree the other components rely on.

Two things do change, and this module covers them:

* ``state_dict()`` keys of adapted layers gain ``.base_layer.`` and ``lora_A/lora_B`` entries, so
  ``save_pretrained`` on an adapted backbone would not write the original checkpoint layout. Use
  :func:`merge_and_export`, which writes the original layout (LoRA merged, QLoRA dequantised, no adapter keys)
  through the backbone's own ``save_pretrained``.
* Only the LoRA factors require grad (everything else is frozen), so the optimizer of the stages
  (:func:`~dllm_zoo.stages.optim.param_groups` keeps trainable parameters only) sees the adapter alone.

Targets
-------
``LoRA.target_modules`` lists names of ``nn.Linear`` layers *inside the transformer blocks*
(``backbone.transformer_blocks()``): an entry matches a module whose path within its block equals the entry or ends
with ``"." + entry`` (``"q_proj"``, ``"mlp.up_proj"``). Matching never leaves the blocks, which matters for LLaDA: its
LM head ``model.transformer.ff_out`` has the same leaf name as every block's down projection
``model.transformer.blocks.{i}.ff_out``, and only the latter is adapted. ``None`` uses the family's default
``lora_target_modules`` class attribute (LLaDA: ``q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out``; SDAR /
Qwen3: ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``). The resolved list of full module names is
what peft receives, so peft's own suffix matching can never reach the head.

QLoRA specifics
---------------
With ``quantize="nf4"`` every ``nn.Linear`` of the transformer blocks (targeted or not) is replaced by a frozen
``bitsandbytes.nn.Linear4bit`` (NF4, compute dtype = the layer's original dtype: float32 on CPU runs, bfloat16 for the
released checkpoints) before LoRA is injected on top. Embeddings, norms and the LM head keep their dtype (as in the
QLoRA paper, which quantises the linear layers of the blocks). bitsandbytes' fused AVX512-BF16 CPU inference path is
turned off on these layers: it computes in bfloat16 and repacks the weights in place, so eval-mode logits (sampling,
a reference policy under :func:`disable_adapter`) would differ from the training forward. This needs
``bitsandbytes>=0.48`` for CPU support (``pip install 'dllm_zoo[quant]'``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from dllm_zoo.backbones.base import Backbone

if TYPE_CHECKING:
    from dllm_zoo.stages.base import DiffusionStage

__all__ = [
    "LoRA",
    "adapter_layers",
    "adapter_parameters",
    "apply_lora",
    "disable_adapter",
    "has_adapter",
    "is_quantized",
    "lora_targets",
    "merge_adapter",
    "merge_and_export",
    "quantize_nf4",
    "reset_adapter_parameters",
]

QuantizeMode = Literal["nf4"]

# bitsandbytes logs this once on import when the optional `kernels` package (a Hub download of a fused AVX512-BF16
# inference kernel) is absent. We never use that kernel (see the module docstring), so the message is noise.
_BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward"


class _DropBnbKernelMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNEL_MESSAGE)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBnbKernelMessage())


@dataclass(frozen=True)
class LoRA:
    """A LoRA (or QLoRA) adapter: what the stages' ``adapter`` argument takes (``--model.adapter.*`` in YAML).

    Attributes:
        rank: ``r``, the inner dimension of ``B A``.
        alpha: Scale numerator: the update is ``(alpha / rank) · B A x``.
        dropout: Dropout on the LoRA branch's input (training only; draws from the global torch RNG).
        target_modules: Names of ``nn.Linear`` layers inside the transformer blocks to adapt (see the module
            docstring for the matching rule); ``None`` = the backbone family's ``lora_target_modules``.
        quantize: ``"nf4"`` stores every frozen Linear layer of the blocks as bitsandbytes 4-bit NormalFloat
            (QLoRA); ``None`` keeps them in their dtype.
        double_quant: With ``quantize="nf4"``, quantise the per-block absmax values too (QLoRA's double
            quantisation, ~0.37 bits/parameter saved).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    quantize: QuantizeMode | None = None
    double_quant: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.rank <= 0:
            problems.append(f"rank={self.rank} must be > 0")
        if self.alpha <= 0:
            problems.append(f"alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.quantize not in (None, "nf4"):
            problems.append(f"quantize={self.quantize!r} must be null or 'nf4'")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules):
                problems.append(f"target_modules={self.target_modules!r} must be a list of module names")
            elif not self.target_modules:
                problems.append("target_modules=[] adapts nothing: give names, or null for the family's default")
        if problems:
            raise ValueError("invalid --model.adapter: " + "; ".join(problems))
        if self.target_modules is not None and not isinstance(self.target_modules, tuple):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))  # YAML lists -> hashable tuple

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor of the low-rank update."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (``target_modules`` as a list), for hparams and checkpoints."""
        out = dataclasses.asdict(self)
        if out["target_modules"] is not None:
            out["target_modules"] = list(out["target_modules"])
        return out


# ------------------------------------------------------------------------------------------------ imports
def _peft() -> Any:
    import peft  # core dependency; imported lazily because it pulls in transformers (~1.5 s)

    return peft


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "--model.adapter.quantize=nf4 (QLoRA) needs bitsandbytes: pip install 'dllm_zoo[quant]' "
            "(bitsandbytes>=0.48 runs 4-bit on CPU too)"
        ) from err
    return bitsandbytes


def _is_params4bit(weight: Tensor) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # never import it just to find out: nothing is quantised without it
    return bnb is not None and isinstance(weight, bnb.nn.Params4bit)


def _is_linear4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds bitsandbytes 4-bit layers (a QLoRA base)."""
    return any(_is_linear4bit(m) for m in module.modules())


# ------------------------------------------------------------------------------------------------ targets
def lora_targets(backbone: Backbone, target_modules: Sequence[str] | None = None) -> list[str]:
    """Full names (relative to ``backbone``) of the Linear layers an adapter with ``target_modules`` adapts.

    Args:
        backbone: Any backbone (plain, or with its block Linear layers already quantised).
        target_modules: Names matched inside the transformer blocks (module docstring); ``None`` = the family's
            ``lora_target_modules``.

    Returns:
        Names such as ``model.transformer.blocks.0.q_proj``, in module order.

    Raises:
        ValueError: naming ``--model.adapter.target_modules`` when an entry matches nothing or names a module
            that is not a Linear layer (the message lists the block's Linear layers), or when the family defines
            no default.
    """
    family = type(backbone).__name__
    wanted = tuple(target_modules) if target_modules is not None else tuple(type(backbone).lora_target_modules)
    if not wanted:
        raise ValueError(
            f"{family} defines no lora_target_modules: set --model.adapter.target_modules to names of Linear layers "
            f"in its transformer blocks"
        )
    prefix = backbone.transformer_blocks_name()
    linear: list[tuple[int, str]] = []  # (block index, path inside the block)
    other: dict[str, str] = {}  # path inside a block -> type name, for errors
    for i, block in enumerate(backbone.transformer_blocks()):
        for path, module in block.named_modules():
            if not path:
                continue
            if isinstance(module, nn.Linear):
                linear.append((i, path))
            else:
                other.setdefault(path, type(module).__name__)

    def hits(entry: str, path: str) -> bool:
        return path == entry or path.endswith("." + entry)

    chosen: set[tuple[int, str]] = set()
    for entry in wanted:
        found = [item for item in linear if hits(entry, item[1])]
        if not found:
            names = sorted({path for _, path in linear})
            not_linear = sorted({f"{p} ({t})" for p, t in other.items() if hits(entry, p)})
            why = f"it names {', '.join(not_linear)}, not a Linear layer" if not_linear else "it matches no module"
            raise ValueError(
                f"--model.adapter.target_modules entry {entry!r} does not fit {family}: {why} inside the transformer "
                f"blocks ({prefix}.{{i}}); the blocks' Linear layers are {names}"
            )
        chosen.update(found)
    return [f"{prefix}.{i}.{path}" for i, path in linear if (i, path) in chosen]


# ----------------------------------------------------------------------------------------------- quantise
def _nf4_linear(linear: nn.Linear, double_quant: bool, device: torch.device) -> nn.Module:
    """A frozen ``bnb.nn.Linear4bit`` (NF4) holding ``linear``'s weight ``[out, in]``, quantised on ``device``."""
    bnb = _bnb()
    weight = linear.weight.detach()
    compute_dtype = weight.dtype if weight.is_floating_point() else torch.float32
    quantised = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        device="meta",  # the weight is replaced right away: allocate nothing
    )
    # Params4bit quantises when moved to a real device (bitsandbytes' documented entry point).
    param = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=quantised
    )
    quantised.weight = param.to(device)
    if linear.bias is not None:
        quantised.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    quantised.support_avx512bf16_for_cpu = False  # keep eval == train numerics (module docstring)
    quantised.train(linear.training)
    return quantised


def quantize_nf4(backbone: Backbone, double_quant: bool = True, device: torch.device | str | None = None) -> list[str]:
    """Replace every ``nn.Linear`` of the transformer blocks by a frozen 4-bit NF4 ``bnb.nn.Linear4bit``, in place.

    Layer by layer, so the peak memory is the unquantised model plus one layer. Embeddings, norms and the LM head
    are left alone.

    Args:
        backbone: A backbone whose weights are materialised (not on the meta device).
        double_quant: Quantise the absmax statistics too.
        device: Where to quantise and keep the 4-bit weights (e.g. the GPU while the rest of a checkpoint loaded on
            CPU waits for the trainer to move it); default: each layer's current device.

    Returns:
        Full names of the quantised layers.

    Raises:
        ImportError: without bitsandbytes.
        ValueError: when a weight is on the meta device.
    """
    quantised: list[str] = []
    prefix = backbone.transformer_blocks_name()
    for i, block in enumerate(backbone.transformer_blocks()):
        for path, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or _is_linear4bit(module):
                continue
            if module.weight.is_meta:
                raise ValueError(
                    f"cannot quantise {prefix}.{i}.{path}: its weight is on the meta device. QLoRA "
                    "(--model.adapter.quantize=nf4) needs a materialised backbone (load the checkpoint first; "
                    "meta-device init for sharded strategies is not supported with QLoRA)"
                )
            target = torch.device(device) if device is not None else module.weight.device
            parent_path, _, child = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            setattr(parent, child, _nf4_linear(module, double_quant, target))
            quantised.append(f"{prefix}.{i}.{path}")
    return quantised


# ------------------------------------------------------------------------------------------------- inject
def _is_adapter_layer(module: nn.Module) -> bool:
    if "peft" not in sys.modules:  # nothing can be adapted before peft is imported: don't import it to find out
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def adapter_layers(module: nn.Module) -> list[Any]:
    """The peft adapter layers (``BaseTunerLayer``) inside ``module`` (itself included), in module order."""
    return [m for m in module.modules() if _is_adapter_layer(m)]


def has_adapter(module: nn.Module) -> bool:
    """Whether ``module`` holds peft adapter layers."""
    return bool(adapter_layers(module))


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors (``lora_A``/``lora_B`` weights of every adapter name) inside ``module``."""
    params: dict[int, nn.Parameter] = {}
    for layer in adapter_layers(module):
        for attr in layer.adapter_layer_names:
            for p in getattr(layer, attr).parameters():
                params[id(p)] = p
    return list(params.values())


def apply_lora(backbone: Backbone, config: LoRA, device: torch.device | str | None = None) -> Backbone:
    """Inject ``config`` into ``backbone`` in place and freeze everything but the LoRA factors.

    Args:
        backbone: A plain backbone (no adapter yet).
        config: The adapter.
        device: QLoRA only: where to quantise the block weights (see :func:`quantize_nf4`).

    Returns:
        ``backbone`` itself: same class and contract, LoRA layers inside, ``A`` random and ``B`` zero, so its output
        is unchanged until the adapter trains. LoRA factors are created in float32 (master weights under
        ``bf16-mixed``) whatever the base dtype; Lightning's ``bf16-true`` precision casts the whole module, factors
        included, to bf16 afterwards.

    Raises:
        ValueError: when ``backbone`` already has an adapter, or on bad ``target_modules`` (:func:`lora_targets`).
    """
    if has_adapter(backbone):
        raise ValueError(f"{type(backbone).__name__} already has an adapter; apply one adapter per backbone")
    targets = lora_targets(backbone, config.target_modules)  # validate before changing anything
    if config.quantize == "nf4":
        quantize_nf4(backbone, double_quant=config.double_quant, device=device)
        # transformers' flag: peft reads it to pick its bitsandbytes-aware LoRA layer (4-bit-safe merge and forward).
        setattr(backbone, "is_loaded_in_4bit", True)  # noqa: B010 - not an attribute of the Backbone type
    peft = _peft()
    peft_config = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
    )
    backbone.requires_grad_(False)
    peft.inject_adapter_in_model(peft_config, backbone)
    for p in adapter_parameters(backbone):
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()  # peft creates them in the base dtype (bf16 for real checkpoints)
        p.requires_grad_(True)
    return backbone


def reset_adapter_parameters(module: nn.Module) -> None:
    """Re-initialise every LoRA factor inside ``module`` as at injection (``A`` random, ``B`` zero).

    For a backbone whose ``reset_parameters`` also reached the LoRA layers (a fresh init after meta-device
    sharding): the adapter must start at ``B = 0`` so the adapted model starts as its base.
    """
    for layer in adapter_layers(module):
        for name in layer.lora_A:
            layer.reset_lora_parameters(name, True)


@contextmanager
def disable_adapter(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model inside the block (RL reference policy without a second model).

    Inside, every adapter layer returns its base layer's output exactly (the same kernels as before adaptation;
    the quantised base for QLoRA). On exit (also on an exception) each layer's previous state and every parameter's
    ``requires_grad`` are restored.

    Raises:
        ValueError: when ``module`` has no adapter (naming ``--model.adapter``).
    """
    layers = adapter_layers(module)
    if not layers:
        raise ValueError(
            f"{type(module).__name__} has no adapter to disable: train with --model.adapter (LoRA) to use the base "
            "model as reference policy"
        )
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    was_disabled = [bool(layer.disable_adapters) for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled):
            if not disabled:
                layer.enable_adapters(True)
        for p, flag in flags:  # peft's enable_adapters toggles requires_grad; put back exactly what was there
            p.requires_grad_(flag)


# -------------------------------------------------------------------------------------------------- merge
def _dense_weight(linear: Any) -> Tensor:
    """The weight ``[out, in]`` of a Linear or Linear4bit layer in its original dtype (4-bit NF4 dequantised)."""
    weight = linear.weight
    if _is_params4bit(weight):
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "this Linear4bit's weight was repacked by bitsandbytes' AVX512-BF16 CPU inference path; quantise "
                "with dllm_zoo.adapters.quantize_nf4 (which turns that path off) to merge it"
            )
        return _bnb().functional.dequantize_4bit(weight.data, state)
    return weight.detach()


def _merged_linear(layer: Any, device: torch.device | str | None) -> nn.Linear:
    """A plain ``nn.Linear`` computing what ``layer`` (LoRA layer, Linear4bit or Linear) computes now.

    ``W' = dequant(W) + Σ (alpha/r) B A`` over the active, not-yet-merged adapters (none while disabled), summed in
    float32 and cast to the base layer's original dtype.
    """
    adapted = _is_adapter_layer(layer)
    base: Any = layer.get_base_layer() if adapted else layer
    weight = _dense_weight(base)
    if adapted and not layer.disable_adapters:
        if getattr(layer, "lora_variant", None):
            raise ValueError(
                f"{type(layer).__name__} uses a LoRA variant ({sorted(layer.lora_variant)}); only plain LoRA merges"
            )
        total = weight.float()
        for name in layer.active_adapters:
            if name in layer.lora_A and name not in layer.merged_adapters:
                total = total + layer.get_delta_weight(name).float().to(total.device)
        weight = total.to(weight.dtype)
    target = torch.device(device) if device is not None else weight.device
    bias = base.bias
    dense = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.to(target), requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias.detach().to(target), requires_grad=False)
    dense.train(layer.training)
    return dense


def _non_plain_layers(backbone: Backbone) -> list[str]:
    """Names of the outermost adapter layers and of bare Linear4bit layers (everything that is not original)."""
    names: list[str] = []
    for name, module in backbone.named_modules():
        if any(name.startswith(done + ".") for done in names):
            continue  # inside an adapter layer already listed (its base_layer, lora_A, …)
        if _is_adapter_layer(module) or _is_linear4bit(module):
            names.append(name)
    return names


def _swap(backbone: Backbone, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    old = parent.get_submodule(child)
    setattr(parent, child, module)
    return old


def _check_original_keys(backbone: Backbone) -> None:
    leftovers = [k for k in backbone.state_dict() if "lora_" in k or ".base_layer." in k or ".quant_" in k]
    if leftovers:
        raise RuntimeError(f"adapter keys survived the merge (report this as a bug): {leftovers[:5]}")


def _as_backbone(target: Backbone | DiffusionStage) -> Backbone:
    if isinstance(target, Backbone):
        return target
    net = getattr(target, "net", None)  # a stage: its built backbone (raises before configure_model)
    if not isinstance(net, Backbone):
        raise TypeError(f"expected a Backbone or a stage holding one, got {type(target).__name__}")
    return net


def merge_adapter(target: Backbone | DiffusionStage) -> Backbone:
    """Merge the adapter into the base weights for good: the backbone becomes a plain one (in place).

    Each adapter layer (and each bare Linear4bit) is replaced by an ``nn.Linear`` holding ``dequant(W) + ΔW`` in the
    base layer's original dtype; every parameter requires grad again, as in a freshly built backbone.

    Returns:
        The backbone, whose ``state_dict()`` now has exactly the family's original keys.
    """
    backbone = _as_backbone(target)
    for name in _non_plain_layers(backbone):
        _swap(backbone, name, _merged_linear(backbone.get_submodule(name), device=None))
    for attr in ("peft_config", "is_loaded_in_4bit"):
        if attr in backbone.__dict__:
            delattr(backbone, attr)
    backbone.requires_grad_(True)
    _check_original_keys(backbone)
    return backbone


def merge_and_export(target: Backbone | DiffusionStage, out_dir: str | Path, max_shard_size: int | None = None) -> Path:
    """Write the adapted model as a checkpoint in the family's ORIGINAL layout (LoRA merged, QLoRA dequantised).

    The backbone is left as it was: each adapter layer is swapped, one at a time, for a plain ``nn.Linear``
    holding ``dequant(W) + (alpha/r) B A`` (built in float32, stored in host memory in the base layer's original
    dtype, so a QLoRA 8B model on a 24 GB GPU exports without a second copy on the device), the backbone's own
    ``save_pretrained`` writes ``config.json`` + safetensors with no adapter keys, and the adapter layers are put
    back. ``Family.from_pretrained(out_dir)`` then loads a plain model with the adapted model's logits.

    Args:
        target: A backbone or a stage (its built backbone is exported). Without an adapter this is plain
            ``save_pretrained``.
        out_dir: Output directory.
        max_shard_size: Bytes per safetensors shard (default: the backbone's ``save_pretrained`` default).

    Returns:
        ``out_dir`` as a Path.
    """
    backbone = _as_backbone(target)
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name in _non_plain_layers(backbone):
            merged = _merged_linear(backbone.get_submodule(name), device="cpu")
            swapped.append((name, _swap(backbone, name, merged)))
        _check_original_keys(backbone)
        if max_shard_size is None:
            backbone.save_pretrained(out_dir)
        else:
            backbone.save_pretrained(out_dir, max_shard_size=max_shard_size)
    finally:
        for name, original in reversed(swapped):
            _swap(backbone, name, original)
    return Path(out_dir)
