"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for every stage, through Lightning's ``ModelParallelStrategy``.

How a stage is sharded
----------------------
:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` with the settings of a plain FSDP run: every
device is a data-parallel replica (``tensor_parallel_size=1``), and the mixed-precision policy, CPU offload and
resharding are constructor arguments, so a YAML fragment selects all of it
(``recipes/configs/strategies/fsdp2.yaml``). :meth:`DiffusionStage.configure_model
<dllm_zoo.stages.base.DiffusionStage.configure_model>` calls :func:`shard_backbone` whenever the trainer runs a
``ModelParallelStrategy`` (a plain one gets the defaults): ``fully_shard`` on each of
``backbone.transformer_blocks()`` (one all-gather per block in forward and backward, so only one block is ever
unsharded), then on the backbone itself (embeddings, final norm and head). Parameters become ``DTensor`` shards
``Shard(0)`` over the data-parallel mesh.

Initialisation
--------------
* ``pretrained=`` backbones load their checkpoint in ``__init__`` (built on the meta device, tensors assigned
  from the safetensors files), are sharded, and every rank keeps only its shards; the host holds one full copy
  per rank while that happens (an 8B bf16 model: 16 GB per rank).
* Fresh backbones are built on the **meta device** (no memory), sharded, then materialised shard by shard on the
  training device (``to_empty``) and initialised there by the backbone's ``reset_parameters`` — an 8B model from
  scratch never exists whole anywhere. The random stream is seeded per rank (``seed + rank``, in a forked RNG so
  the global stream is untouched) so ranks draw different shards; the values therefore differ from a 1-process
  init of the same seed. Runs that must match a 1-process run start from a ``pretrained`` checkpoint.

Adapters and checkpoints
------------------------
LoRA is injected before sharding (the LoRA factors are sharded like any parameter and stay the only trainable
ones); QLoRA is refused (bitsandbytes' 4-bit ``Params4bit`` cannot become a ``DTensor``). Checkpoints are
Lightning's distributed checkpoints (a directory with one file per rank + ``meta.pt``): they resume on another
number of processes (``torch.distributed.checkpoint`` reshards on load) and :func:`convert_checkpoint` (the
``dllm-zoo convert-checkpoint`` command) turns one into the family's original layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.transformer import WeightDType, weight_dtype

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["BlockFSDPStrategy", "FSDP2Strategy", "ShardingPolicy", "convert_checkpoint", "is_sharded", "shard_backbone"]


class ShardingPolicy:
    """How :func:`shard_backbone` shards: mixed precision, CPU offload and resharding after forward.

    Args:
        param_dtype: Dtype the unsharded parameters are all-gathered in for compute (``"bfloat16"`` halves the
            all-gather traffic and the unsharded block's memory); ``None`` = the stored dtype.
        reduce_dtype: Dtype of the gradient reduce-scatter; ``None`` = ``param_dtype``. ``"float32"`` keeps the
            gradient sum exact under a bf16 ``param_dtype``.
        cpu_offload: Keep the sharded parameters, their gradients and the optimizer step on the CPU (FSDP2's
            ``CPUOffloadPolicy``): the GPU holds one unsharded block at a time; the step runs on the host.
        reshard_after_forward: Free each block's unsharded parameters after its forward (all-gather again in
            backward: less memory, more communication). ``False`` keeps them until backward.
    """

    def __init__(
        self,
        param_dtype: WeightDType | None = None,
        reduce_dtype: WeightDType | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
    ) -> None:
        self.param_dtype = weight_dtype(param_dtype, "--trainer.strategy.init_args.param_dtype")
        self.reduce_dtype = weight_dtype(reduce_dtype, "--trainer.strategy.init_args.reduce_dtype")
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def fully_shard_kwargs(self, mesh: DeviceMesh) -> dict[str, Any]:
        """Keyword arguments of ``fully_shard`` for ``mesh``."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.param_dtype is not None or self.reduce_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        # Pinned host memory needs an accelerator; on a CPU-only machine the shards simply stay in host memory.
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()
        kwargs["offload_policy"] = offload
        return kwargs


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: all devices data-parallel, sharding set here.

    Args:
        param_dtype: See :class:`ShardingPolicy`.
        reduce_dtype: See :class:`ShardingPolicy`.
        cpu_offload: See :class:`ShardingPolicy`.
        reshard_after_forward: See :class:`ShardingPolicy`.
        save_distributed_checkpoint: Each rank writes its shards (a checkpoint directory that resumes on any
            number of processes); ``False`` gathers a single-file checkpoint on rank 0 (needs host memory for
            the whole model).
        process_group_backend: ``None`` = NCCL on GPUs, gloo on CPUs.
        timeout: Collective timeout.
    """

    def __init__(
        self,
        param_dtype: WeightDType | None = None,
        reduce_dtype: WeightDType | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.sharding = ShardingPolicy(param_dtype, reduce_dtype, cpu_offload, reshard_after_forward)

    def setup_environment(self) -> None:
        """Every process is a data-parallel replica (the parent's ``auto`` would make them tensor-parallel)."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1, flat parameters) wrapping each transformer block of every backbone.

    The wrap policy is found when the model is set up: the classes of the modules in each backbone's
    ``transformer_blocks()`` (``LLaDABlock``, ``SDARDecoderLayer``, or a user family's), so no class names go into
    YAML. ``use_orig_params=True`` by default, which LoRA needs (frozen and trainable parameters share a block).
    Prefer :class:`FSDP2Strategy` (per-parameter sharding, meta-device init, distributed checkpoints that reshard);
    this one is for setups pinned to FSDP1. Activation checkpointing: use the backbone's own
    ``gradient_checkpointing`` flag.

    Args:
        **kwargs: Any ``FSDPStrategy`` argument (``sharding_strategy``, ``cpu_offload``, ``state_dict_type``, …);
            an explicit ``auto_wrap_policy`` replaces the per-block policy.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if "auto_wrap_policy" not in self.kwargs:
            blocks = {type(b) for m in model.modules() if isinstance(m, Backbone) for b in m.transformer_blocks()}
            if blocks:
                self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
        return super()._setup_model(model)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` has been through ``fully_shard`` (it, or any submodule)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def shard_backbone(
    backbone: Backbone,
    mesh: DeviceMesh,
    policy: ShardingPolicy | None = None,
    device: torch.device | None = None,
    seed: int = 0,
) -> Backbone:
    """``fully_shard`` each transformer block, then the backbone; materialise a meta-device backbone after.

    Args:
        backbone: A built backbone (real tensors, or on the meta device for a fresh init), adapter already
            injected if any.
        mesh: The 1-D data-parallel device mesh (``LightningModule.device_mesh["data_parallel"]``).
        policy: Precision / offload / resharding (default: :class:`ShardingPolicy` defaults).
        device: Where a meta-device backbone is materialised (the training device; the CPU under
            ``cpu_offload``). Required when the backbone is on the meta device.
        seed: Base seed of a fresh init; rank ``r`` draws its shards with ``seed + r``.

    Returns:
        ``backbone``, sharded in place (parameters are ``DTensor`` shards; same class and contract).

    Raises:
        ValueError: for a QLoRA (4-bit) backbone, or a meta backbone without ``device``.
    """
    from torch.distributed.fsdp import fully_shard

    from dllm_zoo.adapters import is_quantized, reset_adapter_parameters

    if is_quantized(backbone):
        raise ValueError(
            "QLoRA (--model.adapter.quantize=nf4) cannot be sharded with FSDP2: bitsandbytes' 4-bit weights cannot "
            "become DTensor shards. Use LoRA (quantize: null) with FSDP2, or QLoRA on one device."
        )
    policy = policy or ShardingPolicy()
    kwargs = policy.fully_shard_kwargs(mesh)
    for block in backbone.transformer_blocks():
        fully_shard(block, **kwargs)
    fully_shard(backbone, **kwargs)
    if any(p.is_meta for p in backbone.parameters()):
        if device is None:
            raise ValueError("shard_backbone: a backbone on the meta device needs `device` to materialise on")
        target = torch.device("cpu") if policy.cpu_offload else device
        backbone.to_empty(device=target)
        rank = mesh.get_local_rank()
        cuda = [target.index or 0] if target.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed + rank)  # seeds the CUDA generators too
            backbone.reset_parameters()  # type: ignore[operator]
            reset_adapter_parameters(backbone)  # B = 0 again: the backbone's init reached the LoRA layers too
    return backbone


