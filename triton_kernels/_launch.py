"""How launchers allocate and launch (the structural checks of docs/testing.md), and pick configurations.

Every launcher allocates through :func:`alloc` and launches through :func:`launch` (layout copies
through :func:`relayout`), so a test can prove, without a GPU, that an eval-mode fused op is
exactly one kernel launch that allocates only its output::

    with count() as c:
        y = op(...)
    assert c.launches == 1 and c.allocations == 1

:func:`poisoned` fills every allocation with NaN (tests catch unwritten elements);
:func:`capture` records launches instead of running them (the static report compiles them);
:class:`Tuned` holds a kernel's tile configurations and the interpreter's one; :func:`launch`
picks one per launch (``_tiles``: by rule; ``_autotune``: by timing, with R21D_AUTOTUNE=1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import torch

from . import _autotune
from ._limits import check_grid
from ._tiles import Choice, by_rule


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
_thread = threading.local()  # .recorders: the _replay recorders of this thread's calls


def recorder():
    """The :mod:`_replay` recorder of the launcher call this thread is running, or None."""
    recorders = getattr(_thread, "recorders", None)
    return recorders[-1] if recorders else None


@contextlib.contextmanager
def recording(rec) -> Iterator[None]:
    """Report this thread's allocations, layout copies and launches to ``rec`` while the block
    runs (see :mod:`_replay`)."""
    if not hasattr(_thread, "recorders"):
        _thread.recorders = []
    _thread.recorders.append(rec)
    try:
        yield
    finally:
        _thread.recorders.pop()


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
    rec = recorder()
    if not (_active or _poison or rec):  # nothing to count, poison or record
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    with rec.quiet() if rec else contextlib.nullcontext():
        t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        if t.numel() > 0:
            for c in _active:
                c.allocations += 1
                c.shapes.append(tuple(t.shape))
            if _poison and t.is_floating_point():
                t.fill_(float("nan"))
    if rec:
        rec.allocated(t, shape, dtype, device, memory_format)
    return t


def relayout(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``t`` copied into ``memory_format``: a torch copy kernel, counted like a launch."""
    rec = recorder()
    with rec.quiet() if rec else contextlib.nullcontext():
        out = alloc(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format)
        for c in _active:
            c.launches += 1
            c.kernels.append("relayout")
        if not (_captures or _stubbed):
            out.copy_(t)
    if rec:
        rec.relaid(out, t, memory_format)
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
    kernel: object  # a JITFunction, or a _tiles.Choice of configurations of one
    grid: object  # a tuple, or a function of the meta-parameters
    args: tuple
    kwargs: dict
    config: dict | None = None  # a Choice's: the configuration a real launch would run now


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
    fn = getattr(kernel, "fn", kernel)  # Choice / JITFunction -> the Python function
    return getattr(fn, "__name__", repr(fn))


def _grids(kernel, grid, kwargs: dict) -> list:
    """The grid of every configuration a :class:`_tiles.Choice` may run with (another shape may
    pick any), or the launch's own."""
    if not callable(grid):
        return [grid]
    configs = getattr(kernel, "configs", None) or [None]
    return [grid({**kwargs, **(c.all_kwargs() if c is not None else {})}) for c in configs]


def choose(choice: Choice, grid, args: tuple, kwargs: dict) -> dict:
    """The meta arguments (``Config.all_kwargs()``, shared: not to be modified) of the
    configuration a launch of ``choice`` runs: by rule (:mod:`_tiles`), or with R21D_AUTOTUNE=1
    the one timed for this shape bucket (timing it now if none was, except under deterministic
    algorithms or where nothing really launches)."""
    if _autotune.enabled() and not torch.are_deterministic_algorithms_enabled():
        config = _autotune.remembered(choice, args, kwargs)
        if config is None and not (_captures or _stubbed):
            config = _autotune.tune(choice, grid, args, kwargs)
        if config is not None:
            return config.all_kwargs()
    # The rule's choice, remembered per launch signature: the grids are functions of the block
    # sizes and of the sizes the launcher derived from its tensors' shapes and scalars, so the
    # arguments' shapes and scalar values key it.
    key = (choice, *(a.shape if isinstance(a, torch.Tensor) else a for a in args))
    config = _ruled.get(key)
    if config is None:
        config = _ruled[key] = by_rule(choice, grid, kwargs).all_kwargs()
    return config


