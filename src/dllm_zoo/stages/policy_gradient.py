"""The shared machinery of in-process policy-gradient stages (UniGRPO, ParaRL).

A policy-gradient stage alternates, per batch of prompts, rollouts under ``no_grad``, scoring, and ``μ`` inner
optimizer steps (manual optimisation) on a :class:`~dllm_zoo.rl.objectives.PolicyObjective`. What differs between
algorithms is how rollouts become training rows (UniGRPO: re-masked responses; ParaRL: replayed denoising steps)
and how they are scored; what is the same lives here:

* the **reference policy** of a KL term against the reference: a frozen copy of the initial policy, or — with a
  LoRA adapter — the same backbone with the adapter disabled (no second copy in memory);
* the **update** (:meth:`PolicyGradientStage.policy_update`): old (and reference) log-probabilities of every row
  computed once before the first update (so the first iteration's ratio is 1), then ``μ`` iterations of
  micro-batched forward/backward, gradient clipping, optimizer and scheduler steps, with averaged diagnostics;
* **timers** (``time/*`` metrics: rollout, scoring, training, step, outside the model);
* the **held-out** score before the first and after the last update (``heldout_before/*``, ``heldout_after/*``).

Trainer steps count optimizer steps: ``--trainer.max_steps`` = RL steps × ``inner_iterations``.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.parallel import is_sharded
from dllm_zoo.rl.logprobs import masked_token_logprobs
from dllm_zoo.rl.objectives import PolicyObjective
from dllm_zoo.stages.base import BackboneFactory, DiffusionStage
from dllm_zoo.stages.optim import OptimConfig
from dllm_zoo.tokenizers.image import ImageTokenizer
from dllm_zoo.tokenizers.text import TextTokenizer

ReferenceKind = Literal["auto", "copy", "adapter"]

# Timer keys whose time is spent in model forward/backward passes (the rest is bookkeeping; see benchmarks/).
MODEL_TIMERS = ("generate", "logp_old", "logp_ref", "forward_backward")


class PolicyGradientStage(DiffusionStage, ABC):
    """Base class of RL stages with manual optimisation (see the module docstring).

    Subclasses build the training rows and call :meth:`policy_update`, and implement :meth:`heldout_scores`.

    Args:
        backbone: The policy: a backbone factory or instance.
        objective: The policy objective.
        num_generations: ``G``, rollouts per prompt (>= 2: group advantages).
        inner_iterations: ``μ``, optimizer steps per rollout batch.
        micro_batch_size: Rows per forward/backward (gradients accumulate over the micro-batches of one iteration);
            ``None`` = all rows at once.
        reference: ``auto`` (``adapter`` when ``adapter`` is set, else ``copy``), ``copy`` or ``adapter``; only
            used when the objective needs a reference.
        max_grad_norm: Gradient clipping by global norm (``None`` = off).
        tokenizer: Decodes generated text; default: the datamodule's ``tokenizer``.
        optim: Optimizer settings.
        seed: Seed of the rollout and training random sources.
        adapter: Train a LoRA/QLoRA adapter instead of every weight.
        image_tokenizer: Decodes generated image codes; default: the datamodule's ``image_tokenizer``.
    """

    algorithm: ClassVar[str] = "policy gradient"
    """The name in the held-out report (``held-out before <algorithm>: …``)."""
    headline_metric: ClassVar[str | None] = None
    """The held-out metric whose ``before -> after`` ends the report (``None``: no such line)."""

    def __init__(
        self,
        backbone: BackboneFactory | Backbone,
        objective: PolicyObjective,
        num_generations: int,
        inner_iterations: int,
        micro_batch_size: int | None,
        reference: ReferenceKind,
        max_grad_norm: float | None,
        tokenizer: TextTokenizer | None,
        optim: OptimConfig,
        seed: int,
        adapter: LoRA | None,
        image_tokenizer: ImageTokenizer | None = None,
    ) -> None:
        super().__init__(backbone, optim, seed, adapter)
        if num_generations < 2:
            raise ValueError(f"--model.num_generations must be >= 2 (group advantages), got {num_generations}")
        if inner_iterations < 1:
            raise ValueError(f"--model.inner_iterations must be >= 1, got {inner_iterations}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"--model.micro_batch_size must be >= 1, got {micro_batch_size}")
        if reference not in ("auto", "copy", "adapter"):
            raise ValueError(f"--model.reference must be auto, copy or adapter, got {reference!r}")
        if reference == "adapter" and adapter is None:
            raise ValueError("--model.reference=adapter needs --model.adapter (the base model is the reference)")
        self.automatic_optimization = False
        self.objective = objective
        self.num_generations = num_generations
        self.inner_iterations = inner_iterations
        self.micro_batch_size = micro_batch_size
        self.reference_kind = reference
        self.max_grad_norm = max_grad_norm
        self._tokenizer = tokenizer
        self._image_tokenizer = image_tokenizer
        self.reference: Backbone | None = None
        self.timers: dict[str, float] = defaultdict(float)
        self._heldout_before: dict[str, float] | None = None

    # ------------------------------------------------------------------ model
    def _uses_adapter_reference(self) -> bool:
        return self.reference_kind == "adapter" or (self.reference_kind == "auto" and self.adapter is not None)

    def configure_model(self) -> None:
        """Build the policy (see :class:`DiffusionStage`) and, when the objective needs one, the frozen reference.

        The copy is made here, before a checkpoint is restored, and is part of the state dict, so a resumed run keeps
        the reference of the original start.
        """
        super().configure_model()
        if not self.objective.needs_reference() or self._uses_adapter_reference() or self.reference is not None:
            return
        if is_sharded(self.net):
            raise ValueError(
                "a frozen reference copy of a sharded policy is not supported: train a LoRA adapter "
                "(--model.adapter, the reference is then the base model) or set --model.objective.kl_against=old"
            )
        # Left in train mode like the policy (Lightning warns about eval-mode modules at fit start); it runs only
        # under no_grad inside reference_context, which switches it to eval.
        self.reference = copy.deepcopy(self.net).requires_grad_(False)

    @contextmanager
    def reference_context(self) -> Iterator[None]:
        """Context in which :meth:`reference_model` computes the reference policy (adapter off, or the copy in eval)."""
        if self._uses_adapter_reference():
            with self.disable_adapter():
                yield
            return
        assert self.reference is not None  # configure_model built it
        self.reference.eval()
        try:
            yield
        finally:
            self.reference.train()

    def reference_model(self) -> Backbone:
        """The backbone that computes the reference (inside :meth:`reference_context`)."""
        if self._uses_adapter_reference():
            return self.net
        assert self.reference is not None  # configure_model built it
        return self.reference

    def _datamodule_attr(self, name: str) -> Any:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, name, None)

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer decoding completions (given, or the datamodule's)."""
        if self._tokenizer is not None:
            return self._tokenizer
        tok = self._datamodule_attr("tokenizer")
        if not isinstance(tok, TextTokenizer):
            raise ValueError(
                f"{self.algorithm} decodes completions with a text tokenizer: set --model.tokenizer or use a "
                "datamodule with a `tokenizer` (PromptDataModule)"
            )
        return tok

    @property
    def image_tokenizer(self) -> ImageTokenizer:
        """The image tokenizer decoding generated codes (given, or the datamodule's)."""
        if self._image_tokenizer is not None:
            return self._image_tokenizer
        tok = self._datamodule_attr("image_tokenizer")
        if not isinstance(tok, ImageTokenizer):
            raise ValueError(
                f"{self.algorithm} decodes images with an image tokenizer: set --model.image_tokenizer or use a "
                "datamodule with an `image_tokenizer` (ParallelDataModule, MultimodalPromptDataModule)"
            )
        return tok

    # ------------------------------------------------------------------ timing
    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Accumulate the wall time of the block into ``self.timers[key]`` (synchronising CUDA for honest numbers)."""
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(self.device)
            self.timers[key] += time.perf_counter() - t0

    def timing_metrics(self, seconds: float) -> dict[str, Tensor]:
        """``time/*`` metrics of one RL step from :attr:`timers` and its total wall time ``seconds``."""
        t = self.timers
        return {
            "time/rollout": torch.tensor(t["generate"] + t["decode"]),
            "time/scoring": torch.tensor(t["reward"] + t["advantage"]),
            "time/training": torch.tensor(t["logp_old"] + t["logp_ref"] + t["forward_backward"] + t["optimizer"]),
            "time/step": torch.tensor(seconds),
            "time/outside_model": torch.tensor(seconds - sum(t[k] for k in MODEL_TIMERS)),
        }

    # ------------------------------------------------------------ optimisation
    def _chunks(self, n: int) -> list[slice]:
        size = n if self.micro_batch_size is None else self.micro_batch_size
        return [slice(i, min(n, i + size)) for i in range(0, n, size)]

    def token_logprobs(
        self,
        model: Backbone,
        noisy: Tensor,
        labels: Tensor,
        targets: Tensor,
        attention_mask: Tensor,
        with_entropy: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The policy's log-probabilities of the taken tokens (:func:`~dllm_zoo.rl.logprobs.masked_token_logprobs`).

        Every log-probability of the update goes through here (old, reference and current policy), so a subclass
        can change how a row is scored (ParaRL: optionally through the guided logits).

        Args:
            model: The policy or reference backbone.
            noisy: ``[R, L]`` int64 model input.
            labels: ``[R, L]`` int64 taken tokens.
            targets: ``[R, L]`` bool positions to score.
            attention_mask: ``[R, L]`` key-padding mask.
            with_entropy: Also return the predictive entropy at the targets (no gradient).

        Returns:
            ``(logp [R, L] float32, entropy [R, L] float32 | None)``, zero outside ``targets``.
        """
        return masked_token_logprobs(
            model, noisy, labels, targets, attention_mask=attention_mask, with_entropy=with_entropy
        )

    @torch.no_grad()
    def _frozen_logprobs(self, model: Backbone, noisy: Tensor, labels: Tensor, targets: Tensor, attn: Tensor) -> Tensor:
        parts = [
            self.token_logprobs(model, noisy[s], labels[s], targets[s], attn[s])[0]
            for s in self._chunks(noisy.shape[0])
        ]
        return torch.cat(parts)

    def policy_update(
        self,
        noisy: Sequence[Tensor],
        targets: Sequence[Tensor],
        labels: Tensor,
        attention_mask: Tensor,
        advantages: Tensor,
    ) -> dict[str, Tensor]:
        """The ``μ`` inner iterations on fixed training rows; returns the diagnostics averaged over micro-batches.

        Iteration ``n`` trains on ``noisy[n % K]`` / ``targets[n % K]`` (``K`` = ``len(noisy)``: ``μ`` row sets, one
        per iteration, or one set for every iteration). The old policy's log-probs of all ``K`` sets (and the
        reference's, when the objective needs them) are computed before the first update.

        Args:
            noisy: ``K`` model inputs ``[R, L]`` int64.
            targets: ``K`` bool ``[R, L]``: the scored (taken) tokens of each row.
            labels: ``[R, L]`` int64 clean tokens (the actions).
            attention_mask: ``[R, L]`` key-padding mask.
            advantages: ``[R]`` (per row) or ``[R, L]`` (per token) float.

        Returns:
            ``loss``, ``surrogate``, ``kl``, ``clip_fraction``, ``ratio``, ``entropy`` (scalars).
        """
        if len(noisy) != len(targets) or not noisy:
            raise ValueError(
                f"noisy and targets must be equally long non-empty lists, got {len(noisy)}, {len(targets)}"
            )
        stats: dict[str, list[Tensor]] = defaultdict(list)
        with self.timed("logp_old"):
            old = [self._frozen_logprobs(self.net, x, labels, m, attention_mask) for x, m in zip(noisy, targets)]
        ref: list[Tensor | None] = [None] * len(noisy)
        if self.objective.needs_reference():
            with self.timed("logp_ref"), self.reference_context():
                model = self.reference_model()
                ref = [self._frozen_logprobs(model, x, labels, m, attention_mask) for x, m in zip(noisy, targets)]
        opt = self.optimizers()
        assert not isinstance(opt, list)  # configure_optimizers returns one optimizer
        sched = self.lr_schedulers()
        n_rows = labels.shape[0]
        for n in range(self.inner_iterations):
            k = n % len(noisy)
            rows, scored = noisy[k], targets[k]
            opt.zero_grad()
            for s in self._chunks(n_rows):
                with self.timed("forward_backward"):
                    logp, entropy = self.token_logprobs(
                        self.net, rows[s], labels[s], scored[s], attention_mask[s], with_entropy=True
                    )
                    ref_s = None if ref[k] is None else ref[k][s]  # type: ignore[index]
                    out = self.objective(logp, old[k][s], advantages[s], scored[s], ref_s)
                    self.manual_backward(out.loss * ((s.stop - s.start) / n_rows))
                assert entropy is not None
                m = scored[s].float()
                stats["loss"].append(out.loss.detach())
                stats["surrogate"].append(out.surrogate)
                stats["kl"].append(out.kl)
                stats["clip_fraction"].append(out.clip_fraction)
                stats["ratio"].append(out.ratio_mean)
                stats["entropy"].append((entropy * m).sum() / m.sum().clamp(min=1))
            with self.timed("optimizer"):
                if self.max_grad_norm is not None:
                    self.clip_gradients(
                        opt.optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
                    )
                opt.step()
                if sched is not None:
                    sched.step()  # type: ignore[union-attr]
        return {k: torch.stack(v).mean() for k, v in stats.items()}

    # ---------------------------------------------------------------- held-out
    @abstractmethod
    def heldout_scores(self, batch: Any, batch_idx: int) -> tuple[int, dict[str, Tensor]]:
        """Evaluate one held-out batch.

        Returns:
            ``(prompts, scores)``: the number of prompts evaluated and, per metric name, ``[n]`` float scores (NaN
            where a metric does not apply; NaN entries are left out of its mean).
        """

    def heldout_metrics(self) -> dict[str, float]:
        """Mean of every :meth:`heldout_scores` metric over the held-out set, as floats, and the ``prompts`` count.

        The held-out set is ``datamodule.val_dataloader()`` (its first loader when there are several).
        """
        dm = self.trainer.datamodule  # type: ignore[attr-defined]
        loaders = dm.val_dataloader()
        loader = loaders[0] if isinstance(loaders, list) else loaders
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        prompts = 0
        for i, batch in enumerate(loader):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            n, per = self.heldout_scores(batch, i)
            prompts += n
            for name, s in per.items():
                applies = ~torch.isnan(s)
                sums[name] += float(torch.where(applies, s, 0.0).sum())
                counts[name] += float(applies.sum())
        out = {name: sums[name] / max(1.0, counts[name]) for name in sums}
        out["prompts"] = float(prompts)
        return out

    def on_train_start(self) -> None:
        """Score the held-out prompts before the first update (logged at step 0; the recipe prints before → after)."""
        if self.trainer.sanity_checking or self.trainer.datamodule is None:  # type: ignore[attr-defined]
            return
        self._heldout_before = self.heldout_metrics()
        if self.logger is not None:
            self.logger.log_metrics({f"heldout_before/{k}": v for k, v in self._heldout_before.items()}, step=0)
        rank_zero_info(f"held-out before {self.algorithm}: {self._format(self._heldout_before)}")

    def on_train_end(self) -> None:
        """Score the same held-out prompts after training and report both."""
        if self.trainer.datamodule is None:  # type: ignore[attr-defined]
            return
        after = self.heldout_metrics()
        if self.logger is not None:
            self.logger.log_metrics({f"heldout_after/{k}": v for k, v in after.items()}, step=self.global_step)
        before = self._heldout_before
        msg = f"held-out after {self.algorithm}: {self._format(after)}"
        key = self.headline_metric
        if before is not None and key is not None and key in before:
            msg += f" | {key} {before[key]:.3f} -> {after[key]:.3f} on {int(after['prompts'])} held-out prompts"
        rank_zero_info(msg)
        self.heldout_after = after

    @staticmethod
    def _format(metrics: dict[str, float]) -> str:
        return ", ".join(f"{k}={v:.3f}" if k != "prompts" else f"prompts={int(v)}" for k, v in metrics.items())


__all__ = ["MODEL_TIMERS", "PolicyGradientStage", "ReferenceKind"]
