"""Synthetic tasks with exact verifiers (the embedded default data; DESIGN.md §4)."""

from dllm_zoo.data.synthetic.arithmetic import Arithmetic, extract_answer
from dllm_zoo.data.synthetic.base import SyntheticTask, default_cache_dir

__all__ = ["Arithmetic", "SyntheticTask", "default_cache_dir", "extract_answer"]
