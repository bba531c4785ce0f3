"""``conv_bn_act3d``: conv3d + BatchNorm + optional residual + activation as one call.

Inputs are validated here, before any kernel launch, with errors that name the argument; then the
backend is chosen (r21d.dispatch) and the call runs either the composite reference (``torch``)
or a fused op of r21d.ops.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import backends, dispatch, ops
from ._op_common import out_size
from .reference import ACTIVATIONS, conv_bn_act3d_reference
from .triton_kernels import _limits as limits

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triple(value, name: str, minimum: int) -> tuple[int, int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value),) * 3
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 3 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        value = tuple(int(v) for v in value)
    else:
        raise TypeError(f"conv_bn_act3d: {name} must be an int or a sequence of 3 ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"conv_bn_act3d: every {name} value must be >= {minimum}, got {value}")
    return value


def _check_activation(activation) -> str | None:
    if activation == "none":
        return None
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv_bn_act3d: unknown activation {activation!r}; expected 'relu', 'silu' or None")
    return activation


def _check_vector(t: Optional[Tensor], name: str, channels: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"conv_bn_act3d: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (channels,):
        raise ValueError(f"conv_bn_act3d: {name} must have shape ({channels},) (the output channels), got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"conv_bn_act3d: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"conv_bn_act3d: {name} is on {t.device} but x is on {device}")


def _byte_range(t: Tensor) -> tuple[int, int]:
    """[first, last) byte a non-empty tensor may touch."""
    extent = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _check_in_place(running_mean: Tensor, running_var: Tensor, others: dict) -> None:
    """Training writes the running statistics (vectors of shape (C,), validated) in place: each
    must hold distinct elements and share no memory with the other or with another argument
    (else one write clobbers another read). Kept cheap: it runs on every training call."""
    if torch.compiler.is_compiling():  # fake tensors have no addresses; functionalization copes
        return
    running = (("running_mean", running_mean), ("running_var", running_var))
    for name, t in running:
        if t.shape[0] > 1 and t.stride(0) == 0:
            raise ValueError(
                f"conv_bn_act3d: {name} has overlapping elements (an expanded tensor?); training "
                "updates it in place")
    device = running_mean.device  # every argument's, validated before
    spans = [(name, *_byte_range(t)) for name, t in (*running, *others.items())
             if t is not None and t.numel() > 0 and t.device == device]
    for i, (written, start, stop) in enumerate(spans[:2]):
        for name, other_start, other_stop in spans[i + 1:]:
            if start < other_stop and other_start < stop:
                raise ValueError(
                    f"conv_bn_act3d: {written} and {name} share memory; training updates "
                    f"{written} in place")


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast casts a conv of ``x`` to (its float32/16 inputs, never float64), or None
    outside autocast."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return None


@dataclasses.dataclass
class Plan:
    """A validated call and the backend that runs it (see :func:`plan`)."""

    backend: str
    config: dispatch.FusedConfig
    output_shape: tuple[int, ...]
    cast_dtype: Optional[torch.dtype]  # autocast's conv dtype, or None outside autocast
    sync_group: str = ""  # the process group batch statistics span (SyncBatchNorm), "" for none
    # why the requested fused backend cannot run it (it then runs on ``torch``, after the one-time
    # warning), or None: a plan without one may be reused for the same call (r21d.fused_site)
    fallback: Optional[str] = None


def plan(x, weight, bias=None, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, *,
         stride=1, padding=0, dilation=1, groups=1, training=False, activation="relu",
         residual=None, blocker: str | None = None, sync_group: str = "") -> Plan:
    """Validate a conv_bn_act3d call and choose its backend; nothing is computed or updated
    (where a requested fused backend cannot run it: the one-time fallback warning, or the error
    under R21D_STRICT=1).

    ``blocker`` is a caller's reason why no fused kernel may run it (it then falls back to
    ``torch`` like an unsupported configuration, or raises under R21D_STRICT=1). ``sync_group``
    names the process group whose ranks' batches the statistics span (a SyncBatchNorm in
    training, see r21d.fused_site.sync_group).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"conv_bn_act3d: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"conv_bn_act3d: x must have rank 5 (N, C, T, H, W), got rank {x.dim()} with shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"conv_bn_act3d: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"conv_bn_act3d: weight must be a Tensor, got {type(weight).__name__}")
    if weight.dim() != 5:
        raise ValueError(f"conv_bn_act3d: weight must have rank 5 (C_out, C_in/groups, kT, kH, kW), got shape {tuple(weight.shape)}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"conv_bn_act3d: groups must be a positive int, got {groups!r}")
    stride = _triple(stride, "stride", 1)
    padding = _triple(padding, "padding", 0)
    dilation = _triple(dilation, "dilation", 1)
    activation = _check_activation(activation)

    N, C_in = x.shape[:2]
    C_out = weight.shape[0]
    if C_in == 0 or C_out == 0:
        raise ValueError(f"conv_bn_act3d: channel counts must be positive, got C_in={C_in}, C_out={C_out}")
    if C_in % groups or C_out % groups:
        raise ValueError(f"conv_bn_act3d: groups={groups} must divide both C_in={C_in} and C_out={C_out}")
    if weight.shape[1] * groups != C_in:
        raise ValueError(
            f"conv_bn_act3d: x has {C_in} channels but weight expects {weight.shape[1] * groups} "
            f"(weight.shape[1]={weight.shape[1]} x groups={groups})")
    if weight.device != x.device:
        raise ValueError(f"conv_bn_act3d: weight is on {weight.device} but x is on {x.device}")

    cast_dtype = autocast_dtype(x)
    conv_dtype = cast_dtype or x.dtype
    if cast_dtype is None and weight.dtype != x.dtype:
        raise TypeError(f"conv_bn_act3d: weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    _check_vector(bias, "bias", C_out, x.device)
    if bias is not None and cast_dtype is None and bias.dtype != x.dtype:
        raise TypeError(f"conv_bn_act3d: bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    for t, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _check_vector(t, name, C_out, x.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("conv_bn_act3d: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("conv_bn_act3d: training=False normalises with running statistics; pass running_mean and running_var")
    if training and running_mean is not None:
        _check_in_place(running_mean, running_var, {
            "x": x, "weight": weight, "bias": bias, "bn_weight": bn_weight, "bn_bias": bn_bias,
            "residual": residual if isinstance(residual, Tensor) else None})

    kernel_size = tuple(weight.shape[2:])
    spatial = []
    for size, k, s, p, d, axis in zip(x.shape[2:], kernel_size, stride, padding, dilation, "THW"):
        out = out_size(size, k, s, p, d)
        if out < 1:
            raise ValueError(
                f"conv_bn_act3d: input size {axis}={size} with padding {p} is smaller than the "
                f"dilated kernel ({d * (k - 1) + 1}); output would be empty")
        spatial.append(out)
    output_shape = (N, C_out, *spatial)
    positions = max(N * math.prod(x.shape[2:]), N * math.prod(spatial))
    blocker = blocker or limits.positions_reason(positions) or limits.channels_reason(max(C_in, C_out))
    if blocker is None and weight.numel() >= 2**31:
        blocker = f"a weight of {weight.numel()} elements exceeds the kernels' 32-bit weight index"
    if sync_group and training and N == 0:
        raise ValueError(
            "conv_bn_act3d: a SyncBatchNorm site needs a non-empty batch on every rank (the "
            "fused statistics exchange has no empty contribution)")
    if training and not sync_group and N * spatial[0] * spatial[1] * spatial[2] == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {torch.Size(output_shape)}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"conv_bn_act3d: residual must be a Tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != output_shape:
            raise ValueError(f"conv_bn_act3d: residual must have the output's shape {output_shape}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"conv_bn_act3d: residual is on {residual.device} but x is on {x.device}")
        if not residual.dtype.is_floating_point:
            raise TypeError(f"conv_bn_act3d: residual must be a floating-point tensor, got {residual.dtype}")
        if blocker is None and residual.dtype != conv_dtype:
            blocker = f"residual dtype {residual.dtype} differs from the conv output's {conv_dtype} (PyTorch would promote)"

    config = dispatch.FusedConfig(
        family=dispatch.conv_family(kernel_size, groups, C_in, C_out),
        kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
        groups=int(groups), dtype=conv_dtype, device_type=x.device.type, training=bool(training),
        activation=activation, residual=residual is not None,
        sync_stats=bool(sync_group and training),
    )
    backend, reason = dispatch.resolve(config, blocker)
    if reason is not None:  # as dispatch.choose: the one-time warning, or the strict-mode error
        backends.fallback(f"{config.describe()} on {backends.get_backend()}", reason)
    return Plan(backend, config, output_shape, cast_dtype, sync_group if training else "", reason)


def save_for_backward(*tensors) -> bool:
    """Whether autograd will want a backward through a call on ``tensors`` (the op then keeps
    what its backward needs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run(p: Plan, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *, momentum, eps,
        residual=None) -> Tensor:
    """Execute a :class:`Plan` on a fused backend (``p.backend`` must not be ``torch``).
    ``momentum``: the exponential-average factor, a float or a 0-dim tensor on the device (see
    r21d._op_common.update_running_stats)."""
    cfg = p.config
    if p.cast_dtype is not None:  # autocast casts the conv's inputs like F.conv3d does
        x, weight = x.to(p.cast_dtype), weight.to(p.cast_dtype)
        bias = bias.to(p.cast_dtype) if bias is not None else None
    call = fused_call(p)
    static = call.static_args(
        stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation, training=cfg.training,
        activation=cfg.activation,
        save=save_for_backward(x, weight, bias, bn_weight, bn_bias, residual),
        sync_group=p.sync_group)
    momentum = momentum if isinstance(momentum, Tensor) else float(momentum)
    return run_call(call, static, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                    residual, momentum, float(eps))


def fused_call(p: Plan) -> ops.FusedCall:
    """The call that runs a :class:`Plan` on its fused backend."""
    return dispatch.FUSED_CALLS[p.backend, p.config.family]


def run_call(call: ops.FusedCall, static, x, weight, bias, bn_weight, bn_bias, running_mean,
             running_var, residual, momentum, eps: float) -> Tensor:
    """One call of ``call`` with its static arguments, autocast off inside the op (its inputs
    are cast already), the running statistics copied back."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return call.run(static, x, weight, bias, bn_weight, bn_bias, running_mean,
                            running_var, residual, momentum, eps)
    return call.run(static, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                    residual, momentum, eps)


def conv_bn_act3d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                  running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None, *,
                  stride=1, padding=0, dilation=1, groups=1, training: bool = False,
                  momentum: float = 0.1, eps: float = 1e-5, activation: Optional[str] = "relu",
                  residual: Optional[Tensor] = None) -> Tensor:
    """``act(batch_norm(conv3d(x, weight, bias)) + residual)`` with PyTorch's exact semantics.

    ``training`` selects batch statistics (and updates ``running_mean``/``running_var`` in place
    with ``momentum`` when given) or the running statistics; ``activation`` is "relu", "silu" or
    None. Runs fused where the selected backend has a kernel for the geometry.
    """
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool):
        raise TypeError(f"conv_bn_act3d: momentum must be a float, got {momentum!r}")
    p = plan(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride=stride,
             padding=padding, dilation=dilation, groups=groups, training=training,
             activation=activation, residual=residual)
    if p.backend == "torch":
        return conv_bn_act3d_reference(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
            stride=p.config.stride, padding=p.config.padding, dilation=p.config.dilation,
            groups=groups, training=training, momentum=momentum, eps=eps,
            activation=p.config.activation, residual=residual)
    return run(p, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
               momentum=momentum, eps=eps, residual=residual)
