"""The fused ops, registered with torch.library in namespace ``r21d`` (DESIGN.md §3).

Every fused conv family has a forward op and a backward op with one shared schema:

``r21d::<family>_conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
    residual, stride, padding, dilation, training, momentum, eps, activation, save_for_backward,
    sync_group)``
    conv + BN + activation (+ residual). Returns (out, z, mean, invstd, new_running_mean,
    new_running_var): z, the conv output, and the (mean, invstd) the BN normalised with, filled
    only when ``save_for_backward`` is set (else empty); in training, the running statistics
    updated with ``momentum`` (the exponential-average factor), else empty. The ops are functional
    (torch.library allows autograd only on functional ops): the caller copies the new running
    statistics back. ``sync_group`` names the process group whose ranks' batches the statistics
    span (SyncBatchNorm; "" for this process only: see r21d.triton_kernels.sync_stats).
``r21d::<family>_conv_bn_act_backward(grad_out, x, weight, bias, z, mean, invstd, bn_weight,
    bn_bias, residual, stride, padding, dilation, training, activation, output_mask, deterministic,
    sync_group)``
    the gradients (dx, dw, dbias, dgamma, dbeta, dresidual); those not asked for in
    ``output_mask`` come back empty.

Ops:
    pointwise_conv_bn_act      Triton (custom_op here); z is channels_last_3d.
    depthwise_conv_bn_act      Triton (custom_op here); z in x's memory format.
    implicit_gemm_conv_bn_act  Triton (custom_op here): spatial, temporal, dense and grouped convs
                               (groups = x.shape[1] / weight.shape[1]); z is channels_last_3d.
    conv2plus1d_bn_act[_train] Triton (custom_ops in r21d.unit_ops): the (2+1)D unit, in eval
                               as one kernel, in training as two chained kernels.
    depthwise3d_conv_bn_act    CUDA C++ (schema in csrc/ops.cpp, kernels in csrc/cuda/); fake
                               implementation and autograd registered here when r21d._C is built.
                               Its schema has no ``sync_group`` (dispatch never gives it one).

They are opaque to torch.compile (fake implementations give shapes and strides) and take
already-validated arguments: r21d.functional checks inputs and chooses the backend first.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _extension
from .dispatch import IMPLICIT_GEMM_FAMILIES
from .triton_kernels import sync_stats
from .triton_kernels._layout import output_memory_format


@dataclasses.dataclass(frozen=True)
class _OpFamily:
    forward: str  # qualified op names
    backward: str
    z_channels_last: bool  # z is channels_last_3d (else in x's memory format)
    sync_group: bool = True  # the schemas end with ``str sync_group`` (the Triton families)


def _out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, ...]:
    N, _, *sizes = x.shape
    dims = [(size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(sizes, weight.shape[2:], stride, padding, dilation)]
    return (N, weight.shape[0], *dims)


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _activation(name: str) -> str | None:
    return None if name == "none" else name


def _fake_forward(family: _OpFamily):
    def fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
             padding, dilation, training, momentum, eps, activation, save_for_backward,
             sync_group=""):
        shape = _out_shape(x, weight, stride, padding, dilation)
        out_format = output_memory_format(x)
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=out_format)
        saved = save_for_backward and out.numel() > 0
        z_format = torch.channels_last_3d if family.z_channels_last else out_format
        z = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=z_format) if saved \
            else x.new_empty(0)
        stats = (weight.shape[0],) if saved else (0,)
        updated = training and running_mean is not None and out.numel() > 0
        new_rm = running_mean.new_empty(running_mean.shape) if updated else x.new_empty(0, dtype=torch.float32)
        new_rv = running_var.new_empty(running_var.shape) if updated else x.new_empty(0, dtype=torch.float32)
        return (out, z, x.new_empty(stats, dtype=torch.float32),
                x.new_empty(stats, dtype=torch.float32), new_rm, new_rv)

    return fake


def _grad_shaped(t: Optional[Tensor], wanted: bool, x: Tensor, zero: bool) -> Tensor:
    """A gradient buffer laid out like ``t`` (zeroed if ``zero``), or an empty placeholder where
    no gradient is wanted."""
    if not wanted or t is None:
        return x.new_empty(0)
    fmt = output_memory_format(t) if t.dim() == 5 else torch.contiguous_format
    g = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)
    return g.zero_() if zero else g


def _fake_backward(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual, stride,
                   padding, dilation, training, activation, output_mask, deterministic,
                   sync_group=""):
    inputs = (x, weight, bias, bn_weight, bn_bias, residual)
    return tuple(_grad_shaped(t, m, x, zero=False) for t, m in zip(inputs, output_mask))


def _zero_grads(x, weight, bias, bn_weight, bn_bias, residual, mask):
    inputs = (x, weight, bias, bn_weight, bn_bias, residual)
    return tuple(_grad_shaped(t, m, x, zero=True) for t, m in zip(inputs, mask))


# Positions of the differentiable inputs of a forward op.
_GRAD_INPUTS = (0, 1, 2, 3, 4, 7)


def _register_autograd(family: _OpFamily) -> None:
    op_name = family.forward.split("::")[1]

    def setup_context(ctx, inputs, output):
        (x, weight, bias, bn_weight, bn_bias, _rm, _rv, residual, stride, padding, dilation,
         training, _mom, _eps, activation, saved, *sync_group) = inputs
        _out, z, mean, invstd, new_rm, new_rv = output
        ctx.mark_non_differentiable(z, mean, invstd, new_rm, new_rv)
        ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, residual, z, mean, invstd)
        ctx.config = (list(stride), list(padding), list(dilation), training, activation, saved)
        ctx.sync_group = sync_group  # [name] for the Triton families, [] for csrc
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_out, *_non_differentiable):
        x, weight, bias, bn_weight, bn_bias, residual, z, mean, invstd = ctx.saved_tensors
        stride, padding, dilation, training, activation, saved = ctx.config
        mask = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
        if not saved:
            raise RuntimeError(
                f"r21d::{op_name} ran with save_for_backward=False, so it kept nothing to "
                "differentiate; call it through r21d.functional.conv_bn_act3d")
        if z.numel() == 0:  # an empty batch: nothing flows back
            grads = _zero_grads(x, weight, bias, bn_weight, bn_bias, residual, mask)
        else:
            backward_op = getattr(torch.ops.r21d, family.backward.split("::")[1])
            grads = backward_op(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias,
                                residual, stride, padding, dilation, training, activation, mask,
                                torch.are_deterministic_algorithms_enabled(), *ctx.sync_group)
        dx, dw, db, dg, dbeta, dres = (g if m else None for g, m in zip(grads, mask))
        return dx, dw, db, dg, dbeta, None, None, dres, *([None] * (ctx.num_inputs - 8))

    torch.library.register_autograd(family.forward, backward, setup_context=setup_context)


def _define_triton_family(name: str, z_channels_last: bool, forward_launcher: Callable,
                          backward_launcher: Callable) -> _OpFamily:
    """The forward and backward custom ops of a Triton kernel family, with fake implementations
    and autograd. The launchers get the op's arguments with tuples for the geometry and None for
    activation "none"; the backward launcher a tuple ``needs`` for ``output_mask``."""
    family = _OpFamily(f"r21d::{name}", f"r21d::{name}_backward", z_channels_last)

    def forward(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
        bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
        residual: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], training: bool, momentum: float, eps: float, activation: str,
        save_for_backward: bool, sync_group: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with _on_device(x), sync_stats.over(sync_group):
            return forward_launcher(
                x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                tuple(stride), tuple(padding), tuple(dilation), training, momentum, eps,
                _activation(activation), save_for_backward)

    def backward(
        grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor,
        mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
        residual: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], training: bool, activation: str, output_mask: Sequence[bool],
        deterministic: bool, sync_group: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        # The Triton kernels are deterministic either way (fixed-order partial sums).
        with _on_device(x), sync_stats.over(sync_group):
            grads = backward_launcher(
                grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual,
                tuple(stride), tuple(padding), tuple(dilation), training, _activation(activation),
                tuple(output_mask))
        return tuple(g if g is not None else x.new_empty(0) for g in grads)

    forward_op = torch.library.custom_op(family.forward, forward, mutates_args=())
    forward_op.register_fake(_fake_forward(family))
    backward_op = torch.library.custom_op(family.backward, backward, mutates_args=())
    backward_op.register_fake(_fake_backward)
    _register_autograd(family)
    return family


def _pointwise_forward(x, weight, bias, gamma, beta, rm, rv, residual, stride, padding, _dilation,
                       training, momentum, eps, activation, save):
    from .triton_kernels import pointwise

    return pointwise.conv_bn_act_fwd(x, weight, bias, gamma, beta, rm, rv, residual, stride,
                                     padding, training, momentum, eps, activation, save)


def _pointwise_backward(grad_out, x, weight, bias, z, mean, invstd, gamma, beta, residual, stride,
                        padding, _dilation, training, activation, needs):
    from .triton_kernels import pointwise

    return pointwise.conv_bn_act_bwd(grad_out, x, weight, bias, z, mean, invstd, gamma, beta,
                                     residual, stride, padding, training, activation, needs)


def _implicit_gemm_forward(*args):
    from .triton_kernels import implicit_gemm

    return implicit_gemm.conv_bn_act_fwd(*args)


def _implicit_gemm_backward(*args):
    from .triton_kernels import implicit_gemm

    return implicit_gemm.conv_bn_act_bwd(*args)


def _depthwise_forward(*args):
    from .triton_kernels import depthwise

    return depthwise.conv_bn_act_fwd(*args)


def _depthwise_backward(*args):
    from .triton_kernels import depthwise

    return depthwise.conv_bn_act_bwd(*args)


POINTWISE = _define_triton_family("pointwise_conv_bn_act", True, _pointwise_forward, _pointwise_backward)
DEPTHWISE = _define_triton_family("depthwise_conv_bn_act", False, _depthwise_forward, _depthwise_backward)
IMPLICIT_GEMM = _define_triton_family("implicit_gemm_conv_bn_act", True, _implicit_gemm_forward,
                                      _implicit_gemm_backward)


# csrc: the schemas come from r21d._C's TORCH_LIBRARY block.
DEPTHWISE_CUDA = _OpFamily("r21d::depthwise3d_conv_bn_act", "r21d::depthwise3d_conv_bn_act_backward",
                           False, sync_group=False)


def csrc_op_available(family: _OpFamily) -> bool:
    """Whether r21d._C is loaded and defines ``family``'s ops."""
    if not _extension.loaded():
        return False
    namespace = torch.ops.r21d
    return all(hasattr(namespace, name.split("::")[1]) for name in (family.forward, family.backward))


