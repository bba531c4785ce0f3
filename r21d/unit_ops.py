"""The (2+1)D unit's ops (spatial conv -> BN1 -> ReLU -> temporal conv -> BN2 [+ residual] ->
activation), registered with torch.library in namespace ``r21d`` (see r21d.ops for the per-conv
families and r21d.fused_unit for the caller).

``r21d::conv2plus1d_bn_act``  eval (both BNs with running statistics) as one Triton kernel
    (r21d.triton_kernels.conv2plus1d); inference only, it has no backward.
``r21d::conv2plus1d_bn_act_train``  training (batch statistics) as two chained implicit GEMMs
    (r21d.triton_kernels.conv2plus1d_train), with autograd through
    ``r21d::conv2plus1d_bn_act_train_backward``. Functional like the per-conv ops: it returns the
    updated running statistics and the caller copies them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ._op_common import (
    activation_arg,
    custom_op,
    differentiable,
    grad_shaped,
    implementation,
    on_device,
    out_shape,
    out_size,
    updated_in_place,
)
from .triton_kernels._layout import output_memory_format


@custom_op("r21d::conv2plus1d_bn_act")
def conv2plus1d_bn_act(
    x: Tensor, spatial_weight: Tensor, spatial_bias: Optional[Tensor], bn1_weight: Optional[Tensor],
    bn1_bias: Optional[Tensor], bn1_running_mean: Tensor, bn1_running_var: Tensor, bn1_eps: float,
    temporal_weight: Tensor, temporal_bias: Optional[Tensor], bn2_weight: Optional[Tensor],
    bn2_bias: Optional[Tensor], bn2_running_mean: Tensor, bn2_running_var: Tensor, bn2_eps: float,
    residual: Optional[Tensor], spatial_stride: Sequence[int], spatial_padding: Sequence[int],
    temporal_stride: int, temporal_padding: int, activation: str,
) -> Tensor:
    """act(bn2(temporal_conv(relu(bn1(spatial_conv(x))))) [+ residual]), both BNs with running
    statistics, as one kernel (r21d.triton_kernels.conv2plus1d). Inference only."""
    from .triton_kernels import conv2plus1d

    with on_device(x):
        return conv2plus1d.unit_eval(
            x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, bn1_running_mean,
            bn1_running_var, bn1_eps, temporal_weight, temporal_bias, bn2_weight, bn2_bias,
            bn2_running_mean, bn2_running_var, bn2_eps, residual, tuple(spatial_stride),
            tuple(spatial_padding), temporal_stride, temporal_padding, activation_arg(activation))


@conv2plus1d_bn_act.register_fake
def _(x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
      bn1_eps, temporal_weight, temporal_bias, bn2_weight, bn2_bias, bn2_running_mean,
      bn2_running_var, bn2_eps, residual, spatial_stride, spatial_padding, temporal_stride,
      temporal_padding, activation):
    N, _, T, H, W = out_shape(x.shape, spatial_weight.shape, (1, *spatial_stride),
                              (0, *spatial_padding), (1, 1, 1))
    T = out_size(T, temporal_weight.shape[2], temporal_stride, temporal_padding)
    shape = (N, temporal_weight.shape[0], T, H, W)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


@custom_op("r21d::conv2plus1d_bn_act_train")
def conv2plus1d_bn_act_train(
    x: Tensor, spatial_weight: Tensor, spatial_bias: Optional[Tensor], bn1_weight: Optional[Tensor],
    bn1_bias: Optional[Tensor], bn1_running_mean: Optional[Tensor],
    bn1_running_var: Optional[Tensor], bn1_momentum: float, bn1_eps: float,
    temporal_weight: Tensor, temporal_bias: Optional[Tensor], bn2_weight: Optional[Tensor],
    bn2_bias: Optional[Tensor], bn2_running_mean: Optional[Tensor],
    bn2_running_var: Optional[Tensor], bn2_momentum: float, bn2_eps: float,
    residual: Optional[Tensor], spatial_stride: Sequence[int], spatial_padding: Sequence[int],
    spatial_dilation: Sequence[int], temporal_stride: Sequence[int],
    temporal_padding: Sequence[int], temporal_dilation: Sequence[int], activation: str,
    save_for_backward: bool, sync_group: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """act(bn2(temporal_conv(relu(bn1(spatial_conv(x))))) [+ residual]) with batch statistics.
    Returns (out, z1, mean1, invstd1, z2, mean2, invstd2, new_running_mean1, new_running_var1,
    new_running_mean2, new_running_var2) as r21d.triton_kernels.conv2plus1d_train documents.
    ``sync_group``: both BNs' statistics span that process group's ranks ("" for none)."""
    from .triton_kernels import conv2plus1d_train

    with on_device(x, sync_group):
        return conv2plus1d_train.unit_train_fwd(
            x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, bn1_running_mean,
            bn1_running_var, bn1_momentum, bn1_eps, temporal_weight, temporal_bias, bn2_weight,
            bn2_bias, bn2_running_mean, bn2_running_var, bn2_momentum, bn2_eps, residual,
            tuple(spatial_stride), tuple(spatial_padding), tuple(spatial_dilation),
            tuple(temporal_stride), tuple(temporal_padding), tuple(temporal_dilation),
            activation_arg(activation), save_for_backward)


def train_in_place(x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, bn1_running_mean,
                   bn1_running_var, bn1_momentum, bn1_eps, temporal_weight, temporal_bias,
                   bn2_weight, bn2_bias, bn2_running_mean, bn2_running_var, bn2_momentum, bn2_eps,
                   residual, spatial_stride, spatial_padding, spatial_dilation, temporal_stride,
                   temporal_padding, temporal_dilation, activation, save_for_backward, sync_group):
    """conv2plus1d_bn_act_train for r21d's eager calls (nothing observes the op, float momenta):
    the statistics kernels update both BNs' running statistics in place, as eager BatchNorm does,
    and the new ones come back empty (nothing to copy back; where they could not be updated in
    place, across a process group, they come back as the op returns them)."""
    from .triton_kernels import conv2plus1d_train

    running = (bn1_running_mean, bn1_running_var, bn2_running_mean, bn2_running_var)
    with on_device(x, sync_group):
        *kept, new_rm1, new_rv1, new_rm2, new_rv2 = conv2plus1d_train.unit_train_fwd(
            x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, bn1_running_mean,
            bn1_running_var, bn1_momentum, bn1_eps, temporal_weight, temporal_bias, bn2_weight,
            bn2_bias, bn2_running_mean, bn2_running_var, bn2_momentum, bn2_eps, residual,
            tuple(spatial_stride), tuple(spatial_padding), tuple(spatial_dilation),
            tuple(temporal_stride), tuple(temporal_padding), tuple(temporal_dilation),
            activation_arg(activation), save_for_backward, True)
    new = tuple(x.new_empty(0, dtype=torch.float32) if updated_in_place(given, updated) else updated
                for given, updated in zip(running, (new_rm1, new_rv1, new_rm2, new_rv2)))
    return (*kept, *new)


def _updated(running: Optional[Tensor], like: Tensor) -> Tensor:
    if running is None:
        return like.new_empty(0, dtype=torch.float32)
    return running.new_empty(running.shape)


@conv2plus1d_bn_act_train.register_fake
def _(x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, bn1_running_mean, bn1_running_var,
      bn1_momentum, bn1_eps, temporal_weight, temporal_bias, bn2_weight, bn2_bias,
      bn2_running_mean, bn2_running_var, bn2_momentum, bn2_eps, residual, spatial_stride,
      spatial_padding, spatial_dilation, temporal_stride, temporal_padding, temporal_dilation,
      activation, save_for_backward, sync_group):
    def channels_last(shape):
        return torch.empty(shape, dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last_3d)

    mid_shape = out_shape(x.shape, spatial_weight.shape, spatial_stride, spatial_padding,
                          spatial_dilation)
    z1 = channels_last(mid_shape)
    shape = out_shape(z1.shape, temporal_weight.shape, temporal_stride, temporal_padding,
                      temporal_dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    def stats(channels):  # (mean, invstd): two distinct tensors
        return tuple(x.new_empty(channels, dtype=torch.float32) for _ in range(2))

    stats1 = stats(mid_shape[1])
    if save_for_backward:
        z2, stats2 = channels_last(shape), stats(shape[1])
    else:
        z2, stats2 = x.new_empty(0), stats(0)
    return (out, z1, *stats1, z2, *stats2, _updated(bn1_running_mean, x),
            _updated(bn1_running_var, x), _updated(bn2_running_mean, x),
            _updated(bn2_running_var, x))


@custom_op("r21d::conv2plus1d_bn_act_train_backward")
def conv2plus1d_bn_act_train_backward(
    grad_out: Tensor, x: Tensor, spatial_weight: Tensor, spatial_bias: Optional[Tensor],
    bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], z1: Tensor, mean1: Tensor,
    invstd1: Tensor, temporal_weight: Tensor, temporal_bias: Optional[Tensor],
    bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], z2: Tensor, mean2: Tensor,
    invstd2: Tensor, residual: Optional[Tensor], spatial_stride: Sequence[int],
    spatial_padding: Sequence[int], spatial_dilation: Sequence[int],
    temporal_stride: Sequence[int], temporal_padding: Sequence[int],
    temporal_dilation: Sequence[int], activation: str, output_mask: Sequence[bool],
    sync_group: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dspatial_weight, dspatial_bias, dbn1_weight, dbn1_bias, dtemporal_weight,
    dtemporal_bias, dbn2_weight, dbn2_bias, dresidual) of conv2plus1d_bn_act_train; those not
    asked for in ``output_mask`` come back empty. Deterministic (fixed-order partial sums)."""
    from .triton_kernels import conv2plus1d_train

    with on_device(x, sync_group):
        grads = conv2plus1d_train.unit_train_bwd(
            grad_out, x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, z1, mean1, invstd1,
            temporal_weight, temporal_bias, bn2_weight, bn2_bias, z2, mean2, invstd2, residual,
            tuple(spatial_stride), tuple(spatial_padding), tuple(spatial_dilation),
            tuple(temporal_stride), tuple(temporal_padding), tuple(temporal_dilation),
            activation_arg(activation), tuple(output_mask))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