# --------------------------------------------------------------------------------------------- conversion
def _read_meta(ckpt_dir: Path) -> dict[str, Any]:
    meta = ckpt_dir / "meta.pt"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{ckpt_dir} is not a sharded Lightning checkpoint (no meta.pt): pass the checkpoint directory written "
            "under FSDP2Strategy / ModelParallelStrategy (e.g. checkpoints/last.ckpt/)"
        )
    loaded = torch.load(meta, map_location="cpu", weights_only=False)
    return dict(loaded)


def convert_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    backbone: Backbone,
    adapter: Mapping[str, Any] | None = None,
    max_shard_size: int | None = None,
) -> Path:
    """Turn a stage checkpoint (sharded or a single file) into the backbone's ORIGINAL checkpoint layout.

    Runs in one process without ``torch.distributed``: the shards of every rank are read and reassembled into
    ``backbone`` (``torch.distributed.checkpoint`` reshards to the full tensors), or a single-file Lightning
    checkpoint is read; a LoRA adapter found in the checkpoint is merged, and the family's ``save_pretrained`` writes
    config.json + safetensors. This is also how one stage's result becomes the next stage's ``pretrained`` (e.g.
    MMaDA pretraining -> mixed CoT SFT).

    Args:
        ckpt_dir: The checkpoint directory (``…/checkpoints/last.ckpt/`` with ``meta.pt`` and ``*.distcp``) or a
            single-file ``.ckpt`` (an adapter-only one needs ``backbone`` built from the base it was trained on).
        out_dir: Output directory.
        backbone: A backbone of the trained family and size (e.g. ``LLaDABackbone("tiny")`` or the
            ``pretrained`` directory it was fine-tuned from); its weights are replaced.
        adapter: The LoRA settings the run trained with; default: read from the checkpoint's hyper-parameters.
        max_shard_size: Bytes per safetensors shard (default: the family's default).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileNotFoundError: when ``ckpt_dir`` is not a sharded checkpoint.
        ValueError: when the checkpoint's tensors do not fit ``backbone`` (missing, unexpected or mis-shaped).
    """
    import torch.distributed.checkpoint as dcp

    from dllm_zoo.adapters import LoRA, apply_lora, merge_and_export

    ckpt = Path(ckpt_dir)
    if ckpt.is_file():
        return _convert_single_file(ckpt, out_dir, backbone, adapter, max_shard_size)
    meta = _read_meta(ckpt)
    saved_adapter = adapter if adapter is not None else meta.get("hyper_parameters", {}).get("adapter")
    if saved_adapter is not None:
        config = LoRA(**saved_adapter)
        if config.quantize is not None:
            raise ValueError("a QLoRA checkpoint is never sharded (FSDP2 refuses 4-bit weights): nothing to convert")
        apply_lora(backbone, config)
    own = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    reader = dcp.FileSystemReader(str(ckpt))
    stored = {k.removeprefix("state_dict."): v for k, v in reader.read_metadata().state_dict_metadata.items()}
    stored = {k: v for k, v in stored.items() if k.startswith("backbone.")}
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    misshaped = [
        f"{k} {tuple(stored[k].size)} vs {tuple(own[k].shape)}"  # type: ignore[union-attr]
        for k in sorted(set(own) & set(stored))
        if tuple(stored[k].size) != tuple(own[k].shape)  # type: ignore[union-attr]
    ]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"the checkpoint {ckpt} does not fit {type(backbone).__name__} "
            f"(pass the family and size it was trained with): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"mis-shaped {misshaped[:5]}"
        )
    state = {"state_dict": own}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return merge_and_export(backbone, out_dir, max_shard_size=max_shard_size)


