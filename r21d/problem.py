"""One conv3d + BatchNorm + activation problem, as the tests, the static report and the bench
describe it: the geometry (shapes, kernel, stride, padding, dilation, groups) and what the site
has (bias, affine BN, running statistics, a residual, the activation, the input's layout).

Tooling's shared vocabulary, not the runtime's: ``import r21d`` does not import it. The runtime's
own description of a call is :class:`r21d.dispatch.FusedConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .triton_kernels._layout import out_size

Triple = tuple[int, int, int]
LAYOUTS = ("ncdhw", "cl3d", "strided")


@dataclasses.dataclass(frozen=True)
class ConvProblem:
    """``layout``: "ncdhw", "cl3d" (channels_last_3d) or "strided" (a non-contiguous view: every
    other element of a wider tensor along W)."""

    N: int = 2
    C_in: int = 45
    C_out: int = 37
    T: int = 3
    H: int = 5
    W: int = 4
    kernel: Triple = (1, 1, 1)
    stride: Triple = (1, 1, 1)
    padding: Triple = (0, 0, 0)
    dilation: Triple = (1, 1, 1)
    groups: int = 1
    bias: bool = True
    affine: bool = True
    running: bool = True
    residual: bool = False
    activation: Optional[str] = "relu"
    layout: str = "ncdhw"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.C_in % self.groups or self.C_out % self.groups:
            raise ValueError(f"groups={self.groups} must divide C_in={self.C_in} and C_out={self.C_out}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.N, self.C_in, self.T, self.H, self.W)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.C_out, self.C_in // self.groups, *self.kernel)

    @property
    def output_thw(self) -> Triple:
        return tuple(out_size(n, k, s, p, d) for n, k, s, p, d in zip(
            (self.T, self.H, self.W), self.kernel, self.stride, self.padding, self.dilation))

    def output_shape(self) -> tuple[int, ...]:
        return (self.N, self.C_out, *self.output_thw)

    @property
    def output_rows(self) -> int:
        """M of the GEMM the conv is: one row per output position."""
        return self.N * math.prod(self.output_thw)

    @property
    def family(self) -> str:
        """The geometry class that picks the kernel family (:func:`r21d.dispatch.conv_family`)."""
        from .dispatch import conv_family

        return conv_family(self.kernel, self.groups, self.C_in, self.C_out)
