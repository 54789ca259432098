from pathlib import Path

import pytest
import torch

from dllm_zoo.backbones import LLaDABackbone, SDARBackbone


@pytest.mark.parametrize("family", [LLaDABackbone, SDARBackbone])
def test_dtype_casts_fresh_and_loaded_weights(family: type, tmp_path: Path) -> None:
    torch.manual_seed(0)
    fp32 = family("tiny")
    fp32.save_pretrained(tmp_path)
    assert {p.dtype for p in family("tiny", dtype="bfloat16").parameters()} == {torch.bfloat16}
    loaded = family(pretrained=str(tmp_path), dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(fp32.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert {p.dtype for p in family(pretrained=str(tmp_path)).parameters()} == {torch.float32}  # stored dtype kept
    with pytest.raises(ValueError, match=r"backbone.init_args.dtype='fp8'"):
        family("tiny", dtype="fp8")