def _register_csrc(family: _OpFamily) -> None:
    if not csrc_op_available(family):
        return
    torch.library.register_fake(family.forward)(_fake_forward(family))
    torch.library.register_fake(family.backward)(_fake_backward)
    _register_autograd(family)


_register_csrc(DEPTHWISE_CUDA)


def op_momentum(momentum: float | Tensor) -> float:
    """The factor an op gets: a device-side factor (a tensor) is applied by
    :func:`update_running_stats` after the op, which then returns the batch statistics (1.0)."""
    return 1.0 if isinstance(momentum, Tensor) else float(momentum)


def update_running_stats(running: Tensor, new: Tensor, momentum: float | Tensor) -> None:
    """Copy an op's updated running statistic back, or, for a factor that lives on the device
    (the cumulative average's 1 / num_batches_tracked), blend the op's batch statistic in on the
    device: running + factor * (batch - running), no host sync."""
    with torch.no_grad():
        if isinstance(momentum, Tensor):
            running.lerp_(new, momentum.to(running.dtype))
        else:
            running.copy_(new)


def _fused_call(family: _OpFamily, bn_float32: bool = False):
    """The call r21d.functional.run makes: the op, then the running statistics copied back.
    ``bn_float32``: the kernels take float32 BN vectors (others are cast, differentiably)."""
    op_name = family.forward.split("::")[1]

    def call(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, *, stride,
             padding, dilation, groups, training, momentum, eps, activation, save, sync_group=""):
        if sync_group and not family.sync_group:
            raise RuntimeError(f"r21d::{op_name} cannot reduce statistics across processes")
        bn = (bn_weight, bn_bias, running_mean, running_var)
        if bn_float32:
            bn = tuple(t.float() if t is not None and t.dtype != torch.float32 else t for t in bn)
        out, _z, _mean, _invstd, new_rm, new_rv = getattr(torch.ops.r21d, op_name)(
            x, weight, bias, bn[0], bn[1], bn[2], bn[3], residual, list(stride), list(padding),
            list(dilation), training, op_momentum(momentum), eps, activation or "none", save,
            *([sync_group] if family.sync_group else []))
        if new_rm.numel():
            update_running_stats(running_mean, new_rm, momentum)
            update_running_stats(running_var, new_rv, momentum)
        return out

    return call


# (backend, conv family) -> the call that runs it; r21d.dispatch offers exactly these.
FUSED_CALLS = {
    ("triton", "pointwise"): _fused_call(POINTWISE),
    ("triton", "depthwise"): _fused_call(DEPTHWISE),
    **{("triton", family): _fused_call(IMPLICIT_GEMM) for family in IMPLICIT_GEMM_FAMILIES},
    ("cuda", "depthwise"): _fused_call(DEPTHWISE_CUDA, bn_float32=True),
}
# The csrc op families behind the cuda backend's calls (dispatch checks that r21d._C has them).
CSRC_FAMILIES = {"depthwise": DEPTHWISE_CUDA}

from . import unit_ops  # noqa: E402,F401  (registers the (2+1)D unit's ops)
