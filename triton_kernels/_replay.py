"""Launcher calls recorded once per call signature and replayed: each op's launch plan.

A launcher's host work (geometry, kernel variant, tile configuration, the alignment of every
tensor, the grid, a launch of some 50 arguments) depends only on its arguments' metadata, yet
costs several times a cuDNN call's whole dispatch. :func:`planned` wraps a launcher: the first call
with a signature (every tensor's shape, strides, dtype, device and pointer alignment, every other
argument's value, which arguments are the same tensor, and TF32's setting) runs the launcher while
recording what it does to the device, as a tape over *slots* (the call's tensor arguments, then
each tensor the call creates):

- its allocations and layout copies (:func:`_launch.alloc`, :func:`_launch.relayout`);
- its launches, resolved: the JIT function, its meta arguments and grid, its arguments with each
  tensor replaced by its slot;
- every other torch op (views, placeholders, small torch computations), seen by a
  ``TorchDispatchMode``; a view (or a chain of views) is replayed as one ``as_strided`` of the
  tensor it views, and an allocation as ``torch.empty_strided`` (each a third of the aten op's
  host cost from Python).

A later call with the same signature replays the tape with the new tensors: the same allocations
(counted and poisoned as ever), the same launches, the same ops; the steps nothing returned or
launched depends on are dropped. The launcher's Python does not run again, nor, on a GPU, Triton's
binder: a launch that returned its CompiledKernel (the specialisation the signature fixes) is
replayed through ``CompiledKernel[grid]`` with every kernel parameter bound once
(:func:`bound_values`, :func:`_launch.launch_compiled`), and so is a stubbed launch (what
``r21d-bench --host`` times); under the interpreter, through :func:`_launch.launch`.

A recording that a replay could not repeat faithfully marks its signature unplanned, and the
launcher then runs on every call: an op that hands the launcher a Python value (``.item()``, a
comparison), a tensor from outside the arguments (a cache). A planned launcher called inside
another's recording, or with keyword arguments, runs in full. Nothing is planned while launches
are captured (the static report and warm-up want the candidates), with ``R21D_AUTOTUNE=1`` (the
timed choice may change), or while statistics are reduced over a process group (collectives).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from triton.compiler import CompiledKernel

from . import _autotune, _launch, sync_stats
from ._gemm import cudnn_conv_allows_tf32

# Signatures kept per launcher before its plans are dropped and recorded afresh (shapes a user
# varies without bound, such as clip lengths, must not grow memory without bound).
MAX_PLANS = 256

stats: Counter = Counter()  # "recorded", "replayed", "unplanned": what the calls did (tests)
_enabled = [True]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run every launcher call in full (tests compare the two paths)."""
    _enabled.append(False)
    try:
        yield
    finally:
        _enabled.pop()


# What a plan may hold and replay: tensor subclasses (fake, functional, user-defined) are never
# planned. r21d._op_common calls an op's implementation directly for the same types only.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

# View ops a replay rebuilds with one ``as_strided`` (their result's size, strides and offset are
# fixed by the signature's shapes and strides).
_VIEW_OPS = frozenset(getattr(torch.ops.aten, name) for name in (
    "view", "_unsafe_view", "_reshape_alias", "permute", "unsqueeze", "squeeze", "expand", "t",
    "transpose", "select", "slice", "narrow", "as_strided", "alias"))


def _signature(args: tuple):
    """What a launcher's host work may depend on, or None where no plan applies (a tensor
    subclass: fake or functional tensors). The TF32 setting matters where the first argument
    (the input, or the output gradient: the conv's dtype) is float32."""
    sig = []
    ids = []
    for a in args:
        kind = type(a)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            sig.append((a.shape, a.stride(), a.dtype, a.device, a.data_ptr() & 15))
            ids.append(id(a))
        elif isinstance(a, torch.Tensor):
            return None
        else:
            sig.append(a)  # None, numbers, strings, tuples of numbers: hashable values
    if len(set(ids)) != len(ids):  # the same tensor in two places: slots follow the pattern
        sig.append(tuple(ids.index(i) for i in ids))
    first = args[0] if args else None
    if type(first) in PLAIN_TENSORS and first.dtype == torch.float32:
        sig.append(cudnn_conv_allows_tf32())
    if _launch._stubbed:  # its launches were never compiled
        sig.append("stubbed")
    return tuple(sig)


