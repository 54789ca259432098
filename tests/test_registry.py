import pytest
import torch

from dllm_zoo import registry
from dllm_zoo.backbones import LLaDABackbone
from dllm_zoo.schedules import LinearSchedule, NoiseSchedule


class UserSchedule(LinearSchedule):
    """A user's subclass, defined outside the library: listed and resolvable without registration."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return t**2


def test_every_axis_lists_its_builtins() -> None:
    expected = {
        "backbone": {"LLaDABackbone", "SDARBackbone"},
        "tokenizer": {"ByteTokenizer", "HFTextTokenizer"},
        "schedule": {"LinearSchedule", "CosineSchedule"},
        "loss": {"MaskedDiffusionLoss"},
        "stage": {"MaskedDiffusionPretraining", "BlockDiffusionSFT", "UniGRPO", "ParallelSFT", "ParaRL"},
        "task": {"Arithmetic"},
        "sampler": {"LLaDASampler"},
        "confidence": {"LowConfidence", "Margin", "NegEntropy", "RandomConfidence"},
        "transfer": {"StaticQuota", "Threshold", "Factor", "Dynamic"},
        "reward": {
            "ArithmeticCorrectness",
            "ThinkFormat",
            "ShapesAlignment",
            "ClipScore",
            "CodeExecution",
            "ForTasks",
            "PartialAlignment",
        },
        "objective": {"ClippedSurrogate"},
        "masking": {"UniformlySpacedMasking", "RandomMasking", "CoupledMasking"},
    }
    for axis, names in expected.items():
        assert names <= set(registry.components(axis)), axis
    assert "NoiseSchedule" not in registry.components("schedule")  # abstract bases are not components
    assert "TransformerBackbone" not in registry.components("backbone")  # the families' shared abstract base
    # jsonargparse's dynamic lazy-instance wrappers (created for the stage defaults) are not components
    assert not [n for axis in registry.AXES for n in registry.components(axis) if n.startswith("LazyInstance")]


def test_resolve_short_dotted_and_user_classes() -> None:
    assert registry.resolve("backbone", "LLaDABackbone") is LLaDABackbone
    assert registry.resolve("schedule", "dllm_zoo.schedules.cosine.CosineSchedule").__name__ == "CosineSchedule"
    assert registry.resolve("schedule", "UserSchedule") is UserSchedule
    assert issubclass(registry.resolve("schedule", f"{__name__}.UserSchedule"), NoiseSchedule)


def test_resolve_errors_name_the_alternatives() -> None:
    with pytest.raises(KeyError, match="known: .*LinearSchedule"):
        registry.resolve("schedule", "Nope")
    with pytest.raises(KeyError, match="unknown component axis 'nope'"):
        registry.components("nope")
    with pytest.raises(TypeError, match="not a NoiseSchedule subclass"):
        registry.resolve("schedule", "dllm_zoo.backbones.llada.LLaDABackbone")
