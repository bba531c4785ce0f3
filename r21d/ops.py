"""The fused ops, registered with torch.library in namespace ``r21d`` (docs/architecture.md, Ops).

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
    the gradients (dx, dw, dbias, dbn_weight, dbn_bias, dresidual); those not asked for in
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

Importing this module fills r21d.dispatch's table of what each backend runs
(``dispatch.FUSED_CALLS``, re-exported here): this module imports r21d.dispatch, never the other
way round, and r21d.unit_ops shares its helpers through r21d._op_common.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from . import direct_calls
from ._op_common import (
    activation_arg,
    custom_op,
    differentiable,
    grad_shaped,
    implementation,
    needs_grad,
    on_device,
    op_momentum,
    out_shape,
    unobserved,
    update_running_stats,
    zero_grads,
)
from .dispatch import CSRC_OPS, FUSED_CALLS, IMPLICIT_GEMM_FAMILIES, csrc_ops_available
from .triton_kernels._layout import output_memory_format


@dataclasses.dataclass(frozen=True)
class _OpFamily:
    forward: str  # qualified op names
    backward: str
    z_channels_last: bool  # z is channels_last_3d (else in x's memory format)
    sync_group: bool = True  # the schemas end with ``str sync_group`` (the Triton families)
    # (forward, backward) launchers with the ops' arguments in the launchers' form (tuples, None
    # for activation "none"): what the ops run, and r21d's eager calls directly (Triton families)
    launchers: tuple[Callable, Callable] | None = None


def _fake_forward(family: _OpFamily):
    def fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
             padding, dilation, training, momentum, eps, activation, save_for_backward,
             sync_group=""):
        shape = out_shape(x.shape, weight.shape, stride, padding, dilation)
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


def _fake_backward(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual, stride,
                   padding, dilation, training, activation, output_mask, deterministic,
                   sync_group=""):
    inputs = (x, weight, bias, bn_weight, bn_bias, residual)
    return tuple(grad_shaped(t, m, x, zero=False) for t, m in zip(inputs, output_mask))


# Positions of the differentiable inputs of a forward op.
_GRAD_INPUTS = (0, 1, 2, 3, 4, 7)


# The forward ops' autograd formulas as Functions (r21d's own calls: _op_common.differentiable).
_DIFFERENTIABLE: dict[str, type[torch.autograd.Function]] = {}


def _register_autograd(family: _OpFamily) -> None:
    """Register the forward op's autograd, and keep the same formula as a Function."""
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
            grads = zero_grads(x, weight, bias, bn_weight, bn_bias, residual, mask)
        else:
            backward_op = implementation(family.backward, grad_out, x, weight, bias, z, mean,
                                         invstd, bn_weight, bn_bias, residual)
            grads = backward_op(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias,
                                residual, stride, padding, dilation, training, activation, mask,
                                torch.are_deterministic_algorithms_enabled(), *ctx.sync_group)
        dx, dw, db, dbn_weight, dbn_bias, dres = (g if m else None for g, m in zip(grads, mask))
        return dx, dw, db, dbn_weight, dbn_bias, None, None, dres, *([None] * (ctx.num_inputs - 8))

    torch.library.register_autograd(family.forward, backward, setup_context=setup_context)
    _DIFFERENTIABLE[family.forward] = differentiable(family.forward, setup_context, backward)


