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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import backends, dispatch, functional
from .fused_site import (activation_name, bn_momentum, conv_base, is_batchnorm_for, run_site,
                         site_config, sync_group, uses_batch_stats)
from .ops import op_momentum, update_running_stats
from .triton_kernels._layout import out_size

UNIT_KERNEL = "conv2plus1d"
UNIT_TRAIN_KERNEL = "conv2plus1d-train"
UNIT_KERNELS = (UNIT_KERNEL, UNIT_TRAIN_KERNEL)

# The one kernel recomputes the spatial conv for every UNIT_BLOCK_N output channels (its
# programs' output tile on a GPU); the two sites instead write the intermediate and read it
# back. It runs where the recompute costs less than that round trip at an H100's balance
# (BASELINES.md: 688 TFLOP/s bf16 against 2.97 TB/s, ~230 FLOP per byte): in r2plus1d_18, the
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
    for cfg, blocker in ((cfg1, blocker1), (cfg2, blocker2)):
        backend, reason = dispatch.resolve(cfg, blocker)
        if backend != "triton":
            return reason or f"the {backend} backend runs its {cfg.family} conv"
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


def run_unit(spatial: nn.Conv3d, bn1: nn.Module, relu: nn.Module, temporal: nn.Conv3d,
             bn2: nn.Module, act: Optional[nn.Module], x: Tensor,
             residual: Optional[Tensor] = None) -> Tensor:
    """``act(bn2(temporal(relu(bn1(spatial(x))))) [+ residual])``, with the unit's kernels where
    they may run."""

    def two_sites() -> Tensor:
        y = run_site(spatial, bn1, relu, x)
        return run_site(temporal, bn2, act, y, residual)

    params = [p for m in (spatial, bn1, temporal, bn2) for p in m.parameters(recurse=False)]
    wants_grad = _wants_grad([x, residual, *params])
    training = _training(bn1, bn2)
    if _eligible_reason(spatial, bn1, relu, temporal, bn2) or (wants_grad and not training):
        return two_sites()
    cfg1, blocker1 = site_config(spatial, bn1, relu)
    cfg2, _ = site_config(temporal, bn2, act)
    rm1, rv1 = _running_stats(bn1)
    # x validated against the spatial conv, and its backend chosen (a warning or strict error)
    p = functional.plan(x, spatial.weight, spatial.bias, bn1.weight, bn1.bias, rm1, rv1,
                        stride=cfg1.stride, padding=cfg1.padding, dilation=cfg1.dilation,
                        groups=cfg1.groups, training=training, activation="relu",
                        blocker=blocker1, sync_group=sync_group(bn1))
    if p.backend != "triton":
        return two_sites()
    dtype = p.cast_dtype or x.dtype
    N, _, *sizes = p.output_shape
    out_shape = (N, temporal.out_channels, *(
        out_size(n, k, s, pad, d) for n, k, s, pad, d in
        zip(sizes, cfg2.kernel_size, cfg2.stride, cfg2.padding, cfg2.dilation)))
    if not _takes_residual(residual, out_shape, dtype, x.device) or min(out_shape[2:]) < 1 \
            or (training and math.prod(out_shape) // out_shape[1] <= 1):
        return two_sites()  # the temporal site raises or runs what the kernels do not take
    reason = _unit_reason(spatial, bn1, relu, temporal, bn2, act, dtype, x.device.type,
                          residual is not None)
    if reason:
        backends.fallback(f"(2+1)D unit {p.config.describe()} -> {cfg2.describe()}", reason,
                          instead="its two fused sites")
        return two_sites()

    w1, b1, w2, b2 = spatial.weight, spatial.bias, temporal.weight, temporal.bias
    if p.cast_dtype is not None:  # autocast casts the convs' inputs like F.conv3d does
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        b1 = b1.to(dtype) if b1 is not None else None
        b2 = b2.to(dtype) if b2 is not None else None
    with torch.autocast(x.device.type, enabled=False):
        if training:
            return _run_train(x, w1, b1, bn1, rm1, rv1, cfg1, w2, b2, bn2, cfg2, residual,
                              activation_name(act), wants_grad)
        (st, _, _), (pt, _, _) = cfg2.stride, cfg2.padding
        return torch.ops.r21d.conv2plus1d_bn_act(
            x, w1, b1, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, float(bn1.eps),
            w2, b2, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, float(bn2.eps),
            residual, list(cfg1.stride[1:]), list(cfg1.padding[1:]), st, pt,
            activation_name(act) or "none")


def _run_train(x, w1, b1, bn1, rm1, rv1, cfg1, w2, b2, bn2, cfg2, residual, activation, save):
    """The training unit op, with the running statistics copied back (nn.BatchNorm's counting
    and momentum, as r21d.fused_site.run_site)."""
    rm2, rv2 = _running_stats(bn2)
    momentum1, momentum2 = bn_momentum(bn1), bn_momentum(bn2)
    out, *_saved, new_rm1, new_rv1, new_rm2, new_rv2 = torch.ops.r21d.conv2plus1d_bn_act_train(
        x, w1, b1, bn1.weight, bn1.bias, rm1, rv1, op_momentum(momentum1), float(bn1.eps),
        w2, b2, bn2.weight, bn2.bias, rm2, rv2, op_momentum(momentum2), float(bn2.eps), residual,
        list(cfg1.stride), list(cfg1.padding), list(cfg1.dilation),
        list(cfg2.stride), list(cfg2.padding), list(cfg2.dilation), activation or "none", save,
        sync_group(bn1))
    for running, new, momentum in ((rm1, new_rm1, momentum1), (rv1, new_rv1, momentum1),
                                   (rm2, new_rm2, momentum2), (rv2, new_rv2, momentum2)):
        if new.numel():
            update_running_stats(running, new, momentum)
    return out
