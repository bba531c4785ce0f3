"""One fused site: a conv module, its BatchNorm module and an activation module, run as one op.

Every r21d module and every site ``fuse()`` creates runs through :func:`run_site`, which keeps
``nn.BatchNorm`` semantics exactly (num_batches_tracked, momentum=None, track_running_stats,
affine) and, where no fused kernel may run the site, calls the modules themselves, so the torch
path is plain PyTorch, hooks and all.

Given a :class:`r21d.plan_cache.PlanSlot`, :func:`run_site` keeps the site's plan (:class:`SitePlan`)
there: the next call with the same signature (:func:`site_signature`) calls the op with the
plan's static arguments, without validating, configuring or choosing the backend again.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import backends, dispatch, functional
from .dispatch import FusedConfig, conv_family
from .plan_cache import PlanSlot, autocast_state, byte_span, conv_kind, hooked, overlaps, plain_bn
from .triton_kernels import sync_stats

CONV_TYPES = (nn.Conv2d, nn.Conv3d)
BN_TYPES = {nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm), nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm)}
ACTIVATION_TYPES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: None}


def _plain_forward(module: nn.Module, base: type) -> bool:
    """True when ``module`` runs ``base``'s own forward (a subclass may change what it computes)."""
    return isinstance(module, base) and type(module).forward is base.forward


def conv_base(conv: nn.Module) -> type | None:
    for base in CONV_TYPES:
        if _plain_forward(conv, base):
            return base
    return None


def is_batchnorm_for(bn: nn.Module, conv: nn.Module) -> bool:
    base = conv_base(conv)
    return (
        base is not None
        and any(_plain_forward(bn, t) for t in BN_TYPES[base])
        and bn.num_features == conv.out_channels
    )


# Activation modules of other classes found to compute ReLU or SiLU (pytorchvideo's Swish):
# r21d.fused_traced probes a module once and registers it here, by instance.
_FOUND_ACTIVATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_activation(module: nn.Module, name: str) -> None:
    """Let fused sites run ``module`` as the activation ``name`` ("relu" or "silu")."""
    _FOUND_ACTIVATIONS[module] = name


def activation_name(act: Optional[nn.Module]) -> str | None:
    """"relu" / "silu" / None for a supported activation module (None for no module)."""
    if act is None:
        return None
    for t, name in ACTIVATION_TYPES.items():
        if _plain_forward(act, t):
            return name
    name = _FOUND_ACTIVATIONS.get(act)
    if name is not None:
        return name
    raise ValueError(f"unsupported activation module {type(act).__name__}; expected ReLU, SiLU or Identity")


def is_activation(module: nn.Module) -> bool:
    return any(_plain_forward(module, t) for t in ACTIVATION_TYPES if t is not nn.Identity)


