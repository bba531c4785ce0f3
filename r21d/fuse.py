"""Swap-in (docs/architecture.md, Swap-in): ``fuse`` / ``unfuse`` / ``fusion_report``.

``fuse`` changes the class of three kinds of module:
- every ``nn.Sequential`` (at any depth, subclasses included when they keep Sequential's forward,
  e.g. torchvision's Conv2Plus1D, BasicStem, R2Plus1dStem) that holds a Conv3d ->
  BatchNorm3d/SyncBatchNorm (-> ReLU/SiLU) run becomes a :class:`FusedSequential`;
- torchvision's BasicBlock / Bottleneck become r21d.fused_block's drop-in classes, whose last
  conv applies BN + residual add + ReLU in its epilogue;
- any other module with a conv child has its forward traced (r21d.traced_chains) and, where a
  chain fuses, becomes a subclass of its own class that runs the rewritten forward
  (r21d.fused_traced).

The children are untouched, so every state-dict key and value, the train/eval mode and the device
stay as they were; only the class changes, and ``unfuse`` changes it back.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
from torch import nn

from . import dispatch, fused_traced, plan_cache
from .backends import get_backend
from .fused_sequential import PROGRAM, FusedSequential, find_runs
from .fused_site import conv_base, site_config
from .fused_unit import UNIT_KERNELS, choose_unit
from .modules import SpatioTemporalConv

# Where fuse() keeps the class a FusedSequential had before, for unfuse().
_ORIGINAL_CLASS = "_r21d_unfused_class"


def _fusable_sequential(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        and not isinstance(module, FusedSequential)
        and type(module).forward is nn.Sequential.forward
        and bool(find_runs(module, dims=(3,)))
    )


def _fused_blocks() -> dict[type, type]:
    """torchvision's residual block classes -> r21d's drop-in fused ones (r21d.fused_block); empty
    when torchvision's video models were never imported (then no model holds their blocks)."""
    if "torchvision.models.video.resnet" not in sys.modules:
        return {}
    from .fused_block import FUSED_BLOCKS

    return FUSED_BLOCKS


def _check_model(model, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"r21d.{caller}: model must be an nn.Module, got {type(model).__name__}")


def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every fusable conv -> BN (-> activation) run of ``model`` by a fused site, and the
    residual tail of torchvision's BasicBlock / Bottleneck by the last conv's epilogue."""
    _check_model(model, "fuse")
    if not inplace:
        model = copy.deepcopy(model)
    blocks = _fused_blocks()
    for module in model.modules():
        # Same object and children: only the class, and so forward, changes.
        fused_class = FusedSequential if _fusable_sequential(module) else blocks.get(type(module))
        if fused_class is not None:
            setattr(module, _ORIGINAL_CLASS, type(module))
            module.__class__ = fused_class
        elif fused_traced.candidate(module):
            fused_traced.fuse_module(module)  # any other forward, by what it computes
    return model


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Back to plain PyTorch modules: fused sequentials become their original class again
    (``nn.Sequential`` for r21d's own ConvBNReLU3d, Conv2Plus1d, ...)."""
    _check_model(model, "unfuse")
    if not inplace:
        model = copy.deepcopy(model)
    fused_blocks = {fused: plain for plain, fused in _fused_blocks().items()}
    for module in model.modules():
        # what the fused forward kept between calls (r21d.plan_cache), no part of a plain module
        plan_cache.forget(module)
        module.__dict__.pop(PROGRAM, None)
        fused_traced.unfuse_module(module)
        if isinstance(module, FusedSequential):
            module.__class__ = module.__dict__.pop(_ORIGINAL_CLASS, nn.Sequential)
        elif type(module) in fused_blocks:
            module.__class__ = module.__dict__.pop(_ORIGINAL_CLASS, fused_blocks[type(module)])
    return model


