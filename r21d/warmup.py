"""``r21d.warmup``: compile every kernel a model's first step will launch, before that step.

The model runs once with every Triton launch captured instead of run (``_launch.capture()``:
nothing reaches the GPU, the captured outputs are left unwritten), each captured launch becomes
the compile job of the configuration it would run (``triton_kernels/_compile.py``), the
duplicates go, and the rest compile in parallel threads into Triton's file cache, where the first
real launch finds them. The model's state is put back afterwards: running statistics, batch
counters and gradients are as they were.

Call it before the first step, and before capturing a CUDA graph (launches must not compile or
time inside a capture).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import time
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass
class WarmupReport:
    """What :func:`warmup` compiled: one entry per kernel specialisation."""

    arch: int
    kernels: list[str]  # kernel names, one per compiled specialisation
    launches: int  # launches the captured step makes
    compile_cpu_s: float  # the sum of the compiles' times
    wall_s: float
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def compiled(self) -> int:
        return len(self.kernels) - len(self.errors)


def _arch(example: torch.Tensor, arch: Optional[int]) -> int:
    if arch is not None:
        return int(arch)
    if example.is_cuda:
        major, minor = torch.cuda.get_device_capability(example.device)
        return 10 * major + minor
    return 90  # no GPU: what an H100 compiles (the CPU estimate of a first call)


@contextlib.contextmanager
def _state_kept(model: nn.Module):
    """Put back the buffers (running statistics, num_batches_tracked) and gradients the captured
    step changed."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g


def _capture_step(model: nn.Module, example: torch.Tensor, training: bool) -> list:
    from .triton_kernels import _launch

    with _state_kept(model), _launch.capture() as launches:
        if training:
            out = model(example)
            outs = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        else:
            with torch.no_grad():
                model(example)
    return launches


def _progress(done: int, total: int, enabled: bool) -> None:
    if enabled:
        end = "\n" if done == total else ""
        print(f"\rr21d.warmup: compiled {done}/{total} kernels", end=end, file=sys.stderr, flush=True)


def warmup(model: nn.Module, example_input: torch.Tensor, *, training: bool = False,
           arch: Optional[int] = None, workers: Optional[int] = None,
           progress: Optional[bool] = None) -> WarmupReport:
    """Compile, in parallel, every Triton kernel that ``model(example_input)`` launches (with
    ``training=True`` also its backward), for the input's GPU (or ``arch``, a compute capability
    like 90, without one), into Triton's cache. The model must already be in the mode it will
    run in (``.train()`` / ``.eval()``) and, for a training step, its input and parameters set to
    require gradients as they will. Returns a :class:`WarmupReport`; ``progress`` (default: when
    stderr is a terminal) prints a progress line."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"r21d.warmup: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"r21d.warmup: example_input must be a Tensor, got {type(example_input).__name__}")
    from .triton_kernels import _compile
    from .triton_kernels._launch import interpreted

    start = time.perf_counter()
    target = _arch(example_input, arch)
    launches = [] if interpreted() else _capture_step(model, example_input, training)
    jobs = _compile.launch_jobs(launches, target) if launches else []
    show = sys.stderr.isatty() if progress is None else progress
    errors: list[str] = []
    seconds: list[float] = []

    def compile_one(job):
        t = time.perf_counter()
        try:
            _compile.compile_job(job)
        except Exception as e:  # reported; the kernel then compiles on first use, as without warmup
            errors.append(f"{job['kernel']}: {type(e).__name__}: {str(e).strip()[:200]}")
        seconds.append(time.perf_counter() - t)

    workers = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for done, _ in enumerate(concurrent.futures.as_completed(
                [pool.submit(compile_one, j) for j in jobs]), 1):
            _progress(done, len(jobs), show)
    return WarmupReport(arch=target, kernels=[j["kernel"] for j in jobs], launches=len(launches),
                        compile_cpu_s=round(sum(seconds), 2),
                        wall_s=round(time.perf_counter() - start, 2), errors=errors)