def planned(launcher: Callable) -> Callable:
    """``launcher`` with its calls recorded per signature and replayed (module docstring)."""
    plans: dict = {}

    @functools.wraps(launcher)
    def call(*args, **kwargs):
        if kwargs or not _enabled[-1] or _launch._captures or _launch.recorder() is not None \
                or sync_stats.current() is not None or _autotune.enabled():
            return launcher(*args, **kwargs)
        key = _signature(args)
        if key is None:
            return launcher(*args)
        plan = plans.get(key, False)
        if plan is None:
            stats["unplanned"] += 1
            return launcher(*args)
        if plan is not False:
            stats["replayed"] += 1
            return plan.replay(args)
        if len(plans) >= MAX_PLANS:
            plans.clear()
        rec = _Recorder(args)
        with _launch.recording(rec), rec:
            result = launcher(*args)
        plans[key] = rec.plan(result)
        stats["recorded" if plans[key] is not None else "unplanned"] += 1
        return result

    call.plans = plans
    return call


class _Slot(int):
    """A tensor's place in a tape's values."""


class _Recorder(TorchDispatchMode):
    """Builds a :class:`_Plan` from one launcher call (see the module docstring)."""

    def __init__(self, args: tuple):
        super().__init__()
        self.n_args = len(args)
        self.slots: dict[int, int] = {}  # id(tensor) -> slot (an argument's: its position)
        self.keep: list = []  # the slotted tensors, alive so that their ids stay theirs
        self.steps: list = []
        self.broken: str | None = None
        self._quiet = 0
        self._launch: _Launch | None = None  # the launch step just recorded, until it has run
        self.view_roots: dict[int, tuple[int, torch.Tensor]] = {}  # a view's slot -> what it views
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                self.slots.setdefault(id(a), i)
                self.keep.append(a)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """The torch ops of an allocation, a copy or a launch run unrecorded: the step that
        reports the whole is recorded instead."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _new_slot(self, t: torch.Tensor) -> int:
        slot = self.slots.get(id(t))
        if slot is None:
            slot = self.slots[id(t)] = self.n_args + len(self.keep)
            self.keep.append(t)
        return slot

    def _template(self, tree):
        """(flat values with tensors as slots, their tree spec), or None for a foreign tensor."""
        flat, spec = tree_flatten(tree)
        out = []
        for v in flat:
            if isinstance(v, torch.Tensor):
                slot = self.slots.get(id(v))
                if slot is None:
                    return None
                v = _Slot(slot)
            out.append(v)
        return out, spec

    def _fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason

    def allocated(self, t, shape, dtype, device, memory_format) -> None:
        if not self._quiet:
            self.steps.append(_Alloc(self._new_slot(t), tuple(shape), t.stride(), dtype, device,
                                     memory_format))

    def relaid(self, out, t, memory_format) -> None:
        if self._quiet:
            return
        src = self.slots.get(id(t))
        if src is None:
            return self._fail("a layout copy of a tensor from outside the call")
        self.steps.append(_Relayout(self._new_slot(out), src, memory_format))

    def _positions(self, values) -> list | None:
        """[(index, slot)] of the tensors in ``values`` (a flat sequence), or None if one is not
        the call's."""
        positions = []
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                slot = self.slots.get(id(v))
                if slot is None:
                    return None
                positions.append((i, slot))
        return positions

    def launched(self, kernel, grid, args, kwargs) -> None:
        self._launch = None
        if self._quiet:
            return
        positions = self._positions(args)
        if positions is None or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return self._fail(f"{_launch.kernel_name(kernel)} launched with a tensor from outside "
                              "the call")
        self._launch = _Launch(kernel, tuple(grid), list(args), positions, dict(kwargs))
        self.steps.append(self._launch)

    def ran(self, compiled) -> None:
        """What the launch just recorded returned: Triton's CompiledKernel on a GPU (nothing to
        attach to if its recording failed)."""
        step, self._launch = self._launch, None
        if step is not None and isinstance(compiled, (CompiledKernel, type(_launch.STUB_KERNEL))):
            step.attach(compiled)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._quiet or self.broken:
            return out
        flat_out, _ = tree_flatten(out)
        if any(not isinstance(v, torch.Tensor) and v is not None for v in flat_out):
            self._fail(f"{func} gave the launcher a Python value")
            return out
        nested = any(isinstance(v, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in v)
                     for v in args) or any(isinstance(v, torch.Tensor) for v in kwargs.values())
        template = self._template((args, kwargs)) if nested else self._positions(args)
        if template is None:
            self._fail(f"{func} on a tensor from outside the call")
            return out
        out_slots = [self._new_slot(v) if isinstance(v, torch.Tensor) else None for v in flat_out]
        if func is torch.ops.aten.new_empty.default:  # the placeholders of absent outputs
            self.steps.append(_NewEmpty(out_slots[0], self.slots[id(args[0])], args[1], kwargs))
        elif func.overloadpacket in _VIEW_OPS and isinstance(out, torch.Tensor) and not nested \
                and len(template) == 1 and template[0][0] == 0 and out.dtype == args[0].dtype:
            root_slot, root = self.view_roots.get(template[0][1], (template[0][1], args[0]))
            self.view_roots[out_slots[0]] = (root_slot, root)
            self.steps.append(_View(out_slots[0], root_slot, out.shape, out.stride(),
                                    out.storage_offset() - root.storage_offset()))
        elif nested:
            self.steps.append(_NestedOp(func, template, out_slots))
        else:
            self.steps.append(_Op(func, list(args), template, kwargs, out_slots))
        return out

    def plan(self, result) -> _Plan | None:
        if self.broken is not None:
            return None
        returned = self._template(result)
        if returned is None:
            return None
        return _Plan(self.n_args, len(self.keep), _live(self.steps, returned[0]), returned,
                     isinstance(result, tuple) and all(isinstance(v, torch.Tensor) or v is None
                                                       for v in result))


