"""Timing: CUDA events around every repetition, median of many, after an untimed warm-up.

The warm-up also absorbs one-time work (Triton autotuning, cuDNN algorithm choice, lazy CUDA
initialisation). Inputs are rotated among several copies whose total size is a few times the L2
cache, so a repetition never finds its input left in L2 by the previous one. On the CPU (only
the smoke mode times there) ``time.perf_counter`` stands in for the events.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

# H100's L2 cache, the default where the device does not report its own.
DEFAULT_L2_BYTES = 50 * 1024 ** 2
MIN_COPIES = 3
MAX_COPIES = 64


@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    copies: int
    peak_bytes: Optional[int] = None  # torch.cuda.max_memory_allocated over the timed reps


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # only the smoke mode times on the CPU: the minimum rotation will do
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES


def rotation_copies(bytes_per_copy: int, device: torch.device) -> int:
    """How many copies of a case's inputs to rotate among: at least 3, and together at least
    twice the L2 cache."""
    needed = math.ceil(2 * l2_bytes(device) / max(bytes_per_copy, 1))
    return max(MIN_COPIES, min(MAX_COPIES, needed))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_times: Sequence[float], q: float) -> float:
    return sorted_times[min(len(sorted_times) - 1, int(q * len(sorted_times)))]


def _summary(times_ms: list[float], copies: int, peak: Optional[int]) -> Timing:
    ordered = sorted(times_ms)
    return Timing(median_ms=statistics.median(ordered), min_ms=ordered[0],
                  p20_ms=_quantile(ordered, 0.2), p80_ms=_quantile(ordered, 0.8),
                  reps=len(ordered), copies=copies, peak_bytes=peak)


@dataclasses.dataclass
class Timer:
    """Times ``fn(*args)`` for ``args`` cycling through ``arg_sets``."""

    device: torch.device
    reps: int = 50
    warmup: int = 10

    def time(self, fn: Callable[..., Any], arg_sets: Sequence[tuple]) -> Timing:
        if self.device.type == "cuda":
            return self._time_cuda(fn, arg_sets)
        return self._time_cpu(fn, arg_sets)

    def _time_cuda(self, fn, arg_sets) -> Timing:
        copies = len(arg_sets)
        synchronize(self.device)
        for i in range(self.warmup):
            fn(*arg_sets[i % copies])
        synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for i in range(self.reps):
            args = arg_sets[i % copies]
            starts[i].record()
            fn(*args)
            ends[i].record()
        synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)], copies, peak)

    def _time_cpu(self, fn, arg_sets) -> Timing:
        copies = len(arg_sets)
        for i in range(self.warmup):
            fn(*arg_sets[i % copies])
        times = []
        for i in range(self.reps):
            args = arg_sets[i % copies]
            start = time.perf_counter()
            fn(*args)
            times.append(1e3 * (time.perf_counter() - start))
        return _summary(times, copies, None)

    def first_call(self, fn: Callable[..., Any], args: tuple) -> tuple[Any, float]:
        """Run ``fn(*args)`` once, untimed by events; return its result and the wall seconds it
        took (for torch.compile: the compile time)."""
        synchronize(self.device)
        start = time.perf_counter()
        result = fn(*args)
        synchronize(self.device)
        return result, time.perf_counter() - start
