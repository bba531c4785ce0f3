"""The (2+1)D unit as one fused call: spatial conv (1 x kh x kw) -> BN -> ReLU -> temporal conv
(kt x 1 x 1) -> BN [+ residual] -> activation.

In eval mode (both BNs normalise with their running statistics) with no gradient wanted, the unit
runs as one kernel, ``r21d::conv2plus1d_bn_act``, and the intermediate never reaches memory. In
training (both BNs with batch statistics) it runs as ``r21d::conv2plus1d_bn_act_train``: two
chained kernels, the intermediate's BN + ReLU applied as the temporal conv loads it, so the
normalised intermediate is never written nor kept for backward. Otherwise (one BN in each mode,
gradients through an eval-mode unit, or an output too wide for the one kernel to pay, see
UNIT_BLOCK_N) it runs as its two fused sites (r21d.fused_site), each with its kernel and autograd.
A unit the kernels do not cover (see ``dispatch.unit_geometry_reason`` and
``dispatch.unit_train_reason``) also runs as two sites, with the one-time fallback warning (an
error under R21D_STRICT=1).

Given a :class:`r21d.plan_cache.PlanSlot`, :func:`run_unit` keeps the unit's plan
(:class:`UnitPlan`: which way it runs, and the op's static arguments) there and reuses it while
the call's signature (:func:`unit_signature`) stays the same.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import backends, dispatch, functional, unit_ops
from ._op_common import (
    implementation,
    needs_grad,
    op_momentum,
    out_size,
    unobserved,
    update_running_stats,
)
from .fused_site import (
    activation_name,
    bn_momentum,
    conv_base,
    is_batchnorm_for,
    run_site,
    site_config,
    site_geometry,
    sync_group,
    uses_batch_stats,
)
from .plan_cache import PlanSlot, autocast_state, byte_span, conv_kind, hooked, overlaps, plain_bn

UNIT_KERNEL = "conv2plus1d"
UNIT_TRAIN_KERNEL = "conv2plus1d-train"
UNIT_KERNELS = (UNIT_KERNEL, UNIT_TRAIN_KERNEL)

# The one kernel recomputes the spatial conv for every UNIT_BLOCK_N output channels (its
# programs' output tile on a GPU); the two sites instead write the intermediate and read it
# back. It runs where the recompute costs less than that round trip at an H100's balance
# (FLOPS_PER_BYTE: its bf16 tensor-core rate over its copy bandwidth, docs/benchmarks.md): in r2plus1d_18, the
# stem and the layer1 units (64 output channels, the largest intermediates).
UNIT_BLOCK_N = 64
FLOPS_PER_BYTE = 230


def unit_children(module: nn.Module) -> tuple[nn.Module, ...] | None:
    """(spatial_conv, bn, relu, temporal_conv) of a sequential laid out like torchvision's
    Conv2Plus1D (a 1xkxk Conv3d, its BatchNorm, a ReLU, a kx1x1 Conv3d), or None."""
    if not isinstance(module, nn.Sequential) or len(module) != 4:
        return None
    spatial, bn, relu, temporal = module
    if conv_base(spatial) is not nn.Conv3d or conv_base(temporal) is not nn.Conv3d:
        return None
    if spatial.kernel_size[0] != 1 or temporal.kernel_size[1:] != (1, 1):
        return None
    if not is_batchnorm_for(bn, spatial) or temporal.in_channels != spatial.out_channels:
        return None
    try:
        if activation_name(relu) != "relu":
            return None
    except ValueError:
        return None
    return spatial, bn, relu, temporal


def inline_unit(children: list[nn.Module], i: int) -> tuple[nn.Module, ...] | None:
    """(spatial_conv, bn1, relu, temporal_conv, bn2) when children i..i+4 of a sequential are a
    (2+1)D factorisation written out, as in torchvision's R2Plus1dStem: a 1xkxk Conv3d (k > 1),
    its BN, a ReLU, a tx1x1 Conv3d (t > 1) and its BN; else None."""
    if i + 5 > len(children):
        return None
    parts = unit_children(nn.Sequential(*children[i:i + 4]))
    if parts is None or parts[0].kernel_size[1:] == (1, 1) or parts[3].kernel_size[0] == 1:
        return None
    if not is_batchnorm_for(children[i + 4], parts[3]):
        return None
    return (*parts, children[i + 4])


def recompute_reason(spatial: nn.Conv3d, temporal: nn.Conv3d) -> str | None:
    """Why the two sites are faster than the one kernel for this unit (see UNIT_BLOCK_N; costed
    with a 16-bit intermediate, for which the kernels are tuned), or None."""
    blocks = -(-temporal.out_channels // UNIT_BLOCK_N)
    # per intermediate element: the spatial conv's FLOPs recomputed by the other output blocks,
    # against the bytes of writing it and reading it back
    extra_flops = (blocks - 1) * 2 * spatial.in_channels * spatial.kernel_size[1] * spatial.kernel_size[2]
    if extra_flops <= FLOPS_PER_BYTE * 2 * 2:
        return None
    return (f"{temporal.out_channels} output channels: the one kernel would recompute the spatial "
            f"conv {blocks} times; writing the intermediate once costs less")


def _wants_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@dataclasses.dataclass(frozen=True)
class UnitChoice:
    """How a unit runs: ``kernel`` "conv2plus1d" (one launch), "conv2plus1d-train" (two chained
    launches) or "sites" (two fused sites, or their fallbacks); ``reason`` says why not one of
    the unit's kernels where it was eligible."""

    kernel: str
    reason: str | None


