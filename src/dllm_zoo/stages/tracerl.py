r"""TraceRL (Wang et al. 2025; research/tracerl_llada.md §2): RL on the sampler's own decoding trace, in process.

One training step = one batch of prompts, as in :class:`~dllm_zoo.stages.unigrpo.UniGRPO` (whose rollout, scoring,
group filter and logging this stage inherits):

1. **Rollout** — ``G`` answers per prompt from the stage's sampler (default: the KV-cached
   :class:`~dllm_zoo.samplers.block.BlockSampler`), with the step map (the 1-based global denoising step at which
   every generated position was revealed).
2. **Scoring** — the rewards, their weighted total and its group z-score (population std, 0 without spread); the
   z-score is the sequence reward of the trace (§2.2). Optionally the group filter (release 0.2 / 0.8).
3. **Rows** — ``baseline="trace"`` replays the trace (:func:`~dllm_zoo.rl.trace.rollout_trace_rows`): one row per
   (shrunk) training step, its targets the tokens revealed at that step, the tokens revealed at it or later masked.
   Block models: rows ≤ ``B / shrink`` per response whatever its length; full attention: one per distinct step.
   ``random_masking`` / ``coupled`` are the paper's baselines on the same rollouts: UniGRPO-style re-masking of the
   final answers (:class:`~dllm_zoo.rl.masking.RandomMasking` / :class:`~dllm_zoo.rl.masking.CoupledMasking`,
   one mask set per inner iteration).
4. **Advantages** — policy-only (``value_model=None``): the sequence z-score broadcast to every target. With a
   :class:`~dllm_zoo.rl.value_model.ValueModel`: its values at the rows' noisy positions (``V_j``, the state just
   before token ``j`` was decoded), token rewards (outcome: the z-score on the last step's tokens; plus process
   rewards on the step that completed each judged chunk, §2.6), step-level returns and GAE over the global denoising
   order with ``γ, λ`` (:func:`~dllm_zoo.rl.value.step_returns_and_gae`), token-level advantages into the objective.
5. **Optimisation** — the value model first (``μ`` steps of the clipped value loss, its own AdamW at ``value_lr``),
   then the policy (:meth:`~dllm_zoo.stages.policy_gradient.PolicyGradientStage.policy_update`: old log-probs once,
   ``μ`` iterations of the clipped surrogate).

**How rows reach the model.** Full attention (LLaDA): the noisy canvas ``[M, L]`` with the rollout's key padding.
Block attention (SDAR): trajectory rows ``[prompt (P) | clean response (R) | prompt tail (T) | noisy response (R)]``
(:func:`~dllm_zoo.backbones.attention.trajectory_input_ids`) on the inference block grid of the *training* block size,
with the 4-D block-diffusion mask and RoPE positions of :func:`~dllm_zoo.backbones.attention.trajectory_mask` /
:func:`~dllm_zoo.backbones.attention.trajectory_position_ids`. The update loop passes a ``[M, W]`` key-padding vector
per row (``[real prompt | generated | unused | generated]``); :meth:`TraceRL.token_logprobs` and the value forward
turn each micro-batch's slice into the mask and positions, so no ``[M, 1, W, W]`` mask is ever held for all rows.

**Block-size adaptation** (§2.7): ``training_block_size`` may be a multiple of the sampler's block (e.g. rollouts
at ``B = 4``, training rows and attention at ``B = 8``), so a block model learns to denoise larger blocks from its
own traces; ``None`` trains at the sampler's block size.

**Process rewards** (§2.6; value model only): ``process_reward`` is any :class:`~dllm_zoo.rewards.base.Reward` with
an integer attribute ``chunk_length`` whose call returns, per completion, a *list* of chunk scores (chunk ``c`` =
completion tokens ``[c·chunk_length, (c+1)·chunk_length)``, judged on the prefix up to its end; the reward gets the
completion's token ids as the field ``completion_ids``), or ``None`` (no chunk). Scores are z-scored per chunk index
within each group (population std) and placed on the tokens of the step that completed the chunk's prefix
(:func:`~dllm_zoo.rl.value.process_token_rewards`); they add to the outcome token rewards (give the outcome rewards
weight 0 for the release's process-only rewards). The release uses ``γ = 0.99`` with them.

Release vs ours (deliberate; see also the module docstrings of :mod:`dllm_zoo.rl.trace` and :mod:`dllm_zoo.rl.value`):

* the policy's rows are trained ``μ`` times with one optimizer step each (all rows accumulated); the release makes
  one pass over the rows with an optimizer step every 32 rows;
* the value model trains on every step (release ``train_value_every`` 1) with ``μ`` steps, loss
  ``sequence_mean`` (the release: per row sum / response width, mean over rows);
* the surrogate aggregates with ``sequence_mean`` by default (the LLaDA trainer; the block-model trainer divides by
  the response width) and its KL (β = 0.01) is against the behaviour policy, as released;
* ``post_num`` defaults to 1: the end-of-answer token trains (our layouts pad with EOS; the release's SDAR pads with
  ``<|endoftext|>`` after a distinct ``<|im_end|>`` and uses 0).

Trainer steps count optimizer steps of the policy: ``--trainer.max_steps`` = RL steps × ``inner_iterations``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from jsonargparse import lazy_instance
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones.attention import (
    trajectory_input_ids,
    trajectory_mask,
    trajectory_position_ids,
    trajectory_tail_width,
)
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.sdar import SDARBackbone
from dllm_zoo.rewards.base import Reward
from dllm_zoo.rl.advantages import group_advantages
from dllm_zoo.rl.logprobs import masked_token_logprobs
from dllm_zoo.rl.masking import CoupledMasking, RandomMasking, ResponseMasking
from dllm_zoo.rl.objectives import ClippedSurrogate, PolicyObjective
from dllm_zoo.rl.rollout import RewardAggregation, Rollout
from dllm_zoo.rl.trace import TraceRows, rollout_trace_rows
from dllm_zoo.rl.value import (
    StepGAE,
    clipped_value_loss,
    outcome_token_rewards,
    process_token_rewards,
    step_returns_and_gae,
)
from dllm_zoo.rl.value_model import ValueModel
from dllm_zoo.samplers.base import Sampler
from dllm_zoo.samplers.block import BlockSampler
from dllm_zoo.stages.base import BackboneFactory
from dllm_zoo.stages.optim import OptimConfig, build_optimizer
from dllm_zoo.stages.policy_gradient import ReferenceKind
from dllm_zoo.stages.unigrpo import UniGRPO, _nanmean
from dllm_zoo.tokenizers.text import TextTokenizer

Baseline = Literal["trace", "random_masking", "coupled"]
VALUE_OPTIMIZER_KEY = "tracerl_value_optimizer"


@dataclass
class TraceRollout(Rollout):
    """A :class:`~dllm_zoo.rl.rollout.Rollout` plus what TraceRL needs beyond UniGRPO.

    Attributes:
        prompt_width: ``P``, the (left-padded) prompt width: completion columns start here.
        chunk_rewards: ``[N, C]`` float raw process-reward scores per chunk (NaN = no chunk), or ``None``.
    """

    prompt_width: int = 0
    chunk_rewards: Tensor | None = None


@dataclass
class UpdateRows:
    """The training rows of one RL step in the model's layout (``W`` columns).

    ``W = L`` (the rollout width) for full attention; ``W = P + 2R + T`` for block-model trajectory rows.

    Attributes:
        noisy: ``K`` model inputs ``[M, W]`` int64 (one per inner iteration, or one for all).
        targets: ``K`` bool ``[M, W]``, the scored tokens.
        labels: ``[M, W]`` int64 clean tokens (the actions).
        keys: ``[M, W]`` bool key padding (trajectory rows: ``[real prompt | generated | unused | generated]``).
        source: ``[M]`` int64, the (kept) rollout each row comes from.
        advantages: ``[M]`` (sequence) or ``[M, W]`` (token) float.
        trace: The trace rows (``baseline="trace"``), else ``None``.
    """

    noisy: list[Tensor]
    targets: list[Tensor]
    labels: Tensor
    keys: Tensor
    source: Tensor
    advantages: Tensor
    trace: TraceRows | None = None

    @property
    def num_rows(self) -> int:
        """``M``."""
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class _Trajectory:
    """Widths of the trajectory rows of one update: prompt ``P``, response ``R``, training block ``B``."""

    prompt: int
    response: int
    block: int


def chunk_advantages(scores: Tensor, group: Tensor) -> Tensor:
    """Process-reward chunk scores z-scored per chunk index within each group (population std; NaN kept).

    Args:
        scores: ``[N, C]`` float, NaN where a completion has no such chunk.
        group: ``[N]`` int64 group ids in ``[0, N)``.

    Returns:
        ``[N, C]`` (``scores``' dtype), NaN where ``scores`` is NaN, 0 for chunks whose group has no spread.

    Example:
        >>> chunk_advantages(torch.tensor([[1.0, 0.0], [0.0, float("nan")]]), torch.tensor([0, 0])).tolist()
        [[1.0, nan], [-1.0, nan]]
    """
    n, c = scores.shape
    flat = scores.flatten()
    live = ~torch.isnan(flat)
    cells = torch.arange(n * c, device=scores.device)
    ids = (group[:, None] * c + torch.arange(c, device=scores.device)).flatten()  # (group, chunk index) < N·C
    # Missing chunks form groups of their own past every real one, so they never move a group's statistics.
    ids = torch.cat([torch.where(live, ids, n * c + cells), n * c + cells])
    z = group_advantages(torch.cat([torch.where(live, flat, 0.0), flat.new_zeros(n * c)]), ids)[: n * c]
    return torch.where(live, z, flat).view(n, c)


class TraceRL(UniGRPO):
    """TraceRL policy optimisation of a block- or full-attention dLLM (see the module docstring).

    Batches come from :class:`~dllm_zoo.data.prompts.PromptDataModule`.

    Args:
        backbone: The policy (block attention: SDAR/TraDo; full attention: LLaDA/MMaDA).
        sampler: Generates the rollouts and their step maps (default: block sampler, ``B = 4``, 4 steps per block,
            temperature 1).
        rewards: Reward functions (outcome rewards); ``name`` is the metric key ``reward/<name>``.
        reward_weights: One weight per reward (default all 1).
        reward_aggregation: ``sum_then_normalize`` or ``normalize_then_sum``.
        objective: Policy objective (default: clipped surrogate ε = 0.2, k3 KL β = 0.01 against the old policy).
        baseline: ``trace`` (TraceRL), ``random_masking`` or ``coupled`` (the paper's baselines on the same rollouts).
        masking: Masking of the baselines (default: :class:`~dllm_zoo.rl.masking.RandomMasking` /
            :class:`~dllm_zoo.rl.masking.CoupledMasking`, ``t ~ U[0.1, 0.9]``); must be unset for ``trace``.
        training_block_size: Block size of the training rows and their attention (block models only); ``None`` =
            the sampler's ``block_length``. A multiple of it adapts the model to larger blocks (§2.7).
        shrink: ``s``, consecutive distinct decoding steps merged into one training step (release: 1 for block
            models, 8 for LLaDA).
        value_model: ``None`` = policy-only TraceRL (sequence advantage broadcast); a :class:`ValueModel` = GAE over
            the denoising steps with token-level advantages.
        gamma: Discount ``γ`` per denoising step (value model only).
        lam: GAE ``λ`` (value model only).
        value_lr: Learning rate of the value model's AdamW (release 5e-6; constant).
        value_clip: ``ε`` of the clipped value loss (release 0.2); ``None`` = unclipped.
        process_reward: A chunk-level reward (value model only; see the module docstring), or ``None``.
        num_generations: ``G``, completions per prompt.
        inner_iterations: ``μ``, optimizer steps per rollout batch (policy and value model each).
        micro_batch_size: Rows per forward/backward; ``None`` = all rows at once.
        accuracy_reward: Name of the reward that defines "correct" (score > 0); ``None``: no accuracy metric.
        filter_groups: Drop groups whose accuracy is outside ``[filter_low, filter_high]``.
        filter_low: Lowest kept group accuracy (release 0.2).
        filter_high: Highest kept group accuracy (release 0.8).
        advantage_eps: Added to the group standard deviation (release 0).
        post_num: Trainable padding tokens after each answer.
        reference: ``auto``, ``copy`` or ``adapter`` (only with a KL against the reference).
        eval_sampler: Sampler of the held-out evaluation (default: ``sampler``).
        max_grad_norm: Gradient clipping by global norm, policy and value model (``None`` = off; release 1.0).
        tokenizer: Decodes completions; default: the datamodule's ``tokenizer``.
        optim: Policy optimizer settings (release: AdamW 1e-6, constant).
        seed: Seed of the rollout and masking random sources.
        adapter: Train a LoRA/QLoRA adapter of the policy instead of every weight.
    """

    algorithm: ClassVar[str] = "TraceRL"
    headline_metric: ClassVar[str | None] = "accuracy"

    def __init__(
        self,
        backbone: BackboneFactory | Backbone = lambda: SDARBackbone("tiny"),
        sampler: Sampler = lazy_instance(
            BlockSampler, gen_length=32, block_length=4, denoising_steps=4, temperature=1.0
        ),
        rewards: Sequence[Reward] = (),
        reward_weights: Sequence[float] | None = None,
        reward_aggregation: RewardAggregation = "sum_then_normalize",
        objective: PolicyObjective = lazy_instance(ClippedSurrogate, beta=0.01, kl_against="old"),
        baseline: Baseline = "trace",
        masking: ResponseMasking | None = None,
        training_block_size: int | None = None,
        shrink: int = 1,
        value_model: ValueModel | None = None,
        gamma: float = 1.0,
        lam: float = 1.0,
        value_lr: float = 5e-6,
        value_clip: float | None = 0.2,
        process_reward: Reward | None = None,
        num_generations: int = 8,
        inner_iterations: int = 1,
        micro_batch_size: int | None = None,
        accuracy_reward: str | None = "correctness",
        filter_groups: bool = False,
        filter_low: float = 0.2,
        filter_high: float = 0.8,
        advantage_eps: float = 0.0,
        post_num: int = 1,
        reference: ReferenceKind = "auto",
        eval_sampler: Sampler | None = None,
        max_grad_norm: float | None = 1.0,
        tokenizer: TextTokenizer | None = None,
        optim: OptimConfig = OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, min_lr_scale=1.0),
        seed: int = 0,
        adapter: LoRA | None = None,
    ) -> None:
        if baseline not in ("trace", "random_masking", "coupled"):
            raise ValueError(f"--model.baseline must be trace, random_masking or coupled, got {baseline!r}")
        if baseline == "trace" and masking is not None:
            raise ValueError("--model.masking is for the random_masking / coupled baselines; unset it for trace")
        if training_block_size is not None and training_block_size < 1:
            raise ValueError(f"--model.training_block_size must be >= 1 (or null), got {training_block_size}")
        if shrink < 1:
            raise ValueError(f"--model.shrink must be >= 1, got {shrink}")
        if baseline != "trace" and shrink != 1:
            raise ValueError("--model.shrink merges trace steps: it needs --model.baseline=trace")
        if value_model is not None and baseline != "trace":
            raise ValueError("--model.value_model needs --model.baseline=trace (its GAE runs over the trace's steps)")
        if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
            raise ValueError(f"--model.gamma and --model.lam must be in [0, 1], got gamma={gamma}, lam={lam}")
        if value_lr <= 0:
            raise ValueError(f"--model.value_lr must be > 0, got {value_lr}")
        if value_clip is not None and value_clip <= 0:
            raise ValueError(f"--model.value_clip must be > 0 (or null), got {value_clip}")
        if process_reward is not None:
            if value_model is None:
                raise ValueError("--model.process_reward needs --model.value_model (its rewards sit on decoding steps)")
            chunk = getattr(process_reward, "chunk_length", None)
            if not isinstance(chunk, int) or chunk < 1:
                raise ValueError(
                    f"--model.process_reward ({type(process_reward).__name__}) needs an integer attribute "
                    f"chunk_length >= 1 (tokens per judged chunk), got {chunk!r}"
                )
        if masking is None:
            masking = CoupledMasking() if baseline == "coupled" else RandomMasking()  # unused by trace
        # UniGRPO saves the hyperparameters of the whole __init__ chain; the modules are saved as weights anyway.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Attribute '(value_model|process_reward)' is an instance")
            super().__init__(
                backbone=backbone,
                sampler=sampler,
                rewards=rewards,
                reward_weights=reward_weights,
                reward_aggregation=reward_aggregation,
                objective=objective,
                masking=masking,
                num_generations=num_generations,
                inner_iterations=inner_iterations,
                micro_batch_size=micro_batch_size,
                accuracy_reward=accuracy_reward,
                filter_groups=filter_groups,
                filter_low=filter_low,
                filter_high=filter_high,
                advantage_eps=advantage_eps,
                post_num=post_num,
                reference=reference,
                eval_sampler=eval_sampler,
                max_grad_norm=max_grad_norm,
                tokenizer=tokenizer,
                optim=optim,
                seed=seed,
                adapter=adapter,
            )
        self.baseline: Baseline = baseline
        self.training_block_size = training_block_size
        self.shrink = shrink
        self.value_model = value_model
        self.gamma = gamma
        self.lam = lam
        self.value_lr = value_lr
        self.value_clip = value_clip
        self.process_reward = process_reward
        self._chunk_length = int(getattr(process_reward, "chunk_length", 1))
        self._value_optimizer: torch.optim.Optimizer | None = None
        self._value_optimizer_state: dict[str, Any] | None = None  # restored from a checkpoint, applied once built
        self._trajectory: _Trajectory | None = None  # set while the rows of one update are being trained
        self.save_hyperparameters(
            ignore=[
                "backbone",
                "sampler",
                "rewards",
                "objective",
                "masking",
                "value_model",
                "process_reward",
                "eval_sampler",
                "tokenizer",
                "optim",
                "adapter",
            ]
        )
        self.hparams["optim"] = dataclasses.asdict(optim)
        self.hparams["adapter"] = None if self.adapter is None else self.adapter.to_dict()

    # ------------------------------------------------------------------ model
    def row_block_size(self) -> int | None:
        """Block size of the training rows: ``None`` for a full-attention policy.

        Raises:
            ValueError: ``training_block_size`` on a full-attention policy, a block policy whose sampler has no
                ``block_length`` (and no ``training_block_size``), or a training block that is not a multiple of the
                rollout's.
        """
        own = getattr(self.net, "block_size", None)  # block-attention backbones (SDAR) expose their block size
        if not isinstance(own, int):
            if self.training_block_size is not None:
                raise ValueError(
                    f"--model.training_block_size={self.training_block_size} is for block-attention backbones "
                    f"(SDAR/TraDo); {type(self.net).__name__} attends to the whole canvas: leave it null"
                )
            return None
        rollout_block = getattr(self.sampler, "block_length", None)
        if self.training_block_size is None:
            if not isinstance(rollout_block, int):
                raise ValueError(
                    f"--model.training_block_size: the sampler {type(self.sampler).__name__} has no block_length, "
                    "so the rollout's block size is unknown; set it (or use a BlockSampler)"
                )
            return rollout_block
        if isinstance(rollout_block, int) and self.training_block_size % rollout_block:
            raise ValueError(
                f"--model.training_block_size={self.training_block_size} must be a multiple of the sampler's "
                f"block_length={rollout_block} (each rollout block inside one training block)"
            )
        return self.training_block_size

    def configure_model(self) -> None:
        """Build the policy (and reference) and check the block sizes early, before the first rollout."""
        super().configure_model()
        self.row_block_size()

    def on_fit_start(self) -> None:
        """Refuse fp16 with a value model: its own optimizer does not take part in Lightning's loss scaling."""
        if self.value_model is not None and str(self.trainer.precision).startswith("16"):
            raise ValueError(
                f"--trainer.precision={self.trainer.precision} with --model.value_model: fp16 loss scaling is not "
                "supported for the value model; use bf16-mixed or 32-true"
            )

    def configure_optimizers(self) -> Any:
        """The policy's AdamW + schedule (as every stage, over the policy only) and the value model's own AdamW.

        The value optimizer is not handed to Lightning (the update loop of the policy steps exactly one optimizer);
        its state is kept in checkpoints under ``tracerl_value_optimizer``.
        """
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        opt, sched = build_optimizer(self.net, self.optim, max_steps)
        if self.value_model is not None:
            self._value_optimizer = torch.optim.AdamW(
                self.value_model.parameters(),
                lr=self.value_lr,
                betas=self.optim.betas,
                eps=self.optim.eps,
                weight_decay=0.0,
            )
            if self._value_optimizer_state is not None:
                self._value_optimizer.load_state_dict(self._value_optimizer_state)
                self._value_optimizer_state = None
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the value optimizer's state next to Lightning's (see :meth:`configure_optimizers`)."""
        super().on_save_checkpoint(checkpoint)
        if self._value_optimizer is not None:
            checkpoint[VALUE_OPTIMIZER_KEY] = self._value_optimizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the value optimizer's state until :meth:`configure_optimizers` builds the optimizer."""
        super().on_load_checkpoint(checkpoint)
        self._value_optimizer_state = checkpoint.get(VALUE_OPTIMIZER_KEY)

    # ----------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(
        self,
        batch: dict[str, Any],
        sampler: Sampler,
        num_generations: int,
        generator: torch.Generator | None = None,
        image_sampler: Sampler | None = None,
    ) -> TraceRollout:
        """UniGRPO's rollout, plus the prompt width and (training rollouts only) the process-reward chunk scores."""
        out = super().rollout(batch, sampler, num_generations, generator, image_sampler)
        base = {f.name: getattr(out, f.name) for f in dataclasses.fields(Rollout)}
        width = int(batch["prompt_ids"].shape[1])
        chunks = None
        if self.process_reward is not None and num_generations > 1:  # held-out rollouts (G = 1) skip the judge
            with self.timed("reward"):
                chunks = self.score_chunks(batch, out, width)
        return TraceRollout(**base, prompt_width=width, chunk_rewards=chunks)

    def score_chunks(self, batch: dict[str, Any], rollout: Rollout, prompt_width: int) -> Tensor:
        """Call the process reward on the completions: ``[N, C]`` float32 chunk scores, NaN where there is none.

        Raises:
            ValueError: when the reward does not return one list (or ``None``) of numbers per completion.
        """
        reward = self.process_reward
        assert reward is not None
        index = rollout.group.tolist()
        fields = {k: [v[i] for i in index] for k, v in batch["fields"].items()}
        _, fields["completion_ids"] = self.decode(rollout.tokens[:, prompt_width:])
        prompts = [batch["prompts"][i] for i in index]
        values = reward(prompts, list(rollout.completions), **fields)
        n = rollout.num_rollouts
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(f"process reward {reward.name!r} must return {n} lists of chunk scores, got {values!r}")
        rows: list[list[float]] = []
        for v in values:  # host data from the reward: one pass over its Python lists
            if v is None:
                rows.append([])
            elif isinstance(v, (list, tuple)):
                rows.append([math.nan if s is None else float(s) for s in v])
            else:
                raise ValueError(
                    f"process reward {reward.name!r} returned {v!r} for a completion; return a list of chunk "
                    "scores (or None)"
                )
        c = max(1, max(len(r) for r in rows))
        padded = [r + [math.nan] * (c - len(r)) for r in rows]
        return torch.tensor(padded, dtype=torch.float32, device=rollout.tokens.device)

    # ------------------------------------------------------------------ rows
    def _to_model(self, x: Tensor, fill: float | bool = 0) -> Tensor:
        """``[M, L]`` per-column values of the rollout layout in the model's layout ``[M, W]`` (noisy copy only)."""
        t = self._trajectory
        if t is None:
            return x
        lead = x.new_full((x.shape[0], t.prompt + t.response + trajectory_tail_width(t.prompt, t.block)), fill)
        return torch.cat([lead, x[:, t.prompt :]], dim=1)

    def _to_rollout(self, x: Tensor) -> Tensor:
        """``[M, W]`` values at the noisy copy back in the rollout layout ``[M, L]`` (0 on the prompt)."""
        t = self._trajectory
        if t is None:
            return x
        return torch.cat([x.new_zeros(x.shape[0], t.prompt), x[:, x.shape[1] - t.response :]], dim=1)

    def _model_rows(
        self, sub: TraceRollout, source: Tensor, noisy: Sequence[Tensor], targets: Sequence[Tensor], adv: Tensor
    ) -> UpdateRows:
        """Rollout-layout rows (``[M, L]`` noisy canvases and targets of the rollouts ``source``) → model rows."""
        tokens = sub.tokens[source]
        generated = sub.attention_mask[source].bool()
        t = self._trajectory
        if t is None:
            return UpdateRows(list(noisy), list(targets), tokens, generated, source, adv)
        p = t.prompt
        prompt, response = tokens[:, :p], tokens[:, p:]
        ids = [trajectory_input_ids(prompt, response, x[:, p:], t.block) for x in noisy]
        labels = trajectory_input_ids(prompt, response, response, t.block)
        keys = self._to_model(generated, False)
        keys[:, :p] = generated[:, :p]
        keys[:, p : p + t.response] = generated[:, p:]
        return UpdateRows(ids, [self._to_model(m, False) for m in targets], labels, keys, source, adv)

    def build_rows(self, sub: TraceRollout, adv: Tensor, generator: torch.Generator | None) -> UpdateRows:
        """The training rows of the kept rollouts (trace or re-masked baseline) with sequence advantages.

        Args:
            sub: The kept rollouts.
            adv: ``[N]`` their sequence advantages.
            generator: Random source of the baselines' masks.
        """
        block = self.row_block_size()
        width = sub.tokens.shape[1]
        self._trajectory = None if block is None else _Trajectory(sub.prompt_width, width - sub.prompt_width, block)
        if self.baseline == "trace":
            trace = rollout_trace_rows(sub, self.layout.mask_id, block_size=block, shrink=self.shrink)
            rows = self._model_rows(sub, trace.source, [trace.input_ids], [trace.target_mask], adv[trace.source])
            rows.trace = trace
            return rows
        masks = self.masking(sub.response_mask, self.inner_iterations, generator)  # [μ, C, N, L]
        copies = masks.shape[1]
        built = [self._rows(sub, masks[n]) for n in range(masks.shape[0])]
        source = torch.arange(sub.num_rollouts, device=adv.device).repeat(copies)
        return self._model_rows(sub, source, [b[0] for b in built], [b[1] for b in built], adv.repeat(copies))

    @contextmanager
    def _no_trajectory(self) -> Iterator[None]:
        saved, self._trajectory = self._trajectory, None
        try:
            yield
        finally:
            self._trajectory = saved

    # --------------------------------------------------------------- forwards
    def model_inputs(self, keys: Tensor) -> tuple[Tensor, Tensor | None]:
        """Attention mask and positions of rows with key padding ``keys`` ``[r, W]`` (one micro-batch).

        Returns:
            ``(keys, None)`` for full attention; the ``[r, 1, W, W]`` trajectory mask and ``[r, W]`` positions for
            block models.
        """
        t = self._trajectory
        if t is None:
            return keys, None
        prompt, response = keys[:, : t.prompt], keys[:, t.prompt : t.prompt + t.response]
        return (
            trajectory_mask(prompt, t.response, t.block, response),
            trajectory_position_ids(prompt, t.response, t.block),
        )

    def token_logprobs(
        self,
        model: Backbone,
        noisy: Tensor,
        labels: Tensor,
        targets: Tensor,
        attention_mask: Tensor,
        with_entropy: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probabilities of the taken tokens; trajectory rows get their block mask and positions here."""
        mask, positions = self.model_inputs(attention_mask)
        return masked_token_logprobs(
            model, noisy, labels, targets, attention_mask=mask, position_ids=positions, with_entropy=with_entropy
        )

    def values(self, noisy: Tensor, keys: Tensor) -> Tensor:
        """The value model on rows ``[r, W]`` (same mask and positions as the policy): ``[r, W]`` float32."""
        assert self.value_model is not None
        mask, positions = self.model_inputs(keys)
        return self.value_model(noisy, attention_mask=mask, position_ids=positions)

    # ------------------------------------------------------------ optimisation
    def trace_gae(self, sub: TraceRollout, adv: Tensor, trace: TraceRows, old: Tensor) -> tuple[StepGAE, Tensor]:
        """Token rewards, step returns and GAE of the kept rollouts from the old values at their trace rows.

        Args:
            sub: The kept rollouts (``chunk_rewards`` for process rewards).
            adv: ``[N]`` their sequence rewards (group z-scores): the outcome reward on each trace's last step.
            trace: Their trace rows.
            old: ``[M, W]`` the value model's outputs on the rows (model layout).

        Returns:
            ``(gae, values)``: :class:`~dllm_zoo.rl.value.StepGAE` in the rollout layout ``[N, L]`` and the old
            values ``V_j`` there (each token's value read in the row where it is a target).
        """
        values = trace.to_rollout(self._to_rollout(old))
        rewards = outcome_token_rewards(adv, trace.steps)
        if sub.chunk_rewards is not None:
            z = chunk_advantages(sub.chunk_rewards, sub.group)
            rewards = rewards + process_token_rewards(z, trace.steps, self._chunk_length, start=sub.prompt_width)
        return step_returns_and_gae(rewards, values, trace.steps, self.gamma, self.lam), values

    def value_advantages(self, sub: TraceRollout, adv: Tensor, rows: UpdateRows) -> dict[str, Tensor]:
        """Old values and :meth:`trace_gae`; trains the value model; sets ``rows.advantages`` (token level).

        Args:
            sub: The kept rollouts.
            adv: ``[N]`` their sequence rewards.
            rows: Their trace rows.

        Returns:
            ``value_loss``, ``value_mean``, ``return_mean``, ``explained_variance``, ``token_advantage_abs`` (and
            ``process_reward``: the raw chunk scores' mean).
        """
        trace = rows.trace
        assert trace is not None
        noisy, targets = rows.noisy[0], rows.targets[0]
        with self.timed("value"), torch.no_grad():
            old = torch.cat([self.values(noisy[s], rows.keys[s]) for s in self._chunks(rows.num_rows)])
        with self.timed("advantage"):
            gae, values = self.trace_gae(sub, adv, trace, old)
            returns = self._to_model(trace.from_rollout(gae.returns))
            rows.advantages = self._to_model(trace.from_rollout(gae.advantages))
            trainable = trace.steps > 0
            count = trainable.sum().clamp(min=1)
            stats = {
                "explained_variance": _explained_variance(gae.returns, values, trainable),
                "value_mean": (values * trainable).sum() / count,
                "return_mean": (gae.returns * trainable).sum() / count,
                "token_advantage_abs": (gae.advantages.abs() * trainable).sum() / count,
            }
            if sub.chunk_rewards is not None:
                stats["process_reward"] = _nanmean(sub.chunk_rewards)
        stats["value_loss"] = self.value_update(noisy, targets, rows.keys, old, returns)
        return stats

    def value_update(self, noisy: Tensor, targets: Tensor, keys: Tensor, old: Tensor, returns: Tensor) -> Tensor:
        """``μ`` AdamW steps of the clipped value loss on the rows; returns the mean loss.

        Args:
            noisy: ``[M, W]`` rows.
            targets: ``[M, W]`` bool, where the values are trained (each trainable token once).
            keys: ``[M, W]`` key padding.
            old: ``[M, W]`` values before the update.
            returns: ``[M, W]`` the targets ``R_j``.
        """
        opt = self._value_optimizer
        assert opt is not None  # configure_optimizers built it
        assert self.value_model is not None
        losses: list[Tensor] = []
        n_rows = noisy.shape[0]
        for _ in range(self.inner_iterations):
            opt.zero_grad()
            for s in self._chunks(n_rows):
                with self.timed("value"):
                    v = self.values(noisy[s], keys[s])
                    loss = clipped_value_loss(v, old[s], returns[s], targets[s], self.value_clip, "sequence_mean")
                    self.manual_backward(loss * ((s.stop - s.start) / n_rows))
                losses.append(loss.detach())
            with self.timed("value"):
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), self.max_grad_norm)
                opt.step()
        return torch.stack(losses).mean()

    def optimise(self, rollout: Rollout, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Rows of the kept rollouts, the value model's step (if any), then ``μ`` policy iterations."""
        assert isinstance(rollout, TraceRollout)  # self.rollout made it
        sub = rollout.kept()  # one host sync per RL step
        adv = sub.advantages
        assert adv is not None  # set by advantages()
        if sub.num_rollouts == 0:
            return {}
        with self.timed("rows"):
            rows = self.build_rows(sub, adv, generator)
        stats: dict[str, Tensor] = {"rows": torch.tensor(float(rows.num_rows))}
        if rows.trace is not None:
            stats["rows_per_response"] = rows.trace.rows_per_rollout.float().mean()
        if rows.num_rows == 0:
            return stats
        if self.value_model is not None:
            stats.update(self.value_advantages(sub, adv, rows))
        stats.update(self.policy_update(rows.noisy, rows.targets, rows.labels, rows.keys, rows.advantages))
        return stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # type: ignore[override]
        """UniGRPO's step (rollout, scoring, optimisation, logs) with the trajectory layout cleared afterwards."""
        with self._no_trajectory():
            super().training_step(batch, batch_idx)

    def timing_metrics(self, seconds: float) -> dict[str, Tensor]:
        """``time/*`` as the other RL stages, plus ``time/value`` (counted as training) and ``time/rows``."""
        out = super().timing_metrics(seconds)
        value = self.timers["value"]
        out["time/value"] = torch.tensor(value)
        out["time/rows"] = torch.tensor(self.timers["rows"])
        out["time/training"] = out["time/training"] + value
        out["time/outside_model"] = out["time/outside_model"] - value
        return out


def _explained_variance(returns: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var(R − V) / Var(R)`` over the ``mask`` tokens (0 when the returns have no variance)."""
    m = mask.to(returns.dtype)
    n = m.sum().clamp(min=1)

    def var(x: Tensor) -> Tensor:
        mean = (x * m).sum() / n
        return (((x - mean) * m) ** 2).sum() / n

    var_r = var(returns)
    return torch.where(var_r > 0, 1 - var(returns - values) / var_r.clamp(min=1e-12), torch.zeros_like(var_r))


__all__ = ["Baseline", "TraceRL", "TraceRollout", "UpdateRows", "chunk_advantages"]
