r"""ParaRL (MMaDA-Parallel §3.3, App. H; research/mmada.md §6.2): RL on the denoising trajectory of joint text + image.

The authors never released ParaRL; this is a re-implementation from the paper's description. One RL step = one
batch of interleaved rows (:class:`~dllm_zoo.data.parallel.ParallelDataModule`; only their input parts are used):

1. **Rollout** — every prompt (task token, input image, instruction) is answered ``G`` times by the
   :class:`~dllm_zoo.samplers.parallel.ParallelSampler` under ``no_grad`` (image CFG as the sampler does it), which
   records the step at which each output token was committed.
2. **Chosen steps** — ``s`` step indices per prompt, drawn uniformly without replacement from the sampler's steps,
   shared by the ``G`` rollouts of its group and drawn afresh for every group
   (:func:`~dllm_zoo.rl.replay.choose_steps`).
3. **Scoring** — the state *after* each chosen step (:func:`~dllm_zoo.samplers.parallel.canvas_after`) is decoded
   (:func:`decode_outputs`: masked text tokens dropped, masked image codes as
   :data:`~dllm_zoo.rewards.partial.MASKED_PIXEL`) and scored by the reward (default
   :class:`~dllm_zoo.rewards.partial.PartialAlignment`); the raw score ``c`` becomes
   ``R = ½(1 + clip((c − μ)/σ, −1, 1))`` (:func:`~dllm_zoo.rl.replay.normalize_rewards`) and ``R`` is standardised
   per chosen step over the group (:func:`~dllm_zoo.rl.replay.step_advantages`). The final sample is scored too
   (``train/output_alignment``).
4. **Optimisation** — one training row per (rollout, chosen step): the canvas just before the step, scored on the
   tokens committed at it (:func:`~dllm_zoo.rl.replay.replay_rows`), with the step's advantage on each of them; the
   clipped surrogate averages over the step's tokens (``1/|τ_i(t)|``, ``sequence_mean``) and over rows, minus
   ``β·KL``; ``μ`` inner iterations (:meth:`~dllm_zoo.stages.policy_gradient.PolicyGradientStage.policy_update`;
   the old log-probs are computed before the first update, so its ratio is 1).

``reward_level="output"`` is the paper's output-level baseline: one reward on the final sample per rollout, its
group advantage given to every chosen step of the rollout, trained on the same chosen steps' tokens (equal compute).

**Normalisation statistics** ``μ, σ`` are estimated once, when training starts (and kept in checkpoints, so a
resumed run reuses them), from ``stats_fraction`` (1 %) of the training rows (``normalization``):

* ``"data"`` (default; the paper's "dataset statistics"): the ground-truth (reasoning, output image) pairs, each
  masked at a random level ``t ~ U(0, 1)`` (every output text and image target i.i.d. with probability ``t``), so
  the statistics cover partial states like those the rewards see;
* ``"rollouts"``: the initial policy's rollouts of those prompts (one each), scored after ``s`` chosen steps;
* ``"fixed"``: ``reward_mean`` / ``reward_std`` given by the user.

Paper vs ours (every choice the paper leaves open is an argument):

========================================  ==========================================================================
paper                                     ours (argument, default)
========================================  ==========================================================================
G rollouts per prompt (G not stated)      ``num_generations=8`` (our UniGRPO default)
s = 3 steps "identical within a group,    ``num_chosen_steps=3``, one uniform draw without replacement per group
uniformly sampled across rollouts"        (independent across groups), among the steps where the sampler's plan
                                          commits a token (all of ``1..S`` for the usual sizes)
CLIP(text, image) of the partial state    ``reward``: ShapesWorld object-set F1 by default (``PartialAlignment``);
                                          ``metric="pixels"`` grades partial shapes (foreground-pixel F1; the
                                          object F1 of one object is 0 until its shape is complete);
                                          CLIP (raw cosine) with ``PartialAlignment(clip=ClipScore(...))``; any
                                          :class:`~dllm_zoo.rewards.base.Reward` works
image "from current tokens"               masked codes drawn as background (``PartialAlignment.masked_image``)
μ, σ from 1 % of the training data        ``normalization="data"``, ``stats_fraction=0.01`` (``stats_samples``
                                          overrides the count; needed for sources of unknown size); population std;
                                          ``σ = 0`` falls back to 1 with a warning
not-applicable reward (not discussed)     ``R = ½`` (neutral)
advantage ``(R − mean)/std``              population std, ``advantage_eps=0``, 0 without spread
ε of the clip (not stated)                ``ClippedSurrogate(eps=0.2)``
β = 1e-4, KL(π_θ ‖ π_old) (eq. 3)         ``ClippedSurrogate(beta=1e-4, kl_against="old")``, k3 estimator; with
                                          ``μ = 1`` it is 0 (and so is its gradient); ``kl_against="reference"``
                                          for a frozen reference
``Σ_i Σ_t∈S 1/|τ_i(t)| Σ_o`` (eq. 3)      ``sequence_mean``: the mean over rows instead of the sum (a constant)
inner iterations (not stated)             ``inner_iterations=1`` (on-policy)
optimizer "as SFT" (AdamW 2e-5, cosine)   ``OptimConfig(lr=2e-5, weight_decay=0, warmup_steps=0,
                                          min_lr_scale=1)`` (constant)
likelihood of a step's tokens (CFG?)      ``guided_likelihood=False``: the conditional denoiser, no CFG (see below)
output-level RL baseline                  ``reward_level="output"`` (default ``"step"``: ParaRL)
========================================  ==========================================================================

The training forward runs **without CFG** by default: the likelihood of a committed token is that of the conditional
denoiser, over its whole vocabulary, given the canvas before the step — as DiffuCoder / TraceRL replay trajectories.
The behaviour policy also had the image guidance, the confidence ranking that chose which positions to commit and
(by default) the sampler's restriction of image positions to the codebook; none of these is part of the ratio.
Caveat, seen on a toy reward that ignores the condition (tests/stages/test_pararl.py): raising the conditional
likelihood of the rewarded codes raises the unconditional one too (one network), and faster, so the guided
sampler ``(1 + w)·cond − w·uncond`` can move *away* from them. ``guided_likelihood=True`` scores the committed
tokens under the guided logits instead (:func:`guided_token_logprobs`: the unconditional copies of the training
rows in the same forward, twice the training compute), which follows the behaviour policy's guidance.

Trainer steps count optimizer steps: ``--trainer.max_steps`` = RL steps × ``inner_iterations``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.llada import LLaDABackbone
from dllm_zoo.data.interleave import InterleaveSpans, drop_conditions
from dllm_zoo.data.synthetic.base import SyntheticTask
from dllm_zoo.parabench import decode_outputs as decode_final_outputs
from dllm_zoo.rewards.base import Reward
from dllm_zoo.rewards.partial import MASKED_PIXEL, PartialAlignment
from dllm_zoo.rl.advantages import group_advantages
from dllm_zoo.rl.logprobs import taken_logprobs
from dllm_zoo.rl.objectives import ClippedSurrogate, PolicyObjective
from dllm_zoo.rl.replay import choose_steps, normalize_rewards, replay_rows, step_advantages
from dllm_zoo.rl.rollout import Rollout, repeat_prompts, score_rewards
from dllm_zoo.samplers.parallel import ParallelSampler, canvas_after
from dllm_zoo.stages.base import BackboneFactory
from dllm_zoo.stages.optim import OptimConfig
from dllm_zoo.stages.policy_gradient import PolicyGradientStage, ReferenceKind
from dllm_zoo.tokenizers.image import ImageTokenizer
from dllm_zoo.tokenizers.text import TextTokenizer

RewardLevel = Literal["step", "output"]
Normalization = Literal["data", "rollouts", "fixed"]
_FIELDS = ("task",)  # per-row batch columns handed to the reward
STATS_CHECKPOINT_KEY = "pararl_reward_stats"


def decode_outputs(
    canvas: Tensor, spans: InterleaveSpans, tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer
) -> tuple[list[str], Tensor]:
    """Reasoning texts and palette images of (partial) interleaved canvases, as the partial-state reward sees them.

    The final-output decoding of :func:`dllm_zoo.parabench.decode_outputs` (text after its BOS up to the first EOS,
    special tokens — ``[MASK]`` included — skipped), plus: every pixel of a still-masked image code is
    :data:`~dllm_zoo.rewards.partial.MASKED_PIXEL`.

    Args:
        canvas: ``[R, L]`` int64 interleaved rows, possibly with ``[MASK]`` in their output part.
        spans: Their spans.
        tokenizer: Text tokenizer (its layout gives ``[MASK]``, EOS and the image offset).
        image_tokenizer: Image tokenizer of the codes.

    Returns:
        ``(texts, images)``: ``R`` strings and ``[R, H, W]`` int64 palette indices on the CPU.
    """
    texts, grids, _ = decode_final_outputs(canvas, spans, tokenizer, image_tokenizer)
    side = math.isqrt(spans.num_image_tokens)
    masked = (canvas[:, spans.output_image] == tokenizer.layout.mask_id).cpu().view(-1, side, side)
    scale = grids.shape[-1] // side  # pixels per code (the tokenizer's downsample factor)
    if scale > 1:
        masked = masked.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return texts, grids.masked_fill(masked, MASKED_PIXEL)


def guided_token_logprobs(
    model: Backbone,
    noisy: Tensor,
    labels: Tensor,
    targets: Tensor,
    attention_mask: Tensor,
    spans: InterleaveSpans,
    image_guidance_scale: float,
    text_guidance_scale: float = 0.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of the taken tokens under the guided logits the :class:`ParallelSampler` draws from.

    One forward over the conditional rows and their unconditional copies (both conditions dropped,
    :func:`~dllm_zoo.data.interleave.drop_conditions`; the output part shared), then at image targets
    ``(1 + w_img)·cond − w_img·uncond`` and at text targets the same with ``w_text``, softmax over the whole
    vocabulary.

    Args:
        model: The policy or reference backbone.
        noisy: ``[R, L]`` int64 interleaved canvases.
        labels: ``[R, L]`` int64 taken tokens.
        targets: ``[R, L]`` bool positions to score (output image and text positions).
        attention_mask: ``[R, L]`` bool key-padding mask.
        spans: The rows' spans.
        image_guidance_scale: ``w_img``.
        text_guidance_scale: ``w_text``.
        with_entropy: Also return the guided distribution's entropy at the targets (no gradient).

    Returns:
        ``(logp [R, L] float32, entropy [R, L] float32 | None)``, zero outside ``targets``.
    """
    attn = attention_mask.bool()
    drop = torch.ones(noisy.shape[0], dtype=torch.bool, device=noisy.device)
    un_ids, un_attn = drop_conditions(noisy, attn, drop, drop, model.layout, spans)
    out = model(torch.cat([noisy, un_ids]), attention_mask=torch.cat([attn, un_attn]), logits_at=targets.repeat(2, 1))
    assert out.logits is not None  # logits were requested
    cond, uncond = out.logits.float().chunk(2)  # [M, V] each: the rows, then their unconditional copies
    is_image = torch.zeros_like(targets)
    is_image[:, spans.output_image] = True
    w = torch.where(is_image[targets], image_guidance_scale, text_guidance_scale)[:, None]
    return taken_logprobs((1 + w) * cond - w * uncond, labels, targets, with_entropy)


