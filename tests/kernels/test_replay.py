"""Launch plans (r21d.triton_kernels._replay): a launcher call recorded once per signature and
replayed. A replay must be the launcher's call exactly: the same kernels with the same
configurations and arguments, the same allocations, and so the same bits. Each family runs once
recorded, then replayed on fresh inputs, against the full launcher on the same inputs (every
buffer poisoned); toy launchers check what the signature holds and which calls are never planned.
Kernels run in the Triton interpreter on tiny shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import triton
import triton.language as tl
from torch import nn

import r21d
from r21d.triton_kernels import _launch, _replay
from tests.utils import perturb_batchnorm

pytestmark = pytest.mark.usefixtures("strict")


def _x(*shape, seed, layout=torch.channels_last_3d, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).contiguous(memory_format=layout).requires_grad_(grad)


def _family(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "unit":
        return r21d.fuse(perturb_batchnorm(r21d.SpatioTemporalConv(3, 5, 3, padding=1)))
    conv = {"pointwise": nn.Conv3d(3, 5, 1),
            "depthwise": nn.Conv3d(3, 3, 3, padding=1, groups=3, bias=False),
            "implicit-gemm": nn.Conv3d(3, 5, (1, 3, 3), padding=(0, 1, 1), bias=False)}[name]
    return r21d.fuse(perturb_batchnorm(nn.Sequential(conv, nn.BatchNorm3d(conv.out_channels), nn.ReLU())))


def _step(model, x, training):
    """Output, input and parameter gradients, buffers, and what was launched and allocated."""
    with r21d.use_backend("triton"), _launch.count() as counter, _launch.poisoned():
        y = model(x)
        if training:
            y.sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()] if training else []
    return [y.detach(), *grads, *model.buffers()], (counter.kernels, counter.shapes)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", ["pointwise", "depthwise", "implicit-gemm", "unit"])
def test_a_replay_is_the_launchers_call(family, training):
    model = _family(family).train(training)
    layout = torch.contiguous_format if family == "pointwise" else torch.channels_last_3d
    shape = (1, 3, 2, 3, 4) if family == "depthwise" else (2, 3, 3, 4, 5)  # (the slowest here)
    with torch.set_grad_enabled(training):
        _step(model, _x(*shape, seed=1, layout=layout, grad=training), training)  # records
        replayed, full = copy.deepcopy(model), copy.deepcopy(model)
        before = _replay.stats["replayed"]
        x = _x(*shape, seed=2, layout=layout, grad=training)
        got, got_work = _step(replayed, x, training)
        assert _replay.stats["replayed"] > before
        with _replay.disabled():
            x = _x(*shape, seed=2, layout=layout, grad=training)
            want, want_work = _step(full, x, training)
    assert got_work == want_work
    for a, b in zip(got, want, strict=True):
        assert not a.isnan().any()
        assert torch.equal(a, b)


# ------------------------------------------------------------------- toy launchers


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, a, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    tl.store(out_ptr + i, a * tl.load(x_ptr + i, mask=mask) + tl.load(y_ptr + i, mask=mask), mask=mask)


def _axpy_launch(x, y, a):
    out = _launch.alloc(x.shape, dtype=x.dtype, device=x.device)
    _launch.launch(_axpy_kernel, lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),),
                   x, y, out, x.numel(), a, BLOCK=16)
    return out


def _counting(fn):
    """``fn`` planned, with a count of how often its own Python ran."""
    runs = []

    def launcher(*args):
        runs.append(1)
        return fn(*args)

    return _replay.planned(launcher), runs


def test_the_signature_holds_shapes_values_alignment_aliasing_and_tf32():
    axpy, runs = _counting(lambda x, y, a: (_axpy_launch(x, y, a), x.new_empty(0)))
    x, y = torch.randn(40), torch.randn(40)
    for _ in range(3):
        out, empty = axpy(x, y, 2.0)
        torch.testing.assert_close(out, 2 * x + y)
        assert empty.shape == (0,)
    assert len(runs) == 1  # recorded once, replayed twice
    x2, y2 = torch.randn(40), torch.randn(40)
    torch.testing.assert_close(axpy(x2, y2, 2.0)[0], 2 * x2 + y2)
    assert len(runs) == 1
    torch.testing.assert_close(axpy(x, y, 3.0)[0], 3 * x + y)  # another scalar
    assert len(runs) == 2
    torch.testing.assert_close(axpy(x[:33], y[:33], 2.0)[0], 2 * x[:33] + y[:33])  # another shape
    assert len(runs) == 3
    base = torch.randn(41)
    torch.testing.assert_close(axpy(base[1:], y, 2.0)[0], 2 * base[1:] + y)  # 4-byte aligned
    assert len(runs) == 4
    torch.testing.assert_close(axpy(x, x, 2.0)[0], 3 * x)  # the same tensor twice
    assert len(runs) == 5
    torch.testing.assert_close(axpy(x2, y2, 2.0)[0], 2 * x2 + y2)  # two again: the first plan
    assert len(runs) == 5
    precision = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = not precision  # fp32 launchers read it
        axpy(x, y, 2.0)
        assert len(runs) == 6
    finally:
        torch.backends.cudnn.allow_tf32 = precision


_CACHED = torch.zeros(40)


@pytest.mark.parametrize("why", ["python value", "outside tensor"])
def test_what_a_replay_cannot_repeat_runs_the_launcher_every_time(why):
    def launcher(x, y):
        if why == "python value":  # a value the host reads decides what is launched
            return (_axpy_launch(x, y, 2.0 if x.sum().item() > 0 else -2.0),)
        return (_axpy_launch(x, _CACHED.add_(1), 1.0),)  # state the arguments do not carry

    planned, runs = _counting(launcher)
    x, y = torch.ones(40), torch.randn(40)
    for sign in (1, -1, 1):
        (out,) = planned(sign * x, y)
        if why == "python value":
            torch.testing.assert_close(out, 2 * x + y)
    assert len(runs) == 3
    if why == "outside tensor":
        torch.testing.assert_close(out, x + 3)
    assert list(planned.plans.values()) == [None]


def test_dead_steps_are_dropped_and_views_and_copies_replayed():
    def launcher(x, y):
        torch.empty(())  # a probe the launcher reads nothing from
        xv = x.view(4, 10).t().contiguous().view(-1)  # a torch copy the launch depends on
        return (_axpy_launch(xv, y, 1.0).view(10, 4),)

    planned, runs = _counting(launcher)
    for seed, offset in ((0, 4), (1, 8)):  # x views its storage at another offset when replayed
        torch.manual_seed(seed)
        x, y = torch.randn(60)[offset:offset + 40], torch.randn(40)
        (out,) = planned(x, y)
        torch.testing.assert_close(out, (x.view(4, 10).t().reshape(-1) + y).view(10, 4))
    assert len(runs) == 1
    (plan,) = planned.plans.values()
    # view + t (one as_strided of x), clone, view, alloc, launch, view (not the probe)
    assert [type(s).__name__ for s in plan.steps] == ["_View", "_Op", "_View", "_Alloc",
                                                     "_Launch", "_View"]


def test_no_plan_while_capturing_autotuning_or_inside_another_recording(monkeypatch):
    axpy, runs = _counting(lambda x, y: (_axpy_launch(x, y, 1.0),))
    x, y = torch.randn(40), torch.randn(40)
    with _launch.capture():
        axpy(x, y)
    monkeypatch.setenv("R21D_AUTOTUNE", "1")
    axpy(x, y)
    monkeypatch.delenv("R21D_AUTOTUNE")
    assert len(runs) == 2 and not axpy.plans
    outer, outer_runs = _counting(lambda x, y: (axpy(x, y)[0] * 2,))
    for _ in range(2):
        torch.testing.assert_close(outer(x, y)[0], 2 * (x + y))
    assert len(outer_runs) == 1 and len(runs) == 3 and not axpy.plans  # recorded within the outer


def test_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(_replay, "MAX_PLANS", 2)
    axpy, runs = _counting(lambda x, y: (_axpy_launch(x, y, 1.0),))
    for n in (8, 9, 10, 11):
        axpy(torch.randn(n), torch.randn(n))
        assert len(axpy.plans) <= 2
    assert len(runs) == 4


@triton.jit
def _axpby_kernel(x_ptr, y_ptr, out_ptr, n, a, B: tl.constexpr, BLOCK: tl.constexpr,
                  SHIFT: tl.constexpr = 0.5):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask)
    tl.store(out_ptr + i, a * x + B * tl.load(y_ptr + i, mask=mask) + SHIFT, mask=mask)


class _Compiled:
    """What Triton's JIT returns on a GPU, run by the interpreter: ``[grid](*every parameter)``."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __getitem__(self, grid):
        assert len(grid) == 3  # Triton's runner reads grid[0], grid[1] and grid[2]

        def runner(*values):
            self.calls += 1
            self.fn[grid](*values)
        return runner


