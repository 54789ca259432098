"""UniGRPO (MMaDA §3.3, Alg. 1; research/mmada.md §4.3–4.4): GRPO for masked-diffusion policies, in process.

One training step = one batch of prompts:

1. **Rollout** — every prompt is answered ``G`` times by the stage's sampler under ``no_grad`` (any
   :class:`~dllm_zoo.samplers.base.Sampler`), giving a :class:`~dllm_zoo.rl.rollout.Rollout` with its step map.
2. **Scoring** — every reward scores the decoded completions; rewards that do not apply to a sample return ``None``
   (diversified rewards per task type); the weighted total is turned into group advantages (population z-score, 0
   without spread); optionally groups that are all right or all wrong are dropped (counted).
3. **Optimisation** — ``μ`` inner iterations over the same rollouts. Iteration ``n`` masks each response with the
   masking scheme's ``n``-th mask (the paper's uniformly spaced ratios by default; the prompt is never masked), the
   sequence log-likelihood being the mean log-probability of the masked tokens; the old policy's log-probs of all
   ``μ`` masks are computed once before the first update (so the first iteration's ratio is 1), then each iteration
   takes one optimizer step on the :class:`~dllm_zoo.rl.objectives.PolicyObjective`.

**Multimodal prompts** (MMaDA's diversified tasks): a batch may mix text-answered prompts (text reasoning, image
questions whose prompt holds the image) and image-answered prompts (``task`` in ``image_tasks``, t2i captions). The
former are answered by ``sampler``, the latter by ``image_sampler`` (MaskGIT); both are merged into one rollout
(right-padded), the rewards see the generated images as the field ``images`` (palette grids), and the masking and the
log-likelihood treat the ``N`` generated image codes as the response, exactly as the text answer of a text row.

The reference handling, the update loop, the timers and the held-out report are those of
:class:`~dllm_zoo.stages.policy_gradient.PolicyGradientStage` (shared with ParaRL).

Trainer steps count optimizer steps: ``--trainer.max_steps`` = RL steps × ``inner_iterations``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from jsonargparse import lazy_instance
from torch import Tensor

from dllm_zoo.adapters import LoRA
from dllm_zoo.backbones.base import Backbone
from dllm_zoo.backbones.llada import LLaDABackbone
from dllm_zoo.callbacks.multimodal import codes_to_grids
from dllm_zoo.rewards.base import Reward
from dllm_zoo.rl.advantages import informative_groups
from dllm_zoo.rl.masking import ResponseMasking, UniformlySpacedMasking
from dllm_zoo.rl.objectives import ClippedSurrogate, PolicyObjective
from dllm_zoo.rl.rollout import (
    RewardAggregation,
    Rollout,
    combine_rewards,
    repeat_prompts,
    response_mask,
    score_rewards,
)
from dllm_zoo.samplers.base import Sampler
from dllm_zoo.samplers.semi_ar import LLaDASampler
from dllm_zoo.stages.base import BackboneFactory
from dllm_zoo.stages.optim import OptimConfig
from dllm_zoo.stages.policy_gradient import MODEL_TIMERS, PolicyGradientStage, ReferenceKind
from dllm_zoo.tokenizers.image import ImageTokenizer
from dllm_zoo.tokenizers.layout import EOT
from dllm_zoo.tokenizers.text import TextTokenizer


def _nanmean(x: Tensor) -> Tensor:
    applies = ~torch.isnan(x)
    return torch.where(applies, x, 0.0).sum() / applies.sum().clamp(min=1)


class UniGRPO(PolicyGradientStage):
    """UniGRPO policy optimisation of a masked-diffusion LM (manual optimisation, ``μ`` inner iterations).

    Batches come from :class:`~dllm_zoo.data.prompts.PromptDataModule`: ``prompt_ids``/``prompt_mask`` ``[B, P]``
    (left-padded), ``prompts`` and the samples' ``fields`` (e.g. ``answer``), which the rewards receive.

    Args:
        backbone: The policy: a backbone factory or instance (``pretrained=`` a warm-start checkpoint).
        sampler: Generates the rollouts (default: LLaDA semi-AR, temperature 1 for diverse groups).
        rewards: Reward functions; their ``name`` is the metric key ``reward/<name>``.
        reward_weights: One weight per reward (default all 1); e.g. MMaDA's correctness 2.0 + format 0.5.
        reward_aggregation: ``sum_then_normalize`` (GRPO) or ``normalize_then_sum`` (each reward z-scored first).
        objective: The policy objective (default: clipped surrogate ε = 0.2, no KL).
        masking: Which response tokens each inner iteration masks (default: the paper's uniformly spaced ratios).
        num_generations: ``G``, completions per prompt.
        inner_iterations: ``μ``, optimizer steps per rollout batch.
        micro_batch_size: Rows per forward/backward (gradients accumulate over the micro-batches of one iteration);
            ``None`` = all rows at once.
        accuracy_reward: Name of the reward that defines "correct" (score > 0) for ``accuracy`` and the group filter;
            ``None``: no accuracy metric.
        filter_groups: Drop groups whose accuracy is outside ``[filter_low, filter_high]`` (released UniGRPO: 0.05 /
            0.95; TraceRL 0.2 / 0.8). They still count in the reward metrics.
        filter_low: Lowest kept group accuracy.
        filter_high: Highest kept group accuracy.
        advantage_eps: Added to the group standard deviation (paper ``std + ε``; release 0).
        post_num: Trainable padding tokens after each answer (release 1).
        reference: ``auto`` (``adapter`` when ``--model.adapter`` is set, else ``copy``), ``copy`` or ``adapter``;
            only used when the objective needs a reference.
        eval_sampler: Sampler of the held-out evaluation (default: ``sampler``); one completion per prompt.
        image_sampler: Answers the prompts whose ``task`` field is in ``image_tasks`` with an image (a
            :class:`~dllm_zoo.samplers.MaskGITSampler`); ``None``: no image prompts allowed.
        eval_image_sampler: Image sampler of the held-out evaluation (default: ``image_sampler``).
        image_tasks: Values of the per-sample ``task`` field answered with an image.
        max_grad_norm: Gradient clipping by global norm (``None`` = off; release 1.0).
        tokenizer: Decodes completions; default: the datamodule's ``tokenizer``.
        optim: Optimizer settings.
        seed: Seed of the rollout and masking random sources.
        adapter: Train a LoRA/QLoRA adapter instead of every weight.
        image_tokenizer: Decodes generated image codes into the ``images`` the rewards read; default: the
            datamodule's ``image_tokenizer``.
    """

    algorithm: ClassVar[str] = "UniGRPO"
    headline_metric: ClassVar[str | None] = "accuracy"

    def __init__(
        self,
        backbone: BackboneFactory | Backbone = lambda: LLaDABackbone("tiny"),
        sampler: Sampler = lazy_instance(LLaDASampler, gen_length=32, block_length=32, steps=32, temperature=1.0),
        rewards: Sequence[Reward] = (),
        reward_weights: Sequence[float] | None = None,
        reward_aggregation: RewardAggregation = "sum_then_normalize",
        objective: PolicyObjective = lazy_instance(ClippedSurrogate),
        masking: ResponseMasking = lazy_instance(UniformlySpacedMasking),
        num_generations: int = 8,
        inner_iterations: int = 4,
        micro_batch_size: int | None = None,
        accuracy_reward: str | None = "correctness",
        filter_groups: bool = False,
        filter_low: float = 0.05,
        filter_high: float = 0.95,
        advantage_eps: float = 0.0,
        post_num: int = 1,
        reference: ReferenceKind = "auto",
        eval_sampler: Sampler | None = None,
        image_sampler: Sampler | None = None,
        eval_image_sampler: Sampler | None = None,
        image_tasks: Sequence[str] = ("t2i",),
        max_grad_norm: float | None = 1.0,
        tokenizer: TextTokenizer | None = None,
        optim: OptimConfig = OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=0, min_lr_scale=1.0),
        seed: int = 0,
        adapter: LoRA | None = None,
        image_tokenizer: ImageTokenizer | None = None,
    ) -> None:
        rewards = list(rewards)
        if not rewards:
            raise ValueError("--model.rewards is empty: give at least one reward (class_path: ArithmeticCorrectness …)")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"--model.rewards: names must be distinct (they are metric keys), got {names}")
        if reward_weights is not None and len(reward_weights) != len(rewards):
            raise ValueError(
                f"--model.reward_weights has {len(reward_weights)} entries for {len(rewards)} rewards {names}"
            )
        if accuracy_reward is not None and accuracy_reward not in names:
            raise ValueError(f"--model.accuracy_reward={accuracy_reward!r} is not one of the reward names {names}")
        if filter_groups and accuracy_reward is None:
            raise ValueError("--model.filter_groups needs --model.accuracy_reward (the reward that defines correct)")
        super().__init__(
            backbone,
            objective,
            num_generations,
            inner_iterations,
            micro_batch_size,
            reference,
            max_grad_norm,
            tokenizer,
            optim,
            seed,
            adapter,
            image_tokenizer=image_tokenizer,
        )
        self.sampler = sampler
        self.eval_sampler = eval_sampler if eval_sampler is not None else sampler
        self.image_sampler = image_sampler
        self.eval_image_sampler = eval_image_sampler if eval_image_sampler is not None else image_sampler
        self.image_tasks = tuple(str(t) for t in image_tasks)
        self.rewards = rewards
        weights = [1.0] * len(rewards) if reward_weights is None else [float(w) for w in reward_weights]
        self.reward_weights = dict(zip(names, weights))
        self.reward_aggregation: RewardAggregation = reward_aggregation
        self.masking = masking
        self.accuracy_reward = accuracy_reward
        self.filter_groups = filter_groups
        self.filter_low = filter_low
        self.filter_high = filter_high
        self.advantage_eps = advantage_eps
        self.post_num = post_num
        self.save_hyperparameters(
            ignore=[
                "backbone",
                "sampler",
                "rewards",
                "objective",
                "masking",
                "eval_sampler",
                "image_sampler",
                "eval_image_sampler",
                "image_tokenizer",
                "tokenizer",
                "optim",
                "adapter",
            ]
        )
        self.hparams["optim"] = dataclasses.asdict(optim)
        self.hparams["adapter"] = None if self.adapter is None else self.adapter.to_dict()

    # ----------------------------------------------------------------- rollout
    def _stop_ids(self) -> Tensor:
        lay = self.layout
        ids = {lay.eos_id}
        if EOT in lay.special_tokens:
            ids.add(lay.special_tokens[EOT])
        return torch.tensor(sorted(ids), device=self.device)

    def decode(self, completion: Tensor) -> tuple[list[str], list[list[int]]]:
        """Texts and ids of completions, cut at the first end-of-turn / EOS token (one host transfer).

        Args:
            completion: ``[N, G]`` generated tokens.
        """
        before_stop = torch.isin(completion, self._stop_ids()).long().cumsum(dim=1) == 0
        rows = [[t for t, keep in zip(r, k) if keep] for r, k in zip(completion.tolist(), before_stop.tolist())]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True), rows

    def _image_rows(self, batch: dict[str, Any], group: list[int], image_sampler: Sampler | None) -> list[int]:
        """Rows (of the repeated batch) whose prompt is answered with an image; checks there is a sampler for them."""
        kinds = batch["fields"].get("task")
        if kinds is None:
            return []
        rows = [i for i, g in enumerate(group) if kinds[g] in self.image_tasks]
        if rows and image_sampler is None:
            raise ValueError(
                f"the batch holds image prompts (task in {list(self.image_tasks)}) but {self.algorithm} has no image "
                "sampler: set --model.image_sampler (e.g. dllm_zoo.samplers.MaskGITSampler)"
            )
        return rows

    def _generate(
        self,
        ids: Tensor,
        mask: Tensor,
        image_rows: list[int],
        sampler: Sampler,
        image_sampler: Sampler | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Answer text rows with ``sampler`` and ``image_rows`` with ``image_sampler``; merge, right-padded.

        Returns:
            ``tokens``, ``attention_mask`` (False on the right padding), ``step_map``, ``is_image`` ``[N]`` bool and
            the total number of forward passes.
        """
        n, width = ids.shape
        is_image = torch.zeros(n, dtype=torch.bool, device=ids.device)
        if not image_rows:
            out = sampler.generate(self.net, ids, mask, generator=generator)
            return out.tokens, out.attention_mask.bool(), out.step_map, is_image, out.nfe
        is_image[image_rows] = True
        parts = []
        for rows, part_sampler in (
            ((~is_image).nonzero().squeeze(1), sampler),
            (is_image.nonzero().squeeze(1), image_sampler),
        ):
            if rows.numel():
                assert part_sampler is not None  # checked by _image_rows
                parts.append((rows, part_sampler.generate(self.net, ids[rows], mask[rows], generator=generator)))
        total = max(out.tokens.shape[1] for _, out in parts)
        tokens = torch.full((n, total), self.layout.pad_id, dtype=torch.long, device=ids.device)
        attention = torch.zeros(n, total, dtype=torch.bool, device=ids.device)
        step_map = torch.zeros(n, total, dtype=torch.long, device=ids.device)
        for rows, out in parts:
            w = out.tokens.shape[1]
            tokens[rows, :w] = out.tokens
            attention[rows, :w] = out.attention_mask.bool()
            step_map[rows, :w] = out.step_map
        return tokens, attention, step_map, is_image, sum(out.nfe for _, out in parts)

    def _images(self, tokens: Tensor, response: Tensor, image_rows: list[int]) -> list[Any]:
        """Palette grids of the generated codes of ``image_rows`` (``None`` for the other rows), one host transfer."""
        images: list[Any] = [None] * tokens.shape[0]
        if not image_rows:
            return images
        rows = torch.tensor(image_rows, device=tokens.device)
        side = math.isqrt(int(response[image_rows[0]].sum()))
        offset = self.layout.image_offset
        assert offset is not None  # an image sampler checked the layout
        codes = tokens[rows][response[rows]].view(len(image_rows), side, side) - offset
        grids = codes_to_grids(codes, self.image_tokenizer).tolist()
        for i, grid in zip(image_rows, grids):
            images[i] = grid
        return images

    @torch.no_grad()
    def rollout(
        self,
        batch: dict[str, Any],
        sampler: Sampler,
        num_generations: int,
        generator: torch.Generator | None = None,
        image_sampler: Sampler | None = None,
    ) -> Rollout:
        """Answer every prompt ``num_generations`` times and score the completions.

        Args:
            batch: A prompt batch (``prompt_ids``, ``prompt_mask``, ``prompts``, ``fields``).
            sampler: The sampler of text answers.
            num_generations: Completions per prompt.
            generator: Random source of the samplers.
            image_sampler: The sampler of image answers (rows whose ``task`` is in ``image_tasks``).

        Returns:
            The scored :class:`Rollout` (``advantages``/``keep`` not yet set). Image rows have an empty completion
            text; their response is the generated image codes (the soi/eoi around them are context).
        """
        with self.timed("generate"):
            ids, mask, group = repeat_prompts(batch["prompt_ids"], batch["prompt_mask"].bool(), num_generations)
            index = group.tolist()
            image_rows = self._image_rows(batch, index, image_sampler)
            tokens, attention, step_map, is_image, nfe = self._generate(
                ids, mask, image_rows, sampler, image_sampler, generator
            )
        with self.timed("decode"):
            width = ids.shape[1]
            completion = tokens[:, width:]
            generated = attention[:, width:]
            text_resp = response_mask(completion, self.layout.eos_id, self.post_num) & generated
            image_resp = step_map[:, width:] > 0  # the image codes: the positions the image sampler committed
            resp = torch.where(is_image[:, None], image_resp, text_resp)
            texts, completion_ids = self.decode(completion)
            for i in image_rows:
                texts[i], completion_ids[i] = "", []
            fields = {k: [v[i] for i in index] for k, v in batch["fields"].items()}
            fields["completion_ids"] = completion_ids
            fields["images"] = self._images(completion, image_resp, image_rows)
            prompts = [batch["prompts"][i] for i in index]
            in_prompt = torch.ones_like(mask)  # the whole prompt part, padding included, is never masked
            # Image rows keep <|soi|>/<|eoi|> as context; text rows mask their untrained tail (see _rows).
            context = is_image[:, None] & generated & ~image_resp
        with self.timed("reward"):
            scores = score_rewards(self.rewards, prompts, texts, fields, device=self.device)
        return Rollout(
            tokens=tokens,
            attention_mask=attention,
            prompt_mask=torch.cat([in_prompt, context], dim=1),
            response_mask=torch.cat([~in_prompt, resp], dim=1),
            step_map=step_map,
            group=group,
            rewards=scores,
            completions=texts,
            nfe=nfe,
        )

    def correct(self, rollout: Rollout) -> Tensor | None:
        """``[N]`` float 1/0/NaN: the accuracy reward is positive / not / does not apply; ``None`` without one."""
        if self.accuracy_reward is None:
            return None
        s = rollout.rewards[self.accuracy_reward]
        return torch.where(torch.isnan(s), s, (s > 0).float())

    def advantages(self, rollout: Rollout) -> Rollout:
        """Set ``total``, ``advantages`` and ``keep`` (the group filter) on ``rollout``."""
        with self.timed("advantage"):
            total, adv = combine_rewards(
                rollout.rewards, self.reward_weights, rollout.group, self.reward_aggregation, eps=self.advantage_eps
            )
            keep = torch.ones_like(rollout.group, dtype=torch.bool)
            correct = self.correct(rollout)
            if self.filter_groups and correct is not None:
                keep = informative_groups(torch.nan_to_num(correct), rollout.group, self.filter_low, self.filter_high)
            rollout.total, rollout.advantages, rollout.keep = total, adv, keep
        return rollout

    # ------------------------------------------------------------ optimisation
    def _rows(self, rollout: Rollout, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Noisy inputs ``[C·N, L]`` and targets ``[C·N, L]`` of one iteration's masks ``[C, N, L]``.

        Completion positions that are not trainable (padding after the first ``post_num``) are masked in the input
        too but never scored, as the released trainers do.
        """
        tail = ~rollout.prompt_mask & ~rollout.response_mask
        noisy_pos = masks | tail
        noisy = torch.where(noisy_pos, self.layout.mask_id, rollout.tokens.expand_as(masks))
        return noisy.flatten(0, 1), masks.flatten(0, 1)

    def optimise(self, rollout: Rollout, generator: torch.Generator | None) -> dict[str, Tensor]:
        """The ``μ`` inner iterations on the kept completions; returns averaged diagnostics."""
        sub = rollout.kept()  # one host sync per RL step
        adv = sub.advantages
        assert adv is not None  # set by advantages()
        if sub.num_rollouts == 0:
            return {}
        mu = self.inner_iterations
        masks = self.masking(sub.response_mask, mu, generator)  # [μ, C, N, L]
        copies = masks.shape[1]
        labels = sub.tokens.repeat(copies, 1)
        attn = sub.attention_mask.repeat(copies, 1)
        adv_rows = adv.repeat(copies)
        rows = [self._rows(sub, masks[n]) for n in range(mu)]
        return self.policy_update([r[0] for r in rows], [r[1] for r in rows], labels, attn, adv_rows)

    # ----------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # type: ignore[override]
        """Rollout, score, and ``μ`` optimizer steps; logs rewards, accuracy, KL, clipping, entropy and timings."""
        self.timers.clear()
        t0 = time.perf_counter()
        self.net.train()
        rollout = self.rollout(
            batch, self.sampler, self.num_generations, self.step_generator(batch_idx, stream=0), self.image_sampler
        )
        self.advantages(rollout)
        stats = self.optimise(rollout, self.step_generator(batch_idx, stream=1))
        seconds = time.perf_counter() - t0
        n = rollout.num_rollouts
        log = {f"train/{k}": v for k, v in stats.items()}
        log.update(self._reward_metrics(rollout, "train"))
        assert rollout.keep is not None
        assert rollout.advantages is not None
        assert rollout.total is not None
        log["train/reward"] = rollout.total.mean()
        log["train/kept_rollouts"] = rollout.keep.float().sum()
        log["train/dropped_groups"] = (~rollout.keep).float().sum() / self.num_generations
        log["train/advantage_abs"] = rollout.advantages.abs().mean()
        log["train/response_length"] = rollout.response_mask.float().sum(dim=1).mean()
        log["train/rollout_nfe"] = torch.tensor(float(rollout.nfe))
        log.update(self.timing_metrics(seconds))
        for key in ("data_errors", "dropped"):
            if key in batch:
                log[f"data/{key}"] = batch[key].float()
        for reward in self.rewards:  # failure counters of rewards that keep them (CodeExecution: timeouts, crashes…)
            counters = getattr(reward, "stats", None)
            if callable(counters):
                log.update({f"reward_stats/{reward.name}/{k}": torch.tensor(float(v)) for k, v in counters().items()})
        bar = {"train/accuracy", "train/reward"}
        self.log_dict({k: v.float() for k, v in log.items() if k not in bar}, batch_size=n)
        self.log_dict({k: v.float() for k, v in log.items() if k in bar}, batch_size=n, prog_bar=True)

    def _reward_metrics(self, rollout: Rollout, prefix: str) -> dict[str, Tensor]:
        log = {f"{prefix}/reward/{name}": _nanmean(s) for name, s in rollout.rewards.items()}
        correct = self.correct(rollout)
        if correct is not None:
            log[f"{prefix}/accuracy"] = _nanmean(correct)
        return log

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, Any], batch_idx: int) -> Rollout:
        """One completion per held-out prompt with ``eval_sampler`` (same draws at every evaluation)."""
        was_training = self.net.training
        self.net.eval()
        try:
            generator = self.step_generator(batch_idx, stream=2, per_step=False)
            return self.rollout(batch, self.eval_sampler, 1, generator, self.eval_image_sampler)
        finally:
            self.net.train(was_training)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:  # type: ignore[override]
        """Held-out rewards and accuracy (``val/reward/<name>``, ``val/accuracy``)."""
        rollout = self.evaluate_batch(batch, batch_idx)
        for key, value in self._reward_metrics(rollout, "val").items():
            self.log(key, value, batch_size=rollout.num_rollouts, sync_dist=True, prog_bar=key == "val/accuracy")

    def heldout_scores(self, batch: dict[str, Any], batch_idx: int) -> tuple[int, dict[str, Tensor]]:
        """Per held-out prompt: every reward, and ``accuracy`` when there is an accuracy reward."""
        rollout = self.evaluate_batch(batch, batch_idx)
        per = dict(rollout.rewards)
        correct = self.correct(rollout)
        if correct is not None:
            per["accuracy"] = correct
        return rollout.num_rollouts, per


__all__ = ["MODEL_TIMERS", "ReferenceKind", "UniGRPO"]
