"""Lightning callbacks that any recipe can attach (see the YAML presets in the top-level callbacks/)."""

from dllm_zoo.callbacks.accuracy import TaskAccuracy
from dllm_zoo.callbacks.multimodal import MultimodalEvaluation
from dllm_zoo.callbacks.parabench import ParaBenchEvaluation
from dllm_zoo.callbacks.throughput import ThroughputMonitor, forward_flops_per_token, measure_matmul_peak

__all__ = [
    "MultimodalEvaluation",
    "ParaBenchEvaluation",
    "TaskAccuracy",
    "ThroughputMonitor",
    "forward_flops_per_token",
    "measure_matmul_peak",
]
