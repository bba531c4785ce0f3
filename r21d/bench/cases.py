"""The case table: what r21d-bench measures.

A case is one of r21d.bench.case_kinds' frozen dataclasses, which know their geometry, roofline
work (``work()``) and tiny ``smoke()`` version; ``r21d.bench.providers`` turns it into timed
callables. To add a case,
append a row to :data:`CASES`:

- another conv + BN + activation geometry (depthwise, spatial 1xkxk, temporal kx1x1, dense,
  strided, padded) is a :class:`ConvBNActCase` row: set ``kernel_size``/``stride``/``padding``/
  ``groups`` (depthwise: ``groups == in_channels == out_channels``); a layer of a real model is a
  row of :data:`R2PLUS1D_18_CONVS` or :data:`DENSE_CONVS`;
- another whole model is a :class:`ModelCase` row naming a ``torchvision.models.video`` builder;
- a new kind of case (e.g. a (2+1)D block) is a new dataclass in case_kinds with ``id``, ``description``,
  ``training``, ``dtype``, ``target``, ``family``, ``work()`` and ``smoke()``, plus a workload
  class registered in ``r21d.bench.providers.WORKLOADS``.

Targets (from docs/benchmarks.md) are ratios checked in the same run; no case holds a measured time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Optional

import torch

from .case_kinds import BlockCase, Case, ConvBNActCase, ModelCase, Target, Triple, UnitCase


def pointwise(in_channels: int, out_channels: int, batch: int, frames: int, size: int,
              training: bool, target: Optional[Target] = None) -> ConvBNActCase:
    mode = "train" if training else "eval"
    return ConvBNActCase(
        id=f"pointwise-{in_channels}-{out_channels}-n{batch}t{frames}s{size}-{mode}",
        description=(f"pointwise 1x1x1 conv+BN+ReLU {in_channels}->{out_channels}, N{batch} T{frames} "
                     f"{size}x{size}, bf16 channels_last_3d, {mode}"
                     + (" (forward+backward)" if training else " (forward)")),
        batch=batch, in_channels=in_channels, out_channels=out_channels, frames=frames,
        height=size, width=size, training=training, target=target)


def video_model(model: str, training: bool, batch: int = 16,
                target: Optional[Target] = None) -> ModelCase:
    """A torchvision video model on 16x112x112 clips: an eval forward in bf16, or a training
    step (forward, backward, SGD) under bf16 autocast."""
    shape = f"{batch}x3x16x112x112"
    if training:
        return ModelCase(
            id=f"{model}-b{batch}-train", model=model, batch=batch, frames=16, size=112,
            training=True, target=target,
            description=f"{model} training step (forward, backward, SGD), {shape}, bf16 autocast")
    return ModelCase(
        id=f"{model}-b{batch}-eval", model=model, batch=batch, frames=16, size=112,
        training=False, description=f"{model} eval forward, {shape}, bf16", target=target)


def zoo_model(model: str, training: bool, batch: int, frames: int, size: int) -> ModelCase:
    """A pytorchvideo model (r21d.bench.zoo): an eval forward in bf16, or a training step under
    bf16 autocast. No target: their first GPU run sets the reference."""
    shape = f"{batch}x3x{frames}x{size}x{size}"
    mode = "train" if training else "eval"
    what = ("training step (forward, backward, SGD), " + shape + ", bf16 autocast" if training
            else "eval forward, " + shape + ", bf16")
    return ModelCase(id=f"{model}-b{batch}-{mode}", model=model, batch=batch, frames=frames,
                     size=size, training=training, description=f"{model} (pytorchvideo) {what}")


def r2plus1d_18(training: bool, batch: int = 16) -> ModelCase:
    """docs/benchmarks.md's whole-model targets: eval <= 0.75x max-autotune; a training step <= 0.8x
    torch.compile's with at most 3.2 GiB peak memory."""
    target = (Target("torch.compile", 0.8, max_peak_gib=3.2) if training
              else Target("torch.compile/max-autotune", 0.75))
    return video_model("r2plus1d_18", training, batch, target)


REDUCE_OVERHEAD = "reduce-overhead"


def r2plus1d_18_latency(batch: int) -> ModelCase:
    """Real-time recognition: an eval forward at a small batch, where launch overhead counts.
    The reference is torch.compile with CUDA graphs (mode="reduce-overhead"); r21d is timed as it
    is and captured into a CUDA graph."""
    case = video_model("r2plus1d_18", False, batch,
                       Target(f"torch.compile/{REDUCE_OVERHEAD}", 0.75))
    return dataclasses.replace(
        case, id=f"r2plus1d_18-b{batch}-latency", compile_modes=(REDUCE_OVERHEAD,),
        cuda_graph=True, description=case.description.replace("eval forward", "eval latency"))


