"""Token layouts, text tokenizers and image tokenizers.

* :class:`TokenLayout`: where text, special and image-code ids live in the model's vocabulary.
* Text: :class:`TextTokenizer` (contract), :class:`ByteTokenizer` (embedded), :class:`WordTokenizer` (a closed word
  vocabulary over bytes, layout ``words``), :class:`HFTextTokenizer`.
* Images (``[B, 3, H, W]`` in ``[0, 1]`` <-> ``[B, h, w]`` codes): :class:`ImageTokenizer` (contract),
  :class:`PaletteTokenizer` (lossless, embedded; palette :data:`DEFAULT_PALETTE`) and :class:`MagvitV2Tokenizer`
  (Show-o / MMaDA's MAGVIT-v2, loads ``showlab/magvitv2``); :class:`PatchCodebookTokenizer` (a fixed codebook of
  palette patches) and :class:`ShapeSlotTokenizer` (one code per ShapesWorld slot: empty or one colour × shape).
"""

from dllm_zoo.tokenizers.image import DEFAULT_PALETTE, ImageTokenizer, PaletteTokenizer
from dllm_zoo.tokenizers.layout import TokenLayout
from dllm_zoo.tokenizers.magvit import MagvitV2Tokenizer
from dllm_zoo.tokenizers.patch import PatchCodebookTokenizer, ShapeSlotTokenizer
from dllm_zoo.tokenizers.text import ByteTokenizer, ChatMessage, HFTextTokenizer, TextTokenizer
from dllm_zoo.tokenizers.words import WordTokenizer

__all__ = [
    "DEFAULT_PALETTE",
    "ByteTokenizer",
    "ChatMessage",
    "HFTextTokenizer",
    "ImageTokenizer",
    "MagvitV2Tokenizer",
    "PaletteTokenizer",
    "PatchCodebookTokenizer",
    "ShapeSlotTokenizer",
    "TextTokenizer",
    "TokenLayout",
    "WordTokenizer",
]
