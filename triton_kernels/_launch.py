"""How launchers allocate and launch (DESIGN.md §8 structural checks), and pick configurations.

Every launcher allocates through :func:`alloc` and launches through :func:`launch` (layout copies
through :func:`relayout`), so a test can prove, without a GPU, that an eval-mode fused op is
exactly one kernel launch that allocates only its output::

    with count() as c:
        y = op(...)
    assert c.launches == 1 and c.allocations == 1

:func:`poisoned` fills every allocation with NaN (tests catch unwritten elements);
:func:`capture` records launches instead of running them (the static report compiles them);
:class:`Tuned` holds a kernel's autotuning configurations and the interpreter's one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from ._limits import check_grid


@dataclasses.dataclass
class Counter:
    launches: int = 0
    allocations: int = 0
    kernels: list[str] = dataclasses.field(default_factory=list)
    shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # of the allocations


_active: list[Counter] = []
_captures: list[list] = []
_poison = False
_stubbed = False


@contextlib.contextmanager
def count() -> Iterator[Counter]:
    counter = Counter()
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Fill every buffer the launchers allocate with NaN, so a test sees any element a kernel
    failed to write."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def alloc(shape, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty that is counted when it allocates (an empty placeholder is not)."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if t.numel() > 0:
        for c in _active:
            c.allocations += 1
            c.shapes.append(tuple(t.shape))
        if _poison and t.is_floating_point():
            t.fill_(float("nan"))
    return t


def relayout(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``t`` copied into ``memory_format``: a torch copy kernel, counted like a launch."""
    out = alloc(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format)
    for c in _active:
        c.launches += 1
        c.kernels.append("relayout")
    if not (_captures or _stubbed):
        out.copy_(t)
    return out


@contextlib.contextmanager
def stubbed() -> Iterator[None]:
    """Do everything up to the kernel launch itself, then skip it: how ``r21d-bench --host``
    measures the host time a call costs before the GPU sees it (on the CPU too)."""
    global _stubbed
    previous, _stubbed = _stubbed, True
    try:
        yield
    finally:
        _stubbed = previous


@dataclasses.dataclass
class CapturedLaunch:
    kernel: object  # a JITFunction or an Autotuner wrapping one
    grid: object  # a tuple, or a function of the meta-parameters
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def capture() -> Iterator[list[CapturedLaunch]]:
    """Record launches instead of running them (the static report compiles what it records)."""
    launches: list[CapturedLaunch] = []
    _captures.append(launches)
    try:
        yield launches
    finally:
        _captures.remove(launches)


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)  # Autotuner / JITFunction -> the Python function
    return getattr(fn, "__name__", repr(fn))


def _grids(kernel, grid, kwargs: dict) -> list:
    """The grid of every configuration the launch may run with (an autotuner picks one later)."""
    if not callable(grid):
        return [grid]
    configs = getattr(kernel, "configs", None) or [None]
    return [grid({**kwargs, **(c.all_kwargs() if c is not None else {})}) for c in configs]


# FP fusion (a * b + c contracted to one FMA by LLVM and ptxas), passed to every launch as Triton's
# ``enable_fp_fusion`` compile option rather than left to TRITON_DEFAULT_FP_FUSION: on in Triton
# 3.6-3.9 by default, a default 3.9 warns will turn off in 3.10. On: the numerics every result so
# far was checked with, one rounding per multiply-add (as cuDNN's FMAs), fewer instructions. The
# static report compiles the captured launches, so it compiles with the same option.
FP_FUSION = True


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), counted; launches on the current stream (Triton's default).
    The grid is checked against CUDA's limits first (also when captured)."""
    kwargs.setdefault("enable_fp_fusion", FP_FUSION)
    for g in _grids(kernel, grid, kwargs):
        check_grid(kernel_name(kernel), g)
    for c in _active:
        c.launches += 1
        c.kernels.append(kernel_name(kernel))
    if _captures:
        _captures[-1].append(CapturedLaunch(kernel, grid, args, kwargs))
        return
    if _stubbed:
        return
    kernel[grid](*args, **kwargs)


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors, slowly: small blocks)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


_tile_arch_override: list[int] = []


@contextlib.contextmanager
def tile_arch(arch: int) -> Iterator[None]:
    """Pick configurations for compute capability ``arch`` (90, 86, 80, ...) whatever device is
    present: the static report and the compile warm-up capture each arch's launches with it."""
    _tile_arch_override.append(_table_arch(arch // 10))
    try:
        yield
    finally:
        _tile_arch_override.pop()


def _table_arch(major: int) -> int:
    """90 where Triton's MMAs keep their accumulators out of the general registers (Hopper's
    wgmma, datacenter Blackwell's tensor memory: compute capability 9.x-11.x), 80 where they are
    registers (mma.sync: Ampere, Ada, consumer Blackwell 12.x) and larger tiles spill."""
    return 90 if 9 <= major <= 11 else 80


_device_arch: dict[int, int] = {}


def current_tile_arch() -> int:
    """The tile tables' arch for launches on the current device, which is the inputs' (the ops
    launch under their device guard): :func:`_table_arch`; 90 without a GPU (the static report
    names its archs with :func:`tile_arch`)."""
    if _tile_arch_override:
        return _tile_arch_override[-1]
    if not torch.cuda.is_available():
        return 90
    device = torch.cuda.current_device()
    if device not in _device_arch:
        major, _ = torch.cuda.get_device_capability(device)
        _device_arch[device] = _table_arch(major)
    return _device_arch[device]


def autotuning() -> bool:
    """False under R21D_AUTOTUNE=0: every kernel variant launches its first configuration (a
    deterministic choice with one compile per specialisation, as ``make gpu-check`` needs);
    otherwise Triton's autotuner times every configuration on first use."""
    import os

    return os.environ.get("R21D_AUTOTUNE", "").strip() != "0"


class Tuned:
    """A kernel with GPU autotuning configurations per variant (operand precision, epilogue, ...:
    what makes a tile size spill or not) and the one configuration the interpreter runs
    (DESIGN.md §6: tiny shapes, one config; ``interpret`` may instead map each variant to its own,
    where variants differ in more than tile sizes). ``arch_configs`` replaces variants' tables on
    an arch (``{80: {variant: [...]}}``: see :func:`current_tile_arch`). ``select(variant)`` gives
    what to launch and the meta arguments to pass; each autotuner is built on first GPU use."""

    def __init__(self, fn, configs: dict, key, interpret: dict, arch_configs: dict | None = None):
        self.fn = fn
        self.configs = configs
        self.arch_configs = arch_configs or {}
        self.key = key
        self.interpret = interpret
        self._autotuners: dict = {}

    def configs_for(self, variant: str, arch: int) -> list:
        return self.arch_configs.get(arch, {}).get(variant, self.configs[variant])

    def select(self, variant: str):
        if interpreted():
            return self.fn, dict(self.interpret.get(variant, self.interpret))
        arch = current_tile_arch()
        configs = self.configs_for(variant, arch)
        if not autotuning():  # the variant's first configuration: no timing, one compile
            return self.fn, configs[0].all_kwargs()
        if (variant, arch) not in self._autotuners:
            import triton

            self._autotuners[variant, arch] = triton.autotune(configs, key=self.key)(self.fn)
        return self._autotuners[variant, arch], {}
