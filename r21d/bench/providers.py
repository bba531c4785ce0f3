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
the activation and the gradients of x, weight, gamma and beta; a model's training step: the
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
import torch.nn.functional as F
from torch import Tensor, nn

from .case_kinds import BlockCase, ConvBNActCase, ModelCase, UnitCase
from .timing import rotation_copies

SEED = 0
BEST_OF_LAYOUTS = (True, False)  # channels_last_3d, NCDHW


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a provider is run: memory format, and whether autocast casts fp32 parameters to
    ``dtype``. Without autocast the parameters are in ``dtype`` already: a site's conv weight
    (its BatchNorm stays fp32, as under AMP), or a whole model cast with ``model.to(dtype)``."""

    channels_last: bool
    autocast: bool
    dtype: torch.dtype
    cuda_graph: bool = False  # captured once into a CUDA graph, then replayed

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    @property
    def label(self) -> str:
        layout = "channels_last_3d" if self.channels_last else "NCDHW"
        dtype = str(self.dtype).replace("torch.", "")
        graph = " CUDA graph" if self.cuda_graph else ""
        return f"{layout} {'autocast ' if self.autocast else ''}{dtype}{graph}"

    def context(self, device: torch.device):
        if self.autocast:
            return torch.autocast(device.type, dtype=self.dtype)
        return contextlib.nullcontext()


def autocast_choices(dtype: torch.dtype) -> tuple[bool, ...]:
    """Autocast is a variant only for 16-bit cases (fp32 under fp32 autocast is the same run)."""
    return (False, True) if dtype in (torch.float16, torch.bfloat16) else (False,)


def _flat_tensors(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    return [t for item in outputs for t in _flat_tensors(item)]


@dataclasses.dataclass
class Prepared:
    """A provider ready to time: ``fn(*arg_sets[i])`` for rotating i."""

    fn: Callable[..., Any]
    arg_sets: list[tuple]
    # outputs -> the tensors compared with the reference; None: nothing to check (matmul)
    checked: Optional[Callable[[Any], list[Tensor]]] = _flat_tensors
    note: str = ""
    details: str = ""  # printed once (e.g. the fusion report of a fused model)


CUDA_GRAPH_WARMUP = 3


def cuda_graphed(fn: Callable[..., Any], example: tuple[Tensor, ...]) -> Callable[..., Any]:
    """``fn`` captured into a CUDA graph, as a user would capture a fused model: warm-up calls on
    a side stream first (Triton autotuning, cuDNN's algorithm search and lazy initialisation must
    not happen during capture), then one captured call on static inputs. The returned callable
    copies its arguments into those inputs, replays the graph and returns the static outputs
    (overwritten by the next call)."""
    static = tuple(a.clone() for a in example)  # clone keeps each input's memory format
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CUDA_GRAPH_WARMUP):
            fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static)

    def replay(*args):
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return outputs
    return replay


def _filled(shape, *, dtype, device, memory_format=torch.contiguous_format, generator=None) -> Tensor:
    """Random normal data (never zeros), laid out in ``memory_format``."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return t.normal_(generator=generator)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Running statistics and affine parameters away from their 0/1 defaults, so eval-mode BN
    does real work and a wrong fold shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                if m.affine:
                    m.weight.copy_(1 + 0.1 * torch.randn(c, generator=generator))
                    m.bias.copy_(0.1 * torch.randn(c, generator=generator))


# ----------------------------------------------------------------------------- conv + BN + act


class _PlainProviders:
    """The ``eager`` and ``torch.compile`` providers of a workload: its plain PyTorch module
    (``_module(variant)``), run as it is or compiled."""

    def eager(self, variant: Variant) -> Prepared:
        module = self._module(variant)
        return self._prepared(module, module, variant)

    def compiled(self, variant: Variant, mode: Optional[str]) -> Prepared:
        module = self._module(variant)
        return self._prepared(torch.compile(module, mode=mode), module, variant)


