"""Drop-in modules (docs/architecture.md, Modules). Each keeps the parameter and buffer names of
the plain PyTorch modules it replaces, so pretrained weights load and checkpoints load back into
plain PyTorch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.utils import _triple

from . import plan_cache
from .fused_sequential import FusedSequential
from .fused_site import activation_name, is_batchnorm_for, run_site
from .fused_unit import run_unit


def _activation_module(activation: Optional[str]) -> Optional[nn.Module]:
    if activation == "relu":
        return nn.ReLU()
    if activation == "silu":
        return nn.SiLU()
    if activation is None or activation == "none":
        return None
    raise ValueError(f"unknown activation {activation!r}; expected 'relu', 'silu' or None")


class _ConvBNAct(FusedSequential):
    """Children "0" conv, "1" BatchNorm, "2" activation (absent for activation=None), the layout
    of torch.ao.nn.intrinsic.ConvBnReLU3d; runs as one fused site."""

    _conv: type
    _bn: type

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False, eps=1e-5, momentum=0.1, activation="relu", *,
                 device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        layers = [
            self._conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                       dilation=dilation, groups=groups, bias=bias, **factory),
            self._bn(out_channels, eps=eps, momentum=momentum, **factory),
        ]
        act = _activation_module(activation)
        super().__init__(*layers, *([act] if act is not None else []))

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.Module, act: Optional[nn.Module] = None):
        """Wrap existing modules; their parameters and buffers are shared, not copied."""
        if not isinstance(conv, cls._conv):
            raise TypeError(f"{cls.__name__}.from_modules: conv must be an {cls._conv.__name__}, got {type(conv).__name__}")
        if not is_batchnorm_for(bn, conv):
            raise TypeError(
                f"{cls.__name__}.from_modules: bn must be a {cls._bn.__name__} or SyncBatchNorm with "
                f"{conv.out_channels} features, got {bn!r}")
        activation_name(act)  # raises for an unsupported activation
        self = cls.__new__(cls)
        FusedSequential.__init__(self, conv, bn, *([act] if act is not None else []))
        return self

    @property
    def conv(self) -> nn.Module:
        return self[0]

    @property
    def bn(self) -> nn.Module:
        return self[1]

    @property
    def activation(self) -> Optional[str]:
        return activation_name(self[2]) if len(self) > 2 else None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """act(bn(conv(x)) [+ residual])."""
        children = tuple(self._modules.values())  # self[0], self[1], self[2]
        return run_site(children[0], children[1], children[2] if len(children) > 2 else None, x,
                        residual, slot=plan_cache.slot(self))


class ConvBNReLU3d(_ConvBNAct):
    """Conv3d -> BatchNorm3d -> ReLU/SiLU/none, fused. Dispatches by geometry: depthwise
    (groups == in == out), pointwise (1x1x1), spatial (1xkxk), temporal (tx1x1), dense, grouped."""

    _conv = nn.Conv3d
    _bn = nn.BatchNorm3d


class ConvBNReLU2d(_ConvBNAct):
    """Conv2d -> BatchNorm2d -> activation on (N, C, H, W) input, run as a 3D site with T = 1."""

    _conv = nn.Conv2d
    _bn = nn.BatchNorm2d


class Conv2Plus1d(FusedSequential):
    """torchvision.models.video.resnet.Conv2Plus1D's child layout (loads its weights):
    1x3x3 conv -> BN -> ReLU (fused) -> 3x1x1 conv. The parent block applies the last BN + ReLU;
    inside an r21d FusedSequential (or a model ``r21d.fuse`` converted) the parent runs all of it
    as one (2+1)D unit (r21d.fused_unit)."""

    def __init__(self, in_planes: int, out_planes: int, midplanes: int, stride: int = 1, padding: int = 1):
        super().__init__(
            nn.Conv3d(in_planes, midplanes, kernel_size=(1, 3, 3), stride=(1, stride, stride),
                      padding=(0, padding, padding), bias=False),
            nn.BatchNorm3d(midplanes),
            nn.ReLU(inplace=True),
            nn.Conv3d(midplanes, out_planes, kernel_size=(3, 1, 1), stride=(stride, 1, 1),
                      padding=(padding, 0, 0), bias=False),
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        """As torchvision's, so this class can be a VideoResNet conv_maker."""
        return stride, stride, stride


def intermediate_channels(kernel_size, in_channels: int, out_channels: int, first_conv: bool = False) -> int:
    """M of Tran et al. 2018: the (2+1)D unit has the parameter count of the full t x k x k conv."""
    if first_conv:
        return 45
    kt, kh, kw = _triple(kernel_size)
    return math.floor(kt * kh * kw * in_channels * out_channels / (kh * kw * in_channels + kt * out_channels))


class SpatioTemporalConv(nn.Module):
    """The R(2+1)D unit with the classic signature and children (spatial_conv, bn1, temporal_conv,
    bn2, relu): spatial conv (1,kh,kw) stride (1,sh,sw) pad (0,ph,pw) -> BN -> ReLU -> temporal
    conv (kt,1,1) stride (st,1,1) pad (pt,0,0) -> BN -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False,
                 first_conv=False):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        st, sh, sw = _triple(stride)
        pt, ph, pw = _triple(padding)
        self.intermed_channels = intermediate_channels((kt, kh, kw), in_channels, out_channels, first_conv)
        m = self.intermed_channels
        self.spatial_conv = nn.Conv3d(in_channels, m, (1, kh, kw), stride=(1, sh, sw), padding=(0, ph, pw), bias=bias)
        self.bn1 = nn.BatchNorm3d(m)
        self.temporal_conv = nn.Conv3d(m, out_channels, (kt, 1, 1), stride=(st, 1, 1), padding=(pt, 0, 0), bias=bias)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """One kernel in eval mode, two chained kernels in training (r21d.fused_unit)."""
        m = self._modules  # (self.spatial_conv etc. each go through nn.Module.__getattr__)
        return run_unit(m["spatial_conv"], m["bn1"], m["relu"], m["temporal_conv"], m["bn2"],
                        m["relu"], x, slot=plan_cache.slot(self))


class DepthwiseSeparableConv3d(nn.Sequential):
    """Depthwise conv + BN + act ("depthwise"), then pointwise conv + BN + act ("pointwise")."""

    _block = ConvBNReLU3d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 activation="relu"):
        super().__init__(OrderedDict(
            depthwise=self._block(in_channels, in_channels, kernel_size, stride=stride,
                                  padding=padding, dilation=dilation, groups=in_channels,
                                  activation=activation),
            pointwise=self._block(in_channels, out_channels, 1, activation=activation),
        ))


class DepthwiseSeparableConv2d(DepthwiseSeparableConv3d):
    """DepthwiseSeparableConv3d on (N, C, H, W) input (T = 1), with Conv2d/BatchNorm2d children."""

    _block = ConvBNReLU2d
