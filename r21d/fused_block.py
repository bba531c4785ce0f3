"""The residual tail of torchvision's video ResNet blocks, fused: the last conv's BatchNorm, the
residual add and the block's ReLU run in that conv's epilogue (r21d.fused_site / fused_unit with
``residual``), instead of BN, then ``out += residual``, then ReLU as three passes.

``FusedBasicBlock`` and ``FusedBottleneck`` subclass torchvision's BasicBlock and Bottleneck and
only replace ``forward``: the children, their names and every state-dict key stay; ``r21d.fuse``
swaps the class in and ``r21d.unfuse`` back. Where the tail cannot run fused (hooks on the tail's
modules, a tail that is not conv -> BN, or a fused backend that cannot run it), the block runs
torchvision's own arithmetic on its modules.

A block keeps its tail's parts (and the tail's plan, see r21d.plan_cache) between calls, until the
tail's modules change (identities, types, children) or get hooks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.video.resnet import BasicBlock, Bottleneck

from . import plan_cache
from .functional import autocast_dtype
from .fused_site import conv_base, hooked, is_activation, is_batchnorm_for, run_site
from .fused_unit import run_unit, unit_children


def tail_fusion(seq: nn.Module, act: nn.Module) -> tuple[Optional[tuple], str]:
    """(parts, "") of a tail that runs fused (see :func:`tail_parts`), else (None, why not)."""
    if not isinstance(seq, nn.Sequential) or len(seq) != 2:
        return None, "the block's last layer is not a conv -> BatchNorm sequential"
    if not is_activation(act):
        return None, f"its activation is {type(act).__name__}, not ReLU or SiLU"
    if hooked(seq, *seq.children(), act):
        # the hooks see the tensors of the unfused forward
        return None, "hooks are registered on the tail's modules (conv, BatchNorm or activation)"
    first, bn = seq
    unit = unit_children(first)
    if unit is not None and not hooked(first) and is_batchnorm_for(bn, unit[3]):
        return (*unit, bn, act), ""
    if conv_base(first) is nn.Conv3d and is_batchnorm_for(bn, first):
        return (first, bn, act), ""
    return None, "the block's last layer is not a Conv3d (or (2+1)D unit) and its BatchNorm"


def tail_parts(seq: nn.Module, act: nn.Module) -> Optional[tuple]:
    """The parts of a block's tail ``seq`` (Sequential(conv, BN), or Sequential(Conv2Plus1D-like
    unit, BN)) followed by the residual add and ``act``: (conv, bn, act) for a site,
    (spatial, bn1, relu, temporal, bn2, act) for a unit; None when it cannot run fused."""
    return tail_fusion(seq, act)[0]


def _tail_layout(seq: nn.Module, act: nn.Module) -> tuple:
    """What decides a tail's parts: the modules' identities and types, and the children of the
    tail sequential and of its first child (a (2+1)D unit or a conv), with their types."""
    children = tuple(seq._modules.values())
    first = children[0] if children else None
    grandchildren = tuple(first._modules.values()) if first is not None else ()
    return (seq, type(seq), act, type(act), children, tuple(map(type, children)), grandchildren,
            tuple(map(type, grandchildren)))


def _cached_tail_parts(seq: nn.Module, act: nn.Module, slot: plan_cache.PlanSlot) -> Optional[tuple]:
    """:func:`tail_parts`, kept in ``slot`` while the tail's layout stays and nothing is hooked."""
    layout = _tail_layout(seq, act)
    if hooked(seq, act, *layout[4], *layout[6]):
        slot.plan = None
        return tail_parts(seq, act)
    cached = slot.plan
    if cached is None or cached[0] != layout:
        cached = slot.plan = (layout, tail_parts(seq, act))
    return cached[1]


def run_tail(seq: nn.Module, act: nn.Module, x: Tensor, residual: Tensor,
             slot: Optional[plan_cache.PlanSlot] = None) -> Tensor:
    """``act(seq(x) + residual)``, fused where it may (see :func:`tail_parts`). With a ``slot``
    (the block's), the parts and the tail's plan are kept there between calls."""
    if slot is not None and not torch.compiler.is_compiling():
        parts = _cached_tail_parts(seq, act, slot)
        run_slot = slot.child(len(parts)) if parts is not None else None
        # autocast_dtype(x), cheaper where autocast is off
        cast = plan_cache.autocast_state(x.device) if x.dtype != torch.float64 else None
    else:
        parts, run_slot, cast = tail_parts(seq, act), None, autocast_dtype(x)
    if parts is None or residual.dtype != (cast or x.dtype):
        # torchvision's ``out += residual`` keeps out's dtype (an fp32 residual under autocast,
        # e.g. a block fed fp32 input): the kernels' residual has the output's dtype, so add as
        # torchvision does, after the fused seq
        out = seq(x)
        out += residual
        return act(out)
    if len(parts) == 6:
        return run_unit(*parts, x, residual, slot=run_slot)
    return run_site(*parts, x, residual, slot=run_slot)


def _child(block: nn.Module, name: str):
    """``getattr(block, name)``, for a registered child without nn.Module.__getattr__."""
    modules = block._modules
    return modules[name] if name in modules else getattr(block, name)


class FusedBasicBlock(BasicBlock):
    """torchvision's BasicBlock with conv2's BN + residual add + ReLU in conv2's epilogue."""

    def forward(self, x: Tensor) -> Tensor:
        out = _child(self, "conv1")(x)
        downsample = _child(self, "downsample")
        residual = x if downsample is None else downsample(x)
        return run_tail(_child(self, "conv2"), _child(self, "relu"), out, residual,
                        slot=plan_cache.slot(self))


class FusedBottleneck(Bottleneck):
    """torchvision's Bottleneck with conv3's BN + residual add + ReLU in conv3's epilogue."""

    def forward(self, x: Tensor) -> Tensor:
        out = _child(self, "conv2")(_child(self, "conv1")(x))
        downsample = _child(self, "downsample")
        residual = x if downsample is None else downsample(x)
        return run_tail(_child(self, "conv3"), _child(self, "relu"), out, residual,
                        slot=plan_cache.slot(self))


# torchvision's block class -> its drop-in fused class (fuse swaps only exact classes: a subclass
# may change forward).
FUSED_BLOCKS = {BasicBlock: FusedBasicBlock, Bottleneck: FusedBottleneck}


def tail_of(block: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    """(tail sequential, activation) of a fused block, or None."""
    if isinstance(block, FusedBasicBlock):
        return block.conv2, block.relu
    if isinstance(block, FusedBottleneck):
        return block.conv3, block.relu
    return None
