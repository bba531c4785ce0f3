"""Helpers the op modules share (r21d.ops for the per-conv families, r21d.unit_ops for the (2+1)D
unit) and r21d.direct_calls: output shapes, the device guard, the activation argument, gradient
buffers, the test for calling an implementation directly, and the running statistics' one
copy-back.

A leaf module (it imports nothing of r21d but r21d.triton_kernels), so the op modules depend on it
one way. A conv's output size along one axis has one definition,
``r21d.triton_kernels._layout.out_size(size, k, stride, pad, dil=1)``, re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from .triton_kernels import sync_stats
from .triton_kernels._layout import out_size, output_memory_format
from .triton_kernels._replay import PLAIN_TENSORS

__all__ = ["activation_arg", "custom_op", "differentiable", "grad_shaped", "implementation",
           "needs_grad", "on_device", "op_momentum", "out_shape", "out_size", "unobserved",
           "update_running_stats", "updated_in_place", "zero_grads"]


def out_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, ...]:
    """(N, C_out, T, H, W) of a conv of an input of shape ``x_shape`` with a weight of shape
    ``weight_shape`` (C_out, C_in / groups, kT, kH, kW)."""
    N, _, *sizes = x_shape
    return (N, weight_shape[0], *(
        out_size(size, k, s, p, d)
        for size, k, s, p, d in zip(sizes, weight_shape[2:], stride, padding, dilation)))


def on_device(t: Tensor, sync_group: str = ""):
    """The context a launcher runs in: Triton launches on the current CUDA device, so that is made
    ``t``'s device; BN statistics are reduced over the process group ``sync_group`` ("": this
    process only, see triton_kernels/sync_stats.py). A shared no-op context where neither changes
    anything (nearly every call: entering the guards costs more than a launch plan's signature)."""
    switch = t.device.type == "cuda" and t.device.index != torch.cuda.current_device()
    if not (switch or sync_group):
        return _NO_GUARD
    return _guarded(t, switch, sync_group)


_NO_GUARD = contextlib.nullcontext()  # reusable: it keeps no state


@contextlib.contextmanager
def _guarded(t: Tensor, switch: bool, sync_group: str):
    with torch.cuda.device(t.device) if switch else _NO_GUARD, sync_stats.over(sync_group):
        yield


def activation_arg(name: str) -> str | None:
    """The launchers' activation (None for the ops' "none")."""
    return None if name == "none" else name


def grad_shaped(t: Optional[Tensor], wanted: bool, x: Tensor, zero: bool) -> Tensor:
    """A gradient buffer laid out like ``t`` (zeroed if ``zero``), or an empty placeholder where
    no gradient is wanted."""
    if not wanted or t is None:
        return x.new_empty(0)
    fmt = output_memory_format(t) if t.dim() == 5 else torch.contiguous_format
    g = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)
    return g.zero_() if zero else g


def zero_grads(x, weight, bias, bn_weight, bn_bias, residual, mask) -> tuple:
    """The gradients of a fused conv + BN call over an empty batch: zeros where ``mask`` asks."""
    inputs = (x, weight, bias, bn_weight, bn_bias, residual)
    return tuple(grad_shaped(t, m, x, zero=True) for t, m in zip(inputs, mask))


_IMPLEMENTATIONS: dict[str, Callable] = {}  # "r21d::<op>" -> its Python implementation


def custom_op(name: str) -> Callable:
    """``torch.library.custom_op(name, mutates_args=())`` that also keeps the implementation for
    :func:`implementation`."""

    def register(fn: Callable):
        _IMPLEMENTATIONS[name] = fn
        return torch.library.custom_op(name, mutates_args=())(fn)

    return register


def implementation(name: str, *tensors: Optional[Tensor]) -> Callable:
    """What r21d calls to run the op ``name`` ("r21d::<op>") on ``tensors``: its Python
    implementation itself where nothing could tell it from a dispatched call, else the op.

    Direct: eager (not compiled, not traced by torch.jit), no gradient recorded by the caller,
    plain tensors, and no dispatch or function mode, functorch transform or profiler that would
    see the op. The dispatcher's own work for
    a Python custom op (boxing the arguments for two Python kernels, the autograd check, the
    aliasing check) costs about as much as the fused site's whole replayed launch; the
    implementation is what its CPU/CUDA kernel runs. torch.compile traces the op: while
    compiling, and in the csrc ops (C++ implementations), the op is called."""
    impl = _IMPLEMENTATIONS.get(name)
    if impl is not None and unobserved(*tensors):
        return impl
    # (looked up each time: a cache filled here would be a global mutation inside the autograd
    # Functions that torch.compile traces, which it refuses)
    return getattr(torch.ops.r21d, name.split("::")[1])


def unobserved(*tensors: Optional[Tensor]) -> bool:
    """Whether nothing could tell a direct call of an op's implementation (or of its launcher)
    from a dispatched call of the op: eager, not compiled or traced by torch.jit, plain tensors,
    no dispatch or function mode, functorch transform or profiler (see :func:`implementation`)."""
    return not (
        torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.profiler._is_profiler_enabled) \
        and all(t is None or type(t) in PLAIN_TENSORS for t in tensors)


def differentiable(name: str, setup_context, backward,
                   run: Optional[Callable] = None) -> type[torch.autograd.Function]:
    """An autograd.Function that runs the op ``name`` ("r21d::<op>") with the formula registered
    as the op's autograd (``setup_context``, ``backward``): what r21d's modules call when a
    gradient is wanted. The op's own autograd wrapper rebuilds the schema's default arguments on
    every call (``torch._library.utils.fill_defaults``, quadratic in the argument count: several
    times a launch's host cost for the 27-argument training unit); under this Function the op
    needs no gradient and the wrapper steps aside (and, eager, :func:`implementation` runs).
    torch.compile traces it as it traces the op. ``run``: what an unobserved call runs in place
    of the op's implementation (with the op's arguments and results)."""

    def forward(ctx, *inputs):
        tensors = [t for t in inputs if isinstance(t, Tensor)]
        if run is not None and unobserved(*tensors):
            output = run(*inputs)
        else:
            output = implementation(name, *tensors)(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(f"{name.split('::')[1]}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd would record a call on ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def op_momentum(momentum: float | Tensor) -> float:
    """The factor an op gets: a device-side factor (a tensor) is applied by
    :func:`update_running_stats` after the op, which then returns the batch statistics (1.0)."""
    return 1.0 if isinstance(momentum, Tensor) else float(momentum)


def update_running_stats(running: Tensor, new: Tensor, momentum: float | Tensor) -> None:
    """Copy an op's updated running statistic back, or, for a factor that lives on the device
    (the cumulative average's 1 / num_batches_tracked), blend the op's batch statistic in on the
    device: running + factor * (batch - running), no host sync. Not recorded by autograd (``new``
    never requires grad; a ``running`` that does is updated under no_grad)."""
    if running.requires_grad:
        with torch.no_grad():
            _update(running, new, momentum)
    else:
        _update(running, new, momentum)


def updated_in_place(running: Optional[Tensor], new: Optional[Tensor]) -> bool:
    """Whether a launcher called with ``running_in_place`` wrote ``running`` itself (it returns
    the same tensor; across a process group it returns a new one to copy back); if so, autograd
    learns that it changed, as from an in-place op."""
    if running is None or new is not running:
        return False
    torch.autograd.graph.increment_version(running)
    return True


def _update(running: Tensor, new: Tensor, momentum: float | Tensor) -> None:
    if isinstance(momentum, Tensor):
        running.lerp_(new, momentum.to(running.dtype))
    else:
        running.copy_(new)