def _padding3d(conv: nn.Module, ndim: int) -> tuple[tuple[int, ...], str | None]:
    """The conv's padding as 3 ints, and why fused kernels cannot express it (or None); where they
    cannot, the ints still give the right output size for validation."""
    reason = None if conv.padding_mode == "zeros" else f"padding_mode={conv.padding_mode!r}"
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * ndim
        else:  # "same": symmetric only when every dilated kernel extent is even
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(t % 2 for t in total):
                reason = reason or "asymmetric padding='same'"
            padding = tuple((t + 1) // 2 for t in total)
    return ((0,) if ndim == 2 else ()) + tuple(padding), reason


def _blocker(conv, bn, act, ndim) -> str | None:
    """Why this site must run as separate modules, or None."""
    _, reason = _padding3d(conv, ndim)
    if reason:
        return reason
    if hooked(conv, bn, act):
        return "hooks are registered on its modules"
    return None


def sync_group(bn: _BatchNorm) -> str:
    """The name of the process group whose ranks' batches ``bn``'s statistics span now: a
    SyncBatchNorm in training with a process group of several ranks, as nn.SyncBatchNorm decides;
    else ""."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available()
            and dist.is_initialized()):
        return ""
    group = bn.process_group or dist.group.WORLD
    return sync_stats.group_name(group) if dist.get_world_size(group) > 1 else ""


def bn_momentum(bn: _BatchNorm) -> float | Tensor:
    """The exponential-average factor, counting the batch like _BatchNorm.forward does. For the
    cumulative average (momentum=None) that is 1 / num_batches_tracked, kept on the BN's device
    as a 0-dim tensor: reading the count on the host would wait for the GPU and break CUDA-graph
    capture (r21d._op_common.update_running_stats applies it)."""
    if not (bn.training and bn.track_running_stats):
        return 0.0 if bn.momentum is None else bn.momentum
    # (a plain BatchNorm's buffers, read without nn.Module.__getattr__)
    buffers = bn._buffers if plain_bn(type(bn)) else None
    count = buffers.get("num_batches_tracked") if buffers is not None else bn.num_batches_tracked
    if count is None:
        return 0.0 if bn.momentum is None else bn.momentum
    count.add_(1)
    if bn.momentum is None:
        running_mean = buffers["running_mean"] if buffers is not None else bn.running_mean
        # (running statistics removed by hand: the factor updates nothing, its dtype is moot)
        dtype = running_mean.dtype if running_mean is not None else torch.float32
        return torch.reciprocal(count.to(dtype))
    return bn.momentum


def _as_3d(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.unsqueeze(2) if t is not None else None


def uses_batch_stats(bn: _BatchNorm) -> bool:
    """BatchNorm normalises with batch statistics in training, or when it tracks none."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def site_config(conv: nn.Module, bn: _BatchNorm, act: Optional[nn.Module], *,
                dtype: torch.dtype | None = None, device=None) -> tuple[FusedConfig, str | None]:
    """The 3D configuration a site runs with (by default in its parameters' dtype and device; a
    Conv2d site is a 3D one with T = 1), and its blocker (see :func:`_blocker`)."""
    ndim = 2 if isinstance(conv, nn.Conv2d) else 3
    lift = (1,) if ndim == 2 else ()
    kernel = lift + tuple(conv.kernel_size)
    padding, _ = _padding3d(conv, ndim)
    cfg = FusedConfig(
        family=conv_family(kernel, conv.groups, conv.in_channels, conv.out_channels),
        kernel_size=kernel, stride=lift + tuple(conv.stride), padding=padding,
        dilation=lift + tuple(conv.dilation), groups=conv.groups,
        dtype=dtype or conv.weight.dtype,
        device_type=torch.device(device if device is not None else conv.weight.device).type,
        training=uses_batch_stats(bn), activation=activation_name(act), residual=False,
        sync_stats=bool(sync_group(bn)),
    )
    return cfg, _blocker(conv, bn, act, ndim)


def site_geometry(conv: nn.Module) -> tuple[tuple, tuple, tuple, str | None]:
    """(stride, padding, dilation) of the conv as 3D triples (a Conv2d's with a leading 1), and
    why fused kernels cannot express its padding (or None)."""
    ndim = 2 if isinstance(conv, nn.Conv2d) else 3
    lift = (1,) if ndim == 2 else ()
    padding, reason = _padding3d(conv, ndim)
    return lift + tuple(conv.stride), padding, lift + tuple(conv.dilation), reason


def _site_tensors(conv: nn.Module, bn: _BatchNorm) -> tuple:
    """(weight, bias, bn weight, bn bias, running mean, running var) as the modules give them."""
    return conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var


