"""The whole-model workload: a torchvision or pytorchvideo video model, eager against
``r21d.fuse`` of it and torch.compile, in eval or a training step."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .case_kinds import ModelCase
from .timing import rotation_copies
from .workload_common import (
    BEST_OF_LAYOUTS,
    SEED,
    PlainProviders,
    Prepared,
    Variant,
    autocast_choices,
    cuda_graphed,
    filled,
    randomize_batchnorm,
)


class ModelWorkload(PlainProviders):
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
        self.xs = [filled(case.input_shape, dtype=torch.float32, device=device, generator=gen)
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