class _Compiling:
    """A JIT function whose launch returns its compiled kernel, as on a GPU."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, _Compiled(fn)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.fn[grid](*args, **kwargs)
            return self.compiled
        return run


def test_a_compiled_launch_is_replayed_with_every_parameter_bound_in_order(monkeypatch):
    monkeypatch.setattr(_replay, "CompiledKernel", _Compiled)
    kernel = _Compiling(_axpby_kernel)

    def launcher(x, y):
        out = _launch.alloc(x.shape, dtype=x.dtype, device=x.device)
        # keywords in another order than the parameters, and a default left out
        _launch.launch(kernel, (3,), x, y, out, x.numel(), 3.0, BLOCK=16, B=2.0)  # a 1-D grid
        return (out,)

    planned, runs = _counting(launcher)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        x, y = torch.randn(40), torch.randn(40)
        with _launch.count() as counter:
            (out,) = planned(x, y)
        torch.testing.assert_close(out, 3 * x + 2 * y + 0.5)
        assert counter.launches == 1 and counter.kernels == ["_axpby_kernel"]
    assert len(runs) == 1 and kernel.compiled.calls == 2  # the two replays


_BINDER_SCRIPT = """
import torch, r21d
from torch import nn
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from r21d.bench.cpu_launch import triton_on_cpu
from r21d.triton_kernels import _compile, _launch, _replay
backend = make_backend(GPUTarget("cuda", 90, 32))
checked = set()
for training in (False, True):
    torch.manual_seed(0)
    model = r21d.fuse(nn.Sequential(  # every family: implicit GEMM, (2+1)D unit, pointwise, depthwise
        nn.Conv3d(3, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(8), nn.ReLU(), r21d.SpatioTemporalConv(8, 16, 3, padding=1),
        nn.Conv3d(16, 24, 1, bias=False), nn.BatchNorm3d(24), nn.ReLU(),
        nn.Conv3d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm3d(24), nn.ReLU(),
    ).train(training))
    x = torch.randn(2, 3, 4, 16, 16, requires_grad=training)  # NCDHW: the layout copies too
    with r21d.use_backend("triton"), triton_on_cpu(), _launch.capture() as launches, \
            torch.set_grad_enabled(training):
        y = model(x)
        if training:
            y.sum().backward()
    for launch in launches:
        for kwargs in _compile.launch_configs(launch):
            fn = _compile.jit_function(launch.kernel)
            _, bound = _compile.specialize(fn, backend, launch.args, kwargs)
            assert _replay.bound_values(fn, launch.args, kwargs) == list(bound.values()), fn
            checked.add(fn.__name__)
print(len(checked))
"""


def test_parameters_are_bound_as_tritons_binder_binds_them():
    """Every kernel a small network of every family launches in eval and training, every
    configuration:
    :func:`_replay.bound_values` against Triton's own binder (a process without the
    interpreter, whose kernels are JIT functions; nothing is compiled or launched)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _BINDER_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 14  # distinct kernels checked


