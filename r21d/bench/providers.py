"""What is timed: for each case, the callables of every provider and the inputs they rotate among.

A workload builds one case on one device. Providers:

``eager``           plain PyTorch (nn.Conv3d -> nn.BatchNorm3d -> nn.ReLU, or the unfused model),
                    once per :class:`Variant` (memory format x autocast or not); the runner
                    reports the fastest and which variant it was.
``r21d/<backend>``  the same computation through r21d (``conv_bn_act3d``, or ``r21d.fuse(model)``)
                    on a fused backend, in the case's memory format.
``torch.compile``   ``torch.compile`` of the eager module in eager's winning variant.
``matmul``          pointwise cases only: the plain GEMM of the same shape, [M, C_in] @ [C_in, C_out]
                    (training: the three GEMMs of forward, input gradient and weight gradient).
``conv``            conv + BN + activation cases: the convolution alone (cuDNN on a GPU), in the
                    case's dtype and memory format (training: with its backward).

Every callable returns its outputs (eval: the activation or the logits; a site's training step:
the activation and the gradients of x, weight, BN weight and BN bias; a model's training step: the
logits and the loss), which the runner checks against a float64 reference before timing. Models
and tensors are built per provider (``Prepared``) and dropped after it is timed, so peak memory
is that provider's own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .case_kinds import BlockCase, ConvBNActCase, ModelCase, UnitCase
from .model_workload import ModelWorkload
from .timing import rotation_copies
from .workload_common import (
    BEST_OF_LAYOUTS,
    SEED,
    PlainProviders,
    Prepared,
    Variant,
    autocast_choices,
    filled,
    flat_tensors,
    randomize_batchnorm,
)


class ConvBNActWorkload(PlainProviders):
    """One conv -> BN -> activation site (:class:`ConvBNActCase`)."""

    reference_on_cpu = False

    def __init__(self, case: ConvBNActCase, device: torch.device, seed: int = SEED):
        self.case, self.device = case, device
        cpu_gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the conv's default init
        conv = nn.Conv3d(case.in_channels, case.out_channels, case.kernel_size, stride=case.stride,
                         padding=case.padding, dilation=case.dilation, groups=case.groups,
                         bias=case.bias)
        layers = [conv, nn.BatchNorm3d(case.out_channels)]
        if case.activation is not None:
            layers.append({"relu": nn.ReLU, "silu": nn.SiLU}[case.activation]())
        self.base = nn.Sequential(*layers)  # fp32 on the CPU; each provider takes a copy
        randomize_batchnorm(self.base, cpu_gen)
        self._make_inputs(seed)

    def _make_inputs(self, seed: int) -> None:
        """The rotating inputs (and output gradients in training), in the case's layout."""
        case, device = self.case, self.device
        gen = torch.Generator(device=device).manual_seed(seed)
        element = torch.empty((), dtype=case.dtype).element_size()
        out_shape = (case.batch, case.out_channels, *case.output_thw)
        per_copy = element * (torch.Size(case.input_shape).numel()
                              + (torch.Size(out_shape).numel() if case.training else 0))
        copies = rotation_copies(per_copy, device)
        make = dict(dtype=case.dtype, device=device, memory_format=case.memory_format, generator=gen)
        self.xs = [filled(case.input_shape, **make) for _ in range(copies)]
        self.dys = [filled(out_shape, **make) for _ in range(copies)] if case.training else []

    # variants
    def eager_variants(self) -> list[Variant]:
        return [Variant(cl, ac, self.case.dtype) for cl in BEST_OF_LAYOUTS
                for ac in autocast_choices(self.case.dtype)]

    def fused_variants(self) -> list[Variant]:
        return [Variant(self.case.channels_last, ac, self.case.dtype)
                for ac in autocast_choices(self.case.dtype)]

    # building blocks
    def _module(self, variant: Variant) -> nn.Sequential:
        site = copy.deepcopy(self.base).to(self.device, memory_format=variant.memory_format)
        if not variant.autocast:  # the convs in the data dtype; BN stays fp32 as under AMP
            for m in site.modules():
                if isinstance(m, nn.Conv3d):
                    m.to(self.case.dtype)
        return site.train(self.case.training)

    def _args(self, variant: Variant) -> list[tuple]:
        xs = [x.contiguous(memory_format=variant.memory_format) for x in self.xs]
        if not self.case.training:
            return [(x,) for x in xs]
        dys = [dy.contiguous(memory_format=variant.memory_format) for dy in self.dys]
        return [(x.detach().requires_grad_(True), dy) for x, dy in zip(xs, dys)]

    def _prepared(self, forward: Callable[[Tensor], Tensor], site: nn.Sequential, variant: Variant,
                  outer: Callable[[], Any] = contextlib.nullcontext) -> Prepared:
        """Eval: ``forward(x)`` without grad. Training: forward, then the gradients of x, the
        conv weight and BN's weight and bias for a random dy."""
        device = self.device
        if not self.case.training:
            def run_eval(x):
                with outer(), torch.no_grad(), variant.context(device):
                    return forward(x)
            return Prepared(run_eval, self._args(variant))

        params = [p for p in site.parameters() if p.requires_grad]

        def run_train(x, dy):
            with outer():
                with variant.context(device):
                    y = forward(x)
                return (y, *torch.autograd.grad(y, (x, *params), dy))
        return Prepared(run_train, self._args(variant))

    # providers
    def reference(self) -> list[Tensor]:
        """The float64 outputs every provider is checked against (same inputs as copy 0)."""
        site = copy.deepcopy(self.base).to(self.device, torch.float64).train(self.case.training)
        variant = Variant(self.case.channels_last, False, torch.float64)
        x = self.xs[0].to(torch.float64)
        args = (x,) if not self.case.training else (x.requires_grad_(True), self.dys[0].to(torch.float64))
        return flat_tensors(self._prepared(site, site, variant).fn(*args))

    def _fused_call(self, site: nn.Sequential) -> Callable[[Tensor], Tensor]:
        from ..functional import conv_bn_act3d

        conv, bn, case = site[0], site[1], self.case

        def forward(x):
            return conv_bn_act3d(
                x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups,
                training=case.training, momentum=bn.momentum, eps=bn.eps, activation=case.activation)
        return forward

    def fused_unavailable(self, backend: str) -> Optional[str]:
        """Why ``backend`` would not run this case fused (it would fall back to torch), or None."""
        from .. import FusedKernelUnavailable, backends, dispatch, functional

        case, device = self.case, self.device
        weight = torch.empty(case.out_channels, case.in_channels // case.groups, *case.kernel_size,
                             dtype=case.dtype, device=device)
        # four distinct vectors: training refuses running statistics that share memory
        vectors = [torch.empty(case.out_channels, device=device) for _ in range(4)]
        with backends.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore", backends.FallbackWarning)
            try:
                plan = functional.plan(
                    self.xs[0], weight, None, *vectors, stride=case.stride,
                    padding=case.padding, dilation=case.dilation, groups=case.groups,
                    training=case.training, activation=case.activation)
            except FusedKernelUnavailable as e:  # R21D_STRICT=1
                return f"no fused kernel: {e}"
            if plan.backend == backend:
                return None
            why = dispatch.resolve(plan.config)[1] or f"runs on {plan.backend}"
            return f"no fused kernel, would run on torch: {why}"

    def fused(self, backend: str, variant: Variant) -> Prepared:
        from ..backends import use_backend

        site = self._module(variant)
        return self._prepared(self._fused_call(site), site, variant, outer=lambda: use_backend(backend))

    def conv_alone(self) -> Prepared:
        """cuDNN's convolution alone (``nn.Conv3d`` in the case's dtype and memory format, no BN
        or activation): what a fused site must match for BN and ReLU to be free. Training: the
        forward, then the gradients of x and the weight."""
        case = self.case
        variant = Variant(case.channels_last, False, case.dtype)
        conv = self._module(variant)[0]
        return dataclasses.replace(self._prepared(conv, conv, variant), checked=None,
                                   note="the convolution alone")

    def matmul(self) -> Optional[Prepared]:
        case = self.case
        if case.family != "pointwise":
            return None
        m, k, n = case.output_rows, case.in_channels, case.out_channels
        gen = torch.Generator(device=self.device).manual_seed(SEED + 1)
        make = dict(dtype=case.dtype, device=self.device, generator=gen)
        element = torch.empty((), dtype=case.dtype).element_size()
        copies = rotation_copies(element * m * (k + (n if case.training else 0)), self.device)
        b = filled((k, n), **make)
        if not case.training:
            return Prepared(lambda a: torch.matmul(a, b),
                            [(filled((m, k), **make),) for _ in range(copies)],
                            checked=None, note="[M, C_in] @ [C_in, C_out]")

        def three_gemms(a, dy):  # forward, input gradient, weight gradient
            return torch.matmul(a, b), torch.matmul(dy, b.t()), torch.matmul(a.t(), dy)
        return Prepared(three_gemms, [(filled((m, k), **make), filled((m, n), **make))
                                      for _ in range(copies)],
                        checked=None, note="3 GEMMs: forward, dgrad, wgrad")