@dataclass
class StepRollout:
    """A scored ParaRL rollout batch: ``N = prompts × G`` trajectories and their ``s`` chosen steps.

    Attributes:
        rollout: Final tokens, step map, groups, attention mask and NFE (``rewards[name]`` = final scores).
        steps: ``[N, s]`` int64 chosen steps (1-based, ascending), equal within a group.
        step_scores: ``[N, s]`` float32 raw reward of the state after each chosen step (NaN: not applicable).
        output_scores: ``[N]`` float32 raw reward of the final sample.
        step_rewards: ``[N, s]`` normalised rewards ``R`` after each chosen step (NaN -> ½).
        output_rewards: ``[N]`` normalised reward of the final sample.
        advantages: ``[N, s]`` the advantage of each chosen step (``reward_level="output"``: the rollout's, repeated).
    """

    rollout: Rollout
    steps: Tensor
    step_scores: Tensor
    output_scores: Tensor
    step_rewards: Tensor
    output_rewards: Tensor
    advantages: Tensor


def _nanmean(x: Tensor) -> Tensor:
    applies = ~torch.isnan(x)
    return torch.where(applies, x, 0.0).sum() / applies.sum().clamp(min=1)


class ParaRL(PolicyGradientStage):
    """ParaRL: trajectory-level RL of MMaDA-Parallel with per-step semantic rewards (see the module docstring).

    Batches come from :class:`~dllm_zoo.data.parallel.ParallelDataModule`: interleaved rows ``input_ids`` /
    ``attention_mask`` ``[B, L]`` (their first ``P = N + T + 3`` columns are the prompts) and ``task``.

    Args:
        backbone: The policy: a backbone factory or instance (``pretrained=`` a parallel-SFT checkpoint).
        sampler: Generates the rollouts; its ``text_len`` / ``num_image_tokens`` must be the data's (default:
            ShapesWorld's 9x9 images and ``T = 192``, 32 steps, the 16 palette codes).
        reward: Scores partial and final (reasoning, image) states (the logged metrics are
            ``train/step_score/<j>``, ``train/step_reward/<j>``, ``train/output_alignment``, whatever its name).
        objective: The policy objective (default: clipped surrogate ε = 0.2, β = 1e-4 k3 KL to the old policy).
        reward_level: ``"step"`` (ParaRL) or ``"output"`` (the output-level baseline).
        num_generations: ``G``, rollouts per prompt.
        num_chosen_steps: ``s``, chosen steps per group (paper ablation: 2, **3**, 4).
        inner_iterations: ``μ``, optimizer steps per rollout batch.
        micro_batch_size: Training rows per forward/backward (there are ``N·s`` rows); ``None`` = all at once.
        normalization: Where ``μ, σ`` come from: ``"data"``, ``"rollouts"`` or ``"fixed"``.
        reward_mean: ``μ`` for ``normalization="fixed"``.
        reward_std: ``σ`` (> 0) for ``normalization="fixed"``.
        stats_fraction: Share of the training set used for the statistics (paper: 1 %).
        stats_samples: Rows for the statistics instead of ``stats_fraction`` of the training set (required when its
            size is unknown, i.e. for ``--data.train`` sources).
        advantage_eps: Added to the group standard deviation.
        guided_likelihood: Score the committed tokens under the sampler's guided logits (CFG: two forwards per
            training row, :func:`guided_token_logprobs`) instead of the conditional denoiser's (default, one
            forward). See the module docstring for when this matters.
        reference: ``auto`` / ``copy`` / ``adapter``: the reference policy, when the objective needs one.
        eval_sampler: Sampler of the held-out evaluation (default: ``sampler``); one sample per prompt.
        max_grad_norm: Gradient clipping by global norm (``None`` = off).
        tokenizer: Decodes the reasoning; default: the datamodule's ``tokenizer``.
        image_tokenizer: Decodes the image codes; default: the datamodule's ``image_tokenizer``.
        optim: Optimizer settings.
        seed: Seed of the rollouts, the chosen steps and the statistics sample.
        adapter: Train a LoRA/QLoRA adapter instead of every weight.
    """

    algorithm: ClassVar[str] = "ParaRL"
    headline_metric: ClassVar[str | None] = "output_alignment"

    def __init__(
        self,
        backbone: BackboneFactory | Backbone = lambda: LLaDABackbone("tiny"),
        sampler: ParallelSampler = lazy_instance(
            ParallelSampler, text_len=192, num_image_tokens=81, steps=32, codebook_size=16
        ),
        reward: Reward = lazy_instance(PartialAlignment),
        objective: PolicyObjective = lazy_instance(ClippedSurrogate, eps=0.2, beta=1e-4, kl_against="old"),
        reward_level: RewardLevel = "step",
        num_generations: int = 8,
        num_chosen_steps: int = 3,
        inner_iterations: int = 1,
        micro_batch_size: int | None = None,
        normalization: Normalization = "data",
        reward_mean: float | None = None,
        reward_std: float | None = None,
        stats_fraction: float = 0.01,
        stats_samples: int | None = None,
        advantage_eps: float = 0.0,
        guided_likelihood: bool = False,
        reference: ReferenceKind = "auto",
        eval_sampler: ParallelSampler | None = None,
        max_grad_norm: float | None = 1.0,
        tokenizer: TextTokenizer | None = None,
        image_tokenizer: ImageTokenizer | None = None,
        optim: OptimConfig = OptimConfig(lr=2e-5, weight_decay=0.0, warmup_steps=0, min_lr_scale=1.0),
        seed: int = 0,
        adapter: LoRA | None = None,
    ) -> None:
        if reward_level not in ("step", "output"):
            raise ValueError(f"--model.reward_level must be 'step' or 'output', got {reward_level!r}")
        if normalization not in ("data", "rollouts", "fixed"):
            raise ValueError(f"--model.normalization must be data, rollouts or fixed, got {normalization!r}")
        fixed = reward_mean is not None or reward_std is not None
        if (normalization == "fixed") != fixed or (fixed and (reward_mean is None or reward_std is None)):
            raise ValueError(
                "--model.reward_mean and --model.reward_std go together with --model.normalization=fixed (and only "
                f"with it); got normalization={normalization!r}, reward_mean={reward_mean}, reward_std={reward_std}"
            )
        if reward_std is not None and not reward_std > 0:
            raise ValueError(f"--model.reward_std must be > 0, got {reward_std}")
        if not 0 < stats_fraction <= 1:
            raise ValueError(f"--model.stats_fraction must be in (0, 1], got {stats_fraction}")
        if stats_samples is not None and stats_samples < 2:
            raise ValueError(f"--model.stats_samples must be >= 2, got {stats_samples}")
        eval_sampler = eval_sampler if eval_sampler is not None else sampler
        for smp in (sampler, eval_sampler):
            smp.plan()  # a method call: builds a lazy_instance default, whose attributes are read below
        if not 1 <= num_chosen_steps <= sampler.steps:
            raise ValueError(
                f"--model.num_chosen_steps must be in 1..{sampler.steps} (the sampler's steps), got {num_chosen_steps}"
            )
        if eval_sampler.spans != sampler.spans:
            raise ValueError(
                f"--model.eval_sampler generates rows of {eval_sampler.spans}, --model.sampler of {sampler.spans}"
            )
        super().__init__(
            backbone=backbone,
            objective=objective,
            num_generations=num_generations,
            inner_iterations=inner_iterations,
            micro_batch_size=micro_batch_size,
            reference=reference,
            max_grad_norm=max_grad_norm,
            tokenizer=tokenizer,
            optim=optim,
            seed=seed,
            adapter=adapter,
            image_tokenizer=image_tokenizer,
        )
        self.sampler = sampler
        self.eval_sampler = eval_sampler
        self.reward = reward
        self.reward_level: RewardLevel = reward_level
        self.num_chosen_steps = num_chosen_steps
        self.normalization: Normalization = normalization
        self.stats_fraction = stats_fraction
        self.stats_samples = stats_samples
        self.advantage_eps = advantage_eps
        self.guided_likelihood = guided_likelihood
        # (μ, σ) of the raw reward; None until estimated. Saved in checkpoints as plain floats.
        self.reward_stats: tuple[float, float] | None = None
        if reward_mean is not None and reward_std is not None:
            self.reward_stats = (float(reward_mean), float(reward_std))
        self.save_hyperparameters(
            ignore=[
                "backbone",
                "sampler",
                "reward",
                "objective",
                "eval_sampler",
                "tokenizer",
                "image_tokenizer",
                "optim",
                "adapter",
            ]
        )
        self.hparams["optim"] = dataclasses.asdict(optim)
        self.hparams["adapter"] = None if self.adapter is None else self.adapter.to_dict()

    # ------------------------------------------------------------------ facts
    @property
    def spans(self) -> InterleaveSpans:
        """The interleaved rows' spans (the sampler's)."""
        return self.sampler.spans

    def candidate_steps(self) -> Tensor:
        """``[K]`` int64 steps (1-based) at which the sampler's plan commits at least one token."""
        plan = self.sampler.plan()
        busy = [s + 1 for s, (a, b) in enumerate(zip(plan.text_counts, plan.image_counts)) if a + b > 0]
        return torch.tensor(busy, dtype=torch.long, device=self.device)

    def _check_rows(self, batch: Mapping[str, Any]) -> None:
        length = batch["input_ids"].shape[1]
        if length != self.spans.length:
            raise ValueError(
                f"batch rows have {length} tokens but the sampler (text_len {self.spans.text_len}, "
                f"{self.spans.num_image_tokens} image tokens) makes rows of {self.spans.length}; set "
                "--model.sampler.init_args.text_len / num_image_tokens to the data's"
            )

    # ---------------------------------------------------------------- rollout
    @torch.no_grad()
    def rollout(
        self,
        batch: Mapping[str, Any],
        sampler: ParallelSampler,
        num_generations: int,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Answer every prompt (the input part of each row) ``num_generations`` times.

        Args:
            batch: Interleaved rows (``input_ids``, ``attention_mask`` ``[B, L]``).
            sampler: The joint sampler.
            num_generations: Rollouts per prompt.
            generator: Random source of the sampler.

        Returns:
            A :class:`Rollout` (``[N, L]`` tokens and step map; ``prompt_mask`` = positions given, not generated).
        """
        self._check_rows(batch)
        p = self.spans.prompt_len
        with self.timed("generate"):
            ids, mask, group = repeat_prompts(
                batch["input_ids"][:, :p], batch["attention_mask"][:, :p].bool(), num_generations
            )
            out = sampler.generate(self.net, ids, mask, generator=generator)
        given = out.step_map == 0
        return Rollout(
            tokens=out.tokens,
            attention_mask=out.attention_mask.bool(),
            prompt_mask=given,
            response_mask=~given,
            step_map=out.step_map,
            group=group,
            nfe=out.nfe,
        )

    def draw_steps(self, group: Tensor, num_groups: int, generator: torch.Generator | None) -> Tensor:
        """The chosen steps of each rollout: ``s`` per group (:func:`~dllm_zoo.rl.replay.choose_steps`), shared.

        Args:
            group: ``[N]`` int64 group (prompt) of each rollout.
            num_groups: Groups in the batch.
            generator: Random source (one draw for all groups).

        Returns:
            ``[N, s]`` int64, ascending, equal for the rollouts of a group.
        """
        chosen = choose_steps(num_groups, self.candidate_steps(), self.num_chosen_steps, generator)
        return chosen[group]

    @torch.no_grad()
    def score_canvases(self, canvas: Tensor, rows: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The raw reward of (partial) canvases.

        Args:
            canvas: ``[R, L]`` interleaved rows, ``[MASK]`` where not decoded yet.
            rows: ``[R]`` int64 index of each canvas's prompt in ``batch``.
            batch: The prompts' batch (instruction texts and the ``task`` column go to the reward).

        Returns:
            ``[R]`` float32 scores (NaN where the reward does not apply).
        """
        with self.timed("reward"):
            texts, images = decode_outputs(canvas, self.spans, self.tokenizer, self.image_tokenizer)
            index = rows.tolist()
            instructions = self.tokenizer.batch_decode(
                batch["input_ids"][:, self.spans.input_text].tolist(), skip_special_tokens=True
            )
            fields: dict[str, Any] = {k: [batch[k][i] for i in index] for k in _FIELDS if k in batch}
            fields["images"] = images.tolist()
            prompts = [instructions[i] for i in index]
            return score_rewards([self.reward], prompts, texts, fields, device=self.device)[self.reward.name]

    @torch.no_grad()
    def score_steps(self, rollout: Rollout, steps: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The raw reward of the state after each of ``steps`` (the final sample for ``S``).

        Args:
            rollout: The trajectories.
            steps: ``[N, k]`` int64 steps per trajectory.
            batch: The prompts' batch.

        Returns:
            ``[N, k]`` float32.
        """
        n, k = steps.shape
        canvas = canvas_after(
            rollout.tokens.repeat_interleave(k, dim=0),
            rollout.step_map.repeat_interleave(k, dim=0),
            steps.reshape(-1),
            self.layout.mask_id,
        )
        return self.score_canvases(canvas, rollout.group.repeat_interleave(k), batch).view(n, k)

    def advantages(self, rollout: Rollout, steps: Tensor, scores: Tensor) -> StepRollout:
        """Normalise the scores and compute the advantages of the chosen steps.

        Args:
            rollout: The trajectories.
            steps: ``[N, s]`` chosen steps.
            scores: ``[N, s + 1]`` raw scores after each chosen step, then of the final sample.

        Returns:
            The :class:`StepRollout`.
        """
        with self.timed("advantage"):
            mean, std = self._require_stats()
            rewards = torch.nan_to_num(normalize_rewards(scores, mean, std).float(), nan=0.5)
            s = steps.shape[1]
            step_rewards, output_rewards = rewards[:, :s], rewards[:, s]
            if self.reward_level == "step":
                adv = step_advantages(step_rewards, rollout.group, eps=self.advantage_eps)
            else:
                adv = group_advantages(output_rewards, rollout.group, eps=self.advantage_eps)[:, None].expand(-1, s)
            rollout.rewards = {self.reward.name: scores[:, s]}
            return StepRollout(rollout, steps, scores[:, :s], scores[:, s], step_rewards, output_rewards, adv)

    # ------------------------------------------------------------ optimisation
    def token_logprobs(
        self,
        model: Backbone,
        noisy: Tensor,
        labels: Tensor,
        targets: Tensor,
        attention_mask: Tensor,
        with_entropy: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The conditional denoiser's log-probabilities, or the guided ones with ``guided_likelihood``."""
        w_img, w_txt = self.sampler.image_guidance_scale, self.sampler.text_guidance_scale
        if not self.guided_likelihood or (w_img == 0 and w_txt == 0):
            return super().token_logprobs(model, noisy, labels, targets, attention_mask, with_entropy)
        return guided_token_logprobs(
            model, noisy, labels, targets, attention_mask, self.spans, w_img, w_txt, with_entropy
        )

    def optimise(self, scored: StepRollout) -> tuple[dict[str, Tensor], Tensor]:
        """``μ`` inner iterations on the (rollout, chosen step) rows; returns diagnostics and ``[N·s]`` token counts."""
        r = scored.rollout
        s = scored.steps.shape[1]
        with self.timed("replay"):
            noisy, committed = replay_rows(r.tokens, r.step_map, scored.steps, self.layout.mask_id)
            labels = r.tokens.repeat_interleave(s, dim=0)
            attn = r.attention_mask.repeat_interleave(s, dim=0)
            adv = scored.advantages.reshape(-1, 1) * committed  # token-level: the step's advantage on its tokens
        stats = self.policy_update([noisy], [committed], labels, attn, adv)
        return stats, committed.sum(dim=1)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # type: ignore[override]
        """Rollout, score the chosen steps, ``μ`` optimizer steps; logs rewards per step index, KL, clipping, time."""
        self.timers.clear()
        t0 = time.perf_counter()
        self.net.train()
        self._require_stats()
        rollout = self.rollout(batch, self.sampler, self.num_generations, self.step_generator(batch_idx, stream=0))
        steps = self.draw_steps(rollout.group, batch["input_ids"].shape[0], self.step_generator(batch_idx, stream=1))
        final = torch.full_like(steps[:, :1], self.sampler.steps)
        scores = self.score_steps(rollout, torch.cat([steps, final], dim=1), batch)
        scored = self.advantages(rollout, steps, scores)
        stats, committed = self.optimise(scored)
        seconds = time.perf_counter() - t0

        log = {f"train/{k}": v for k, v in stats.items()}
        for j in range(steps.shape[1]):
            log[f"train/step_score/{j + 1}"] = _nanmean(scored.step_scores[:, j])
            log[f"train/step_reward/{j + 1}"] = scored.step_rewards[:, j].mean()
            log[f"train/chosen_step/{j + 1}"] = steps[:, j].float().mean()
        log["train/output_alignment"] = _nanmean(scored.output_scores)
        log["train/output_reward"] = scored.output_rewards.mean()
        log["train/reward"] = scored.step_rewards.mean() if self.reward_level == "step" else log["train/output_reward"]
        log["train/advantage_abs"] = scored.advantages.abs().mean()
        log["train/committed_tokens"] = committed.float().mean()
        log["train/rollout_nfe"] = torch.tensor(float(rollout.nfe))
        mean, std = self._require_stats()
        log["reward_stats/mean"], log["reward_stats/std"] = torch.tensor(mean), torch.tensor(std)
        log.update(self.timing_metrics(seconds))
        for key in ("data_errors", "dropped", "truncated"):
            if key in batch:
                log[f"data/{key}"] = batch[key].float()
        bar = {"train/output_alignment", "train/reward"}
        n = rollout.num_rollouts
        self.log_dict({k: v.float() for k, v in log.items() if k not in bar}, batch_size=n)
        self.log_dict({k: v.float() for k, v in log.items() if k in bar}, batch_size=n, prog_bar=True)

    @torch.no_grad()
    def evaluate_batch(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """``[B]`` raw reward of one ``eval_sampler`` sample per held-out prompt (same draws at every evaluation)."""
        was_training = self.net.training
        self.net.eval()
        try:
            gen = self.step_generator(batch_idx, stream=2, per_step=False)
            rollout = self.rollout(batch, self.eval_sampler, 1, gen)
            final = torch.full((rollout.num_rollouts, 1), self.eval_sampler.steps, device=self.device)
            return self.score_steps(rollout, final, batch)[:, 0]
        finally:
            self.net.train(was_training)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # type: ignore[override]
        """Held-out alignment of the final samples (``val/output_alignment``)."""
        scores = self.evaluate_batch(batch, batch_idx)
        self.log("val/output_alignment", _nanmean(scores), batch_size=scores.shape[0], sync_dist=True, prog_bar=True)

    def heldout_scores(self, batch: Mapping[str, Any], batch_idx: int) -> tuple[int, dict[str, Tensor]]:
        """Per held-out prompt: ``output_alignment`` (the reward of its final sample)."""
        scores = self.evaluate_batch(batch, batch_idx)
        return scores.shape[0], {"output_alignment": scores}

    # -------------------------------------------------------------- statistics
    def _require_stats(self) -> tuple[float, float]:
        if self.reward_stats is None:
            raise RuntimeError(
                "ParaRL's reward statistics are not set: they are estimated when training starts (on_train_start, "
                "from the datamodule's training data), or give --model.normalization=fixed with "
                "--model.reward_mean/--model.reward_std"
            )
        return self.reward_stats

    def _stats_count(self) -> int:
        if self.stats_samples is not None:
            return self.stats_samples
        train, task = self._datamodule_attr("train"), self._datamodule_attr("task")
        if train is None and isinstance(task, SyntheticTask):
            return max(2, math.ceil(self.stats_fraction * task.num_samples("train")))
        raise ValueError(
            "ParaRL cannot tell the training set's size (a --data.train source): set --model.stats_samples to the "
            "number of rows for the reward statistics (the paper: 1% of the training data)"
        )

    @torch.no_grad()
    def sample_scores(self, batch: Mapping[str, Any], generator: torch.Generator) -> Tensor:
        """Raw rewards of one batch of the statistics sample (``normalization``), flattened.

        ``"data"``: each row's ground-truth output masked at a level ``t ~ U(0, 1)`` (its text and image targets
        i.i.d. with probability ``t``); ``"rollouts"``: one rollout per prompt, scored after ``s`` chosen steps.
        """
        self._check_rows(batch)
        ids: Tensor = batch["input_ids"]
        b, n = ids.shape[0], torch.arange(ids.shape[0], device=ids.device)
        if self.normalization == "rollouts":
            rollout = self.rollout(batch, self.sampler, 1, generator)
            return self.score_steps(rollout, self.draw_steps(rollout.group, b, generator), batch).reshape(-1)
        targets = (batch["text_mask"].bool() | batch["image_mask"].bool()) & batch["attention_mask"].bool()
        t = torch.rand(b, 1, generator=generator, device=ids.device)
        masked = targets & (torch.rand(ids.shape, generator=generator, device=ids.device) < t)
        return self.score_canvases(ids.masked_fill(masked, self.layout.mask_id), n, batch)

    def estimate_reward_stats(self, batches: Iterable[Mapping[str, Any]]) -> tuple[float, float]:
        """Set :attr:`reward_stats` to the mean and (population) std of the raw rewards of ``batches``' rows.

        Args:
            batches: The statistics sample (interleaved rows on any device).

        Returns:
            ``(μ, σ)``; ``σ = 0`` (all scores equal) is replaced by 1, with a warning.
        """
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        was_training = self.net.training
        self.net.eval()
        try:
            parts = [
                self.sample_scores(self.transfer_batch_to_device(dict(b), self.device, 0), generator) for b in batches
            ]
        finally:
            self.net.train(was_training)
        scores = torch.cat(parts) if parts else torch.zeros(0, device=self.device)
        scores = scores[~torch.isnan(scores)].double()
        if scores.numel() < 2:
            raise ValueError(f"the reward applied to {scores.numel()} rows of the statistics sample; need at least 2")
        mean, std = float(scores.mean()), float(scores.std(correction=0))
        if std == 0:
            rank_zero_warn(f"ParaRL: every reward of the statistics sample is {mean}; using σ = 1")
            std = 1.0
        self.reward_stats = (mean, std)
        return mean, std

    def on_train_start(self) -> None:
        """Estimate the reward statistics (unless fixed or restored), then score the held-out prompts."""
        if self.reward_stats is not None:
            rank_zero_info(f"ParaRL reward statistics: μ={self.reward_stats[0]:.4f}, σ={self.reward_stats[1]:.4f}")
        elif self.normalization != "fixed":
            dm = self.trainer.datamodule  # type: ignore[attr-defined]
            if dm is None or not hasattr(dm, "sample_dataloader"):
                raise ValueError(
                    f"--model.normalization={self.normalization} estimates the reward statistics from the training "
                    "data: train with a datamodule (ParallelDataModule), or give --model.normalization=fixed"
                )
            count = self._stats_count()
            mean, std = self.estimate_reward_stats(dm.sample_dataloader(count, seed=self.seed))
            rank_zero_info(
                f"ParaRL reward statistics from {count} training rows ({self.normalization}): μ={mean:.4f}, σ={std:.4f}"
            )
        super().on_train_start()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the reward statistics with the weights, so that a resumed run normalises as the original did."""
        super().on_save_checkpoint(checkpoint)
        if self.reward_stats is not None:
            checkpoint[STATS_CHECKPOINT_KEY] = list(self.reward_stats)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the reward statistics of the checkpoint's run (``normalization="fixed"`` keeps the given ones)."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(STATS_CHECKPOINT_KEY)
        if saved is not None and self.normalization != "fixed":
            self.reward_stats = (float(saved[0]), float(saved[1]))


__all__ = ["Normalization", "ParaRL", "RewardLevel", "StepRollout", "decode_outputs", "guided_token_logprobs"]
