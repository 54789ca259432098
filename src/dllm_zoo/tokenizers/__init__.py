"""Token layouts and text tokenizers (image tokenizers arrive with the MMaDA issue)."""

from dllm_zoo.tokenizers.layout import TokenLayout
from dllm_zoo.tokenizers.text import ByteTokenizer, ChatMessage, HFTextTokenizer, TextTokenizer

__all__ = ["ByteTokenizer", "ChatMessage", "HFTextTokenizer", "TextTokenizer", "TokenLayout"]