def _convert_single_file(
    ckpt: Path, out_dir: str | Path, backbone: Backbone, adapter: Mapping[str, Any] | None, max_shard_size: int | None
) -> Path:
    """:func:`convert_checkpoint` for a single-file Lightning checkpoint."""
    from dllm_zoo.adapters import LoRA, apply_lora, merge_and_export

    try:
        loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exn:  # noqa: BLE001 - torch raises several types for unreadable files
        raise ValueError(f"{ckpt} is not a readable Lightning checkpoint ({exn})") from exn
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        raise ValueError(f"{ckpt} is not a Lightning checkpoint (no state_dict)")
    saved_adapter = adapter if adapter is not None else loaded.get("hyper_parameters", {}).get("adapter")
    if saved_adapter is not None:
        config = LoRA(**saved_adapter)
        if config.quantize is not None:
            raise ValueError(
                "a QLoRA checkpoint holds 4-bit base weights that cannot be merged here; convert the LoRA run on the "
                "full-precision base instead (--model.adapter without quantize)"
            )
        apply_lora(backbone, config)
    stored = {k.removeprefix("backbone."): v for k, v in loaded["state_dict"].items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    adapter_only = int(loaded.get("dllm_zoo_adapter", {}).get("frozen_keys_not_saved", 0)) > 0
    trainable = {k for k, v in backbone.named_parameters() if v.requires_grad}
    missing = sorted(k for k in set(own) - set(stored) if not (adapter_only and k not in trainable))
    unexpected = sorted(set(stored) - set(own))
    misshaped = [
        f"{k} {tuple(stored[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(stored))
        if tuple(stored[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"the checkpoint {ckpt} does not fit {type(backbone).__name__} "
            f"(pass the family and size it was trained with): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"mis-shaped {misshaped[:5]}"
        )
    backbone.load_state_dict(stored, strict=not adapter_only)
    return merge_and_export(backbone, out_dir, max_shard_size=max_shard_size)
