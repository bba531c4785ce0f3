"""r21d's eager calls of a Triton family: its launchers called directly, with the ops' semantics.

A fused site's call in eager mode (nothing that could observe the op, see
``_op_common.unobserved``) needs neither the op's boxing nor its functional form. So
:func:`run` calls the family's forward launcher itself (and, for a gradient, :class:`_Training`
records one autograd node whose backward calls the backward launcher), with two differences
from the op:

- the running statistics are updated in place by the statistics kernel, as eager BatchNorm does,
  where the op returns new tensors for the caller to copy back (two copy launches per site);
- the autograd node returns only the output, and none of the op's placeholders.

Under torch.compile, torch.jit tracing, a dispatch or function mode, a functorch transform or the
profiler, r21d.ops.FusedCall calls the op instead (so that they see it), and so does the backward
here when its own call is observed (compiled autograd, a mode entered around ``backward()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from ._op_common import (
    implementation,
    needs_grad,
    on_device,
    op_momentum,
    unobserved,
    update_running_stats,
    updated_in_place,
    zero_grads,
)

# Positions of the differentiable tensors among _Training.forward's inputs (after ctx).
_GRAD_INPUTS = (4, 5, 6, 7, 8, 11)


def launch_form(stride, padding, dilation, training: bool, activation: Optional[str],
                save: bool, sync_group: str) -> tuple:
    """A site's static arguments as the launchers take them: (geometry and mode, activation
    (None for none) and save_for_backward, the statistics' process group)."""
    return ((tuple(stride), tuple(padding), tuple(dilation), bool(training)),
            (activation if activation not in (None, "none") else None, bool(save)), sync_group)


def run(family, launch: tuple, x: Tensor, weight: Tensor, bias, bn_weight, bn_bias, running_mean,
        running_var, residual, momentum: float | Tensor, eps: float) -> Tensor:
    """``act(bn(conv(x)) + residual)`` through ``family``'s launchers, the running statistics
    updated with ``momentum`` (a float, or the 0-dim device tensor of the cumulative average)."""
    if needs_grad(x, weight, bias, bn_weight, bn_bias, residual):
        return _Training.apply(family, launch, momentum, eps, x, weight, bias, bn_weight, bn_bias,
                               running_mean, running_var, residual)
    _, (_, save), _ = launch
    return _forward(family, launch, save, x, weight, bias, bn_weight, bn_bias, running_mean,
                    running_var, residual, momentum, eps)[0]


def _forward(family, launch, save, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
             residual, momentum, eps) -> tuple:
    """The forward launcher's (out, z, mean, invstd, ...), the running statistics updated: in
    place by the statistics kernel where the factor is a float, else copied back after it."""
    geometry, (activation, _), sync_group = launch
    with on_device(x, sync_group):
        result = family.launchers[0](
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, *geometry,
            op_momentum(momentum), eps, activation, save, not isinstance(momentum, Tensor))
    new_rm, new_rv = result[4:]
    if new_rm is None or not new_rm.numel():  # eval, or no running statistics
        return result
    if updated_in_place(running_mean, new_rm):  # and so running_var, by the same kernel
        updated_in_place(running_var, new_rv)
    else:
        update_running_stats(running_mean, new_rm, momentum)
        update_running_stats(running_var, new_rv, momentum)
    return result


class _Training(torch.autograd.Function):
    """One fused site's call recording a gradient: the op's autograd formula (r21d.ops), with
    its launchers called directly."""

    @staticmethod
    def forward(ctx, family, launch, momentum, eps, x, weight, bias, bn_weight, bn_bias,
                running_mean, running_var, residual):
        out, z, mean, invstd, _, _ = _forward(family, launch, True, x, weight, bias, bn_weight,
                                              bn_bias, running_mean, running_var, residual,
                                              momentum, eps)
        # z, mean and invstd too, though made here: saved-tensor hooks (checkpointing, offload)
        # see everything the backward keeps
        ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, residual, z, mean, invstd)
        ctx.family, ctx.launch = family, launch
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, bn_weight, bn_bias, residual, z, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = tuple(needs[i] for i in _GRAD_INPUTS)
        inputs = (x, weight, bias, bn_weight, bn_bias, residual)
        if z.numel() == 0:  # an empty batch: nothing flows back
            grads = zero_grads(*inputs, mask)
        elif unobserved(grad_out, *inputs):
            geometry, (activation, _save), sync_group = ctx.launch
            with on_device(x, sync_group):
                grads = ctx.family.launchers[1](grad_out, x, weight, bias, z, mean, invstd,
                                                bn_weight, bn_bias, residual, *geometry,
                                                activation, mask)
        else:
            grads = _backward_op(ctx.family, ctx.launch, grad_out, x, weight, bias, z, mean,
                                 invstd, bn_weight, bn_bias, residual, mask)
        dx, dw, db, dbn_weight, dbn_bias, dres = (g if m else None for g, m in zip(grads, mask))
        return None, None, None, None, dx, dw, db, dbn_weight, dbn_bias, None, None, dres


def _backward_op(family, launch, grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias,
                 residual, mask) -> tuple:
    """The backward op's call with the same arguments, for whatever observes this backward."""
    (stride, padding, dilation, training), (activation, _save), sync_group = launch
    op: Callable = implementation(family.backward, grad_out, x, weight, bias, z, mean, invstd,
                                  bn_weight, bn_bias, residual)
    return op(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual,
              list(stride), list(padding), list(dilation), training, activation or "none",
              list(mask), torch.are_deterministic_algorithms_enabled(), sync_group)