class ConvBNActWorkload(_PlainProviders):
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
        self.xs = [_filled(case.input_shape, **make) for _ in range(copies)]
        self.dys = [_filled(out_shape, **make) for _ in range(copies)] if case.training else []

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
        conv weight and BN's gamma and beta for a random dy."""
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
        return _flat_tensors(self._prepared(site, site, variant).fn(*args))

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
        b = _filled((k, n), **make)
        if not case.training:
            return Prepared(lambda a: torch.matmul(a, b),
                            [(_filled((m, k), **make),) for _ in range(copies)],
                            checked=None, note="[M, C_in] @ [C_in, C_out]")

        def three_gemms(a, dy):  # forward, input gradient, weight gradient
            return torch.matmul(a, b), torch.matmul(dy, b.t()), torch.matmul(a.t(), dy)
        return Prepared(three_gemms, [(_filled((m, k), **make), _filled((m, n), **make))
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


class ModelWorkload(_PlainProviders):
    """A torchvision video model (:class:`ModelCase`): eval forward, or a training step under
    autocast (forward, cross-entropy, backward, SGD with momentum)."""

    reference_on_cpu = True  # keep it out of the providers' peak memory
    learning_rate = 1e-3

    def __init__(self, case: ModelCase, device: torch.device, seed: int = SEED):
        self.case, self.device = case, device
        torch.manual_seed(seed)
        self.base = case.builder()(num_classes=case.num_classes)  # fp32 on the CPU
        randomize_batchnorm(self.base, torch.Generator().manual_seed(seed))
        gen = torch.Generator(device=device).manual_seed(seed)
        per_copy = 4 * torch.Size(case.input_shape).numel()
        copies = rotation_copies(per_copy, device)
        self.xs = [_filled(case.input_shape, dtype=torch.float32, device=device, generator=gen)
                   for _ in range(copies)]
        self.labels = [torch.randint(0, case.num_classes, (case.batch,), device=device, generator=gen)
                       for _ in range(copies)]

    def _autocast_choices(self) -> tuple[bool, ...]:
        choices = autocast_choices(self.case.dtype)
        # A 16-bit training step runs under autocast only (parameters stay fp32, as in AMP).
        return choices[-1:] if self.case.training else choices

    def eager_variants(self) -> list[Variant]:
        return [Variant(cl, ac, self.case.dtype) for cl in BEST_OF_LAYOUTS for ac in self._autocast_choices()]

    def fused_variants(self) -> list[Variant]:
        """The case's layout with and without autocast; latency cases on a GPU also each of
        those captured into a CUDA graph."""
        graphs = (False, True) if self.case.cuda_graph and self.device.type == "cuda" else (False,)
        return [Variant(self.case.channels_last, ac, self.case.dtype, cuda_graph=g)
                for g in graphs for ac in self._autocast_choices()]

    def _module(self, variant: Variant) -> nn.Module:
        model = copy.deepcopy(self.base).to(self.device, memory_format=variant.memory_format)
        if not variant.autocast:
            model.to(variant.dtype)
        return model.train(self.case.training)

    def _args(self, variant: Variant) -> list[tuple]:
        dtype = torch.float32 if variant.autocast else variant.dtype
        xs = [x.to(dtype).contiguous(memory_format=variant.memory_format) for x in self.xs]
        if not self.case.training:
            return [(x,) for x in xs]
        return list(zip(xs, self.labels))

    def _prepared(self, forward: nn.Module, model: nn.Module, variant: Variant,
                  outer: Callable[[], Any] = contextlib.nullcontext) -> Prepared:
        device = self.device
        if not self.case.training:
            def run_eval(x):
                with outer(), torch.no_grad(), variant.context(device):
                    return forward(x)
            return Prepared(run_eval, self._args(variant))

        optimizer = torch.optim.SGD(model.parameters(), lr=self.learning_rate, momentum=0.9)

        def train_step(x, labels):
            with outer():
                with variant.context(device):
                    logits = forward(x)
                loss = F.cross_entropy(logits.float(), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return logits, loss.detach()
        return Prepared(train_step, self._args(variant))

    def reference(self) -> list[Tensor]:
        """Logits (and, training, the loss) of the first step in float64.

        A training step is checked on its forward only: in bf16 the parameter gradients of a
        deep random network differ from float64 in direction by ~100% for eager PyTorch too
        (rounding is amplified layer by layer), so they cannot tell right from wrong; the
        pointwise training cases check every gradient of the fused op instead.
        """
        model = copy.deepcopy(self.base).to(self.device, torch.float64).train(self.case.training)
        with torch.no_grad():
            logits = model(self.xs[0].to(torch.float64))
            if not self.case.training:
                return [logits]
            return [logits, F.cross_entropy(logits, self.labels[0])]

    def fused_unavailable(self, backend: str) -> Optional[str]:
        """Sites without a fused kernel run on torch (the fusion report lists them); the Triton
        interpreter is too slow for a whole model (its 512-1152-channel convs take minutes)."""
        from ..ops import FUSED_CALLS

        if backend != "torch" and not any(name == backend for name, _family in FUSED_CALLS):
            return f"the {backend} backend has no kernels yet: every site would run on torch"
        if backend == "triton" and self.device.type == "cpu":
            return "a whole model takes many minutes in the Triton interpreter (the conv cases cover its kernels)"
        return None

    def fused(self, backend: str, variant: Variant) -> Prepared:
        from .. import fuse, fusion_report
        from ..backends import use_backend

        model = fuse(self._module(variant), inplace=True)
        prepared = self._prepared(model, model, variant, outer=lambda: use_backend(backend))
        if variant.cuda_graph:
            if self.case.training:
                raise ValueError("CUDA graph variants are eval only")
            prepared.fn = cuda_graphed(prepared.fn, prepared.arg_sets[0])
            prepared.note = "the fused model captured into a CUDA graph"
        if backend != "torch":  # where each site runs (on torch: everywhere, nothing to show)
            with use_backend(backend):
                prepared.details = fusion_report(model, dtype=variant.dtype, device=self.device)
        return prepared

    def matmul(self) -> Optional[Prepared]:
        return None


WORKLOADS = {
    ConvBNActCase.kind: ConvBNActWorkload,
    ModelCase.kind: ModelWorkload,
    UnitCase.kind: UnitWorkload,
    BlockCase.kind: BlockWorkload,
}


def workload(case, device: torch.device):
    """The workload that builds ``case`` on ``device``."""
    return WORKLOADS[case.kind](case, device)
