"""Roofline floors: the least time a case can take on a given GPU.

A case's work is a list of :class:`Work` items (one per kernel-sized step: a fused conv site, or
every conv of a whole model). Each item's floor is max(bytes moved once / copy bandwidth,
FLOPs / tensor-core rate); a case's floor is the sum over its items, since layers run one after
the other. The ceilings are measured on the GPU in the same run (a large device-to-device copy
and large matmuls); without a GPU the H100 ceilings of docs/benchmarks.md stand in.

Bytes moved once by one conv + BN + activation site (BN vectors are negligible):
  eval   read x, write y, read the weight:      M_in*C_in + M_out*C_out activations + |W|
  train  forward reads x, writes y and the conv output z (kept for backward); backward reads
         dy, z and x (for dW) and writes dx:    3*M_in*C_in + 4*M_out*C_out + 3*|W| (W read
         twice, dW written). This is the model docs/benchmarks.md's training floors use.
FLOPs: 2 * M_out * C_out * (C_in / groups) * kT*kH*kW per GEMM-like pass; training runs three
(forward, input gradient, weight gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """What the GPU can do at best: copy bandwidth (read + write bytes per second) and dense
    matmul rates; ``source`` says where the numbers come from."""

    copy_bytes_per_s: float
    bf16_flops_per_s: float
    fp32_flops_per_s: float
    source: str

    def flops_per_s(self, dtype: torch.dtype) -> float:
        """The tensor-core rate for 16-bit inputs, the plain fp32 rate otherwise."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16_flops_per_s
        return self.fp32_flops_per_s

    def describe(self) -> str:
        return (f"copy {self.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul "
                f"{self.bf16_flops_per_s / 1e12:.0f} TFLOP/s, fp32 matmul "
                f"{self.fp32_flops_per_s / 1e12:.1f} TFLOP/s ({self.source})")


# docs/benchmarks.md: measured on an H100 80GB HBM3 (torch 2.11, cuDNN 9.19).
H100_BASELINES = Ceilings(
    copy_bytes_per_s=2.97e12, bf16_flops_per_s=688e12, fp32_flops_per_s=52e12,
    source="H100 80GB HBM3 ceilings from docs/benchmarks.md, not measured here",
)


@dataclasses.dataclass(frozen=True)
class Work:
    """Bytes moved once and FLOPs of one step, in the dtype its math runs in."""

    bytes: int
    flops: int
    dtype: torch.dtype

    def memory_s(self, ceilings: Ceilings) -> float:
        return self.bytes / ceilings.copy_bytes_per_s

    def compute_s(self, ceilings: Ceilings) -> float:
        return self.flops / ceilings.flops_per_s(self.dtype)

    def floor_s(self, ceilings: Ceilings) -> float:
        return max(self.memory_s(ceilings), self.compute_s(ceilings))


def floor_ms(work: Sequence[Work], ceilings: Ceilings) -> float:
    """The case's floor: the sum of its steps' floors, in milliseconds."""
    return 1e3 * sum(w.floor_s(ceilings) for w in work)


def bound_by(work: Sequence[Work], ceilings: Ceilings) -> str:
    """'memory' or 'compute': which ceiling sets most of the floor."""
    memory = sum(w.memory_s(ceilings) for w in work if w.memory_s(ceilings) >= w.compute_s(ceilings))
    compute = sum(w.compute_s(ceilings) for w in work if w.memory_s(ceilings) < w.compute_s(ceilings))
    return "memory" if memory >= compute else "compute"


