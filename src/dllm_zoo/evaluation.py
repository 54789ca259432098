"""Answer accuracy of a sampler on a synthetic task: prompts in, decoded completions checked by the task."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.prompts import left_pad, prompt_token_ids
from dllm_zoo.data.synthetic.base import SyntheticTask
from dllm_zoo.tokenizers.text import TextTokenizer

if TYPE_CHECKING:
    from dllm_zoo.samplers.base import Sampler


def encode_prompts(tokenizer: TextTokenizer, prompts: Sequence[str], chat: bool = True) -> tuple[Tensor, Tensor]:
    """Encode prompts (as a user turn plus the generation prompt when ``chat``) and LEFT-pad them.

    Args:
        tokenizer: Text tokenizer; its layout gives the pad id.
        prompts: ``B`` prompt strings.
        chat: Render with the layout's chat template (the ``lm_chat`` training format).

    Returns:
        ``ids`` ``[B, P]`` int64 and ``mask`` ``[B, P]`` bool (True = real token).
    """
    return left_pad([prompt_token_ids(tokenizer, p, chat) for p in prompts], tokenizer.layout.pad_id)


@dataclass
class AccuracyReport:
    """Accuracy and cost of decoding a task's samples.

    Attributes:
        accuracy: Fraction of samples the task's checker accepts.
        num_samples: Samples decoded.
        generated_tokens: Positions generated (the sampler's ``attention_mask`` over the completion part: a row that
            stopped early counts only what it generated).
        forward_passes: Sum over batches of the sampler's NFE.
        seconds: Wall time of the sampling calls.
        completions: The decoded completions, in sample order.
    """

    accuracy: float
    num_samples: int
    generated_tokens: int
    forward_passes: int
    seconds: float
    completions: list[str]

    @property
    def tokens_per_second(self) -> float:
        """Generated positions per second."""
        return self.generated_tokens / self.seconds

    @property
    def tokens_per_forward(self) -> float:
        """Generated positions per forward pass (batch rows counted once per pass)."""
        return self.generated_tokens / max(1, self.forward_passes)


@torch.no_grad()
def evaluate_task(
    model: Backbone,
    tokenizer: TextTokenizer,
    sampler: Sampler,
    task: SyntheticTask,
    *,
    split: str = "val",
    limit: int | None = None,
    batch_size: int = 8,
    chat: bool = True,
    seed: int = 0,
) -> AccuracyReport:
    """Decode ``task`` prompts with ``sampler`` and score them with ``task.check``.

    Args:
        model: Any backbone (put in eval mode here).
        tokenizer: Tokenizer matching the model's layout.
        sampler: Any :class:`~dllm_zoo.samplers.base.Sampler`.
        task: A synthetic task with prompts and an exact checker.
        split: ``"train"`` or ``"val"``.
        limit: Decode at most this many samples.
        batch_size: Prompts per ``generate`` call.
        chat: Prompts in the chat format (as trained with ``lm_chat``).
        seed: Seed of the sampler's generator (temperature > 0 or random remasking).
    """
    model.eval()
    device = next(model.parameters()).device
    samples: list[dict[str, Any]] = list(itertools.islice(task.generate(split), limit))  # type: ignore[arg-type]
    gen = torch.Generator(device).manual_seed(seed)
    completions: list[str] = []
    nfe = generated = 0
    seconds = 0.0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, [s["prompt"] for s in chunk], chat=chat)
        t0 = time.perf_counter()
        out = sampler.generate(model, ids.to(device), mask.to(device), generator=gen)
        completion_ids = out.tokens[:, ids.shape[1] :]
        completion_mask = out.attention_mask[:, ids.shape[1] :]
        generated += int(completion_mask.sum())  # also the sync that makes the timing honest on accelerators
        seconds += time.perf_counter() - t0
        nfe += out.nfe
        rows = [[t for t, m in zip(r, k) if m] for r, k in zip(completion_ids.tolist(), completion_mask.tolist())]
        completions += tokenizer.batch_decode(rows, skip_special_tokens=True)
    correct = sum(task.check(c, s) for c, s in zip(completions, samples))
    return AccuracyReport(
        accuracy=correct / max(1, len(samples)),
        num_samples=len(samples),
        generated_tokens=generated,
        forward_passes=nfe,
        seconds=seconds,
        completions=completions,
    )