def site_signature(conv, bn, act, x, residual) -> tuple[tuple, tuple] | None:
    """(signature, tensors) of a call of the site, or None where its plan may not be cached
    (conv or BN classes that keep their tensors elsewhere than nn.Module does, see
    r21d.plan_cache.conv_kind, tensor subclasses, hooks).

    The signature holds what :func:`_plan_site` reads: the modules' types, geometry and modes,
    the shape, strides, dtype, device and requires_grad of ``x`` and ``residual``, the shape,
    dtype, device (and requires_grad) of every parameter and buffer, grad mode, the requested
    backend, autocast's state, the SyncBatchNorm's process group, and in training (where the
    running statistics are written in place) the addresses and strides the in-place check saw.
    ``tensors``: the site's (weight, bias, bn weight, bn bias, running mean, running var), read
    once for the call."""
    if (conv_kind(type(conv)) is None or not plain_bn(type(bn))
            or type(x) is not Tensor or (residual is not None and type(residual) is not Tensor)
            or hooked(conv, bn, act)):
        return None
    params, bn_params, buffers = conv._parameters, bn._parameters, bn._buffers
    try:
        w, b = params["weight"], params["bias"]
        bn_weight, bn_bias = bn_params["weight"], bn_params["bias"]
        rm, rv = buffers["running_mean"], buffers["running_var"]
    except KeyError:  # a removed parameter (weight_norm's, say): not a plain module any more
        return None
    if w is None:
        return None
    device = x.device
    training, track = bn.training, bn.track_running_stats
    grad = torch.is_grad_enabled()
    key = (
        type(conv), type(bn), type(act), conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.padding_mode, training, track, grad,
        x.shape, x.stride(), x.dtype, device,
        w.shape, w.dtype, w.device,
        None if b is None else (b.shape, b.dtype, b.device),
        None if bn_weight is None else (bn_weight.shape, bn_weight.dtype, bn_weight.device),
        None if bn_bias is None else (bn_bias.shape, bn_bias.dtype, bn_bias.device),
        None if rm is None else (rm.shape, rm.dtype, rm.device),
        None if rv is None else (rv.shape, rv.dtype, rv.device),
        None if residual is None else (residual.shape, residual.stride(), residual.dtype,
                                       residual.device),
        backends.get_backend(), autocast_state(device), sync_group(bn),
        tuple(dispatch._DEVICE_CHECKS.values()),
    )
    if grad:  # requires_grad decides whether the op keeps what backward needs
        key += (x.requires_grad, w.requires_grad, b is not None and b.requires_grad,
                bn_weight is not None and bn_weight.requires_grad,
                bn_bias is not None and bn_bias.requires_grad,
                residual is not None and residual.requires_grad)
    if training and track and rm is not None:
        key += tuple((t.data_ptr(), t.stride()) if t is not None else None
                     for t in (w, b, bn_weight, bn_bias, rm, rv))
    return key, (w, b, bn_weight, bn_bias, rm, rv)


class SitePlan:
    """A site call planned by the checked path: ``torch`` (the modules run themselves) or the
    fused op's call with its static arguments. ``key``: the signature it was planned for (None:
    not to be reused); ``spans``: in training, the running statistics' byte ranges, which the
    input and residual must not overlap (checked each call, like functional.plan does)."""

    __slots__ = ("key", "torch", "two_d", "call", "static", "cast_dtype", "autocast", "track",
                 "spans", "x_extent", "residual_extent")

    def __init__(self, key, *, torch_path: bool, two_d: bool = False, call=None, static=None,
                 cast_dtype=None, autocast: bool = False, track: bool = True, spans=None,
                 x_extent: int = 0, residual_extent: int = 0):
        self.key = key
        self.torch = torch_path
        self.two_d = two_d
        self.call = call
        self.static = static
        self.cast_dtype = cast_dtype
        self.autocast = autocast
        self.track = track
        self.spans = spans
        self.x_extent = x_extent
        self.residual_extent = residual_extent

    def overlaps(self, x: Tensor, residual: Optional[Tensor]) -> bool:
        """Whether this call's input or residual shares memory with the running statistics."""
        if self.spans is None:
            return False
        start = x.data_ptr()
        if overlaps(start, start + self.x_extent, self.spans):
            return True
        if residual is not None:
            start = residual.data_ptr()
            return overlaps(start, start + self.residual_extent, self.spans)
        return False

    def run(self, conv, bn, act, x, residual, tensors) -> Tensor:
        if self.torch:
            y = bn(conv(x))
            if residual is not None:
                y = y + residual
            return act(y) if act is not None else y
        w, b, bn_weight, bn_bias, rm, rv = tensors
        if self.two_d:
            x, w = x.unsqueeze(2), w.unsqueeze(2)
            residual = residual.unsqueeze(2) if residual is not None else None
        if not self.track:
            rm = rv = None
        momentum = bn_momentum(bn)  # counts the batch, every call
        if not isinstance(momentum, Tensor):
            momentum = float(momentum)
        cast = self.cast_dtype
        if cast is not None:  # autocast casts the conv's inputs like F.conv3d does
            x, w = x.to(cast), w.to(cast)
            b = b.to(cast) if b is not None else None
        if self.autocast:
            with torch.autocast(x.device.type, enabled=False):
                y = self.call.run(self.static, x, w, b, bn_weight, bn_bias, rm, rv, residual, momentum,
                                  float(bn.eps))
        else:
            y = self.call.run(self.static, x, w, b, bn_weight, bn_bias, rm, rv, residual, momentum,
                              float(bn.eps))
        return y.squeeze(2) if self.two_d else y