def test_a_stubbed_launch_is_replayed_only_while_stubbed():
    """``r21d-bench --host`` times replays up to the launch; such a plan must never stand in
    for a real launch."""
    axpy, runs = _counting(lambda x, y: (_axpy_launch(x, y, 1.0),))
    x, y = torch.randn(40), torch.randn(40)
    with _launch.stubbed():
        for _ in range(2):
            with _launch.count() as counter:
                axpy(x, y)
            assert counter.launches == 1
    assert len(runs) == 1
    for _ in range(2):
        torch.testing.assert_close(axpy(x, y)[0], x + y)
    assert len(runs) == 2


def test_a_launch_left_unrecorded_still_runs_when_it_returns_a_compiled_kernel():
    """A launch whose recording failed (a tensor from outside the call) returns a compiled
    kernel, as on a GPU (here: stubbed); nothing may attach it to another step."""
    def launcher(x, y):
        out = _launch.alloc(x.shape, dtype=x.dtype, device=x.device)
        _launch.launch(_axpy_kernel, (3,), _CACHED, y, out, x.numel(), 1.0, BLOCK=16)
        return (out,)

    planned, runs = _counting(launcher)
    with _launch.stubbed():
        for _ in range(2):
            with _launch.count() as counter:
                planned(torch.randn(40), torch.randn(40))
            assert counter.launches == 1
    assert len(runs) == 2 and list(planned.plans.values()) == [None]