def _training(bn1, bn2) -> bool | str:
    """True (both BNs with batch statistics), False (both with running statistics), or why the
    unit runs as two sites by design (one in each mode)."""
    train1, train2 = uses_batch_stats(bn1), uses_batch_stats(bn2)
    if train1 != train2:
        return "one BN normalises with batch statistics, the other with running statistics"
    return train1


def _eligible_reason(spatial, bn1, relu, temporal, bn2) -> str | None:
    """Why the unit runs as two sites by design (BNs in different modes, a middle activation
    other than ReLU, or in eval an output wide enough that the intermediate's round trip is
    cheaper), or None."""
    training = _training(bn1, bn2)
    if isinstance(training, str):
        return training
    if activation_name(relu) != "relu":
        return "the unit kernels apply ReLU between the convs"
    if sync_group(bn1) != sync_group(bn2):
        return "its BNs reduce batch statistics over different process groups"
    return None if training else recompute_reason(spatial, temporal)


def _unit_reason(spatial, bn1, relu, temporal, bn2, act, dtype, device_type, residual) -> str | None:
    """Why the unit's kernel for its mode cannot run it, or None (no warnings)."""
    cfg1, blocker1 = site_config(spatial, bn1, relu, dtype=dtype, device=device_type)
    cfg2, blocker2 = site_config(temporal, bn2, act, dtype=dtype, device=device_type)
    cfg2 = dataclasses.replace(cfg2, residual=residual)
    return _pair_reason(((cfg1, blocker1), (cfg2, blocker2)))


def _pair_reason(sites) -> str | None:
    """Why the unit's kernel for its mode cannot run the (spatial, temporal) pair of
    ``(config, blocker)``, or None (no warnings)."""
    for cfg, blocker in sites:
        backend, reason = dispatch.resolve(cfg, blocker)
        if backend != "triton":
            return reason or f"the {backend} backend runs its {cfg.family} conv"
    (cfg1, _), (cfg2, _) = sites
    if cfg1.training:
        return dispatch.unit_train_reason(cfg1, cfg2)
    return dispatch.unit_geometry_reason(cfg1, cfg2)


def choose_unit(spatial, bn1, relu, temporal, bn2, act, *, dtype=None, device=None,
                residual: bool = False) -> UnitChoice:
    """How the unit would run in its modules' current mode (no gradients in eval), for the
    fusion report."""
    dtype = dtype or spatial.weight.dtype
    device_type = torch.device(device if device is not None else spatial.weight.device).type
    reason = _eligible_reason(spatial, bn1, relu, temporal, bn2) or _unit_reason(
        spatial, bn1, relu, temporal, bn2, act, dtype, device_type, residual)
    if reason:
        return UnitChoice("sites", reason)
    return UnitChoice(UNIT_TRAIN_KERNEL if uses_batch_stats(bn1) else UNIT_KERNEL, None)


