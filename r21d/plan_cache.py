"""What the fused modules keep between calls: each site's (and unit's) plan, so that a call like
the previous one skips validation, configuration and backend choice (r21d.fused_site,
r21d.fused_unit), and each fused sequential's or block's layout of sites (r21d.fused_sequential,
r21d.fused_block).

A plan is valid for one *signature* of the call: a tuple, compared with ``==``, of everything the
checked path read to make it (the input's shape, strides, dtype and device, the parameters' and
buffers' shapes, dtypes, devices and requires_grad, the modules' types, geometry and modes, the
requested backend, grad mode, autocast state, ...). Any difference runs the checked path again,
which plans anew. A call that falls back (a warning, or the strict-mode error) is never cached.
Under torch.compile (``torch.compiler.is_compiling()``) nothing here is used: the checked path is
what gets traced.

Plans live in :class:`PlanSlot` objects in the owning module's ``__dict__``: copying or pickling a
module copies an empty slot, and ``r21d.unfuse`` drops them (:func:`forget`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module

# Whether autocast is on for any device type (one check, instead of the device's type and its
# state; host times in benchmarks/NOTES.md); the public per-device check where torch lacks it.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def autocast_state(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts to on ``device``'s type, or None where it is off there."""
    if not _any_autocast():
        return None
    device_type = device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

# The fast path reads a site's tensors from ``_parameters`` / ``_buffers`` (``conv.weight``
# goes through nn.Module.__getattr__, a Python call): only for classes that keep them there, see
# :func:`conv_kind` and :func:`plain_bn`; any other (a parametrized conv, whose ``weight`` is a
# property, say) always takes the checked path.
_TENSOR_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_conv_kinds: dict[type, bool | None] = {}
_plain_bns: dict[type, bool] = {}


def _plain_attributes(cls: type) -> bool:
    """Whether ``cls`` reads its tensors as nn.Module does: no class in its MRO (nn.Module's own
    __getattr__ aside) defines one of the tensor names, ``__getattr__`` or ``__getattribute__``."""
    return not any(
        name in vars(k) for k in cls.__mro__ if k not in (nn.Module, object)
        for name in (*_TENSOR_NAMES, "__getattr__", "__getattribute__"))


def conv_kind(cls: type) -> bool | None:
    """For a conv module's class: False (Conv3d) or True (Conv2d) where it runs that class's own
    forward (as r21d.fused_site.conv_base requires) and keeps its tensors in ``_parameters``;
    else None."""
    try:
        return _conv_kinds[cls]
    except KeyError:
        pass
    kind = None
    for base, two_d in ((nn.Conv3d, False), (nn.Conv2d, True)):
        if issubclass(cls, base) and cls.forward is base.forward and _plain_attributes(cls):
            kind = two_d
    _conv_kinds[cls] = kind
    return kind


def plain_bn(cls: type) -> bool:
    """For a BatchNorm module's class: whether it runs nn.BatchNorm's forward and keeps its
    tensors in ``_parameters`` / ``_buffers``."""
    try:
        return _plain_bns[cls]
    except KeyError:
        pass
    from torch.nn.modules.batchnorm import _BatchNorm

    plain = (issubclass(cls, _BatchNorm)
             and cls.forward in (nn.BatchNorm3d.forward, nn.SyncBatchNorm.forward)
             and _plain_attributes(cls))
    _plain_bns[cls] = plain
    return plain

# The attribute of a module's __dict__ that holds its slots (name -> PlanSlot).
SLOTS = "_r21d_plans"


class PlanSlot:
    """Where a caller keeps one plan between calls (``plan``, None before the first), and the
    slots of what that plan calls in turn (``sub``: a unit's two sites, a sequential's sites)."""

    __slots__ = ("plan", "sub")

    def __init__(self):
        self.plan = None
        self.sub: dict = {}

    def child(self, name) -> PlanSlot:
        slot = self.sub.get(name)
        if slot is None:
            slot = self.sub[name] = PlanSlot()
        return slot

    # a copied or unpickled module plans anew (a plan names no tensor, but it was made for the
    # original's modules)
    def __deepcopy__(self, memo) -> PlanSlot:
        return PlanSlot()

    def __copy__(self) -> PlanSlot:
        return PlanSlot()

    def __reduce__(self):
        return (PlanSlot, ())


def slot(module: nn.Module, name: str = "") -> PlanSlot | None:
    """``module``'s slot called ``name`` (created on first use); None under torch.compile, whose
    trace neither reads nor keeps plans."""
    if torch.compiler.is_compiling():
        return None
    slots = module.__dict__.get(SLOTS)
    if slots is None:
        slots = module.__dict__[SLOTS] = {}
    found = slots.get(name)
    if found is None:
        found = slots[name] = PlanSlot()
    return found


def forget(module: nn.Module) -> None:
    """Drop every plan ``module`` keeps (not its children's)."""
    module.__dict__.pop(SLOTS, None)


def hooked(*modules: Optional[nn.Module]) -> bool:
    """Hooks would be skipped by a fused call: on these modules, or global module hooks."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return True
    for m in modules:
        if m is not None and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                              or m._backward_pre_hooks):
            return True
    return False


def byte_span(t) -> tuple[int, int]:
    """[first, last) byte a tensor may touch; (0, 0) for an empty one (it touches nothing)."""
    if t.numel() == 0:
        return (0, 0)
    extent = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (extent + 1) * t.element_size()


def overlaps(start: int, stop: int, spans) -> bool:
    """Whether [start, stop) shares a byte with any of ``spans`` (empty ranges share none)."""
    if start >= stop:
        return False
    for other_start, other_stop in spans:
        if start < other_stop and other_start < stop:
            return True
    return False