def _pattern(conv, bn, act, residual: bool = False) -> str:
    k = "x".join(map(str, conv.kernel_size))
    parts = [f"{type(conv).__name__}({k}, stride {tuple(conv.stride)})", type(bn).__name__]
    if residual:
        parts.append("+ residual")
    if act is not None:
        parts.append(type(act).__name__)
    return " -> ".join(parts)


def _site_row(site: str, conv, bn, act, dtype, device, residual: bool = False) -> Site:
    cfg, blocker = site_config(conv, bn, act, dtype=dtype, device=device)
    backend, reason = dispatch.resolve(dataclasses.replace(cfg, residual=residual), blocker)
    return Site(site, _pattern(conv, bn, act, residual), cfg.family, backend, reason or "")


def _unit_row(site: str, spatial, bn1, relu, temporal, bn2, act, dtype, device,
              residual: bool = False) -> Site:
    pattern = (f"(2+1)D unit: {_pattern(spatial, bn1, relu)} -> "
               f"{_pattern(temporal, bn2, act, residual)}")
    choice = choose_unit(spatial, bn1, relu, temporal, bn2, act, dtype=dtype, device=device,
                         residual=residual)
    if choice.kernel in UNIT_KERNELS:
        return Site(site, pattern, choice.kernel, "triton", "")
    rows = [_site_row(site, spatial, bn1, relu, dtype, device),
            _site_row(site, temporal, bn2, act, dtype, device, residual)]
    backends = "+".join(dict.fromkeys(r.backend for r in rows))
    notes = "; ".join(n for n in (choice.reason, *(r.note for r in rows)) if n)
    return Site(site, pattern, f"{rows[0].kernel}+{rows[1].kernel}", backends, notes)


def _block_tail(module: nn.Module) -> tuple[nn.Module, tuple | None, str] | None:
    """(tail sequential, its fused parts or None, why it runs unfused) of a fused residual
    block; None for any other module."""
    if not _fused_blocks():
        return None
    from .fused_block import tail_fusion, tail_of

    tail = tail_of(module)
    if tail is None:
        return None
    return (tail[0], *tail_fusion(*tail))


def _with_note(row: Site, note: str) -> Site:
    return dataclasses.replace(row, note="; ".join(n for n in (row.note, note) if n))


def _sites(model: nn.Module, dtype, device):
    """(row, convs) for every fused site and (2+1)D unit of ``model``."""
    units = set()  # the Conv2Plus1D-like children a parent runs as a unit (not as their own site)
    tails = {}  # id(tail sequential) -> the parts its fused block runs (r21d.fused_block)
    plain_tails = {}  # id(tail sequential) -> why its block's residual add + activation run apart
    for name, module in model.named_modules():  # parents come before their children
        if id(module) in units:
            continue
        tail = _block_tail(module)
        if tail is not None:
            seq, parts, why = tail
            if parts is not None:
                tails[id(seq)] = parts
            else:
                plain_tails[id(seq)] = f"residual add + activation not fused: {why}"
        if id(module) in tails:
            parts = tails[id(module)]
            site = f"{name}[0:2] + residual"
            if len(parts) == 6:
                units.add(id(module[0]))
                yield _unit_row(site, *parts, dtype, device, True), (parts[0], parts[3])
            else:
                yield _site_row(site, *parts, dtype, device, True), (parts[0],)
        elif isinstance(module, FusedSequential):
            children = list(module.children())
            tail_note = plain_tails.get(id(module), "")
            for run in find_runs(module):
                site = f"{name or '<root>'}[{run.start}:{run.start + run.length}]"
                parts = run.parts(children)
                if run.unit or run.inline_unit:
                    if run.unit:
                        units.add(id(children[run.start]))
                    row, convs = _unit_row(site, *parts, dtype, device), (parts[0], parts[3])
                else:
                    row, convs = _site_row(site, *parts, dtype, device), (parts[0],)
                yield _with_note(row, tail_note), convs
        elif fused_traced.is_traced(module):
            for chain in fused_traced.program_of(module).chains:
                yield _traced_row(name, module, chain, dtype, device)
        elif isinstance(module, SpatioTemporalConv):
            yield (_unit_row(name or "<root>", module.spatial_conv, module.bn1, module.relu,
                             module.temporal_conv, module.bn2, module.relu, dtype, device),
                   (module.spatial_conv, module.temporal_conv))


