"""The component registry: the public subclasses of each axis's base class, and name resolution.

There is one naming system: a component's class name (or its full dotted path). LightningCLI accepts the
same names in ``class_path``; this module only enumerates and resolves them for the Python API and for
``dllm-zoo list``. A user's own subclass, once imported, is listed and resolvable like a built-in.
"""

from __future__ import annotations

import importlib
import inspect
import sys

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.synthetic.base import SyntheticTask
from dllm_zoo.losses.masked_diffusion import MaskedDiffusionLoss
from dllm_zoo.rewards.base import Reward
from dllm_zoo.rl.masking import ResponseMasking
from dllm_zoo.rl.objectives import PolicyObjective
from dllm_zoo.samplers.base import Sampler
from dllm_zoo.samplers.confidence import Confidence
from dllm_zoo.samplers.transfer import TransferRule
from dllm_zoo.schedules.base import NoiseSchedule
from dllm_zoo.stages.base import DiffusionStage
from dllm_zoo.tokenizers.image import ImageTokenizer
from dllm_zoo.tokenizers.text import TextTokenizer

AXES: dict[str, type] = {
    "backbone": Backbone,
    "tokenizer": TextTokenizer,
    "image_tokenizer": ImageTokenizer,
    "schedule": NoiseSchedule,
    "loss": MaskedDiffusionLoss,
    "stage": DiffusionStage,
    "sampler": Sampler,
    "confidence": Confidence,
    "transfer": TransferRule,
    "task": SyntheticTask,
    "objective": PolicyObjective,
    "masking": ResponseMasking,
    "reward": Reward,
}


def _base(axis: str) -> type:
    if axis not in AXES:
        raise KeyError(f"unknown component axis {axis!r}; choose one of {sorted(AXES)}")
    return AXES[axis]


def _importable(cls: type) -> bool:
    """Whether ``module.Class`` names this very class, so a config can refer to it."""
    module = sys.modules.get(cls.__module__)
    return module is not None and getattr(module, cls.__qualname__, None) is cls


def _config_wrapper(cls: type) -> bool:
    """Jsonargparse's ``lazy_instance`` defaults subclass a component; they are config machinery, not components."""
    return any(base.__module__.split(".")[0] == "jsonargparse" for base in cls.__mro__)


def components(axis: str) -> dict[str, type]:
    """Public, concrete classes of ``axis`` (the base itself when it is concrete), keyed by class name.

    Raises:
        KeyError: for an unknown axis (the message lists the known ones).
    """
    base = _base(axis)
    found: dict[str, type] = {}
    stack = [base]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__name__.startswith("_") or inspect.isabstract(cls) or cls is DiffusionStage:
            continue
        if not _importable(cls) or _config_wrapper(cls):
            continue
        if cls.__name__ in found and found[cls.__name__] is not cls:
            # Two classes with one short name: only the dotted path is unambiguous; keep the first.
            continue
        found[cls.__name__] = cls
    return dict(sorted(found.items()))


def resolve(axis: str, name: str) -> type:
    """The class of ``axis`` called ``name`` (a short class name or a full ``module.Class`` path).

    Raises:
        KeyError: if no such class exists; the message lists the known names.
        TypeError: if a dotted path names a class of another axis.
    """
    known = components(axis)
    if name in known:
        return known[name]
    if "." in name:
        module_name, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        if not (isinstance(cls, type) and issubclass(cls, _base(axis))):
            raise TypeError(f"{name} is not a {_base(axis).__name__} subclass (axis {axis!r})")
        return cls
    raise KeyError(f"no {axis} named {name!r}; known: {sorted(known)}")