def _define_triton_family(forward_name: str, backward_name: str, z_channels_last: bool,
                          forward_launcher: Callable, backward_launcher: Callable) -> _OpFamily:
    """The forward and backward custom ops (qualified names) of a Triton kernel family, with fake
    implementations and autograd; the three families share one schema, written once here. The
    launchers get the op's arguments with tuples for the geometry and None for activation
    "none"; the backward launcher a tuple ``needs`` for ``output_mask``."""
    family = _OpFamily(forward_name, backward_name, z_channels_last,
                       launchers=(forward_launcher, backward_launcher))

    def forward(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
        bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
        residual: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], training: bool, momentum: float, eps: float, activation: str,
        save_for_backward: bool, sync_group: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with on_device(x, sync_group):
            return forward_launcher(
                x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                tuple(stride), tuple(padding), tuple(dilation), training, momentum, eps,
                activation_arg(activation), save_for_backward)

    def backward(
        grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], z: Tensor,
        mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
        residual: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], training: bool, activation: str, output_mask: Sequence[bool],
        deterministic: bool, sync_group: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        # The Triton kernels are deterministic either way (fixed-order partial sums).
        with on_device(x, sync_group):
            grads = backward_launcher(
                grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual,
                tuple(stride), tuple(padding), tuple(dilation), training, activation_arg(activation),
                tuple(output_mask))
        return tuple(g if g is not None else x.new_empty(0) for g in grads)

    forward_op = custom_op(family.forward)(forward)
    forward_op.register_fake(_fake_forward(family))
    backward_op = custom_op(family.backward)(backward)
    backward_op.register_fake(_fake_backward)
    _register_autograd(family)
    return family


def _pointwise_forward(x, weight, bias, bn_weight, bn_bias, rm, rv, residual, stride, padding, _dilation,
                       training, momentum, eps, activation, save, running_in_place=False):
    from .triton_kernels import pointwise

    return pointwise.conv_bn_act_fwd(x, weight, bias, bn_weight, bn_bias, rm, rv, residual, stride,
                                     padding, training, momentum, eps, activation, save,
                                     running_in_place)


def _pointwise_backward(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual, stride,
                        padding, _dilation, training, activation, needs):
    from .triton_kernels import pointwise

    return pointwise.conv_bn_act_bwd(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias,
                                     residual, stride, padding, training, activation, needs)


def _implicit_gemm_forward(*args):
    from .triton_kernels import implicit_gemm

    return implicit_gemm.conv_bn_act_fwd(*args)


def _implicit_gemm_backward(*args):
    from .triton_kernels import implicit_gemm_bwd

    return implicit_gemm_bwd.conv_bn_act_bwd(*args)


def _depthwise_forward(*args):
    from .triton_kernels import depthwise

    return depthwise.conv_bn_act_fwd(*args)


def _depthwise_backward(*args):
    from .triton_kernels import depthwise_bwd

    return depthwise_bwd.conv_bn_act_bwd(*args)


POINTWISE = _define_triton_family("r21d::pointwise_conv_bn_act", "r21d::pointwise_conv_bn_act_backward",
                                  True, _pointwise_forward, _pointwise_backward)
DEPTHWISE = _define_triton_family("r21d::depthwise_conv_bn_act", "r21d::depthwise_conv_bn_act_backward",
                                  False, _depthwise_forward, _depthwise_backward)
IMPLICIT_GEMM = _define_triton_family("r21d::implicit_gemm_conv_bn_act",
                                      "r21d::implicit_gemm_conv_bn_act_backward",
                                      True, _implicit_gemm_forward, _implicit_gemm_backward)


# csrc: the schemas come from r21d._C's TORCH_LIBRARY block.
DEPTHWISE_CUDA = _OpFamily(*CSRC_OPS["depthwise"], False, sync_group=False)


def csrc_op_available(family: _OpFamily) -> bool:
    """Whether r21d._C is loaded and defines ``family``'s ops."""
    return csrc_ops_available((family.forward, family.backward))


def _register_csrc(family: _OpFamily) -> None:
    if not csrc_op_available(family):
        return
    torch.library.register_fake(family.forward)(_fake_forward(family))
    torch.library.register_fake(family.backward)(_fake_backward)
    _register_autograd(family)


_register_csrc(DEPTHWISE_CUDA)