def _traced_row(name: str, module: nn.Module, chain, dtype, device) -> tuple[Site, tuple]:
    """(row, convs) of a chain found in a traced module's forward (r21d.fused_traced)."""
    get = module.get_submodule
    site = f"{name}.{chain.convs[0]}" if name else chain.convs[0]
    acts = fused_traced.CANONICAL_ACTIVATIONS
    act = acts[chain.act.kind] if chain.act is not None else None
    convs = tuple(get(path) for path in chain.convs)
    if chain.unit:
        return _unit_row(site, convs[0], get(chain.bns[0]), acts["relu"], convs[1],
                         get(chain.bns[1]), act, dtype, device, chain.residual), convs
    return _site_row(site, convs[0], get(chain.bns[0]), act, dtype, device, chain.residual), convs


def _unfused_reason(parent: nn.Module | None, conv: nn.Module) -> str:
    if conv_base(conv) is None:
        return f"{type(conv).__name__} has its own forward"
    if parent is None:
        return "not inside a module r21d can fuse"
    if fused_traced.is_traced(parent) or fused_traced.candidate(parent):
        return fused_traced.unfused_reason(parent, conv)
    if not isinstance(parent, nn.Sequential):
        return f"inside {type(parent).__name__}, not an nn.Sequential"
    if not isinstance(parent, FusedSequential) and type(parent).forward is not nn.Sequential.forward:
        return f"{type(parent).__name__} has its own forward"
    if list(parent.children())[-1] is conv:
        return "last in its nn.Sequential: its BatchNorm, if any, is outside it"
    return "no BatchNorm follows it"


@dataclasses.dataclass(frozen=True)
class Site:
    """One row of the fusion report: a fused site, or a convolution left unfused (backend
    "unfused", ``note`` says why). For fused sites ``note`` says why a requested fused backend
    cannot run it, if so."""

    site: str
    pattern: str
    kernel: str
    backend: str
    note: str


def fusion_sites(model: nn.Module, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> list[Site]:
    """The rows of :func:`fusion_report`, for programs: each fused site with the backend that
    would run it (for ``dtype``/``device``, by default those of the model's parameters), then
    every convolution left unfused."""
    _check_model(model, "fusion_sites")
    rows, fused_convs = [], set()
    for row, convs in _sites(model, dtype, device):
        if any(id(c) in fused_convs for c in convs):
            continue  # a Sequential's run that a traced parent's forward runs (listed there)
        rows.append(row)
        fused_convs.update(id(c) for c in convs)
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv3d, nn.Conv2d)) and id(module) not in fused_convs:
            k = "x".join(map(str, module.kernel_size))
            rows.append(Site(name, f"{type(module).__name__}({k}, stride {tuple(module.stride)})",
                             "-", "unfused", _unfused_reason(parents.get(id(module)), module)))
    return rows


def fusion_report(model: nn.Module, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> str:
    """A table: each fused site, its pattern, the kernel family and the backend that would run it
    (for ``dtype``/``device``, by default those of the model's parameters), then the convolutions
    left unfused and why."""
    sites = fusion_sites(model, dtype=dtype, device=device)
    fields = [f.name for f in dataclasses.fields(Site)]
    rows = [tuple(fields)] + [tuple(getattr(s, f) for f in fields) for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(len(fields))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    fused = sum(1 for s in sites if s.backend != "unfused")
    lines.append(f"{fused} fused sites, {len(sites) - fused} convolutions unfused "
                 f"(requested backend: {get_backend()})")
    return "\n".join(lines)
