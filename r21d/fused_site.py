"""One fused site: a conv module, its BatchNorm module and an activation module, run as one op.

Every r21d module and every site ``fuse()`` creates runs through :func:`run_site`, which keeps
``nn.BatchNorm`` semantics exactly (num_batches_tracked, momentum=None, track_running_stats,
affine) and, where no fused kernel may run the site, calls the modules themselves, so the torch
path is plain PyTorch, hooks and all.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional
from .dispatch import FusedConfig, conv_family
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


def activation_name(act: Optional[nn.Module]) -> str | None:
    """"relu" / "silu" / None for a supported activation module (None for no module)."""
    if act is None:
        return None
    for t, name in ACTIVATION_TYPES.items():
        if _plain_forward(act, t):
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


def hooked(*modules: Optional[nn.Module]) -> bool:
    """Hooks would be skipped by a fused call: on these modules, or global module hooks."""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks or M._global_backward_hooks \
            or M._global_backward_pre_hooks:
        return True
    return any(
        m is not None and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                           or m._backward_pre_hooks)
        for m in modules
    )


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
    capture (r21d.ops.update_running_stats applies it)."""
    if not (bn.training and bn.track_running_stats and bn.num_batches_tracked is not None):
        return 0.0 if bn.momentum is None else bn.momentum
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return torch.reciprocal(bn.num_batches_tracked.to(bn.running_mean.dtype))
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


def run_site(conv: nn.Module, bn: _BatchNorm, act: Optional[nn.Module], x: Tensor,
             residual: Optional[Tensor] = None) -> Tensor:
    """``act(bn(conv(x)) + residual)``, fused where the selected backend can."""
    cfg, blocker = site_config(conv, bn, act)
    track = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if track else None
    running_var = bn.running_var if track else None
    two_d = isinstance(conv, nn.Conv2d)
    if two_d and x.dim() != 4:
        raise ValueError(f"{type(conv).__name__} site expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    lift = _as_3d if two_d else (lambda t: t)

    p = functional.plan(
        lift(x), lift(conv.weight), conv.bias, bn.weight, bn.bias, running_mean, running_var,
        stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation, groups=conv.groups,
        training=cfg.training, activation=cfg.activation, residual=lift(residual), blocker=blocker,
        sync_group=sync_group(bn),
    )
    if p.backend == "torch":
        y = bn(conv(x))
        if residual is not None:
            y = y + residual
        return act(y) if act is not None else y
    y = functional.run(
        p, lift(x), lift(conv.weight), conv.bias, bn.weight, bn.bias, running_mean, running_var,
        momentum=bn_momentum(bn), eps=bn.eps, residual=lift(residual))
    return y.squeeze(2) if two_d else y
