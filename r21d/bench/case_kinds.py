"""The kinds of bench case: frozen dataclasses that know their geometry, their roofline work
(``work()``) and their tiny ``smoke()`` version, and a case's :class:`Target`. The table of cases
is r21d.bench.cases; r21d.bench.providers turns a case into timed callables.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Union

import torch

from ..problem import ConvProblem
from ..triton_kernels._layout import out_size
from . import roofline

Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Target:
    """r21d's goal for a case: its best fused time at most ``max_ratio`` x the ``reference``
    provider's time (and, where given, its peak memory at most ``max_peak_gib``)."""

    reference: str
    max_ratio: float
    max_peak_gib: Optional[float] = None

    def describe(self) -> str:
        text = f"r21d <= {self.max_ratio:g}x {self.reference}"
        if self.max_peak_gib is not None:
            text += f", peak memory <= {self.max_peak_gib:g} GiB"
        return text


def _smoke_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclasses.dataclass(frozen=True)
class ConvBNActCase:
    """One fused site: conv3d -> BatchNorm3d -> activation on an (N, C, T, H, W) input."""

    id: str
    description: str
    batch: int
    in_channels: int
    out_channels: int
    frames: int
    height: int
    width: int
    kernel_size: Triple = (1, 1, 1)
    stride: Triple = (1, 1, 1)
    padding: Triple = (0, 0, 0)
    dilation: Triple = (1, 1, 1)
    groups: int = 1
    bias: bool = False
    training: bool = False
    activation: Optional[str] = "relu"
    dtype: torch.dtype = torch.bfloat16
    channels_last: bool = True
    target: Optional[Target] = None

    kind: ClassVar[str] = "conv_bn_act"

    @functools.cached_property
    def problem(self) -> ConvProblem:
        """The case as the tests and the static report describe a problem (r21d.problem); built
        once per case (family, shapes and rows all read it)."""
        return ConvProblem(
            N=self.batch, C_in=self.in_channels, C_out=self.out_channels, T=self.frames,
            H=self.height, W=self.width, kernel=self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, bias=self.bias,
            activation=self.activation, layout="cl3d" if self.channels_last else "ncdhw")

    @property
    def family(self) -> str:
        return self.problem.family

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.problem.input_shape

    @property
    def output_thw(self) -> Triple:
        return self.problem.output_thw

    @property
    def output_rows(self) -> int:
        """M of the GEMM a pointwise conv is: one row per output position."""
        return self.problem.output_rows

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def work(self) -> list[roofline.Work]:
        return [roofline.conv_bn_act_work(
            self.batch, self.in_channels, self.out_channels, self.input_shape[2:], self.output_thw,
            self.kernel_size, self.groups, self.dtype, self.training)]

    def smoke(self, device: torch.device) -> ConvBNActCase:
        """The same geometry, tiny: channels / 16 (at least 4), N2 T2 4x4; on the CPU in fp32
        (the Triton interpreter has no bf16 arithmetic). No target: the shapes are not the
        target's."""
        dtype = _smoke_dtype(device)

        def shrink(c: int) -> int:
            return max(4, c // 16)
        depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        c_in, c_out, groups = shrink(self.in_channels), shrink(self.out_channels), self.groups
        if depthwise:
            c_out = groups = c_in
        elif groups > 1:  # fewer groups of the same width
            groups = max(1, groups // 16)
            c_in, c_out = groups * (self.in_channels // self.groups), groups * (self.out_channels // self.groups)
        mode = "train" if self.training else "eval"
        return dataclasses.replace(
            self, id=f"{self.id}-smoke", batch=2, in_channels=c_in, out_channels=c_out, frames=2,
            height=4, width=4, groups=groups, dtype=dtype, target=None,
            description=(f"smoke version of {self.id}: {self.family} {c_in}->{c_out}, N2 T2 4x4, "
                         f"{str(dtype).replace('torch.', '')}, {mode}"))


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A whole torchvision video model with random weights: eval forward, or one training step
    (forward, backward, SGD) under autocast."""

    id: str
    description: str
    model: str  # a builder in torchvision.models.video, or r21d.bench.zoo's (pytorchvideo)
    batch: int
    frames: int
    size: int
    training: bool
    dtype: torch.dtype = torch.bfloat16
    num_classes: int = 400
    channels_last: bool = True
    target: Optional[Target] = None
    # torch.compile modes timed for this case beside the run's own (its target's reference)
    compile_modes: tuple[str, ...] = ()
    # also time the fused model captured into a CUDA graph (eval on a GPU): the latency cases
    cuda_graph: bool = False

    kind: ClassVar[str] = "model"
    family: ClassVar[str] = "model"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, 3, self.frames, self.size, self.size)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def builder(self):
        """The model's builder, called with ``num_classes`` (pytorchvideo's with the clip too)."""
        from . import zoo

        if self.model in zoo.BUILDERS:
            return functools.partial(zoo.BUILDERS[self.model], self.frames, self.size)
        import torchvision

        return getattr(torchvision.models.video, self.model)

    def work(self) -> list[roofline.Work]:
        return roofline.model_conv_work(self.builder(), self.input_shape, self.dtype, self.training,
                                        num_classes=self.num_classes)

    def smoke(self, device: torch.device) -> ModelCase:
        """A 1x3x4x32x32 clip; on the CPU in fp32 and NCDHW (the CPU's channels_last_3d conv3d
        backward takes seconds even at this size)."""
        dtype = _smoke_dtype(device)
        mode = "training step" if self.training else "eval"
        return dataclasses.replace(
            self, id=f"{self.id}-smoke", batch=1, frames=4, size=32, dtype=dtype, target=None,
            channels_last=self.channels_last and device.type == "cuda",
            description=(f"smoke version of {self.id}: {self.model} {mode}, 1x3x4x32x32, "
                         f"{str(dtype).replace('torch.', '')}"))


@dataclasses.dataclass(frozen=True)
class UnitCase:
    """A (2+1)D unit in torchvision's BasicBlock layout, Sequential(Conv2Plus1D, BN, ReLU): spatial
    conv (1, k, k) stride (1, s, s) padding k // 2 -> BN -> ReLU -> temporal conv (3, 1, 1)
    stride (st, 1, 1) padding 1 -> BN -> ReLU."""

    id: str
    description: str
    batch: int
    in_channels: int
    mid_channels: int
    out_channels: int
    frames: int
    size: int
    spatial_kernel: int = 3
    spatial_stride: int = 1
    temporal_stride: int = 1
    training: bool = False
    dtype: torch.dtype = torch.bfloat16
    channels_last: bool = True
    target: Optional[Target] = None

    kind: ClassVar[str] = "conv2plus1d"
    family: ClassVar[str] = "conv2plus1d"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.in_channels, self.frames, self.size, self.size)

    @property
    def mid_thw(self) -> Triple:
        k = self.spatial_kernel
        hw = out_size(self.size, k, self.spatial_stride, k // 2, 1)
        return (self.frames, hw, hw)

    @property
    def output_thw(self) -> Triple:
        t, h, w = self.mid_thw
        return (out_size(t, 3, self.temporal_stride, 1, 1), h, w)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def work(self) -> list[roofline.Work]:
        k = self.spatial_kernel
        return roofline.unit_work(self.batch, self.in_channels, self.mid_channels,
                                  self.out_channels, self.input_shape[2:], self.mid_thw,
                                  self.output_thw, k, self.dtype, self.training)

    def smoke(self, device: torch.device) -> UnitCase:
        """The same geometry, tiny: channels / 16 (at least 4), N2 T2 8x8, fp32 on the CPU."""
        dtype = _smoke_dtype(device)
        c_in, c_mid, c_out = (max(4, c // 16) for c in (self.in_channels, self.mid_channels,
                                                          self.out_channels))
        mode = "train" if self.training else "eval"
        return dataclasses.replace(
            self, id=f"{self.id}-smoke", batch=2, in_channels=c_in, mid_channels=c_mid,
            out_channels=c_out, frames=2, size=8, dtype=dtype, target=None,
            description=(f"smoke version of {self.id}: (2+1)D unit {c_in}->{c_mid}->{c_out}, "
                         f"N2 T2 8x8, {str(dtype).replace('torch.', '')}, {mode}"))


@dataclasses.dataclass(frozen=True)
class BlockCase(UnitCase):
    """torchvision's R(2+1)D BasicBlock with an identity shortcut (in = out channels, stride 1):
    unit -> BN -> ReLU -> unit -> BN -> (+ the block's input) -> ReLU, the mid channels being
    BasicBlock's own. r21d runs the residual tail (BN + add + ReLU) in the second unit's epilogue."""

    kind: ClassVar[str] = "block"
    family: ClassVar[str] = "block"

    def work(self) -> list[roofline.Work]:
        return super().work() * 2  # two units of the same geometry (the residual read is small)


Case = Union[ConvBNActCase, ModelCase, UnitCase, BlockCase]
