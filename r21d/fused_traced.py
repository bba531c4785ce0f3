"""Any module's own forward, fused where what it computes is conv -> BN (-> residual add)
(-> activation): found by tracing the forward with ``torch.fx``, not by the module's class.

A module's forward is traced with each child as a leaf (a child runs its own forward, itself fused
or not), except plain ``nn.Sequential`` children without hooks, which are traced through (X3D's
``norm_b`` is a Sequential whose first child is the BN of the conv before it). In the graph, a
*chain* is a Conv3d/Conv2d child whose only user is its BatchNorm child, then optionally a residual
add (``bn(conv(h)) + x``, ``out += identity``) and an activation: a ReLU or SiLU module, a module
found to compute one of them (pytorchvideo's ``Swish``: probed on a fixed input), or a call
(``F.relu``, ``torch.relu``, ``.relu()``, ``relu_``, ``F.silu``, in-place or not). Each
intermediate must have no other user. Two chains where the first's ReLU output feeds only the
second's conv, a 1xkxk conv then a tx1x1 one, are a (2+1)D unit (r21d.fused_unit).

The module keeps its identity, children and state: its class becomes a subclass of its own (made
once per class, :func:`traced_class`) whose forward runs the rewritten graph as Python code, each
chain through r21d.fused_site.run_site or r21d.fused_unit.run_unit. The code reaches the children
through ``self`` on every call; the program is kept in the module's ``__dict__`` with the children
it was traced for and traced again when they change. A chain whose modules have hooks (or a
residual the kernels cannot add: another shape or dtype) runs its original ops that call.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import plan_cache
from ._op_common import out_size
from .fused_sequential import FusedSequential
from .fused_site import conv_base, is_batchnorm_for, register_activation, run_site, site_geometry
from .fused_unit import run_unit
from .plan_cache import autocast_state, hooked

# The attribute of a traced module's __dict__ that holds its program (:class:`TracedProgram`).
PROGRAM = "_r21d_traced"

_RELU_CALLS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_SILU_CALLS = {F.silu}
_RELU_METHODS = {"relu", "relu_"}
_ADDS = {operator.add, operator.iadd, torch.add}

# The activation modules run_site is handed for an activation the forward called as a function.
CANONICAL_ACTIVATIONS = {"relu": nn.ReLU(), "silu": nn.SiLU()}


def activation_kind(module: nn.Module) -> str | None:
    """"relu" / "silu" for a module that computes one of them (an nn.ReLU or nn.SiLU, or a module
    with no parameters, buffers or children that gives the same values on a probe), else None."""
    for kind, t in (("relu", nn.ReLU), ("silu", nn.SiLU)):
        if isinstance(module, t) and type(module).forward is t.forward:
            return kind
    if (next(module.parameters(), None) is not None or next(module.buffers(), None) is not None
            or module._modules or _has_hooks(module)):
        return None
    probe = torch.linspace(-8.0, 8.0, 161)
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
class _Match:
    chain: Chain
    nodes: list  # the graph nodes the chain replaces, in order
    x: fx.Node
    residual: Optional[fx.Node]


def _match_site(root: nn.Module, conv_node: fx.Node, claimed: set) -> tuple[_Match | None, str]:
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
    return _Match(chain, nodes, conv_node.args[0], residual), ""


def _through_identities(root: nn.Module, node: fx.Node, nodes: list,
                        claimed: set) -> tuple[fx.Node, fx.Node | None]:
    """(the last node, its single user or None) after any nn.Identity children that ``node``'s
    value passes alone (X3D's ``norm_b`` is Sequential(BN, Identity) where a block has no SE),
    which join ``nodes``."""
    nxt = _single_user(node)
    while (nxt is not None and nxt not in claimed and nxt.op == "call_module"
           and type(_module_of(root, nxt)) is nn.Identity and not _has_hooks(_module_of(root, nxt))
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


def _as_unit(root: nn.Module, first: _Match, second: _Match) -> _Match | None:
    a, b = first.chain, second.chain
    if (a.residual or a.act is None or a.act.kind != "relu" or second.x is not first.nodes[-1]
            or len(first.nodes[-1].users) != 1
            or not _unit_geometry(root.get_submodule(a.convs[0]), root.get_submodule(b.convs[0]))):
        return None
    chain = Chain(a.convs + b.convs, a.bns + b.bns, a.act, b.act, b.residual, b.residual_first,
                  b.residual_op)
    return _Match(chain, first.nodes + second.nodes, first.x, second.residual)


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


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _traced_through(m: nn.Module) -> bool:
    """Whether a parent's trace goes through ``m``: a plain Sequential, or a module whose output
    is a conv's (pytorchvideo's Conv2plus1d: the BN that follows the conv is its parent's), so
    that a chain across the two shows. Never one with hooks of its own (they must fire)."""
    if m is None or _has_hooks(m):
        return False
    if isinstance(m, nn.Sequential):
        return type(m).forward is nn.Sequential.forward or isinstance(m, FusedSequential)
    if not (candidate(m) or is_traced(m)):
        return False
    try:
        graph, _ = _trace(m)
    except Exception:  # its parent calls it as a leaf
        return False
    (out,) = [n for n in graph.nodes if n.op == "output"]
    value = out.args[0]
    return (isinstance(value, fx.Node) and value.op == "call_module"
            and conv_base(m.get_submodule(value.target)) is not None)


def _trace(module: nn.Module) -> tuple[fx.Graph, list[nn.Module]]:
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


def _layout(module: nn.Module, inlined) -> tuple:
    """The children a program was traced for, and the children of the modules traced through."""
    return (tuple(module._modules.values()),
            tuple((m, tuple(m._modules.values())) for m in inlined))


class TracedProgram:
    """A module's rewritten forward (``forward``, None when nothing fuses or tracing failed),
    its ``chains``, ``unfused`` convs (path -> why) and ``error`` (why it could not be traced).
    ``inlined``: the modules whose forward it no longer calls (those traced through, identities
    a chain absorbed), whose children and hooks decide whether it still applies."""

    def __init__(self, module: nn.Module):
        self.forward: Optional[Callable] = None
        self.chains: list[Chain] = []
        self.unfused: dict[str, str] = {}
        self.error = ""
        self.inlined: tuple = ()
        try:
            graph, inlined = _trace(module)
        except Exception as e:  # data-dependent control flow, untraceable calls, ...
            first_line = str(e).splitlines()[0] if str(e) else ""
            self.error = f"not traceable: {type(e).__name__}: {first_line}"
        else:
            matches = self._find(module, graph)
            # an identity a chain absorbed is no longer called: watched for hooks like those
            absorbed = (_module_of(module, n) for m in matches for n in m.nodes)
            identities = tuple(a for a in absorbed if type(a) is nn.Identity)
            self.inlined = tuple(inlined) + identities
            if matches:
                self.forward = _compile(graph, matches)
        self.layout = _layout(module, self.inlined)

    def _find(self, module: nn.Module, graph: fx.Graph) -> list[_Match]:
        sites: list[_Match] = []
        claimed: set = set()
        for node in graph.nodes:
            if node.op == "call_module" and conv_base(module.get_submodule(node.target)) is not None:
                match, why = _match_site(module, node, claimed)
                if match is None:
                    self.unfused[node.target] = why
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
        self.chains = [m.chain for m in matches]
        return matches

    def valid(self, module: nn.Module) -> bool:
        """Traced for these children, and no module it traces through has hooks now."""
        return (_layout(module, self.inlined) == self.layout
                and not any(_has_hooks(m) for m in self.inlined))

    # a copy keeps the program, for the copy's children (it holds no tensor and no plan: the
    # plans live in the convs' slots); an unpickled module traces anew
    def __deepcopy__(self, memo):
        copied = object.__new__(TracedProgram)
        copied.__dict__.update(self.__dict__)
        copied.layout = copy.deepcopy(self.layout, memo)
        copied.inlined = copy.deepcopy(self.inlined, memo)
        return copied

    def __reduce__(self):
        return (_no_program, ())


def _no_program():
    return None


def _compile(graph: fx.Graph, matches: list[_Match]) -> Callable:
    """The graph with each match replaced by a call of its chain's runner, as a function of
    (self, *inputs)."""
    replaced: dict = {}  # a chain's last node -> its runner's call, for the chains after it
    for i, m in enumerate(matches):
        runner = _runner(m.chain, i)
        last = m.nodes[-1]
        modules = []
        with graph.inserting_before(m.nodes[0]):
            for path in _module_paths(m.chain):
                modules.append(graph.get_attr(path) if path is not None else None)
        with graph.inserting_before(last):
            fused = graph.call_function(runner, (*modules, replaced.get(m.x, m.x),
                                                 replaced.get(m.residual, m.residual)))
        last.replace_all_uses_with(fused)
        replaced[last] = fused
        for node in reversed(m.nodes):
            graph.erase_node(node)
    graph.lint()
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, "<r21d traced forward>", "exec"), scope)
    return scope["forward"]


def _module_paths(chain: Chain) -> list:
    """What a chain's runner is handed: its conv and BN modules, and the activation modules
    (None where the forward called a function)."""
    act = chain.act.module if chain.act is not None else None
    if chain.unit:
        return [chain.convs[0], chain.bns[0], chain.relu.module, chain.convs[1], chain.bns[1], act]
    return [chain.convs[0], chain.bns[0], act]


def _runner(chain: Chain, index: int) -> Callable:
    """The function the rewritten forward calls for ``chain``: its modules (None for an
    activation the forward called as a function), the input and the residual."""
    relu_kind = chain.relu.kind if chain.relu is not None else None
    act_kind = chain.act.kind if chain.act is not None else None

    if chain.unit:
        def run(spatial, bn1, relu, temporal, bn2, act, x, residual):
            if residual is not None and not _residual_fits(
                    temporal, _conv_output_shape(spatial, x.shape), x, residual):
                mid = _apply(chain.relu, relu, bn1(spatial(x)))
                return _tail(chain, act, bn2(temporal(mid)), residual)
            return run_unit(spatial, bn1, _activation(relu, relu_kind), temporal, bn2,
                            _activation(act, act_kind), x, residual,
                            slot=plan_cache.slot(temporal, "traced-unit"))
    else:
        def run(conv, bn, act, x, residual):
            if residual is not None and not _residual_fits(conv, x.shape, x, residual):
                return _tail(chain, act, bn(conv(x)), residual)
            return run_site(conv, bn, _activation(act, act_kind), x, residual,
                            slot=plan_cache.slot(conv, "traced-site"))

    run.__name__ = run.__qualname__ = f"r21d_chain_{index}"
    run.__module__ = __name__
    return run


def _activation(module: Optional[nn.Module], kind: Optional[str]) -> Optional[nn.Module]:
    """The activation module a fused site runs: the forward's own (so that the torch path and
    its hooks are the forward's), or for a call, an nn.ReLU / nn.SiLU."""
    if kind is None:
        return None
    if module is None:
        return CANONICAL_ACTIVATIONS[kind]
    if type(module) not in _STANDARD:  # a copy of a probed module is registered again
        register_activation(module, kind)
    return module


_STANDARD = (nn.ReLU, nn.SiLU)


def _apply(activation: Optional[Activation], module: Optional[nn.Module], y: Tensor) -> Tensor:
    """The activation as the forward applied it: its module, or its call."""
    if activation is None:
        return y
    return module(y) if module is not None else activation.call_on(y)


def _tail(chain: Chain, act: Optional[nn.Module], y: Tensor, residual) -> Tensor:
    """The chain's residual add and activation as the forward wrote them (hooks see them)."""
    if chain.residual:
        add = chain.residual_op
        y = add(residual, y) if chain.residual_first else add(y, residual)
    return _apply(chain.act, act, y)


def _conv_output_shape(conv: nn.Module, in_shape) -> tuple:
    stride, padding, dilation, _ = site_geometry(conv)
    lift = 1 if isinstance(conv, nn.Conv2d) else 0
    kernel = (1,) * lift + tuple(conv.kernel_size)
    sizes = (1,) * lift + tuple(in_shape[2:])
    out = [out_size(s, k, st, p, d) for s, k, st, p, d in zip(sizes, kernel, stride, padding, dilation)]
    return (in_shape[0], conv.out_channels, *out[lift:])


def _residual_fits(conv: nn.Module, in_shape, x: Tensor, residual: Any) -> bool:
    """Whether the kernels can add ``residual`` as the forward would: a tensor of the output's
    shape and dtype (``conv``'s output for an input of ``in_shape``). Another dtype (PyTorch
    would promote) or a broadcast runs the ops as written."""
    if residual is None:
        return True
    if not isinstance(residual, Tensor) or len(in_shape) != x.dim():
        return False
    dtype = autocast_state(x.device) if x.dtype != torch.float64 else None
    return (residual.dtype == (dtype or x.dtype)
            and tuple(residual.shape) == _conv_output_shape(conv, in_shape))


# --- the module side: a subclass per class, whose forward runs the program -------------------

_TRACED_CLASSES: dict[type, type] = {}
BASE = "_r21d_traced_base"


def traced_class(cls: type) -> type:
    """``cls`` with its forward run through the module's traced program (made once per class)."""
    traced = _TRACED_CLASSES.get(cls)
    if traced is None:
        traced = type(cls.__name__, (cls,), {
            "forward": _traced_forward, "__reduce_ex__": _reduce_ex, BASE: cls,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__})
        _TRACED_CLASSES[cls] = traced
    return traced


def is_traced(module: nn.Module) -> bool:
    return BASE in type(module).__dict__


def program_of(module: nn.Module) -> TracedProgram:
    """The module's program, traced now if it has none or its children changed."""
    program = module.__dict__.get(PROGRAM)
    if program is None or not program.valid(module):
        program = module.__dict__[PROGRAM] = TracedProgram(module)
    return program


def _traced_forward(self, *args, **kwargs):
    if hooked():  # global module hooks: every module's forward runs, for them to see it
        return type(self).__dict__[BASE].forward(self, *args, **kwargs)
    program = self.__dict__.get(PROGRAM)
    if program is None or not program.valid(self):
        if torch.compiler.is_compiling():  # tracing is no part of a compiled graph
            program = None
        else:
            program = program_of(self)
    if program is None or program.forward is None:
        return type(self).__dict__[BASE].forward(self, *args, **kwargs)
    return program.forward(self, *args, **kwargs)


def _reduce_ex(self, protocol):
    # pickled as the user's class, fused again when loaded (a class made at run time has no
    # importable name)
    return (_rebuild, (type(self).__dict__[BASE],), self.__getstate__())


def _rebuild(cls: type) -> nn.Module:
    return object.__new__(traced_class(cls))


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


def unfused_reason(module: nn.Module, conv: nn.Module) -> str:
    """Why the conv child ``conv`` of ``module`` (traced or a candidate) runs unfused."""
    program = program_of(module) if is_traced(module) else TracedProgram(module)
    if program.error:
        return program.error
    for path, child in module.named_children():
        if child is conv:
            return program.unfused.get(path, "its forward does not call it")
    return "not a child of the traced module"


def fuse_module(module: nn.Module) -> TracedProgram:
    """Trace ``module``; where a chain fuses, its class becomes :func:`traced_class`'s."""
    program = TracedProgram(module)
    if program.forward is not None:
        module.__dict__[PROGRAM] = program
        module.__class__ = traced_class(type(module))
    return program


def unfuse_module(module: nn.Module) -> None:
    module.__dict__.pop(PROGRAM, None)
    if is_traced(module):
        module.__class__ = type(module).__dict__[BASE]