def depthwise(channels: int, batch: int, frames: int, size: int, training: bool, *,
              kernel_size: Triple = (3, 3, 3), stride: Triple = (1, 1, 1),
              dtype: torch.dtype = torch.bfloat16, channels_last: bool = True,
              activation: Optional[str] = "relu", model: str = "",
              target: Optional[Target] = None) -> ConvBNActCase:
    mode = "train" if training else "eval"
    padding = tuple(k // 2 for k in kernel_size)
    k = "x".join(map(str, kernel_size))
    dt = str(dtype).replace("torch.", "")
    layout = "cl3d" if channels_last else "ncdhw"
    s = "" if stride == (1, 1, 1) else "-s" + "".join(map(str, stride))
    return ConvBNActCase(
        id=f"depthwise{k}{s}-{channels}-n{batch}t{frames}s{size}-{dt}-{layout}-{mode}",
        description=(f"depthwise {k} conv+BN+{activation or 'none'} C{channels}, N{batch} T{frames} "
                     f"{size}x{size}, stride {stride}, {dt} {layout}, {mode}"
                     + (" (forward+backward)" if training else " (forward)")
                     + (f" [{model}]" if model else "")),
        batch=batch, in_channels=channels, out_channels=channels, frames=frames, height=size,
        width=size, kernel_size=kernel_size, stride=stride, padding=padding, groups=channels,
        training=training, activation=activation, dtype=dtype, channels_last=channels_last,
        target=target)


# Depthwise targets (docs/benchmarks.md): eval at most 1.3x the memory floor; training forward+backward
# at least 8x faster than PyTorch's best layout.
_DW_FLOOR_TARGET = Target("floor", 1.3)
_DW_TRAIN_TARGET = Target("eager", 1 / 8)


def _depthwise_cases() -> list[ConvBNActCase]:
    cases = []
    for channels, size in ((216, 56), (432, 28), (864, 14)):  # the shapes, N8 T16
        for dtype in (torch.bfloat16, torch.float32):
            for cl in (True, False):
                cases.append(depthwise(channels, 8, 16, size, False, dtype=dtype, channels_last=cl,
                                       target=_DW_FLOOR_TARGET))
    # X3D-M (16x224^2 clips: stages at 56^2 .. 7^2, SiLU after the depthwise conv; stride (1,2,2)
    # in each stage's first block) and CSN-R101 (32 frames, ReLU); batch 8
    for channels, size in ((54, 56), (108, 28), (216, 14), (432, 7)):
        cases.append(depthwise(channels, 8, 16, size, False, activation="silu", model="X3D-M",
                               target=_DW_FLOOR_TARGET))
    cases.append(depthwise(108, 8, 16, 56, False, stride=(1, 2, 2), activation="silu",
                           model="X3D-M stage 2 first block", target=_DW_FLOOR_TARGET))
    for channels, frames, size in ((64, 32, 56), (256, 16, 28), (512, 8, 14)):
        cases.append(depthwise(channels, 8, frames, size, False, model="CSN-R101",
                               target=_DW_FLOOR_TARGET))
    # training forward + backward, both layouts
    for cl in (True, False):
        cases.append(depthwise(216, 8, 16, 56, True, channels_last=cl, target=_DW_TRAIN_TARGET))
    cases.append(depthwise(432, 8, 16, 28, True, target=_DW_TRAIN_TARGET))
    return cases


# The convolutions of r2plus1d_18 on a 16x112x112 clip, one row per distinct configuration
# (docs/benchmarks.md; tests/tools/test_bench.py checks the table against torchvision's model):
# (in, out, kernel, stride, input T, input H = W); padding is kernel // 2 on every axis.
R2PLUS1D_18_CONVS = [
    (3, 45, (1, 7, 7), (1, 2, 2), 16, 112), (45, 64, (3, 1, 1), (1, 1, 1), 16, 56),
    (64, 144, (1, 3, 3), (1, 1, 1), 16, 56), (144, 64, (3, 1, 1), (1, 1, 1), 16, 56),
    (64, 230, (1, 3, 3), (1, 2, 2), 16, 56), (230, 128, (3, 1, 1), (2, 1, 1), 16, 28),
    (128, 230, (1, 3, 3), (1, 1, 1), 8, 28), (230, 128, (3, 1, 1), (1, 1, 1), 8, 28),
    (64, 128, (1, 1, 1), (2, 2, 2), 16, 56), (128, 288, (1, 3, 3), (1, 1, 1), 8, 28),
    (288, 128, (3, 1, 1), (1, 1, 1), 8, 28), (128, 460, (1, 3, 3), (1, 2, 2), 8, 28),
    (460, 256, (3, 1, 1), (2, 1, 1), 8, 14), (256, 460, (1, 3, 3), (1, 1, 1), 4, 14),
    (460, 256, (3, 1, 1), (1, 1, 1), 4, 14), (128, 256, (1, 1, 1), (2, 2, 2), 8, 28),
    (256, 576, (1, 3, 3), (1, 1, 1), 4, 14), (576, 256, (3, 1, 1), (1, 1, 1), 4, 14),
    (256, 921, (1, 3, 3), (1, 2, 2), 4, 14), (921, 512, (3, 1, 1), (2, 1, 1), 4, 7),
    (512, 921, (1, 3, 3), (1, 1, 1), 2, 7), (921, 512, (3, 1, 1), (1, 1, 1), 2, 7),
    (256, 512, (1, 1, 1), (2, 2, 2), 4, 14), (512, 1152, (1, 3, 3), (1, 1, 1), 2, 7),
    (1152, 512, (3, 1, 1), (1, 1, 1), 2, 7),
]
# Dense kernels: r3d_18's stem and a 3x3x3 of its layer1 (mc3_18 has both), and the
# sign-language classifier's 3x7x7 / 3x5x5 stride-2 convs with bias:
# (model, in, out, kernel, stride, padding, input T, input H = W, bias)
DENSE_CONVS = [
    ("r3d_18", 3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), 16, 112, False),
    ("r3d_18", 64, 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), 16, 56, False),
    ("sign", 3, 32, (3, 7, 7), (2, 2, 2), (1, 3, 3), 16, 112, True),
    ("sign", 32, 64, (3, 5, 5), (2, 2, 2), (1, 2, 2), 8, 56, True),
]
# The implicit-GEMM targets: eval at most 1.0x cuDNN's convolution alone (BN and ReLU for free);
# training forward+backward at most 0.6x eager.
_CONV_TARGET = Target("conv", 1.0)
_CONV_TRAIN_TARGET = Target("eager", 0.6)