_ruled: dict = {}


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
    config = meta = None
    if isinstance(kernel, Choice):
        config = choose(kernel, grid, args, kwargs)
        meta = {**kwargs, **config}
    # captured (the static report): every configuration's grid; else the one that runs
    for g in _grids(kernel, grid, kwargs) if _captures or meta is None else [
            grid(meta) if callable(grid) else grid]:
        check_grid(kernel_name(kernel), g)
    for c in _active:
        c.launches += 1
        c.kernels.append(kernel_name(kernel))
    if _captures:
        _captures[-1].append(CapturedLaunch(kernel, grid, args, kwargs, config))
        return
    if meta is not None:
        kernel, kwargs = kernel.fn, meta
    rec = recorder()
    if rec:  # what to launch, resolved: the JIT function, its meta arguments and its grid
        rec.launched(kernel, grid(kwargs) if callable(grid) else grid, args, kwargs)
    if _stubbed:
        if rec:  # replayed as a compiled launch would be, up to the launch itself
            rec.ran(STUB_KERNEL)
        return
    with rec.quiet() if rec else contextlib.nullcontext():  # the interpreter's own copies
        compiled = kernel[grid](*args, **kwargs)
    if rec:
        rec.ran(compiled)


class _StubKernel:
    """What a stubbed launch "compiled": :func:`launch_compiled` never calls its runner (a plan
    recorded under :func:`stubbed` is replayed only under it: ``_replay`` keys plans by it)."""

    def __getitem__(self, grid):
        def runner(*values):
            raise AssertionError("a stubbed launch's plan replayed outside _launch.stubbed()")
        return runner


STUB_KERNEL = _StubKernel()


def launch_compiled(name: str, runner, values: list) -> None:
    """A launch a launch plan replays (:mod:`_replay`) through the kernel Triton compiled for it,
    without Triton's binder: ``runner`` is ``CompiledKernel[grid]``, ``values`` every kernel
    parameter in order (what ``JITFunction.run`` passes after binding). Counted like
    :func:`launch`; stubbed likewise."""
    for c in _active:
        c.launches += 1
        c.kernels.append(name)
    if not _stubbed:
        runner(*values)


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


class Tuned:
    """A kernel with tile configurations per variant (operand precision, epilogue, ...: what
    makes a tile size spill or not) and the one configuration the interpreter runs (tiny shapes,
    one config; ``interpret`` may instead map each variant to its own, where variants differ in
    more than tile sizes). ``arch_configs`` replaces variants' tables on an arch (``{80:
    {variant: [...]}}``: see :func:`current_tile_arch`). ``select(variant)`` gives what to
    launch and the meta arguments to pass: on a GPU a :class:`_tiles.Choice` that :func:`launch`
    resolves by rule (or, with R21D_AUTOTUNE=1, by timing) once it knows the grid."""

    def __init__(self, fn, configs: dict, key, interpret: dict, arch_configs: dict | None = None):
        self.fn = fn
        self.configs = configs
        self.arch_configs = arch_configs or {}
        self.key = tuple(key)
        self.interpret = interpret
        self._choices: dict = {}

    def configs_for(self, variant: str, arch: int) -> list:
        return self.arch_configs.get(arch, {}).get(variant, self.configs[variant])

    def select(self, variant: str):
        if interpreted():
            return self.fn, dict(self.interpret.get(variant, self.interpret))
        arch = current_tile_arch()
        choice = self._choices.get((variant, arch))
        if choice is None:
            choice = self._choices[variant, arch] = Choice(
                self.fn, tuple(self.configs_for(variant, arch)), variant, arch, self.key)
        return choice, {}