def _running_stats(bn: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The running statistics the site would use and update (as r21d.fused_site.run_site)."""
    if bn.training and not bn.track_running_stats:
        return None, None
    return bn.running_mean, bn.running_var


def _takes_residual(residual, shape, dtype, device) -> bool:
    """The unit kernels take a residual of the output's shape, dtype and device; any other runs
    through the temporal site, which validates it (and promotes like PyTorch)."""
    return residual is None or (isinstance(residual, Tensor) and residual.dtype == dtype
                                and residual.device == device and tuple(residual.shape) == shape)


def _geometry(conv: nn.Module) -> tuple:
    return (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.padding_mode, conv.in_channels, conv.out_channels)


def unit_signature(spatial, bn1, relu, temporal, bn2, act, x, residual) -> tuple[tuple, tuple] | None:
    """(signature, tensors) of a call of the unit, or None where its plan may not be cached; as
    r21d.fused_site.site_signature for the unit's six modules. ``tensors``: each conv's (weight,
    bias) and each BN's (weight, bias, running mean, running var), read once for the call."""
    if (conv_kind(type(spatial)) is not False or conv_kind(type(temporal)) is not False
            or not plain_bn(type(bn1)) or not plain_bn(type(bn2))
            or type(x) is not Tensor or (residual is not None and type(residual) is not Tensor)
            or hooked(spatial, bn1, relu, temporal, bn2, act)):
        return None
    p1, q1, r1 = spatial._parameters, bn1._parameters, bn1._buffers
    p2, q2, r2 = temporal._parameters, bn2._parameters, bn2._buffers
    try:
        tensors = (p1["weight"], p1["bias"], q1["weight"], q1["bias"], r1["running_mean"],
                   r1["running_var"], p2["weight"], p2["bias"], q2["weight"], q2["bias"],
                   r2["running_mean"], r2["running_var"])
    except KeyError:
        return None
    w1, b1, g1, be1, rm1, rv1, w2, b2, g2, be2, rm2, rv2 = tensors
    if w1 is None or w2 is None:
        return None
    device = x.device
    grad = torch.is_grad_enabled()
    key = (
        type(spatial), type(temporal), type(bn1), type(bn2), type(relu), type(act),
        _geometry(spatial), _geometry(temporal),
        bn1.training, bn1.track_running_stats, bn2.training, bn2.track_running_stats, grad,
        x.shape, x.stride(), x.dtype, device,
        None if residual is None else (residual.shape, residual.stride(), residual.dtype,
                                       residual.device),
        *((t.shape, t.dtype, t.device) if t is not None else None for t in tensors),
        backends.get_backend(), autocast_state(device), sync_group(bn1), sync_group(bn2),
        tuple(dispatch._DEVICE_CHECKS.values()),
    )
    if grad:  # requires_grad decides whether the unit runs fused and what it keeps
        key += (x.requires_grad, residual is not None and residual.requires_grad,
                *(t is not None and t.requires_grad for t in tensors))
    if bn1.training and bn1.track_running_stats and rm1 is not None:
        key += tuple((t.data_ptr(), t.stride()) if t is not None else None
                     for t in (w1, b1, g1, be1, rm1, rv1))
    return key, tensors


SITES, EVAL, TRAIN = "sites", UNIT_KERNEL, UNIT_TRAIN_KERNEL


class UnitPlan:
    """How a unit call runs: ``kind`` SITES (its two fused sites, each with its own plan), EVAL
    (``r21d::conv2plus1d_bn_act``) or TRAIN (``r21d::conv2plus1d_bn_act_train``), with the op's
    static arguments. ``key``: the signature it was planned for (None: not to be reused);
    ``spans``: in training, the first BN's running statistics' byte ranges, which the input must
    not overlap (checked each call, like functional.plan does)."""

    __slots__ = ("key", "kind", "cast_dtype", "autocast", "static", "spans", "x_extent")

    def __init__(self, key, kind: str, *, cast_dtype=None, autocast: bool = False, static=(),
                 spans=None, x_extent: int = 0):
        self.key = key
        self.kind = kind
        self.cast_dtype = cast_dtype
        self.autocast = autocast
        self.static = static
        self.spans = spans
        self.x_extent = x_extent

    def overlaps(self, x: Tensor) -> bool:
        if self.spans is None:
            return False
        start = x.data_ptr()
        return overlaps(start, start + self.x_extent, self.spans)

    def run(self, spatial, bn1, relu, temporal, bn2, act, x, residual, tensors,
            slot: Optional[PlanSlot]) -> Tensor:
        if self.kind == SITES:
            y = run_site(spatial, bn1, relu, x, slot=slot.child(0) if slot is not None else None)
            return run_site(temporal, bn2, act, y, residual,
                            slot=slot.child(1) if slot is not None else None)
        w1, b1, g1, be1, rm1, rv1, w2, b2, g2, be2, rm2, rv2 = tensors
        cast = self.cast_dtype
        if cast is not None:  # autocast casts the convs' inputs like F.conv3d does
            x, w1, w2 = x.to(cast), w1.to(cast), w2.to(cast)
            b1 = b1.to(cast) if b1 is not None else None
            b2 = b2.to(cast) if b2 is not None else None
        if self.autocast:
            with torch.autocast(x.device.type, enabled=False):
                return self._call(bn1, bn2, x, w1, b1, g1, be1, rm1, rv1, w2, b2, g2, be2, rm2,
                                  rv2, residual)
        return self._call(bn1, bn2, x, w1, b1, g1, be1, rm1, rv1, w2, b2, g2, be2, rm2, rv2,
                          residual)

    def _call(self, bn1, bn2, x, w1, b1, g1, be1, rm1, rv1, w2, b2, g2, be2, rm2, rv2, residual):
        if self.kind == EVAL:
            return implementation("r21d::conv2plus1d_bn_act", x, w1, b1, g1, be1, rm1, rv1, w2,
                                  b2, g2, be2, rm2, rv2, residual)(
                x, w1, b1, g1, be1, rm1, rv1, float(bn1.eps), w2, b2, g2, be2, rm2, rv2,
                float(bn2.eps), residual, *self.static)
        # training: nn.BatchNorm's counting and momentum, as r21d.fused_site.run_site
        track1 = not bn1.training or bn1.track_running_stats  # as _running_stats
        track2 = not bn2.training or bn2.track_running_stats
        rm1, rv1 = (rm1, rv1) if track1 else (None, None)
        rm2, rv2 = (rm2, rv2) if track2 else (None, None)
        momentum1, momentum2 = bn_momentum(bn1), bn_momentum(bn2)
        geometry, tail = self.static
        # float momenta: the statistics kernels may update the running statistics in place
        in_place = not (isinstance(momentum1, torch.Tensor) or isinstance(momentum2, torch.Tensor))
        if needs_grad(x, w1, b1, g1, be1, w2, b2, g2, be2, residual):
            op = (unit_ops.TRAIN_IN_PLACE if in_place else unit_ops.TRAIN_DIFFERENTIABLE).apply
        elif in_place and unobserved(x, w1, b1, g1, be1, rm1, rv1, w2, b2, g2, be2, rm2, rv2,
                                     residual):
            op = unit_ops.train_in_place
        else:
            op = implementation("r21d::conv2plus1d_bn_act_train", x, w1, b1, g1, be1, rm1, rv1,
                                w2, b2, g2, be2, rm2, rv2, residual)
        out, *_saved, new_rm1, new_rv1, new_rm2, new_rv2 = op(
            x, w1, b1, g1, be1, rm1, rv1, op_momentum(momentum1), float(bn1.eps),
            w2, b2, g2, be2, rm2, rv2, op_momentum(momentum2), float(bn2.eps), residual,
            *geometry, *tail)
        for running, new, momentum in ((rm1, new_rm1, momentum1), (rv1, new_rv1, momentum1),
                                       (rm2, new_rm2, momentum2), (rv2, new_rv2, momentum2)):
            if new.numel():
                update_running_stats(running, new, momentum)
        return out


def _unit_tensors(spatial, bn1, temporal, bn2) -> tuple:
    return (spatial.weight, spatial.bias, bn1.weight, bn1.bias, bn1.running_mean,
            bn1.running_var, temporal.weight, temporal.bias, bn2.weight, bn2.bias,
            bn2.running_mean, bn2.running_var)


def _plan_unit(spatial, bn1, relu, temporal, bn2, act, x, residual, tensors, key) -> UnitPlan:
    """The checked path: how the unit runs (validating ``x`` against the spatial conv and
    choosing its backend: a warning or the strict-mode error where it falls back), planned. The
    plan keeps ``key`` where it may be reused (no fallback)."""
    params = [p for m in (spatial, bn1, temporal, bn2) for p in m.parameters(recurse=False)]
    wants_grad = _wants_grad([x, residual, *params])
    training = _training(bn1, bn2)
    if _eligible_reason(spatial, bn1, relu, temporal, bn2) or (wants_grad and not training):
        return UnitPlan(key, SITES)
    w1, b1, g1, be1, _rm1, _rv1, *_ = tensors
    stride1, padding1, dilation1, blocker1 = site_geometry(spatial)
    if blocker1 is None and hooked(spatial, bn1, relu):
        blocker1 = "hooks are registered on its modules"
    rm1, rv1 = _running_stats(bn1)
    # x validated against the spatial conv, and its backend chosen (a warning or strict error)
    p = functional.plan(x, w1, b1, g1, be1, rm1, rv1, stride=stride1, padding=padding1,
                        dilation=dilation1, groups=spatial.groups, training=training,
                        activation="relu", blocker=blocker1, sync_group=sync_group(bn1))
    if p.fallback is not None:
        key = None
    if p.backend != "triton":
        return UnitPlan(key, SITES)
    dtype = p.cast_dtype or x.dtype
    cfg1 = p.config
    cfg2, blocker2 = site_config(temporal, bn2, act, dtype=dtype, device=x.device.type)
    cfg2 = dataclasses.replace(cfg2, residual=residual is not None)
    N, _, *sizes = p.output_shape
    out_shape = (N, temporal.out_channels, *(
        out_size(n, k, s, pad, d) for n, k, s, pad, d in
        zip(sizes, cfg2.kernel_size, cfg2.stride, cfg2.padding, cfg2.dilation)))
    if not _takes_residual(residual, out_shape, dtype, x.device) or min(out_shape[2:]) < 1 \
            or (training and math.prod(out_shape) // out_shape[1] <= 1):
        return UnitPlan(key, SITES)  # the temporal site raises or runs what the kernels do not take
    reason = _pair_reason(((cfg1, blocker1), (cfg2, blocker2)))
    if reason:
        backends.fallback(f"(2+1)D unit {cfg1.describe()} -> {cfg2.describe()}", reason,
                          instead="its two fused sites")
        return UnitPlan(None, SITES)

    autocast = torch.is_autocast_enabled(x.device.type)
    activation = activation_name(act) or "none"
    if not training:
        (st, _, _), (pt, _, _) = cfg2.stride, cfg2.padding
        return UnitPlan(key, EVAL, cast_dtype=p.cast_dtype, autocast=autocast,
                        static=(list(cfg1.stride[1:]), list(cfg1.padding[1:]), st, pt, activation))
    geometry = (list(cfg1.stride), list(cfg1.padding), list(cfg1.dilation),
                list(cfg2.stride), list(cfg2.padding), list(cfg2.dilation))
    spans = x_extent = None
    if key is not None and rm1 is not None:  # the addresses functional.plan checked (none
        # under torch.compile, where nothing is cached and fake tensors have no addresses)
        spans = (byte_span(rm1), byte_span(rv1))
        start, stop = byte_span(x)
        x_extent = stop - start
    return UnitPlan(key, TRAIN, cast_dtype=p.cast_dtype, autocast=autocast,
                    static=(geometry, (activation, wants_grad, sync_group(bn1))),
                    spans=spans, x_extent=x_extent or 0)


def run_unit(spatial: nn.Conv3d, bn1: nn.Module, relu: nn.Module, temporal: nn.Conv3d,
             bn2: nn.Module, act: Optional[nn.Module], x: Tensor,
             residual: Optional[Tensor] = None, slot: Optional[PlanSlot] = None) -> Tensor:
    """``act(bn2(temporal(relu(bn1(spatial(x))))) [+ residual])``, with the unit's kernels where
    they may run. With a ``slot`` (the caller's, one per unit), the plan is kept there and
    reused while the call's signature stays the same."""
    modules = (spatial, bn1, relu, temporal, bn2, act)
    if slot is not None and not torch.compiler.is_compiling():
        found = unit_signature(*modules, x, residual)
        if found is not None:
            key, tensors = found
            plan = slot.plan
            if plan is None or plan.key != key or plan.overlaps(x):
                slot.plan = None
                plan = _plan_unit(*modules, x, residual, tensors, key)
                if plan.key is not None:
                    slot.plan = plan
            return plan.run(*modules, x, residual, tensors, slot)
    tensors = _unit_tensors(spatial, bn1, temporal, bn2)
    return _plan_unit(*modules, x, residual, tensors, None).run(*modules, x, residual, tensors,
                                                                None)