def _live(steps: list, returned: list) -> list:
    """The steps a launch or the result depends on, in order (launches and in-place ops always)."""
    live = {v for v in returned if isinstance(v, _Slot)}
    kept = []
    for step in reversed(steps):
        if step.always or any(s in live for s in step.outputs):
            live.update(step.inputs)
            kept.append(step)
    return kept[::-1]


class _Plan:
    def __init__(self, n_args: int, n_created: int, steps: list, returned, flat_tuple: bool):
        self.padding = [None] * n_created
        self.steps = steps
        self.returned = returned
        # a tuple of tensors (and Nones), every launcher's result: rebuilt without pytree
        self.flat_returned = tuple(returned[0]) if flat_tuple else None

    def replay(self, args: tuple):
        values = [*args, *self.padding]
        for step in self.steps:
            step.run(values)
        if self.flat_returned is not None:
            return tuple(v if v is None else values[v] for v in self.flat_returned)
        return _fill(self.returned, values)


def _fill(template, values):
    flat, spec = template
    return tree_unflatten([values[v] if isinstance(v, _Slot) else v for v in flat], spec)


def _slots(template) -> list[int]:
    return [v for v in template[0] if isinstance(v, _Slot)]


class _Alloc:
    always = False

    def __init__(self, out, shape, stride, dtype, device, memory_format):
        self.outputs, self.inputs = (out,), ()
        self.spec = (shape, dtype, device, memory_format)
        self.stride = stride

    def run(self, values):
        shape, dtype, device, memory_format = self.spec
        if _launch._active or _launch._poison:  # counted, poisoned: the launchers' own path
            values[self.outputs[0]] = _launch.alloc(shape, dtype=dtype, device=device,
                                                    memory_format=memory_format)
        else:
            values[self.outputs[0]] = torch.empty_strided(shape, self.stride, dtype=dtype,
                                                          device=device)


