"""CLIP image–text similarity from a local ``transformers`` CLIP checkpoint (MMaDA UniGRPO: 0.1·CLIP).

Nothing is downloaded: the reward reads a directory written by ``save_pretrained`` (or a local snapshot of e.g.
``openai/clip-vit-large-patch14``) with ``local_files_only=True``. ``transformers`` is imported, and the model
loaded, on the first call only, so building the reward (YAML, worker processes) stays cheap and picklable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dllm_zoo.rewards.base import Reward, field
from dllm_zoo.rewards.format import after_think
from dllm_zoo.tokenizers.image import DEFAULT_PALETTE, PaletteTokenizer

Palette = Sequence[tuple[int, int, int]] | Sequence[tuple[str, tuple[int, int, int]]]


def _embeddings(output: Any) -> Tensor:
    """Projected features of ``get_*_features``: a tensor (transformers 4) or ``.pooler_output`` (transformers 5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _input_side(image_processor: Any) -> int | None:
    """The side of the image processor's output (its crop, else its resize target); ``None`` if it does not say."""
    for attr, key in (("crop_size", "height"), ("size", "shortest_edge"), ("size", "height")):
        value = getattr(image_processor, attr, None)
        side = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        if isinstance(side, int):
            return side
    return None


class ClipScore(Reward):
    """``score · max(cos(CLIP_image(image), CLIP_text(text)), 0)`` per sample, from a local CLIP directory.

    The CLIPScore convention ``w · max(cos, 0)`` (Hessel et al. 2021, who use ``w = 2.5``); MMaDA's UniGRPO adds
    ``0.1 · CLIP(image, text)`` on captioning and text-to-image (research/mmada.md §4.3), i.e. ``score=0.1``. The
    cosine is between the projected, L2-normalised embeddings of ``CLIPModel.get_image_features`` and
    ``get_text_features`` (the same cosine ``CLIPModel.forward`` scales into logits), so a score lies in
    ``[0, score]``.

    Images (per-sample field ``image_field``): a float tensor ``[3, H, W]`` in ``[0, 1]`` (clamped), or a
    palette-index grid (nested lists or an integer tensor ``[H, W]``) rendered to RGB with ``palette``. ``None``
    means not applicable. An image smaller than the CLIP input is first enlarged by an integer nearest-neighbour
    factor (tiny synthetic images stay sharp instead of being blurred by the processor's bicubic resize); then the
    checkpoint's own image processor resizes, crops and normalises it.

    Text: the per-sample ``caption_field`` (text-to-image: the prompt's caption) or, when it is ``None``, the
    completion after its last ``</think>`` (captioning); tokens past CLIP's context are truncated. Image and text
    go through CLIP in batches of ``batch_size`` under ``torch.no_grad()``.

    The model is loaded on the first call (not in ``__init__``) and left out of the pickled state, so the reward
    can be sent to worker processes before or after use.

    Args:
        path: A local ``transformers`` CLIP directory (``config.json``, weights, tokenizer and image-processor
            files, as ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` write them).
        score: Weight ``w`` (MMaDA: 0.1).
        name: Metric key (``reward/<name>``).
        image_field: Per-sample field with the images (``"images"``: generated; ``"image"``: the sample's input).
        caption_field: Per-sample field with the texts, or ``None`` to use the completions.
        device: Device of the CLIP model (``"cpu"``, ``"cuda"``, ``"cuda:1"`` …).
        batch_size: Image–text pairs per CLIP forward.
        palette: RGB triples (0–255) or ``(name, RGB)`` pairs of palette-index images; default
            :data:`~dllm_zoo.tokenizers.image.DEFAULT_PALETTE` (ShapesWorld's colours).

    Raises:
        FileNotFoundError: when ``path`` is not a directory with a ``config.json``.
        ValueError: for ``batch_size < 1``; (on call) for an image that is neither ``[3, H, W]`` float nor
            ``[H, W]`` palette indices.

    Example:
        >>> reward = ClipScore("/models/clip-vit-base-patch32", score=0.1)  # doctest: +SKIP
        >>> reward([""], ["a red x"], images=[[[1, 0], [0, 1]]])  # doctest: +SKIP
        [0.1 * max(cos, 0)]  # one float in [0, 0.1]
    """

    def __init__(
        self,
        path: str,
        score: float = 1.0,
        name: str = "clip",
        image_field: str = "images",
        caption_field: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        palette: Palette = DEFAULT_PALETTE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = str(path)
        self._check_path()  # fail at configuration time, not after the first rollout
        self.score = float(score)
        self.name = name
        self.image_field = image_field
        self.caption_field = caption_field
        self.device = device
        self.batch_size = batch_size
        self._renderer = PaletteTokenizer(palette)
        self._model: Any = None
        self._tokenizer: Any = None
        self._image_processor: Any = None

    def _check_path(self) -> None:
        if not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(
                f"ClipScore path={self.path!r} is not a local transformers CLIP directory (no config.json there); "
                "pass a directory written by CLIPModel.save_pretrained + CLIPProcessor.save_pretrained (or a "
                "downloaded snapshot) — the reward never downloads"
            )

    def _load(self) -> None:
        """Load the model, tokenizer and image processor from :attr:`path` (once)."""
        if self._model is not None:
            return
        self._check_path()
        from transformers import CLIPModel, CLIPProcessor  # lazy: importing transformers takes seconds

        processor = CLIPProcessor.from_pretrained(self.path, local_files_only=True)
        model: Any = CLIPModel.from_pretrained(self.path, local_files_only=True)
        # float32 whatever the checkpoint's dtype: CPU half-precision kernels are slow or missing.
        self._model = model.to(device=self.device, dtype=torch.float32).eval()
        self._tokenizer = processor.tokenizer
        self._image_processor = processor.image_processor

    def __getstate__(self) -> dict[str, Any]:
        # The loaded model stays behind: it is large, device-bound and reloads lazily from ``path``.
        state = self.__dict__.copy()
        state.update(_model=None, _tokenizer=None, _image_processor=None)
        return state

    def _rgb(self, image: Any) -> Tensor:
        """``[3, H, W]`` float in ``[0, 1]`` of a float RGB image or a palette-index grid."""
        t = image if isinstance(image, Tensor) else torch.as_tensor(image)
        if t.is_floating_point():
            if t.dim() != 3 or t.shape[0] != 3:
                raise ValueError(f"a float image must be [3, H, W] RGB in [0, 1], got shape {tuple(t.shape)}")
            return t.detach().float().cpu().clamp(0, 1)
        if t.dim() != 2:
            raise ValueError(f"a palette-index image must be [H, W], got shape {tuple(t.shape)}")
        return self._renderer.render(t.detach().long().cpu()[None])[0]

    def _enlarge(self, rgb: Tensor, side: int | None) -> Tensor:
        """Nearest-neighbour upscaling by the smallest integer factor that reaches ``side`` pixels."""
        short = min(rgb.shape[-2:])
        if side is None or short >= side or short == 0:
            return rgb
        factor = math.ceil(side / short)
        return rgb.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)

    @torch.no_grad()
    def similarities(self, images: Sequence[Any], texts: Sequence[str]) -> Tensor:
        """Cosine similarities of image–text pairs.

        Args:
            images: ``N`` images (float ``[3, H, W]`` or palette grids ``[H, W]``; no ``None``).
            texts: ``N`` texts.

        Returns:
            ``[N]`` float32 cosines in ``[-1, 1]``, on the CPU.
        """
        self._load()
        model, tokenizer, image_processor = self._model, self._tokenizer, self._image_processor
        side = _input_side(image_processor)
        max_length = int(model.config.text_config.max_position_embeddings)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [self._enlarge(self._rgb(im), side) for im in images[start : start + self.batch_size]]
            # Images are already in [0, 1]: skip the processor's 1/255 rescale.
            pixels = image_processor(images=chunk, return_tensors="pt", do_rescale=False)["pixel_values"]
            tokens = tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            image_emb = _embeddings(model.get_image_features(pixel_values=pixels.to(self.device)))
            text_emb = _embeddings(
                model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens.get("attention_mask", torch.ones_like(tokens["input_ids"])).to(self.device),
                )
            )
            out.append(torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float | None]:
        """See :meth:`Reward.__call__`; needs ``image_field`` (and ``caption_field`` unless it is ``None``)."""
        n = len(completions)
        images = field(fields, self.image_field, self, n)
        if self.caption_field is None:
            texts: Sequence[str | None] = [after_think(c) for c in completions]
        else:
            texts = field(fields, self.caption_field, self, n)
        keep = [i for i in range(n) if images[i] is not None and texts[i] is not None]
        out: list[float | None] = [None] * n
        if keep:
            cos = self.similarities([images[i] for i in keep], [str(texts[i]) for i in keep])
            for i, c in zip(keep, cos.tolist()):
                out[i] = self.score * max(c, 0.0)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, score={self.score}, name={self.name!r}, "
            f"image_field={self.image_field!r}, caption_field={self.caption_field!r})"
        )
