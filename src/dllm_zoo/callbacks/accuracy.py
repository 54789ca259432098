"""Answer accuracy during training: decode held-out questions with a sampler at every validation and log it.

A loss going down does not show that a diffusion LM answers correctly; decoding does. :class:`TaskAccuracy` runs
:func:`~dllm_zoo.evaluation.evaluate_task` on the datamodule's synthetic task at the end of each validation and
logs ``val/accuracy`` (plus ``val/sample_tokens_per_s``), so a recipe's curve shows the model learning to answer.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.synthetic.base import SyntheticTask
from dllm_zoo.evaluation import evaluate_task
from dllm_zoo.samplers.base import Sampler
from dllm_zoo.tokenizers.text import TextTokenizer


class TaskAccuracy(Callback):
    """Log the answer accuracy of ``sampler`` on the task's validation questions after every validation.

    Every rank decodes the same questions (sharded models need every rank in each forward), so the logged value
    is identical across ranks.

    Args:
        sampler: How to decode (e.g. ``LLaDASampler`` for full attention, ``BlockSampler`` for block attention).
        task: The task to score; default: the datamodule's ``task``.
        limit: Validation questions to decode.
        batch_size: Prompts per ``generate`` call.
        chat: Prompts in the chat format; default: ``True`` when the datamodule's ``format`` is ``lm_chat``.
    """

    def __init__(
        self,
        sampler: Sampler,
        task: SyntheticTask | None = None,
        limit: int = 64,
        batch_size: int = 32,
        chat: bool | None = None,
    ) -> None:
        if limit < 1 or batch_size < 1:
            raise ValueError(f"limit and batch_size must be >= 1, got limit={limit}, batch_size={batch_size}")
        self.sampler = sampler
        self.task = task
        self.limit = limit
        self.batch_size = batch_size
        self.chat = chat

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Decode, score and log ``val/accuracy`` (skipped during the sanity check)."""
        if trainer.sanity_checking:
            return
        dm: Any = trainer.datamodule  # type: ignore[attr-defined]
        task = self.task if self.task is not None else getattr(dm, "task", None)
        tokenizer = getattr(dm, "tokenizer", None)
        if not isinstance(task, SyntheticTask) or not isinstance(tokenizer, TextTokenizer):
            raise ValueError(
                "TaskAccuracy needs a synthetic task and a text tokenizer: pass task= or use a datamodule with "
                f"`task` and `tokenizer` attributes (got task={task!r}, tokenizer={tokenizer!r})"
            )
        chat = self.chat if self.chat is not None else getattr(dm, "format", "lm_chat") == "lm_chat"
        net = getattr(pl_module, "net", None)
        if not isinstance(net, Backbone):
            raise TypeError(f"TaskAccuracy needs a stage whose `net` is a Backbone, got {type(net)!r}")
        was_training = net.training
        report = evaluate_task(
            net, tokenizer, self.sampler, task, limit=self.limit, batch_size=self.batch_size, chat=chat
        )
        net.train(was_training)
        # Identical on every rank (same questions, same weights); sync_dist makes that explicit to Lightning.
        pl_module.log("val/accuracy", report.accuracy, prog_bar=True, sync_dist=True)
        pl_module.log("val/sample_tokens_per_s", report.tokens_per_second, sync_dist=True)