# The differentiable inputs of conv2plus1d_bn_act_train, in the backward's output order.
_TRAIN_GRAD_INPUTS = (0, 1, 2, 3, 4, 9, 10, 11, 12, 17)


@conv2plus1d_bn_act_train_backward.register_fake
def _(grad_out, x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, z1, mean1, invstd1,
      temporal_weight, temporal_bias, bn2_weight, bn2_bias, z2, mean2, invstd2, residual,
      spatial_stride, spatial_padding, spatial_dilation, temporal_stride, temporal_padding,
      temporal_dilation, activation, output_mask, sync_group):
    inputs = (x, spatial_weight, spatial_bias, bn1_weight, bn1_bias, temporal_weight,
              temporal_bias, bn2_weight, bn2_bias, residual)
    return tuple(grad_shaped(t, m, x, zero=False) for t, m in zip(inputs, output_mask))


def _train_setup_context(ctx, inputs, output):
    (x, w1, b1, g1, be1, _rm1, _rv1, _mom1, _eps1, w2, b2, g2, be2, _rm2, _rv2, _mom2, _eps2,
     residual, *geometry, activation, saved, sync_group) = inputs
    _out, z1, mean1, invstd1, z2, mean2, invstd2, *running = output
    ctx.mark_non_differentiable(z1, mean1, invstd1, z2, mean2, invstd2, *running)
    ctx.save_for_backward(x, w1, b1, g1, be1, z1, mean1, invstd1, w2, b2, g2, be2, z2, mean2,
                          invstd2, residual)
    ctx.config = ([list(g) for g in geometry], activation, saved, sync_group)


