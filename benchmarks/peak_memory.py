"""Peak memory of one measured region: CUDA allocator peak on GPUs, resident-set peak (VmHWM) on Linux CPUs.

On CPU, freed heap memory is first handed back to the kernel (glibc ``malloc_trim``; otherwise the allocator would
reuse it silently and a later region would look free), then the kernel's high-water mark is reset through
``/proc/self/clear_refs`` (Linux >= 4.0), so each region reports its own peak above the memory resident when it
started. Elsewhere it falls back to the process peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import re
import resource
from pathlib import Path
from types import TracebackType

import torch

_STATUS = Path("/proc/self/status")


def _trim_heap() -> None:
    """Return freed heap pages to the kernel (glibc only; a no-op elsewhere)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(name).malloc_trim(0)


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+)", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.mib`` = peak MiB used by the region.

    Args:
        device: The device the region computes on.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mib = 0.0
        self.kind = ""
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_allocated_peak_above_start"
            return self
        _trim_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._start = _status_kib("VmRSS") or 0
            self.kind = "rss_peak_above_start"
        except OSError:
            self._start = 0
            self.kind = "process_peak_rss"
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self.kind == "rss_peak_above_start":
            self.mib = ((_status_kib("VmHWM") or 0) - self._start) / 1024
        else:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
