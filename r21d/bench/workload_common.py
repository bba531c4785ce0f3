"""What every workload shares: the eager variants (memory format x autocast), a provider's
prepared callables and inputs, CUDA-graph capture, random inputs and BatchNorm statistics."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, nn

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


def flat_tensors(outputs: Any) -> list[Tensor]:
    if isinstance(outputs, Tensor):
        return [outputs]
    return [t for item in outputs for t in flat_tensors(item)]


@dataclasses.dataclass
class Prepared:
    """A provider ready to time: ``fn(*arg_sets[i])`` for rotating i."""

    fn: Callable[..., Any]
    arg_sets: list[tuple]
    # outputs -> the tensors compared with the reference; None: nothing to check (matmul)
    checked: Optional[Callable[[Any], list[Tensor]]] = flat_tensors
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


def filled(shape, *, dtype, device, memory_format=torch.contiguous_format, generator=None) -> Tensor:
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


class PlainProviders:
    """The ``eager`` and ``torch.compile`` providers of a workload: its plain PyTorch module
    (``_module(variant)``), run as it is or compiled."""

    def eager(self, variant: Variant) -> Prepared:
        module = self._module(variant)
        return self._prepared(module, module, variant)

    def compiled(self, variant: Variant, mode: Optional[str]) -> Prepared:
        module = self._module(variant)
        return self._prepared(torch.compile(module, mode=mode), module, variant)