# ----------------------------------------------------------------------------- (2+1)D unit


class UnitWorkload(ConvBNActWorkload):
    """A (2+1)D unit (:class:`UnitCase`) as torchvision's BasicBlock holds it,
    Sequential(Conv2Plus1D, BN, ReLU); r21d runs it through ``r21d.fuse``: one kernel in eval,
    two chained kernels (the intermediate's BN + ReLU in the temporal conv's prologue) in
    training."""

    def __init__(self, case: UnitCase, device: torch.device, seed: int = SEED):
        from torchvision.models.video.resnet import Conv2Plus1D

        self.case, self.device = case, device
        torch.manual_seed(seed)
        k, s = case.spatial_kernel, case.spatial_stride
        unit = Conv2Plus1D(case.in_channels, case.out_channels, case.mid_channels)
        # torchvision's Conv2Plus1D is 1x3x3 stride (1, s, s) then 3x1x1 stride (s, 1, 1); the stem
        # unit is 1x7x7 stride (1, 2, 2) then 3x1x1 stride 1
        unit[0] = nn.Conv3d(case.in_channels, case.mid_channels, (1, k, k), stride=(1, s, s),
                            padding=(0, k // 2, k // 2), bias=False)
        unit[3] = nn.Conv3d(case.mid_channels, case.out_channels, (3, 1, 1),
                            stride=(case.temporal_stride, 1, 1), padding=(1, 0, 0), bias=False)
        self.base = nn.Sequential(unit, nn.BatchNorm3d(case.out_channels), nn.ReLU())
        randomize_batchnorm(self.base, torch.Generator().manual_seed(seed))
        self._make_inputs(seed)

    def _fused_call(self, site: nn.Sequential) -> Callable[[Tensor], Tensor]:
        from ..fuse import fuse

        return fuse(site, inplace=True)

    def fused_unavailable(self, backend: str) -> Optional[str]:
        """Why ``backend`` would not run the unit fused (one kernel in eval, two chained kernels in
        training), or None."""
        from .. import backends
        from ..fuse import fuse, fusion_sites

        variant = self.fused_variants()[0]
        with backends.use_backend(backend):
            (row,) = fusion_sites(fuse(self._module(variant)), dtype=self.case.dtype, device=self.device)
        if row.backend != backend:
            return f"no fused kernel, would run on {row.backend}: {row.note}"
        return None

    def fused(self, backend: str, variant: Variant) -> Prepared:
        prepared = super().fused(backend, variant)
        if backend != "torch":
            prepared.note = "two chained kernels" if self.case.training else "one kernel"
        return prepared


class BlockWorkload(UnitWorkload):
    """A BasicBlock (:class:`BlockCase`): torchvision's ``BasicBlock(c, c, Conv2Plus1D)``; r21d
    runs it through ``r21d.fuse``: its two units, the second with the residual tail in its
    epilogue."""

    def __init__(self, case: BlockCase, device: torch.device, seed: int = SEED):
        from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D

        if case.in_channels != case.out_channels:
            raise ValueError("a block without a shortcut conv keeps its channel count")
        self.case, self.device = case, device
        torch.manual_seed(seed)
        self.base = BasicBlock(case.in_channels, case.out_channels, Conv2Plus1D)
        randomize_batchnorm(self.base, torch.Generator().manual_seed(seed))
        self._make_inputs(seed)

    def fused_unavailable(self, backend: str) -> Optional[str]:
        """Why ``backend`` would not run every site of the block, or None."""
        from .. import backends
        from ..fuse import fuse, fusion_sites

        with backends.use_backend(backend):
            rows = fusion_sites(fuse(self._module(self.fused_variants()[0])),
                                dtype=self.case.dtype, device=self.device)
        elsewhere = [f"{r.site} on {r.backend}: {r.note}" for r in rows if r.backend != backend]
        return "; ".join(elsewhere) or None

    def fused(self, backend: str, variant: Variant) -> Prepared:
        prepared = ConvBNActWorkload.fused(self, backend, variant)
        if backend != "torch":
            prepared.note = "two units, the residual tail in the second's epilogue"
        return prepared


# ----------------------------------------------------------------------------- whole model


WORKLOADS = {
    ConvBNActCase.kind: ConvBNActWorkload,
    ModelCase.kind: ModelWorkload,
    UnitCase.kind: UnitWorkload,
    BlockCase.kind: BlockWorkload,
}


def workload(case, device: torch.device):
    """The workload that builds ``case`` on ``device``."""
    return WORKLOADS[case.kind](case, device)
