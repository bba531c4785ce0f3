"""Chains in what a module's forward computes: the forward traced with ``torch.fx`` and searched
for conv -> BN (-> residual add) (-> activation) runs and (2+1)D units (r21d.fused_traced runs
them fused).

The trace keeps each child a leaf (a child runs its own forward, itself fused or not), except
plain ``nn.Sequential`` children without hooks and children whose output is a conv's, which are
traced through (X3D's ``norm_b`` is a Sequential whose first child is the BN of the conv before
it; pytorchvideo's ``Conv2plus1d`` ends in the conv whose BN its parent holds). A *chain* is a
Conv3d/Conv2d whose only user is its BatchNorm, then optionally a residual add
(``bn(conv(h)) + x``, ``out += identity``) and an activation: a ReLU or SiLU module, a module
found to compute one of them (pytorchvideo's ``Swish``: probed on a fixed input), or a call
(``F.relu``, ``torch.relu``, ``.relu()``, ``relu_``, ``F.silu``, in place or not), with
``nn.Identity`` children passed through. Each intermediate must have no other user. Two chains
where the first's ReLU output feeds only the second's conv, a 1xkxk conv then a tx1x1 one, are a
(2+1)D unit.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .fused_sequential import FusedSequential
from .fused_site import conv_base, is_batchnorm_for

# The attribute of a traced module's class (r21d.fused_traced.traced_class) naming the user's
# class it subclasses.
BASE = "_r21d_traced_base"

_RELU_CALLS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_SILU_CALLS = {F.silu}
_RELU_METHODS = {"relu", "relu_"}
_ADDS = {operator.add, operator.iadd, torch.add}


def activation_kind(module: nn.Module) -> str | None:
    """"relu" / "silu" for a module that computes one of them (an nn.ReLU or nn.SiLU, or a module
    with no parameters, buffers or children that gives the same values on a probe), else None."""
    for kind, t in (("relu", nn.ReLU), ("silu", nn.SiLU)):
        if isinstance(module, t) and type(module).forward is t.forward:
            return kind
    if (next(module.parameters(), None) is not None or next(module.buffers(), None) is not None
            or module._modules or has_hooks(module)):
        return None
    # the range where ReLU and SiLU differ, and far beyond it (a clamp at 6 or 100 is no ReLU)
    far = torch.tensor([1e2, 1e4, 1e30])
    probe = torch.cat([torch.linspace(-8.0, 8.0, 161), far, -far])
    try:
        with torch.no_grad():  # (its forward: global hooks are not told of a probe)
            out = module.forward(probe.clone())
    except Exception:  # whatever it is, not an activation r21d can run
        return None
    if not isinstance(out, Tensor) or out.shape != probe.shape or out.dtype != probe.dtype:
        return None
    for kind, fn in (("relu", torch.relu), ("silu", F.silu)):
        if torch.allclose(out, fn(probe), rtol=1e-5, atol=1e-6):
            return kind
    return None


@dataclasses.dataclass(frozen=True)
class Activation:
    """A chain's activation: ``kind`` ("relu"/"silu"), and how the forward applied it: a child
    module (``module``: its path) or a call (``call``: (op, target, extra args, kwargs))."""

    kind: str
    module: Optional[str] = None
    call: Optional[tuple] = None

    def call_on(self, y: Tensor) -> Tensor:
        """The call the forward made (an activation that is a module is called by the caller)."""
        op, target, extra, kwargs = self.call
        if op == "call_method":
            return getattr(y, target)(*extra, **kwargs)
        return target(y, *extra, **kwargs)


@dataclasses.dataclass(frozen=True)
class Chain:
    """conv -> BN (-> residual add) (-> activation), or a (2+1)D unit: (spatial conv, BN, ReLU)
    then (temporal conv, BN (-> residual add) (-> activation)). Paths are relative to the traced
    module. ``residual_first``: the forward added ``residual + bn(...)``; ``residual_op``: how
    (where the chain runs as written, ``out += identity`` keeps ``out``'s dtype)."""

    convs: tuple[str, ...]
    bns: tuple[str, ...]
    relu: Optional[Activation]  # a unit's middle ReLU
    act: Optional[Activation]
    residual: bool = False
    residual_first: bool = False
    residual_op: Optional[Callable] = None  # operator.add, operator.iadd or torch.add

    @property
    def unit(self) -> bool:
        return len(self.convs) == 2


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _module_of(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _activation_of(root: nn.Module, node: fx.Node, producer: fx.Node) -> Activation | None:
    """``node`` as the activation of ``producer``'s value, or None."""
    if not node.args or node.args[0] is not producer:
        return None
    extra, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in (*extra, *kwargs.values())):
        return None
    if node.op == "call_module" and not extra and not kwargs:
        kind = activation_kind(_module_of(root, node))
        return Activation(kind, module=node.target) if kind else None
    if node.op == "call_function":
        kind = "relu" if node.target in _RELU_CALLS else "silu" if node.target in _SILU_CALLS else None
        return Activation(kind, call=("call_function", node.target, extra, kwargs)) if kind else None
    if node.op == "call_method" and node.target in _RELU_METHODS and not extra and not kwargs:
        return Activation("relu", call=("call_method", node.target, (), {}))
    return None


def _residual_of(node: fx.Node, producer: fx.Node) -> tuple[fx.Node, bool] | None:
    """(the other operand, whether it came first) when ``node`` adds a tensor to ``producer``."""
    if node.op != "call_function" or node.target not in _ADDS or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if a is producer and isinstance(b, fx.Node) and b is not producer:
        return b, False
    if b is producer and isinstance(a, fx.Node) and node.target is not operator.iadd:
        return a, True
    return None


@dataclasses.dataclass
class Match:
    chain: Chain
    nodes: list  # the graph nodes the chain replaces, in order
    x: fx.Node
    residual: Optional[fx.Node]


def _match_site(root: nn.Module, conv_node: fx.Node, claimed: set) -> tuple[Match | None, str]:
    """The chain that starts at ``conv_node``, or (None, why not). Its residual add and
    activation are taken only where no earlier chain ``claimed`` them (a shortcut's BN feeds the
    add that the main path's BN, earlier in the graph, already ends with)."""
    conv = _module_of(root, conv_node)
    if len(conv_node.args) != 1 or conv_node.kwargs or not isinstance(conv_node.args[0], fx.Node):
        return None, "called with more than its input"
    users = list(conv_node.users)
    if len(users) != 1:
        return None, (f"its output is used {len(users)} times" if users else "its output is unused")
    bn_node = users[0]
    bn = _module_of(root, bn_node)
    if bn is None or not is_batchnorm_for(bn, conv) or bn_node.args != (conv_node,) or bn_node.kwargs:
        what = bn_node.target if bn_node.op != "call_function" else getattr(bn_node.target, "__name__", bn_node.target)
        return None, f"no BatchNorm follows it (its output goes to {what})"
    nodes, residual, first, add = [conv_node, bn_node], None, False, None
    last, nxt = _through_identities(root, bn_node, nodes, claimed)
    found = _residual_of(nxt, last) if nxt is not None and nxt not in claimed else None
    if found is not None:
        residual, first = found
        add = nxt.target
        nodes.append(nxt)
        last, nxt = _through_identities(root, nxt, nodes, claimed)
    act = _activation_of(root, nxt, last) if nxt is not None and nxt not in claimed else None
    if act is not None:
        nodes.append(nxt)
    chain = Chain((conv_node.target,), (bn_node.target,), None, act, residual is not None, first,
                  add)
    return Match(chain, nodes, conv_node.args[0], residual), ""


def _through_identities(root: nn.Module, node: fx.Node, nodes: list,
                        claimed: set) -> tuple[fx.Node, fx.Node | None]:
    """(the last node, its single user or None) after any nn.Identity children that ``node``'s
    value passes alone (X3D's ``norm_b`` is Sequential(BN, Identity) where a block has no SE),
    which join ``nodes``."""
    nxt = _single_user(node)
    while (nxt is not None and nxt not in claimed and nxt.op == "call_module"
           and type(_module_of(root, nxt)) is nn.Identity and not has_hooks(_module_of(root, nxt))
           and nxt.args == (node,) and not nxt.kwargs):
        nodes.append(nxt)
        node, nxt = nxt, _single_user(nxt)
    return node, nxt


def _inside_one_sequential(root: nn.Module, chain: Chain) -> bool:
    """A chain whose conv and BN are children of one Sequential the trace went through: that
    Sequential fuses it itself (r21d.fused_sequential), where its own hooks, if any, fire."""
    parent = chain.convs[0].rpartition(".")[0]
    return bool(parent) and chain.bns[0].rpartition(".")[0] == parent and isinstance(
        root.get_submodule(parent), nn.Sequential)


def _unit_geometry(spatial: nn.Module, temporal: nn.Module) -> bool:
    """A 1xkxk Conv3d (k > 1) then a tx1x1 Conv3d (t > 1) over its output, as fused_unit runs."""
    return (conv_base(spatial) is nn.Conv3d and conv_base(temporal) is nn.Conv3d
            and spatial.kernel_size[0] == 1 and spatial.kernel_size[1:] != (1, 1)
            and temporal.kernel_size[1:] == (1, 1) and temporal.kernel_size[0] != 1
            and temporal.in_channels == spatial.out_channels)


def _as_unit(root: nn.Module, first: Match, second: Match) -> Match | None:
    a, b = first.chain, second.chain
    if (a.residual or a.act is None or a.act.kind != "relu" or second.x is not first.nodes[-1]
            or len(first.nodes[-1].users) != 1
            or not _unit_geometry(root.get_submodule(a.convs[0]), root.get_submodule(b.convs[0]))):
        return None
    chain = Chain(a.convs + b.convs, a.bns + b.bns, a.act, b.act, b.residual, b.residual_first,
                  b.residual_op)
    return Match(chain, first.nodes + second.nodes, first.x, second.residual)


def find_chains(module: nn.Module, graph: fx.Graph) -> tuple[list[Match], dict[str, str]]:
    """The chains (units merged) in ``module``'s traced ``graph``, in graph order, and the convs
    that start none (path -> why). A chain inside one Sequential the trace went through is that
    Sequential's to fuse (r21d.fused_sequential): neither."""
    sites: list[Match] = []
    unfused: dict[str, str] = {}
    claimed: set = set()
    for node in graph.nodes:
        if node.op == "call_module" and conv_base(module.get_submodule(node.target)) is not None:
            match, why = _match_site(module, node, claimed)
            if match is None:
                unfused[node.target] = why
            elif not _inside_one_sequential(module, match.chain):
                sites.append(match)
                claimed.update(match.nodes)
    by_conv = {m.nodes[0]: m for m in sites}
    matches, taken = [], set()
    for m in sites:
        if id(m) in taken:
            continue
        follower = _single_user(m.nodes[-1])
        second = by_conv.get(follower) if follower is not None else None
        unit = _as_unit(module, m, second) if second is not None else None
        if unit is not None:
            taken.add(id(second))
            m = unit
        matches.append(m)
    return matches, unfused


class _InPlaceProxy(fx.Proxy):
    """fx's Proxy records ``out += identity`` as ``out + identity`` (it has no ``__iadd__``): in
    place, the sum keeps ``out``'s dtype and storage, which the rewritten forward must keep too
    (an alias of ``out`` sees it)."""


def _in_place(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name in ("iadd", "isub", "imul", "itruediv"):
    setattr(_InPlaceProxy, f"__{_name}__", _in_place(getattr(operator, _name)))


class _Tracer(fx.Tracer):
    """Children are leaves (each runs its own forward, fused or not) except those traced through
    (:func:`_traced_through`), which it records in ``inlined``."""

    def __init__(self):
        super().__init__()
        self.inlined: list[nn.Module] = []
        self._through: dict[int, bool] = {}

    def through(self, m: nn.Module) -> bool:
        found = self._through.get(id(m))
        if found is None:
            found = self._through[id(m)] = _traced_through(m)
        return found

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not self.through(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        if not self.through(m):
            return super().call_module(m, forward, args, kwargs)
        self.inlined.append(m)
        if isinstance(m, nn.Sequential):  # Sequential.forward, child by child
            (x,) = args
            for child in m:
                x = self.call_module(child, child.forward, (x,), {})
            return x
        return _own_forward(m)(m, *args, **kwargs)


def _own_forward(m: nn.Module) -> Callable:
    """The forward ``m``'s class had before fuse (its own, for a traced module)."""
    return type(m).__dict__.get(BASE, type(m)).forward


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _traced_through(m: nn.Module) -> bool:
    """Whether a parent's trace goes through ``m``: a plain Sequential, or a module whose output
    is a conv's (pytorchvideo's Conv2plus1d: the BN that follows the conv is its parent's), so
    that a chain across the two shows. Never one with hooks of its own (they must fire)."""
    if m is None or has_hooks(m):
        return False
    if isinstance(m, nn.Sequential):
        return type(m).forward is nn.Sequential.forward or isinstance(m, FusedSequential)
    if not (candidate(m) or is_traced(m)):
        return False
    try:
        graph, _ = trace(m)
    except Exception:  # its parent calls it as a leaf
        return False
    (out,) = [n for n in graph.nodes if n.op == "output"]
    value = out.args[0]
    return (isinstance(value, fx.Node) and value.op == "call_module"
            and conv_base(m.get_submodule(value.target)) is not None)


def trace(module: nn.Module) -> tuple[fx.Graph, list[nn.Module]]:
    """``module``'s own forward traced (its class's before fuse), and the modules traced through."""
    tracer = _Tracer()
    cls = type(module)
    base = cls.__dict__.get(BASE)
    if base is not None:  # fx traces type(root).forward
        module.__class__ = base
    try:
        graph = tracer.trace(module)
    finally:
        module.__class__ = cls
    return graph, tracer.inlined


def is_traced(module: nn.Module) -> bool:
    return BASE in type(module).__dict__


def candidate(module: nn.Module) -> bool:
    """Whether ``module``'s own forward may hold a chain: a user's module (not r21d's, whose
    forwards are fused already, nor a Sequential: r21d.fused_sequential) with a conv child, or
    a child whose output is a conv's (traced through, see :func:`_traced_through`)."""
    if (isinstance(module, nn.Sequential) or conv_base(module) is not None
            or type(module).__module__.split(".")[0] == "r21d" or is_traced(module)):
        return False
    children = [c for c in module._modules.values() if c is not None]
    return (any(conv_base(c) is not None for c in children)
            or any(not isinstance(c, nn.Sequential) and _traced_through(c) for c in children))
