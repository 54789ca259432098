"""Synthetic tasks with exact verifiers (the embedded default data; DESIGN.md §4)."""

from dllm_zoo.data.synthetic.arithmetic import Arithmetic, extract_answer
from dllm_zoo.data.synthetic.base import SyntheticTask, default_cache_dir
from dllm_zoo.data.synthetic.shapes import (
    COLOR_NAMES,
    SHAPE_NAMES,
    ImageReading,
    ShapesWorld,
    caption_of,
    draw,
    parse_caption,
    parse_listing,
    parse_r2i_prompt,
    parse_slot,
    read_image,
    render_pattern,
    slot_name,
)

__all__ = [
    "COLOR_NAMES",
    "SHAPE_NAMES",
    "Arithmetic",
    "ImageReading",
    "ShapesWorld",
    "SyntheticTask",
    "caption_of",
    "default_cache_dir",
    "draw",
    "extract_answer",
    "parse_caption",
    "parse_listing",
    "parse_r2i_prompt",
    "parse_slot",
    "read_image",
    "render_pattern",
    "slot_name",
]
