"""``FusedSequential``: an ``nn.Sequential`` that runs each conv -> BN (-> activation) run of its
children as one fused site (r21d.fused_site), each (2+1)D unit -> BN (-> activation) run (a child
laid out like torchvision's Conv2Plus1D, then the BN and activation its parent applies) as one
fused unit (r21d.fused_unit), and every other child as usual.

Children, their names and so every state-dict key stay exactly as they were; only ``forward``
changes. ``r21d.fuse`` turns plain sequentials into this class and ``r21d.unfuse`` back.

The layout of runs is worked out on the first call and kept (:class:`Program`, with a plan slot
per run, see r21d.plan_cache) until the children change: their identities and types, those of
the children of a child sequential (a (2+1)D unit's), or hooks on such a child or global module
hooks (which decide whether a unit runs fused).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .fused_site import conv_base, hooked, is_activation, is_batchnorm_for, run_site
from .fused_unit import inline_unit, run_unit, unit_children
from .plan_cache import PlanSlot


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


def _layout(modules: tuple) -> tuple:
    """What decides the runs of a sequential of ``modules``: their types, and the children (and
    their types) of each one that is a sequential itself (a (2+1)D unit or not); with the
    modules' identities (the tuple itself), compared by ``==``."""
    return tuple(
        (type(m), tuple(m._modules.values()), tuple(type(c) for c in m._modules.values()))
        if isinstance(m, nn.Sequential) else type(m)
        for m in modules)


_PLAIN, _SITE, _UNIT = 0, 1, 2


class Program:
    """The runs of a FusedSequential's children as steps (plain child, fused site, fused unit),
    each fused one with its plan slot; valid for ``modules`` (its children, None ones included,
    by identity) with ``layout`` (see :func:`_layout`) while no child sequential (a (2+1)D unit
    or not) and no module globally is hooked (``cacheable``: none was when it was made)."""

    __slots__ = ("modules", "layout", "sequentials", "steps", "cacheable")

    def __init__(self, modules: tuple):
        self.modules = modules
        self.layout = _layout(modules)
        self.sequentials = tuple(m for m in modules if isinstance(m, nn.Sequential))
        self.cacheable = not hooked(*self.sequentials)
        children = [m for m in modules if m is not None]
        steps, i = [], 0
        while i < len(children):
            run = run_at(children, i)
            if run is None:
                steps.append((_PLAIN, children[i], None))
                i += 1
                continue
            kind = _UNIT if run.unit or run.inline_unit else _SITE
            steps.append((kind, run.parts(children), PlanSlot() if self.cacheable else None))
            i += run.length
        self.steps = tuple(steps)

    def valid(self, modules: tuple) -> bool:
        return (modules == self.modules and _layout(modules) == self.layout
                and not hooked(*self.sequentials))

    def __call__(self, x):
        for kind, what, slot in self.steps:
            if kind == _PLAIN:
                x = what(x)
            elif kind == _SITE:
                x = run_site(*what, x, slot=slot)
            else:
                x = run_unit(*what, x, slot=slot)
        return x

    # a copied or unpickled sequential works its runs out anew
    def __deepcopy__(self, memo):
        return None

    def __copy__(self):
        return None

    def __reduce__(self):
        return (_no_program, ())


def _no_program():
    return None


PROGRAM = "_r21d_program"


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose conv -> BN (-> ReLU/SiLU) runs execute fused."""

    def forward(self, x):
        if not torch.compiler.is_compiling():
            modules = tuple(self._modules.values())
            program = self.__dict__.get(PROGRAM)
            if program is None or not program.valid(modules):
                program = Program(modules)
                self.__dict__[PROGRAM] = program if program.cacheable else None
            return program(x)
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
