"""``FusedSequential``: an ``nn.Sequential`` that runs each conv -> BN (-> activation) run of its
children as one fused site (r21d.fused_site), each (2+1)D unit -> BN (-> activation) run (a child
laid out like torchvision's Conv2Plus1D, then the BN and activation its parent applies) as one
fused unit (r21d.fused_unit), and every other child as usual.

Children, their names and so every state-dict key stay exactly as they were; only ``forward``
changes. ``r21d.fuse`` turns plain sequentials into this class and ``r21d.unfuse`` back.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .fused_site import hooked, conv_base, is_activation, is_batchnorm_for, run_site
from .fused_unit import inline_unit, run_unit, unit_children


@dataclasses.dataclass(frozen=True)
class Run:
    start: int  # index of the conv (or the unit) among the children
    length: int  # 2 (conv, bn) or 3 (conv, bn, activation); 5 or 6 for an inline unit
    unit: bool = False  # the child at ``start`` is a (2+1)D unit (see fused_unit.unit_children)
    inline_unit: bool = False  # children start.. are a unit written out (fused_unit.inline_unit)

    def parts(self, children: list[nn.Module]) -> tuple:
        """(conv, bn, act) of a site; (spatial, bn1, relu, temporal, bn2, act) of a unit."""
        act = children[self.start + self.length - 1]
        if self.inline_unit:
            return (*children[self.start:self.start + 5], act if self.length == 6 else None)
        act = act if self.length == 3 else None
        if self.unit:
            return (*unit_children(children[self.start]), children[self.start + 1], act)
        return children[self.start], children[self.start + 1], act


def _unit_at(children: list[nn.Module], i: int) -> bool:
    """A (2+1)D unit whose BN follows it; a unit with hooks of its own runs as a plain child."""
    parts = unit_children(children[i])
    return (parts is not None and not hooked(children[i]) and i + 1 < len(children)
            and is_batchnorm_for(children[i + 1], parts[3]))


def run_at(children: list[nn.Module], i: int, dims: tuple[int, ...] = (2, 3)) -> Run | None:
    """The fusable run that starts at child ``i``, if any."""
    conv = children[i]
    if 3 in dims and inline_unit(children, i) is not None:
        has_act = i + 5 < len(children) and is_activation(children[i + 5])
        return Run(i, 6 if has_act else 5, inline_unit=True)
    if 3 in dims and _unit_at(children, i):
        unit = True
    else:
        unit = False
        base = conv_base(conv)
        if base is None or (3 if base is nn.Conv3d else 2) not in dims:
            return None
        if i + 1 >= len(children) or not is_batchnorm_for(children[i + 1], conv):
            return None
    if i + 2 < len(children) and is_activation(children[i + 2]):
        return Run(i, 3, unit)
    return Run(i, 2, unit)


def find_runs(seq: nn.Sequential, dims: tuple[int, ...] = (2, 3)) -> list[Run]:
    children = list(seq.children())
    runs, i = [], 0
    while i < len(children):
        run = run_at(children, i, dims)
        if run is None:
            i += 1
        else:
            runs.append(run)
            i += run.length
    return runs


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose conv -> BN (-> ReLU/SiLU) runs execute fused."""

    def forward(self, x):
        children = list(self.children())
        i = 0
        while i < len(children):
            run = run_at(children, i)
            if run is None:
                x = children[i](x)
                i += 1
                continue
            parts = run.parts(children)
            x = run_unit(*parts, x) if run.unit or run.inline_unit else run_site(*parts, x)
            i += run.length
        return x