class _Relayout:
    always = False

    def __init__(self, out, src, memory_format):
        self.outputs, self.inputs = (out,), (src,)
        self.memory_format = memory_format

    def run(self, values):
        values[self.outputs[0]] = _launch.relayout(values[self.inputs[0]], self.memory_format)


def bound_values(fn, args: tuple, kwargs: dict) -> list | None:
    """Every parameter of the JIT function ``fn`` in order, as ``JITFunction.run`` binds them
    before its launch (positional arguments, then keywords or defaults); None if one is missing."""
    while hasattr(fn, "fn"):  # a Choice, a JITFunction -> the Python function
        fn = fn.fn
    values = list(args)
    for p in list(inspect.signature(fn).parameters.values())[len(args):]:
        if p.name in kwargs:
            values.append(kwargs[p.name])
        elif p.default is not inspect.Parameter.empty:
            values.append(p.default)
        else:
            return None
    return values


class _Launch:
    always = True
    outputs = ()

    def __init__(self, kernel, grid, args: list, positions: list, kwargs: dict):
        self.kernel, self.grid, self.kwargs = kernel, grid, kwargs
        self.args = [None if isinstance(a, torch.Tensor) else a for a in args]  # no tensor kept
        self.positions = positions
        self.inputs = tuple(slot for _, slot in positions)
        self.runner = None

    def attach(self, compiled) -> None:
        """Replay through ``compiled`` (the kernel Triton compiled for this launch's
        specialisation, which the signature fixes) with every parameter bound once here."""
        values = bound_values(self.kernel, self.args, self.kwargs)
        if values is not None:
            # CompiledKernel[grid] indexes all three dimensions (JITFunction.run pads them)
            grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
            self.args, self.runner = values, compiled[grid]
            self.name = _launch.kernel_name(self.kernel)

    def run(self, values):
        args = self.args.copy()
        for i, slot in self.positions:
            args[i] = values[slot]
        if self.runner is not None:
            _launch.launch_compiled(self.name, self.runner, args)
        else:
            _launch.launch(self.kernel, self.grid, *args, **self.kwargs)


class _View:
    """A view of a tensor of the call (or of one it created), however many view ops made it."""

    always = False

    def __init__(self, out, root, size, stride, offset: int):
        self.outputs, self.inputs = (out,), (root,)
        self.size, self.stride, self.offset = tuple(size), tuple(stride), offset

    def run(self, values):
        root = values[self.inputs[0]]
        values[self.outputs[0]] = root.as_strided(self.size, self.stride,
                                                  root.storage_offset() + self.offset)


class _NewEmpty:
    always = False

    def __init__(self, out, src, size, kwargs):
        self.outputs, self.inputs = (out,), (src,)
        self.size, self.kwargs = size, kwargs

    def run(self, values):
        values[self.outputs[0]] = values[self.inputs[0]].new_empty(self.size, **self.kwargs)


class _Op:
    """A torch op whose tensors are among its positional arguments."""

    def __init__(self, func, args: list, positions: list, kwargs: dict, out_slots: list):
        self.func, self.kwargs = func, kwargs
        self.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        self.positions = positions
        self.inputs = tuple(slot for _, slot in positions)
        self.outputs = tuple(s for s in out_slots if s is not None)
        self.out_slots = out_slots
        self.always = func._schema.is_mutable  # writes one of its inputs

    def run(self, values):
        args = self.args.copy()
        for i, slot in self.positions:
            args[i] = values[slot]
        _store(self.out_slots, self.func(*args, **self.kwargs), values)


class _NestedOp(_Op):
    """A torch op with tensors inside a list argument (``cat``) or among its keywords."""

    def __init__(self, func, template, out_slots: list):
        super().__init__(func, [], [], {}, out_slots)
        self.template = template
        self.inputs = tuple(_slots(template))

    def run(self, values):
        args, kwargs = _fill(self.template, values)
        _store(self.out_slots, self.func(*args, **kwargs), values)


def _store(out_slots: list, out, values: list) -> None:
    if isinstance(out, torch.Tensor):
        values[out_slots[0]] = out
        return
    for slot, v in zip(out_slots, tree_flatten(out)[0]):
        if slot is not None:
            values[slot] = v