def _train_backward(ctx, grad_out, *_non_differentiable):
    (x, w1, b1, g1, be1, z1, mean1, invstd1, w2, b2, g2, be2, z2, mean2, invstd2,
     residual) = ctx.saved_tensors
    geometry, activation, saved, sync_group = ctx.config
    if not saved:
        raise RuntimeError("r21d::conv2plus1d_bn_act_train ran with save_for_backward=False, so "
                           "it kept nothing to differentiate; run the unit through its module")
    mask = [ctx.needs_input_grad[i] for i in _TRAIN_GRAD_INPUTS]
    grads = implementation("r21d::conv2plus1d_bn_act_train_backward", grad_out, x, w1, b1, g1,
                           be1, z1, mean1, invstd1, w2, b2, g2, be2, z2, mean2, invstd2, residual)(
        grad_out, x, w1, b1, g1, be1, z1, mean1, invstd1, w2, b2, g2, be2, z2, mean2, invstd2,
        residual, *geometry, activation, mask, sync_group)
    dx, dw1, db1, dg1, dbe1, dw2, db2, dg2, dbe2, dres = (g if m else None for g, m in zip(grads, mask))
    return (dx, dw1, db1, dg1, dbe1, None, None, None, None, dw2, db2, dg2, dbe2, None, None, None,
            None, dres, *([None] * 9))


torch.library.register_autograd("r21d::conv2plus1d_bn_act_train", _train_backward,
                                setup_context=_train_setup_context)
# the same formula as a Function, for r21d's own calls (_op_common.differentiable); and one whose
# unobserved calls update the running statistics in place (train_in_place: float momenta only)
TRAIN_DIFFERENTIABLE = differentiable("r21d::conv2plus1d_bn_act_train", _train_setup_context,
                                      _train_backward)
TRAIN_IN_PLACE = differentiable("r21d::conv2plus1d_bn_act_train", _train_setup_context,
                                _train_backward, run=train_in_place)
