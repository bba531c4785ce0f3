"""Which implementation runs one fused conv + BN + activation call.

A call is described by :class:`FusedConfig` (geometry, dtype, device, mode); :func:`choose` turns
the requested backend (r21d.backends) into the one that runs, falling back to ``torch`` (one
warning per configuration, or an error under R21D_STRICT=1) where a fused backend has no kernel.

The table of what each backend runs, :data:`FUSED_CALLS`, lives here and r21d.ops fills it when it
registers the ops: r21d.ops imports this module, never the other way round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import _extension, auto_choices, backends
from .triton_kernels._launch import interpreted
from .triton_kernels._limits import (
    DEPTHWISE_MAX_DILATION,
    DEPTHWISE_MAX_KERNEL,
    DEPTHWISE_STRIDES,
    GRID_YZ_MAX,
    UNIT_MAX_OPEN_FRAMES,
)

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (backend, conv family) -> the call that runs it (an r21d.ops.FusedCall): what the fused backends
# offer. Filled by r21d.ops when it registers the ops (importing r21d imports r21d.ops); r21d.ops
# re-exports the same dict as ``r21d.ops.FUSED_CALLS``.
FUSED_CALLS: dict[tuple[str, str], Callable] = {}

# conv family -> the qualified names (forward, backward) of the csrc ops behind the cuda
# backend's call for it (r21d._C defines their schemas; _cuda_reason checks that it has them).
CSRC_OPS: dict[str, tuple[str, str]] = {
    "depthwise": ("r21d::depthwise3d_conv_bn_act", "r21d::depthwise3d_conv_bn_act_backward"),
}


def csrc_ops_available(names) -> bool:
    """Whether r21d._C is loaded and defines the ops of qualified ``names``."""
    if not _extension.loaded():
        return False
    namespace = torch.ops.r21d
    return all(hasattr(namespace, name.split("::")[1]) for name in names)


def conv_family(kernel_size, groups: int, in_channels: int, out_channels: int) -> str:
    """The geometry class that picks the kernel family (docs/architecture.md, Modules)."""
    kt, kh, kw = kernel_size
    if groups > 1:
        return "depthwise" if groups == in_channels == out_channels else "grouped"
    if (kt, kh, kw) == (1, 1, 1):
        return "pointwise"
    if kt == 1:
        return "spatial"
    if kh == kw == 1:
        return "temporal"
    return "dense"


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    family: str
    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    groups: int
    dtype: torch.dtype
    device_type: str
    training: bool
    activation: str | None
    residual: bool
    sync_stats: bool = False  # a SyncBatchNorm's batch statistics span a process group's ranks

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        mode = "train" if self.training else "eval"
        dtype = str(self.dtype).replace("torch.", "")
        return (f"conv_bn_act3d[{self.family} {k} stride={self.stride} padding={self.padding} "
                f"dilation={self.dilation} groups={self.groups} {dtype} {self.device_type} {mode} "
                f"act={self.activation} residual={self.residual}{' sync-bn' if self.sync_stats else ''}]")


def _triton_reason(cfg: FusedConfig) -> str | None:
    if not backends.triton_installed():
        return "Triton is not installed"
    if cfg.device_type == "cpu":
        if not interpreted():
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU)"
        if cfg.dtype == torch.bfloat16:
            return "the Triton interpreter has no bf16 arithmetic"
    elif cfg.device_type != "cuda":
        return f"Triton kernels do not run on {cfg.device_type} tensors"
    return None


def _cuda_reason(cfg: FusedConfig) -> str | None:
    if not _extension.loaded():
        return _extension.unavailable_reason()
    if not csrc_ops_available(CSRC_OPS[cfg.family]):
        return f"r21d._C was built without the {cfg.family} ops; rebuild it (pip install --no-build-isolation -e .)"
    if cfg.device_type != "cuda":
        return "the csrc kernels need CUDA tensors"
    if cfg.sync_stats:
        return "the csrc kernels do not reduce SyncBatchNorm statistics across processes"
    return None




# The conv families the implicit-GEMM kernels run; they put groups and stride residue classes on
# grid axes y and z.
IMPLICIT_GEMM_FAMILIES = ("spatial", "temporal", "dense", "grouped")
IMPLICIT_GEMM_MAX_GRID = GRID_YZ_MAX




def unit_geometry_reason(spatial: FusedConfig, temporal: FusedConfig) -> str | None:
    """Why the eval-mode (2+1)D unit kernel cannot run this spatial -> temporal pair (which then
    runs as its two fused sites), or None."""
    if spatial.kernel_size[0] != 1 or temporal.kernel_size[1:] != (1, 1):
        return (f"the unit needs a 1xkxk then a kx1x1 conv, got {spatial.kernel_size} then "
                f"{temporal.kernel_size}")
    if spatial.groups != 1 or temporal.groups != 1:
        return "the unit kernel has no groups"
    if spatial.stride[0] != 1 or spatial.padding[0] != 0 or temporal.stride[1:] != (1, 1) \
            or temporal.padding[1:] != (0, 0):
        return "the spatial conv must not stride or pad in time, nor the temporal conv in space"
    if spatial.dilation != (1, 1, 1) or temporal.dilation != (1, 1, 1):
        return "the unit kernel has no dilation"
    open_frames = -(-temporal.kernel_size[0] // temporal.stride[0])
    if open_frames > UNIT_MAX_OPEN_FRAMES:
        return (f"the unit kernel keeps at most {UNIT_MAX_OPEN_FRAMES} output frames open, "
                f"ceil(kt / st) = {open_frames}")
    return None


def unit_train_reason(spatial: FusedConfig, temporal: FusedConfig) -> str | None:
    """Why the training (2+1)D unit (two chained implicit GEMMs, BN1 + ReLU applied in the
    temporal conv's prologue) cannot run this pair (which then runs as its two fused sites), or
    None."""
    if temporal.groups != 1:
        return "the temporal conv's BN prologue has no groups"
    # both convs run the implicit-GEMM kernels, whatever family they would run alone
    return _implicit_gemm_reason(spatial) or _implicit_gemm_reason(temporal)


def _implicit_gemm_reason(cfg: FusedConfig) -> str | None:
    """Why the implicit-GEMM kernels' grid cannot hold this conv, or None."""
    if cfg.groups > IMPLICIT_GEMM_MAX_GRID:
        return f"implicit-GEMM kernels take at most {IMPLICIT_GEMM_MAX_GRID} groups, got {cfg.groups}"
    classes = cfg.stride[0] * cfg.stride[1] * cfg.stride[2]
    if classes > IMPLICIT_GEMM_MAX_GRID:
        return f"implicit-GEMM kernels take strides whose product is at most {IMPLICIT_GEMM_MAX_GRID}, got {cfg.stride}"
    return None


def _geometry_reason(cfg: FusedConfig) -> str | None:
    if cfg.family in IMPLICIT_GEMM_FAMILIES:
        return _implicit_gemm_reason(cfg)
    if cfg.family != "depthwise":
        return None
    if max(cfg.kernel_size) > DEPTHWISE_MAX_KERNEL:
        return f"depthwise kernels take kernel sizes up to {DEPTHWISE_MAX_KERNEL}, got {cfg.kernel_size}"
    if any(s not in DEPTHWISE_STRIDES for s in cfg.stride):
        return f"depthwise kernels take strides 1 or 2, got {cfg.stride}"
    if max(cfg.dilation) > DEPTHWISE_MAX_DILATION:
        return f"depthwise kernels take dilations up to {DEPTHWISE_MAX_DILATION}, got {cfg.dilation}"
    return None


_DEVICE_CHECKS = {"triton": _triton_reason, "cuda": _cuda_reason}


def unsupported_reason(backend: str, cfg: FusedConfig) -> str | None:
    """Why ``backend`` cannot run ``cfg``, or None when it can."""
    if (backend, cfg.family) not in FUSED_CALLS:
        return f"the {backend} backend has no {cfg.family} kernel yet"
    if cfg.dtype not in FUSED_DTYPES:
        return f"fused kernels take float16, bfloat16 or float32, not {cfg.dtype}"
    return _geometry_reason(cfg) or _DEVICE_CHECKS[backend](cfg)


def resolve(cfg: FusedConfig, blocker: str | None = None) -> tuple[str, str | None]:
    """(backend that runs ``cfg``, why a requested fused backend cannot), without side effects.

    ``blocker`` is a caller's reason why no fused kernel may run ``cfg`` (e.g. a residual of
    another dtype); it counts like an unsupported configuration.
    """
    requested = backends.get_backend()
    if requested == "torch":
        return "torch", None
    if requested == "auto":
        order = tuple(b for b in auto_choices.preferred(cfg.family) if (b, cfg.family) in FUSED_CALLS)
        if cfg.device_type != "cuda" or not order:
            return "torch", None  # auto's choice, not a fallback: no fused kernel applies here
    else:
        order = (requested,)
    if blocker is not None:
        return "torch", blocker
    reasons = []
    for name in order:
        reason = unsupported_reason(name, cfg)
        if reason is None:
            return name, None
        reasons.append(reason)
    return "torch", "; ".join(reasons)


def choose(cfg: FusedConfig, blocker: str | None = None) -> str:
    """The backend that runs ``cfg``: :func:`resolve`, plus the fallback warning (or the strict-mode
    error) when a fused backend was asked for and cannot run it."""
    backend, reason = resolve(cfg, blocker)
    if reason is not None:
        backends.fallback(f"{cfg.describe()} on {backends.get_backend()}", reason)
    return backend