def conv_layer(model: str, index: int, in_channels: int, out_channels: int, kernel_size: Triple,
               stride: Triple, padding: Triple, frames: int, size: int, training: bool,
               batch: int = 16, bias: bool = False) -> ConvBNActCase:
    """A conv + BN + ReLU site of a real model, bf16 channels_last_3d."""
    mode = "train" if training else "eval"
    k = "x".join(map(str, kernel_size))
    s = "".join(map(str, stride))
    return ConvBNActCase(
        id=f"{model}-conv{index:02d}-{in_channels}-{out_channels}-k{k}-s{s}-t{frames}s{size}-{mode}",
        description=(f"{model} conv {index}: {k} conv{'(+bias)' if bias else ''}+BN+ReLU "
                     f"{in_channels}->{out_channels}, stride {stride}, N{batch} T{frames} "
                     f"{size}x{size}, bf16 channels_last_3d, {mode}"
                     + (" (forward+backward)" if training else " (forward)")),
        batch=batch, in_channels=in_channels, out_channels=out_channels, frames=frames,
        height=size, width=size, kernel_size=kernel_size, stride=stride, padding=padding,
        bias=bias, training=training, target=_CONV_TRAIN_TARGET if training else _CONV_TARGET)


def _conv_layer_cases() -> list[ConvBNActCase]:
    out = []
    for training in (False, True):
        for i, (cin, cout, k, s, t, size) in enumerate(R2PLUS1D_18_CONVS, 1):
            out.append(conv_layer("r2p1d", i, cin, cout, k, s, tuple(n // 2 for n in k), t, size,
                                  training))
        per_model: dict[str, int] = {}
        for model, cin, cout, k, s, p, t, size, bias in DENSE_CONVS:
            per_model[model] = per_model.get(model, 0) + 1
            out.append(conv_layer(model, per_model[model], cin, cout, k, s, p, t, size, training,
                                  bias=bias))
    return out


# The (2+1)D units of r2plus1d_18 on a 16x112x112 clip: (spatial conv row, temporal conv row) of
# R2PLUS1D_18_CONVS (1-based), the temporal conv's input being the spatial conv's output.
R2PLUS1D_18_UNITS = [(1, 2), (3, 4), (5, 6), (7, 8), (10, 11), (12, 13), (14, 15), (17, 18),
                     (19, 20), (21, 22), (24, 25)]
# Eval at most 0.5x torch.compile for the layer1 unit (64->144->64), 0.7x for the others;
# training forward+backward at most 0.6x eager.
_UNIT_TARGET = Target("torch.compile", 0.7)
_UNIT_LAYER1_TARGET = Target("torch.compile", 0.5)
_UNIT_TRAIN_TARGET = Target("eager", 0.6)


def conv2plus1d_unit(spatial_row: int, temporal_row: int, training: bool,
                     batch: int = 16) -> UnitCase:
    cin, cmid, (_, k, _), (_, s, _), t, size = R2PLUS1D_18_CONVS[spatial_row - 1]
    _, cout, _, (st, _, _), _, _ = R2PLUS1D_18_CONVS[temporal_row - 1]
    mode = "train" if training else "eval"
    if training:
        target = _UNIT_TRAIN_TARGET
    else:
        target = _UNIT_LAYER1_TARGET if (cin, cmid, cout) == (64, 144, 64) else _UNIT_TARGET
    return UnitCase(
        id=f"r2p1d-unit{spatial_row:02d}-{cin}-{cmid}-{cout}-s{s}{st}-t{t}s{size}-{mode}",
        description=(f"r2plus1d_18 (2+1)D unit (convs {spatial_row}, {temporal_row}): 1x{k}x{k} "
                     f"stride {s} -> BN -> ReLU -> 3x1x1 stride {st} -> BN -> ReLU, "
                     f"{cin}->{cmid}->{cout}, N{batch} T{t} {size}x{size}, bf16 channels_last_3d, "
                     f"{mode}" + (" (forward+backward)" if training else " (forward)")),
        batch=batch, in_channels=cin, mid_channels=cmid, out_channels=cout, frames=t, size=size,
        spatial_kernel=k, spatial_stride=s, temporal_stride=st, training=training, target=target)


def r2plus1d_block(training: bool, batch: int = 16) -> BlockCase:
    """r2plus1d_18's layer1 BasicBlock: 64 -> 144 -> 64 twice and the residual tail, T16 56x56."""
    mode = "train" if training else "eval"
    return BlockCase(
        id=f"r2p1d-block-64-144-64-t16s56-n{batch}-{mode}",
        description=(f"r2plus1d_18 layer1 BasicBlock: two (2+1)D units 64->144->64 + BN + residual "
                     f"add + ReLU, N{batch} T16 56x56, bf16 channels_last_3d, {mode}"),
        batch=batch, in_channels=64, mid_channels=144, out_channels=64, frames=16, size=56,
        training=training)


# The targets for fused pointwise: eval no slower than 1.1x the plain GEMM (docs/benchmarks.md);
# training forward+backward at most 0.5x eager PyTorch.
_GEMM_TARGET = Target("matmul", 1.1)
_TRAIN_TARGET = Target("eager", 0.5)

CASES: list[Case] = [
    pointwise(64, 256, batch=8, frames=16, size=56, training=False, target=_GEMM_TARGET),
    pointwise(256, 64, batch=8, frames=16, size=56, training=False, target=_GEMM_TARGET),
    pointwise(512, 512, batch=8, frames=8, size=14, training=False, target=_GEMM_TARGET),
    pointwise(64, 256, batch=8, frames=16, size=56, training=True, target=_TRAIN_TARGET),
    pointwise(256, 64, batch=8, frames=16, size=56, training=True, target=_TRAIN_TARGET),
    pointwise(512, 512, batch=8, frames=8, size=14, training=True, target=_TRAIN_TARGET),
    *_depthwise_cases(),
    *_conv_layer_cases(),
    *(conv2plus1d_unit(sp, tm, training) for training in (False, True)
      for sp, tm in R2PLUS1D_18_UNITS),
    r2plus1d_18(training=False),
    r2plus1d_18(training=True),
    r2plus1d_18_latency(batch=1),
    r2plus1d_18_latency(batch=4),
    video_model("r3d_18", training=False),
    video_model("r3d_18", training=True),
    # the depthwise family's whole models
    *(zoo_model("x3d_m", training, batch=8, frames=16, size=224) for training in (False, True)),
    *(zoo_model("csn_50", training, batch=8, frames=32, size=224) for training in (False, True)),
]


def select(pattern: Optional[str] = None, cases: Sequence[Case] = CASES) -> list[Case]:
    """The cases whose id matches the regular expression ``pattern`` (all without one)."""
    if not pattern:
        return list(cases)
    regex = re.compile(pattern)
    return [c for c in cases if regex.search(c.id)]
