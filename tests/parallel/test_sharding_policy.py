import pytest
import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

from dllm_zoo.parallel import FSDP2Strategy, ShardingPolicy


def test_policy_builds_fully_shard_arguments() -> None:
    mesh = object()
    plain = ShardingPolicy().fully_shard_kwargs(mesh)  # type: ignore[arg-type]
    assert plain["mesh"] is mesh
    assert plain["reshard_after_forward"] is True
    assert "mp_policy" not in plain
    assert type(plain["offload_policy"]) is OffloadPolicy

    policy = ShardingPolicy("bfloat16", "float32", cpu_offload=True, reshard_after_forward=False)
    kwargs = policy.fully_shard_kwargs(mesh)  # type: ignore[arg-type]
    assert kwargs["mp_policy"] == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert isinstance(kwargs["offload_policy"], CPUOffloadPolicy)
    assert kwargs["offload_policy"].pin_memory is torch.cuda.is_available()  # pinning needs an accelerator
    assert kwargs["reshard_after_forward"] is False


def test_strategy_is_data_parallel_only_and_checks_dtype_names() -> None:
    strategy = FSDP2Strategy(param_dtype="bfloat16", cpu_offload=True)
    assert strategy._tensor_parallel_size == 1
    assert strategy.sharding.cpu_offload
    with pytest.raises(ValueError, match=r"--trainer.strategy.init_args.param_dtype='bf16'"):
        FSDP2Strategy(param_dtype="bf16")  # type: ignore[arg-type]
