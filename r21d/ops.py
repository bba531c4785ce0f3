"""The fused ops, registered with torch.library in namespace ``r21d`` (DESIGN.md §3).

Opaque ``custom_op``s with fake (meta) implementations and autograd, so ``torch.compile`` traces
them without a graph break and ``torch.library.opcheck`` passes. They take already-validated
arguments: r21d.functional checks inputs and chooses the backend before calling them.

``r21d::pointwise_conv_bn_act``           1x1x1 conv + BN + activation (+ residual), forward.
    Returns (out, z, mean, invstd, new_running_mean, new_running_var): z, the conv output
    (channels_last_3d), and the (mean, invstd) the BN normalised with, filled only when
    ``save_for_backward`` is set
    (else empty); in training, the running statistics updated with ``momentum`` (the
    exponential-average factor), else empty. The op is functional (torch.library allows autograd
    only on functional ops): the caller copies the new running statistics back.
``r21d::pointwise_conv_bn_act_backward``  its gradients (dx, dw, dbias, dgamma, dbeta, dresidual);
    those not asked for in ``output_mask`` come back empty.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from .triton_kernels._layout import output_memory_format


def _out_shape(x: Tensor, weight: Tensor, stride, padding) -> tuple[int, ...]:
    N, _, T, H, W = x.shape
    dims = [(size + 2 * p - 1) // s + 1 for size, s, p in zip((T, H, W), stride, padding)]
    return (N, weight.shape[0], *dims)


def _empty_activation(shape, like: Tensor) -> Tensor:
    """Laid out like the launcher's output: in ``like``'s memory format."""
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=output_memory_format(like))


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _activation(name: str) -> str | None:
    return None if name == "none" else name


@torch.library.custom_op("r21d::pointwise_conv_bn_act", mutates_args=())
def pointwise_conv_bn_act(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
    residual: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], training: bool,
    momentum: float, eps: float, activation: str, save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .triton_kernels import pointwise

    with _on_device(x):
        return pointwise.conv_bn_act_fwd(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
            tuple(stride), tuple(padding), training, momentum, eps, _activation(activation),
            save_for_backward)


@pointwise_conv_bn_act.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride, padding,
      training, momentum, eps, activation, save_for_backward):
    out = _empty_activation(_out_shape(x, weight, stride, padding), x)
    saved = save_for_backward and out.numel() > 0
    z = torch.empty(out.shape, dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last_3d) if saved else x.new_empty(0)
    stats = (weight.shape[0],) if saved else (0,)
    updated = training and running_mean is not None and out.numel() > 0
    new_rm = running_mean.new_empty(running_mean.shape) if updated else x.new_empty(0, dtype=torch.float32)
    new_rv = running_var.new_empty(running_var.shape) if updated else x.new_empty(0, dtype=torch.float32)
    return (out, z, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32),
            new_rm, new_rv)


@torch.library.custom_op("r21d::pointwise_conv_bn_act_backward", mutates_args=())
def pointwise_conv_bn_act_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor, mean: Tensor,
    invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    residual: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], training: bool,
    activation: str, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .triton_kernels import pointwise

    if z.numel() == 0:  # empty batch: nothing flows back
        return _zero_grads(x, weight, bias, bn_weight, bn_bias, residual, output_mask)
    with _on_device(x):
        grads = pointwise.conv_bn_act_bwd(
            grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual,
            tuple(stride), tuple(padding), training, _activation(activation), tuple(output_mask))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _grad_shaped(t: Optional[Tensor], wanted: bool, x: Tensor, zero: bool) -> Tensor:
    """A gradient buffer laid out like ``t`` (zeroed if ``zero``), or an empty placeholder where
    no gradient is wanted."""
    if not wanted or t is None:
        return x.new_empty(0)
    fmt = output_memory_format(t) if t.dim() == 5 else torch.contiguous_format
    g = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)
    return g.zero_() if zero else g


def _zero_grads(x, weight, bias, bn_weight, bn_bias, residual, mask):
    inputs = (x, weight, bias, bn_weight, bn_bias, residual)
    return tuple(_grad_shaped(t, m, x, zero=True) for t, m in zip(inputs, mask))


@pointwise_conv_bn_act_backward.register_fake
def _(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual, stride, padding,
      training, activation, output_mask):
    inputs = (x, weight, bias, bn_weight, bn_bias, residual)
    return tuple(_grad_shaped(t, m, x, zero=False) for t, m in zip(inputs, output_mask))


# Positions of the differentiable inputs of pointwise_conv_bn_act.
_GRAD_INPUTS = (0, 1, 2, 3, 4, 7)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, _rm, _rv, residual, stride, padding, training, _mom,
     _eps, activation, saved) = inputs
    _out, z, mean, invstd, _new_rm, _new_rv = output
    ctx.mark_non_differentiable(z, mean, invstd, _new_rm, _new_rv)
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, residual, z, mean, invstd)
    ctx.config = (tuple(stride), tuple(padding), training, activation, saved)


def _backward(ctx, grad_out, *_non_differentiable):
    x, weight, bias, bn_weight, bn_bias, residual, z, mean, invstd = ctx.saved_tensors
    stride, padding, training, activation, saved = ctx.config
    mask = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    if not saved:
        raise RuntimeError(
            "r21d::pointwise_conv_bn_act ran with save_for_backward=False, so it kept nothing to "
            "differentiate; call it through r21d.functional.conv_bn_act3d")
    grads = torch.ops.r21d.pointwise_conv_bn_act_backward(
        grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual, stride, padding,
        training, activation, mask)
    dx, dw, db, dg, dbeta, dres = (g if m else None for g, m in zip(grads, mask))
    return dx, dw, db, dg, dbeta, None, None, dres, None, None, None, None, None, None, None


torch.library.register_autograd(
    "r21d::pointwise_conv_bn_act", _backward, setup_context=_setup_context)


def _pointwise_call(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, *,
                    stride, padding, dilation, groups, training, momentum, eps, activation, save):
    out, _z, _mean, _invstd, new_rm, new_rv = torch.ops.r21d.pointwise_conv_bn_act(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, list(stride),
        list(padding), training, momentum, eps, activation or "none", save)
    if new_rm.numel():
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    return out


# (backend, conv family) -> the call that runs it; r21d.dispatch offers exactly these.
FUSED_CALLS = {
    ("triton", "pointwise"): _pointwise_call,
}
