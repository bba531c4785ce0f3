"""Any module's own forward, fused: the chains r21d.traced_chains finds in it run through
r21d.fused_site.run_site or r21d.fused_unit.run_unit, the rest as written.

The module keeps its identity, children and state: its class becomes a subclass of its own (made
once per class, :func:`traced_class`) whose forward runs the rewritten graph as Python code. The
code reaches the children through ``self`` on every call; the program is kept in the module's
``__dict__`` with the children it was traced for and traced again when they change. Hooks on a
chain's modules run that chain's torch path (the modules themselves); a residual the kernels
cannot add (another shape or dtype) runs the chain's ops as written; global module hooks run the
module's own forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor, fx, nn

from . import plan_cache
from ._op_common import out_size
from .fused_site import register_activation, run_site, site_geometry
from .fused_unit import run_unit
from .plan_cache import autocast_state, hooked
from .traced_chains import BASE, Activation, Chain, Match, candidate, find_chains, has_hooks, is_traced, trace

__all__ = ["CANONICAL_ACTIVATIONS", "PROGRAM", "TracedProgram", "candidate", "fuse_module",
           "is_traced", "program_of", "traced_class", "unfuse_module", "unfused_reason"]

# The attribute of a traced module's __dict__ that holds its program (:class:`TracedProgram`).
PROGRAM = "_r21d_traced"
# The activation modules run_site is handed for an activation the forward called as a function.
CANONICAL_ACTIVATIONS = {"relu": nn.ReLU(), "silu": nn.SiLU()}


def _layout(module: nn.Module, inlined) -> tuple:
    """What a program was traced for: the module's children and mode, and the children and mode
    of the modules traced through (a forward that branches on ``self.training`` traces the
    branch of its mode then)."""
    return (module.training, tuple(module._modules.values()),
            tuple((m, m.training, tuple(m._modules.values())) for m in inlined))


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
            graph, inlined = trace(module)
        except Exception as e:  # data-dependent control flow, untraceable calls, ...
            self.error = _why("not traceable", e)
        else:
            try:
                self._rewrite(module, graph, inlined)
            except Exception as e:  # fuse never raises for a model it cannot rewrite
                self.forward, self.chains, self.inlined = None, [], ()
                self.error = _why("not rewritable", e)
        self.layout = _layout(module, self.inlined)

    def _rewrite(self, module: nn.Module, graph: fx.Graph, inlined: list) -> None:
        matches, self.unfused = find_chains(module, graph)
        self.chains = [m.chain for m in matches]
        # an identity a chain absorbed is no longer called: watched for hooks like those
        absorbed = (module.get_submodule(n.target) for m in matches for n in m.nodes
                    if n.op == "call_module")
        identities = tuple(a for a in absorbed if type(a) is nn.Identity)
        self.inlined = tuple(inlined) + identities
        if matches:
            self.forward = _compile(graph, matches)

    def valid(self, module: nn.Module) -> bool:
        """Traced for these children, and no module it traces through has hooks now."""
        return (_layout(module, self.inlined) == self.layout
                and not any(has_hooks(m) for m in self.inlined))

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


def _why(what: str, error: Exception) -> str:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"{what}: {type(error).__name__}: {first_line}"


def _compile(graph: fx.Graph, matches: list[Match]) -> Callable:
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
