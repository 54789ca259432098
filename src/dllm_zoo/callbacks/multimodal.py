"""MMaDA validation: generate images and answers, score them with the task's exact checker, log numbers and images.

A falling loss does not show that the model draws what a caption says or reads an image right; generating does.
:class:`MultimodalEvaluation` runs after every validation (not the sanity check) on the
:class:`~dllm_zoo.data.MultiTaskDataModule`'s held-out ShapesWorld/Arithmetic samples:

* **t2i**: captions -> :class:`~dllm_zoo.samplers.MaskGITSampler` -> images; ``val/t2i_alignment`` = share of
  images whose objects are exactly the caption's, ``val/t2i_f1`` = mean object-set F1; a grid of the images (with
  their captions) goes to TensorBoard;
* **mmu**: image + question -> text sampler (semi-AR) -> ``val/mmu_accuracy`` from the task's answer checker;
* **text**: Arithmetic questions -> text sampler -> ``val/text_accuracy``.

Every rank decodes the same samples (sharded models need every rank in each forward), so the logged values agree.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from dllm_zoo.backbones.base import Backbone
from dllm_zoo.data.multimodal import mmu_prompt_ids, t2i_prefix
from dllm_zoo.data.prompts import left_pad
from dllm_zoo.evaluation import evaluate_task
from dllm_zoo.samplers.base import Sampler
from dllm_zoo.samplers.maskgit import MaskGITSampler
from dllm_zoo.tokenizers.image import ImageTokenizer, PaletteTokenizer
from dllm_zoo.tokenizers.layout import TokenLayout
from dllm_zoo.tokenizers.text import TextTokenizer


def t2i_prompts(tokenizer: TextTokenizer, captions: list[str], text_len: int) -> tuple[Tensor, Tensor]:
    """t2i generation prefixes ``[iPAD]… <|t2i|> BOS caption EOS`` (``[B, T + 1]``) and their key-padding masks."""
    lay = tokenizer.layout
    ids, masks = [], []
    for caption in captions:
        prefix, pads, _ = t2i_prefix(tokenizer.encode(caption), lay, text_len)
        ids.append(prefix)
        masks.append([False] * pads + [True] * (len(prefix) - pads))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)


def mmu_prompts(tokenizer: TextTokenizer, image_ids: Tensor, questions: list[str]) -> tuple[Tensor, Tensor]:
    """``<|mmu|> <|soi|> img <|eoi|>`` + the chat prompt of each question, left-padded.

    Args:
        tokenizer: Text tokenizer.
        image_ids: ``[B, N]`` image token ids (codes + ``image_offset``).
        questions: ``B`` questions.
    """
    rows = [mmu_prompt_ids(tokenizer, img, q) for img, q in zip(image_ids.tolist(), questions)]
    return left_pad(rows, tokenizer.layout.pad_id)


def codes_to_grids(codes: Tensor, image_tokenizer: ImageTokenizer) -> Tensor:
    """Palette-index grids ``[B, H, W]`` of code grids ``[B, h, w]`` (exact for the palette tokenizer).

    Codes the tokenizer does not have (a sampler drawing from a larger image segment) become background; the caller
    scores such images as wrong.
    """
    codes = torch.where(codes < image_tokenizer.codebook_size, codes, torch.zeros_like(codes))
    if isinstance(image_tokenizer, PaletteTokenizer) and image_tokenizer.downsample == 1:
        return codes
    images = image_tokenizer.decode(codes)
    return PaletteTokenizer().nearest_indices(images)


def image_grid(images: Tensor, columns: int = 8, scale: int = 8, border: int = 1) -> Tensor:
    """Tile ``[B, 3, H, W]`` images into one ``[3, H', W']`` picture, upscaled ``scale``× (nearest), white borders."""
    b, c, h, w = images.shape
    big = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    rows = (b + columns - 1) // columns
    hh, ww = h * scale + border, w * scale + border
    canvas = torch.ones(c, rows * hh + border, min(b, columns) * ww + border)
    for i in range(b):
        r, col = divmod(i, columns)
        canvas[:, border + r * hh : border + r * hh + h * scale, border + col * ww : border + col * ww + w * scale] = (
            big[i]
        )
    return canvas


class MultimodalEvaluation(Callback):
    """Generate, score and log t2i alignment, mmu accuracy and text accuracy after each validation.

    Args:
        t2i_sampler: Image sampler (``MaskGITSampler``; its ``num_image_tokens`` must equal the data's); ``None``
            skips t2i.
        text_sampler: Text sampler for mmu answers and text questions (``LLaDASampler``); ``None`` skips both.
        limit: Validation samples per task.
        batch_size: Samples per ``generate`` call.
        t2i_task: Name of the datamodule task whose synthetic task supplies captions (``t2i``).
        mmu_task: Name of the task whose samples supply images and questions (``mmu``).
        text_task: Name of the text task scored with its checker (``lm``).
        log_images: Generated images to log as a grid (0 = none).
        seed: Seed of the samplers' random source (the same draws at every validation).
    """

    def __init__(
        self,
        t2i_sampler: MaskGITSampler | None = None,
        text_sampler: Sampler | None = None,
        limit: int = 64,
        batch_size: int = 32,
        t2i_task: str = "t2i",
        mmu_task: str = "mmu",
        text_task: str = "lm",
        log_images: int = 16,
        seed: int = 0,
    ) -> None:
        if limit < 1 or batch_size < 1:
            raise ValueError(f"limit and batch_size must be >= 1, got limit={limit}, batch_size={batch_size}")
        self.t2i_sampler = t2i_sampler
        self.text_sampler = text_sampler
        self.limit = limit
        self.batch_size = batch_size
        self.t2i_task = t2i_task
        self.mmu_task = mmu_task
        self.text_task = text_task
        self.log_images = log_images
        self.seed = seed

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Generate and log (skipped during the sanity check)."""
        if trainer.sanity_checking:
            return
        dm: Any = trainer.datamodule  # type: ignore[attr-defined]
        for attr in ("tokenizer", "image_tokenizer", "text_len", "task_of"):
            if not hasattr(dm, attr):
                raise ValueError(f"MultimodalEvaluation needs a MultiTaskDataModule (its datamodule has no {attr!r})")
        net = getattr(pl_module, "net", None)
        if not isinstance(net, Backbone):
            raise TypeError(f"MultimodalEvaluation needs a stage whose `net` is a Backbone, got {type(net)!r}")
        was_training = net.training
        net.eval()
        metrics: dict[str, float] = {}
        with torch.no_grad():
            if self.t2i_sampler is not None and dm.task_of(self.t2i_task) is not None:
                metrics.update(self.evaluate_t2i(net, dm, trainer))
            if self.text_sampler is not None and dm.task_of(self.mmu_task) is not None:
                metrics.update(self.evaluate_mmu(net, dm))
            text_task = dm.task_of(self.text_task)
            if self.text_sampler is not None and text_task is not None:
                report = evaluate_task(
                    net,
                    dm.tokenizer,
                    self.text_sampler,
                    text_task,
                    limit=self.limit,
                    batch_size=self.batch_size,
                    chat=dm.tasks[self.text_task].format == "lm_chat",
                    seed=self.seed,
                )
                metrics["val/text_accuracy"] = report.accuracy
        net.train(was_training)
        for key, value in metrics.items():
            pl_module.log(key, value, prog_bar=key.endswith(("alignment", "mmu_accuracy")), sync_dist=True)

    # -------------------------------------------------------------------- t2i
    def generate_images(
        self, net: Backbone, tokenizer: TextTokenizer, text_len: int, captions: list[str], generator: torch.Generator
    ) -> Tensor:
        """Code grids ``[B, h, w]`` generated for ``captions`` by the t2i sampler."""
        assert self.t2i_sampler is not None
        device = next(net.parameters()).device
        ids, mask = t2i_prompts(tokenizer, captions, text_len)
        out = self.t2i_sampler.generate(net, ids.to(device), mask.to(device), generator=generator)
        n = self.t2i_sampler.num_image_tokens
        tokens = out.tokens[:, ids.shape[1] + 1 : ids.shape[1] + 1 + n]
        lay: TokenLayout = net.layout
        codes = lay.image_codes(tokens).clamp(0, lay.image_codebook_size - 1)
        side = int(round(n**0.5))
        return codes.view(-1, side, side).cpu()

    def evaluate_t2i(self, net: Backbone, dm: Any, trainer: L.Trainer) -> dict[str, float]:
        """Alignment and F1 of images generated for held-out captions; logs an image grid."""
        task: Any = dm.task_of(self.t2i_task)
        assert self.t2i_sampler is not None
        n = self.t2i_sampler.num_image_tokens
        if n != dm.num_image_tokens:
            raise ValueError(
                f"the t2i sampler generates {n} image tokens but the data's images have {dm.num_image_tokens}; set "
                f"its num_image_tokens to {dm.num_image_tokens}"
            )
        samples = list(itertools.islice(task.generate("val"), self.limit))
        gen = torch.Generator(next(net.parameters()).device).manual_seed(self.seed)
        grids: list[Tensor] = []
        valid: list[Tensor] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            codes = self.generate_images(net, dm.tokenizer, dm.text_len, [s["caption"] for s in chunk], gen)
            valid.append((codes < dm.image_tokenizer.codebook_size).flatten(1).all(dim=1))
            grids.append(codes_to_grids(codes, dm.image_tokenizer))
        images = torch.cat(grids)
        ok = torch.cat(valid).tolist()
        exact = [v and task.check_image(img.tolist(), s) for v, img, s in zip(ok, images, samples)]
        f1 = [task.alignment_score(s["caption"], img.tolist()) for img, s in zip(images, samples)]
        self._log_image_grid(trainer, images[: self.log_images], [s["caption"] for s in samples[: self.log_images]])
        return {"val/t2i_alignment": sum(exact) / len(exact), "val/t2i_f1": sum(f1) / len(f1)}

    def _log_image_grid(self, trainer: L.Trainer, grids: Tensor, captions: list[str]) -> None:
        if not len(grids) or trainer.global_rank != 0:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        rgb = PaletteTokenizer().render(grids)
        experiment.add_image("val/t2i_samples", image_grid(rgb), trainer.global_step)
        experiment.add_text(
            "val/t2i_captions", "  \n".join(f"{i}: {c}" for i, c in enumerate(captions)), trainer.global_step
        )

    # -------------------------------------------------------------------- mmu
    def evaluate_mmu(self, net: Backbone, dm: Any) -> dict[str, float]:
        """Answer accuracy on held-out image questions."""
        assert self.text_sampler is not None
        task: Any = dm.task_of(self.mmu_task)
        spec = dm.tasks[self.mmu_task]
        fields = spec.fields()
        samples = list(itertools.islice(task.generate("val"), self.limit))
        device = next(net.parameters()).device
        gen = torch.Generator(device).manual_seed(self.seed)
        from dllm_zoo.data.multimodal import load_image_codes

        correct = 0
        lay: TokenLayout = net.layout
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            codes = torch.stack(
                [load_image_codes(s, dm.image_tokenizer, spec.image_field, dm.image_size).reshape(-1) for s in chunk]
            )
            ids, mask = mmu_prompts(dm.tokenizer, lay.image_ids(codes), [s[fields["prompt_field"]] for s in chunk])
            out = self.text_sampler.generate(net, ids.to(device), mask.to(device), generator=gen)
            rows = out.tokens[:, ids.shape[1] :].tolist()
            texts = dm.tokenizer.batch_decode(rows, skip_special_tokens=True)
            correct += sum(task.check(t, s) for t, s in zip(texts, chunk))
        return {"val/mmu_accuracy": correct / max(1, len(samples))}