def conv_bn_act_work(batch: int, in_channels: int, out_channels: int,
                     input_thw: Sequence[int], output_thw: Sequence[int],
                     kernel_size: Sequence[int], groups: int, dtype: torch.dtype,
                     training: bool) -> Work:
    """One conv + BN + activation site (see the module docstring for the byte model)."""
    element = torch.empty((), dtype=dtype).element_size()
    in_elems = batch * in_channels * math.prod(input_thw)
    out_elems = batch * out_channels * math.prod(output_thw)
    weight_elems = out_channels * (in_channels // groups) * math.prod(kernel_size)
    gemm_flops = 2 * out_elems * (in_channels // groups) * math.prod(kernel_size)
    if training:
        return Work(bytes=element * (3 * in_elems + 4 * out_elems + 3 * weight_elems),
                    flops=3 * gemm_flops, dtype=dtype)
    return Work(bytes=element * (in_elems + out_elems + weight_elems), flops=gemm_flops, dtype=dtype)


def unit_work(batch: int, in_channels: int, mid_channels: int, out_channels: int,
              input_thw: Sequence[int], mid_thw: Sequence[int], output_thw: Sequence[int],
              spatial_kernel: int, dtype: torch.dtype, training: bool) -> list[Work]:
    """A (2+1)D unit. Eval: one step that reads the input and both weights once and writes the
    output once, the intermediate kept on chip. Training: its two conv + BN + ReLU sites (the
    intermediate is written once and read back, as the backward needs it)."""
    k = (1, spatial_kernel, spatial_kernel)
    sites = [conv_bn_act_work(batch, in_channels, mid_channels, input_thw, mid_thw, k, 1, dtype, training),
             conv_bn_act_work(batch, mid_channels, out_channels, mid_thw, output_thw, (3, 1, 1), 1,
                              dtype, training)]
    if training:
        return sites
    element = torch.empty((), dtype=dtype).element_size()
    mid_bytes = element * batch * mid_channels * math.prod(mid_thw)
    return [Work(bytes=sum(w.bytes for w in sites) - 2 * mid_bytes,
                 flops=sum(w.flops for w in sites), dtype=dtype)]


def model_convs(builder, input_shape: Sequence[int], training: bool = False, **model_kwargs):
    """(conv module, input shape, output shape) of every Conv3d of a model, in call order, found
    by running the model on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = builder(**model_kwargs)
        x = torch.empty(*input_shape)
    shapes = []

    def record(module, inputs, output):
        shapes.append((module, tuple(inputs[0].shape), tuple(output.shape)))

    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(record)
    model.train(training)
    with torch.no_grad():
        model(x)
    return shapes


def model_conv_work(builder, input_shape: Sequence[int], dtype: torch.dtype, training: bool,
                    **model_kwargs) -> list[Work]:
    """One :func:`conv_bn_act_work` per Conv3d of a model (shapes from :func:`model_convs`).

    The floor this gives is that of running the model layer by layer with BN, activation and
    residual fused into each conv (residual reads, pooling and the classifier are left out:
    they are small). Training also counts the first conv's input gradient, which no one needs
    (about 1% of r2plus1d_18's FLOPs).
    """
    return [
        conv_bn_act_work(i[0], conv.in_channels, conv.out_channels, i[2:], o[2:], conv.kernel_size,
                         conv.groups, dtype, training)
        for conv, i, o in model_convs(builder, input_shape, training, **model_kwargs)
    ]


def _copy_bandwidth(timer, device: torch.device, nbytes: int) -> float:
    """Read + write bytes per second of a device-to-device copy of ``nbytes``."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timer.time(lambda: dst.copy_(src), [()])
    return 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3)


def _matmul_rate(timer, device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n torch.matmul in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timer.time(lambda: torch.matmul(a, b), [()])
    return 2 * n ** 3 / (t.median_ms * 1e-3)


def measure_ceilings(timer, device: torch.device, *, copy_bytes: int = 1 << 30,
                     bf16_size: int = 8192, fp32_size: int = 4096) -> Ceilings:
    """Copy bandwidth and matmul rates of this GPU, timed like everything else (``timer`` is a
    :class:`r21d.bench.timing.Timer`). fp32 runs under the current float32 matmul precision
    (IEEE fp32 unless the user allowed TF32)."""
    return Ceilings(
        copy_bytes_per_s=_copy_bandwidth(timer, device, copy_bytes),
        bf16_flops_per_s=_matmul_rate(timer, device, torch.bfloat16, bf16_size),
        fp32_flops_per_s=_matmul_rate(timer, device, torch.float32, fp32_size),
        source=(f"measured in this run on {torch.cuda.get_device_name(device)} "
                f"(fp32 matmul precision '{torch.get_float32_matmul_precision()}')"),
    )
