"""r21d: fused GPU kernels for video convolution networks.

Depthwise, pointwise and factorized (2+1)D 3D convolutions fused with BatchNorm and an activation,
as torch.library ops with autograd, behind drop-in modules, with ``r21d.fuse(model)`` to swap them
into existing models. See README.md and docs/.
"""

from . import _compat

# TRITON_INTERPRET set with a Triton / NumPy pair whose interpreter cannot run: say so now
_compat.check_interpreter()

from . import functional, ops  # noqa: E402  (after the check)
from .backends import (
    FallbackWarning,
    FusedKernelUnavailable,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .fuse import fuse, fusion_report, fusion_sites, unfuse
from .modules import (
    Conv2Plus1d,
    ConvBNReLU2d,
    ConvBNReLU3d,
    DepthwiseSeparableConv2d,
    DepthwiseSeparableConv3d,
    SpatioTemporalConv,
)
from .warmup import WarmupReport, warmup

__version__ = "0.1.0"

__all__ = [
    "Conv2Plus1d", "ConvBNReLU2d", "ConvBNReLU3d", "DepthwiseSeparableConv2d",
    "DepthwiseSeparableConv3d", "FallbackWarning", "FusedKernelUnavailable", "SpatioTemporalConv",
    "available_backends", "functional", "fuse", "fusion_report", "fusion_sites", "get_backend", "ops",
    "set_backend", "unfuse", "use_backend", "warmup", "WarmupReport",
]