class FusedCall:
    """The call r21d.functional.run makes: eager and unobserved, the family's launchers directly
    (r21d.direct_calls, running statistics updated in place); else the op, then the running
    statistics it returns copied back. ``bn_float32``: the kernels take float32 BN vectors
    (others are cast, differentiably).

    :meth:`static_args` turns the arguments that stay the same from call to call of a site (its
    geometry and mode) into the op's; :meth:`run` makes one call with them (what a site's cached
    plan calls, see r21d.fused_site); calling the object does both."""

    __slots__ = ("family", "bn_float32", "op_name")

    def __init__(self, family: _OpFamily, bn_float32: bool = False):
        self.family = family
        self.bn_float32 = bn_float32
        self.op_name = family.forward.split("::")[1]

    def static_args(self, *, stride, padding, dilation, training, activation, save,
                    sync_group="") -> tuple[tuple, tuple, tuple | None]:
        """The op's arguments before the momentum (geometry, training) and after the eps
        (activation, save_for_backward, sync_group where the schema has it), and the same in
        the launchers' form where the family has launchers (r21d.direct_calls)."""
        if sync_group and not self.family.sync_group:
            raise RuntimeError(f"r21d::{self.op_name} cannot reduce statistics across processes")
        head = (list(stride), list(padding), list(dilation), bool(training))
        tail = (activation or "none", bool(save), *([sync_group] if self.family.sync_group else []))
        launch = None
        if self.family.launchers is not None:
            launch = direct_calls.launch_form(stride, padding, dilation, training, activation,
                                              save, sync_group)
        return head, tail, launch

    def run(self, static: tuple[tuple, tuple, tuple | None], x, weight, bias, bn_weight, bn_bias,
            running_mean, running_var, residual, momentum, eps: float) -> Tensor:
        """One call: eager and unobserved, the family's launchers directly (r21d.direct_calls);
        else the op (under an autograd.Function where a gradient is wanted)."""
        head, tail, launch = static
        if launch is not None and unobserved(x, weight, bias, bn_weight, bn_bias, running_mean,
                                             running_var, residual):
            return direct_calls.run(self.family, launch, x, weight, bias, bn_weight, bn_bias,
                                    running_mean, running_var, residual, momentum, eps)
        if self.bn_float32:
            bn_weight, bn_bias, rm, rv = (
                t.float() if t is not None and t.dtype != torch.float32 else t
                for t in (bn_weight, bn_bias, running_mean, running_var))
        else:
            rm, rv = running_mean, running_var
        if needs_grad(x, weight, bias, bn_weight, bn_bias, residual):
            op = _DIFFERENTIABLE[self.family.forward].apply
        else:
            op = implementation(self.family.forward, x, weight, bias, bn_weight, bn_bias, rm, rv,
                                residual)
        out, _z, _mean, _invstd, new_rm, new_rv = op(
            x, weight, bias, bn_weight, bn_bias, rm, rv, residual, *head, op_momentum(momentum),
            eps, *tail)
        if new_rm.numel():
            update_running_stats(running_mean, new_rm, momentum)
            update_running_stats(running_var, new_rv, momentum)
        return out

    def __call__(self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, *,
                 stride, padding, dilation, groups, training, momentum, eps, activation, save,
                 sync_group=""):
        static = self.static_args(stride=stride, padding=padding, dilation=dilation,
                                  training=training, activation=activation, save=save,
                                  sync_group=sync_group)
        return self.run(static, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                        residual, momentum, float(eps))


def _fused_call(family: _OpFamily, bn_float32: bool = False) -> FusedCall:
    return FusedCall(family, bn_float32)


# (backend, conv family) -> the call that runs it: r21d.dispatch's table (dispatch offers exactly
# these), filled here.
FUSED_CALLS.update({
    ("triton", "pointwise"): _fused_call(POINTWISE),
    ("triton", "depthwise"): _fused_call(DEPTHWISE),
    **{("triton", family): _fused_call(IMPLICIT_GEMM) for family in IMPLICIT_GEMM_FAMILIES},
    ("cuda", "depthwise"): _fused_call(DEPTHWISE_CUDA, bn_float32=True),
})

# The csrc op families behind the cuda backend's calls (dispatch checks that r21d._C has them).
CSRC_FAMILIES = {"depthwise": DEPTHWISE_CUDA}

from . import unit_ops  # noqa: E402,F401  (registers the (2+1)D unit's ops)