def _plan_site(conv, bn, act, x, residual, tensors, key) -> SitePlan:
    """The checked path: validate the call (errors name the argument), choose the backend (the
    one-time fallback warning, or the strict-mode error), and plan it. The plan keeps ``key``
    where it may be reused (no fallback)."""
    two_d = isinstance(conv, nn.Conv2d)
    if two_d and x.dim() != 4:
        raise ValueError(f"{type(conv).__name__} site expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    lift = _as_3d if two_d else (lambda t: t)
    w, b, bn_weight, bn_bias, rm, rv = tensors
    stride, padding, dilation, blocker = site_geometry(conv)
    if blocker is None and hooked(conv, bn, act):
        blocker = "hooks are registered on its modules"
    training = bn.training or (rm is None and rv is None)  # uses_batch_stats
    track = not bn.training or bn.track_running_stats
    running_mean, running_var = (rm, rv) if track else (None, None)
    x3, residual3 = lift(x), lift(residual)
    p = functional.plan(
        x3, lift(w), b, bn_weight, bn_bias, running_mean, running_var,
        stride=stride, padding=padding, dilation=dilation, groups=conv.groups,
        training=training, activation=activation_name(act), residual=residual3, blocker=blocker,
        sync_group=sync_group(bn),
    )
    if p.fallback is not None:
        key = None
    if p.backend == "torch":
        return SitePlan(key, torch_path=True)
    call = functional.fused_call(p)
    cfg = p.config
    static = call.static_args(
        stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation, training=cfg.training,
        activation=cfg.activation,
        save=functional.save_for_backward(x, w, b, bn_weight, bn_bias, residual), sync_group=p.sync_group)
    spans = x_extent = residual_extent = None
    if key is not None and cfg.training and running_mean is not None:
        # the addresses functional.plan checked (for the cached plan to check each call; none
        # under torch.compile, where nothing is cached and fake tensors have no addresses)
        spans = (byte_span(running_mean), byte_span(running_var))
        x_extent = _extent(x3)
        residual_extent = _extent(residual3) if residual3 is not None else 0
    return SitePlan(key, torch_path=False, two_d=two_d, call=call, static=static,
                    cast_dtype=p.cast_dtype, autocast=torch.is_autocast_enabled(x.device.type),
                    track=track, spans=spans, x_extent=x_extent or 0,
                    residual_extent=residual_extent or 0)


def _extent(t: Tensor) -> int:
    start, stop = byte_span(t)
    return stop - start


def run_site(conv: nn.Module, bn: _BatchNorm, act: Optional[nn.Module], x: Tensor,
             residual: Optional[Tensor] = None, slot: Optional[PlanSlot] = None) -> Tensor:
    """``act(bn(conv(x)) + residual)``, fused where the selected backend can. With a ``slot``
    (the caller's, one per site), the plan is kept there and reused while the call's signature
    stays the same."""
    if slot is not None and not torch.compiler.is_compiling():
        found = site_signature(conv, bn, act, x, residual)
        if found is not None:
            key, tensors = found
            plan = slot.plan
            if plan is None or plan.key != key or plan.overlaps(x, residual):
                slot.plan = None
                plan = _plan_site(conv, bn, act, x, residual, tensors, key)
                if plan.key is not None:
                    slot.plan = plan
            return plan.run(conv, bn, act, x, residual, tensors)
    tensors = _site_tensors(conv, bn)
    return _plan_site(conv, bn, act, x, residual, tensors, None).run(conv, bn, act, x, residual,
                                                                      tensors)
