"""A diffusion value model: any backbone plus a zero-initialised scalar head (research/tracerl_llada.md §2.5).

TraceRL's value model is a full copy of the language model with ``value_head = Linear(D, 1, bias=False)`` on the
final (post-norm) hidden states, initialised to zero, so every value starts at 0 and the first advantages equal the
plain returns. It runs on exactly the rows the policy trains on (same tokens, same attention mask and positions) and
is read at the noisy positions: ``V_j`` is the value of token ``j`` in the state just before it was decoded.

The released value model exists for SDAR/TraDo only (dLLM-RL issue #28); here the head sits on the backbone
contract's ``return_hidden`` output, so any :class:`~dllm_zoo.backbones.base.Backbone` works (LLaDA, SDAR, …), and
the width ``D`` is read from the backbone's ``output_head()`` (``D -> V``). The vocabulary projection is skipped in
the value forward (``return_logits=False``); its weights stay in the backbone so the checkpoint keeps the family's
original layout.

Checkpoints: :meth:`ValueModel.save_pretrained` writes the backbone's own ``save_pretrained`` directory plus
``value_head.safetensors`` and ``value_model.json`` (the backbone class), and :meth:`ValueModel.from_pretrained`
reads them back.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dllm_zoo.backbones.base import Backbone

HEAD_FILE = "value_head.safetensors"
META_FILE = "value_model.json"


class ValueModel(nn.Module):
    """``V(x) = w · h(x)`` per position: a backbone's final hidden states ``h`` and a zero-initialised ``w``.

    Args:
        backbone: Any backbone (or a zero-argument factory building one), e.g. ``SDARBackbone(pretrained=…)`` of
            the policy's checkpoint (the release initialises the value model from the policy's weights) or of
            another checkpoint.

    Example:
        >>> from dllm_zoo.backbones import LLaDABackbone
        >>> v = ValueModel(LLaDABackbone("tiny"))
        >>> v(torch.tensor([[1, 2, 3]])).tolist()  # zero head: every value starts at 0
        [[0.0, 0.0, 0.0]]
    """

    def __init__(self, backbone: Backbone | Callable[[], Backbone]) -> None:
        super().__init__()
        built = backbone if isinstance(backbone, Backbone) else backbone()
        if not isinstance(built, Backbone):
            raise TypeError(f"--model.value_model.backbone must build a dllm_zoo Backbone, got {type(built).__name__}")
        self.backbone = built
        width = built.output_head().in_features
        self.head = nn.Linear(width, 1, bias=False)
        nn.init.zeros_(self.head.weight)  # all values 0 at the start: the first advantages are the returns

    def forward(
        self, input_ids: Tensor, *, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """Values at every position.

        Args:
            input_ids: ``[B, L]`` token ids (the policy's training rows).
            attention_mask: ``[B, L]`` key padding or ``[B, 1, L, L]`` bool mask, as for the backbone.
            position_ids: ``[B, L]`` RoPE positions (default ``0..L−1``).

        Returns:
            ``[B, L]`` float32 values.
        """
        out = self.backbone(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, return_hidden=True, return_logits=False
        )
        assert out.hidden is not None  # requested
        # The head in float32: values are regression targets of order 1, bf16 rounding would bias small advantages.
        return nn.functional.linear(out.hidden.float(), self.head.weight.float()).squeeze(-1)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the backbone's checkpoint directory, ``value_head.safetensors`` and ``value_model.json``."""
        out = Path(path)
        self.backbone.save_pretrained(out)
        save_file({"weight": self.head.weight.detach().cpu().contiguous()}, str(out / HEAD_FILE))
        cls = type(self.backbone)
        meta = {"backbone_class": f"{cls.__module__}.{cls.__qualname__}", "head": HEAD_FILE}
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ValueModel:
        """Load a directory written by :meth:`save_pretrained`.

        Args:
            path: The directory.
            **overrides: Passed to the backbone class's ``from_pretrained``.

        Raises:
            FileNotFoundError: when the directory lacks ``value_model.json`` or the head file.
        """
        root = Path(path)
        meta_file = root / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{root} is not a value-model directory (no {META_FILE}); write it with ValueModel.save_pretrained"
            )
        meta = json.loads(meta_file.read_text())
        module, _, name = str(meta["backbone_class"]).rpartition(".")
        backbone_cls = getattr(importlib.import_module(module), name)
        model = cls(backbone_cls.from_pretrained(root, **overrides))
        head = load_file(str(root / meta.get("head", HEAD_FILE)))["weight"]
        with torch.no_grad():
            model.head.weight.copy_(head.to(model.head.weight.dtype))
        return model


__all__ = ["ValueModel"]
