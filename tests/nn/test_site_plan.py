"""The plans fused modules keep between calls (r21d.plan_cache): a call like the previous one
skips validation, configuration and backend choice; any change to what the plan was made from
runs the checked path again. Each test changes one thing after a cached call and checks that
the checked path ran (the ``planned`` counter), and that the result (outputs, running statistics,
gradients) still matches the plain PyTorch modules. Kernels run in the Triton interpreter on
tiny shapes, in strict mode unless a test says otherwise."""

from __future__ import annotations

import collections
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import r21d
from r21d import dispatch, fused_site, fused_unit, plan_cache
from r21d.fused_sequential import PROGRAM
from r21d.triton_kernels import _launch
from tests.utils import perturb_batchnorm

pytestmark = pytest.mark.usefixtures("strict")

TOL = dict(atol=1e-4, rtol=1e-4)
FP16_TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture
def planned(monkeypatch):
    """How often the checked path planned a site ("site") or a (2+1)D unit ("unit")."""
    counts = collections.Counter()
    for module, name, kind in ((fused_site, "_plan_site", "site"), (fused_unit, "_plan_unit", "unit")):
        original = getattr(module, name)

        def counting(*args, _original=original, _kind=kind, **kwargs):
            counts[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return counts


def _site(seed=0, c_in=4, c_out=4, act=nn.ReLU, momentum=0.1, bias=False) -> nn.Sequential:
    torch.manual_seed(seed)
    return perturb_batchnorm(nn.Sequential(
        nn.Conv3d(c_in, c_out, (1, 3, 3), padding=(0, 1, 1), bias=bias),
        nn.BatchNorm3d(c_out, momentum=momentum), act()))


def _pair(training=False, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(plain, fused) copies of one conv -> BN -> activation site."""
    plain = _site(**kwargs).train(training)
    return plain, r21d.fuse(copy.deepcopy(plain))


def _x(*shape, seed=1) -> torch.Tensor:
    """An input, channels_last_3d where 5-D (the layout the kernels address: no relayout
    launches)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(shape or (1, 4, 2, 4, 4)), generator=g)
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


def _same_state(fused: nn.Module, plain: nn.Module) -> None:
    for (name, a), b in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def _kernels(counter: _launch.Counter) -> list[str]:
    """The fused kernels a call launched (not the weights' layout copies)."""
    return [k for k in counter.kernels if k != "relayout"]


def _check(fused, plain, *inputs, launches=None, tol=TOL):
    """Run both (the fused one on the Triton backend), compare outputs and buffers;
    ``launches``: how many fused kernels the call must launch."""
    with r21d.use_backend("triton"), _launch.count() as counter:
        y = fused(*inputs)
    ref = plain(*inputs)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, **tol)
    _same_state(fused, plain)
    if launches is not None:
        assert len(_kernels(counter)) == launches, counter.kernels
    return y


def test_a_repeated_call_reuses_the_plan(planned):
    plain, fused = _pair()
    x = _x()
    _check(fused, plain, x, launches=1)
    _check(fused, plain, x, launches=1)
    _check(fused, plain, _x(seed=2), launches=1)  # other values, same signature
    assert planned["site"] == 1
    program = fused.__dict__[PROGRAM]
    [(_kind, _parts, slot)] = program.steps
    assert isinstance(slot.plan, fused_site.SitePlan) and not slot.plan.torch


def test_input_shape_layout_dtype_and_device_replan(planned):
    plain, fused = _pair()
    x = _x()
    _check(fused, plain, x)
    _check(fused, plain, _x(2, 4, 2, 4, 4))  # batch
    _check(fused, plain, _x(1, 4, 3, 5, 4))  # T, H
    assert planned["site"] == 3
    y = _check(fused, plain, x.contiguous())  # strides
    assert y.is_contiguous()
    assert planned["site"] == 4
    _check(fused, plain, torch.randn(1, 4, 2, 4, 8)[..., ::2])  # a strided view
    assert planned["site"] == 5
    # right after a cached call of x: a stale plan would hand the op a float64 input with a
    # float32 weight, or a tensor on another device
    for other, error, match in ((x.double(), TypeError, "weight dtype"),
                                (x.to("meta"), ValueError, "x is on meta")):
        _check(fused, plain, x)
        with r21d.use_backend("triton"), pytest.raises(error, match=match):
            fused(other)
    assert planned["site"] == 9
    _check(fused, plain, x)
    _check(fused, plain, x)
    assert planned["site"] == 10


def test_residual_presence_shape_dtype_and_layout_replan(planned, monkeypatch):
    torch.manual_seed(0)
    m = r21d.ConvBNReLU3d(4, 4, (1, 3, 3), padding=(0, 1, 1)).eval()
    perturb_batchnorm(m)
    plain = r21d.unfuse(copy.deepcopy(m))

    def ref(x, residual=None):
        y = plain[1](plain[0](x))
        return plain[2](y if residual is None else y + residual)

    x, res = _x(), _x(seed=3)
    for args in ((x,), (x, res), (x, res), (x, res.contiguous()),
                 (x,)):
        with r21d.use_backend("triton"):
            torch.testing.assert_close(m(*args), ref(*args), **TOL)
    assert planned["site"] == 4
    with r21d.use_backend("triton"), pytest.raises(ValueError, match="residual must have the output's shape"):
        m(x, _x(1, 4, 2, 4, 2))
    # another dtype: no fused kernel promotes like PyTorch; strict refuses, else it falls back
    with r21d.use_backend("triton"), pytest.raises(r21d.FusedKernelUnavailable, match="residual dtype"):
        m(x, res.double())
    monkeypatch.delenv("R21D_STRICT")
    with r21d.use_backend("triton"), pytest.warns(r21d.FallbackWarning):
        torch.testing.assert_close(m(x, res.double()), ref(x, res.double()), **TOL)
    assert planned["site"] == 7


def test_backend_changes_replan_and_fallbacks_are_never_cached(planned, monkeypatch):
    plain, fused = _pair()
    x = _x()
    _check(fused, plain, x, launches=1)
    with r21d.use_backend("torch"), _launch.count() as counter:
        torch.testing.assert_close(fused(x), plain(x), **TOL)
        torch.testing.assert_close(fused(x), plain(x), **TOL)
    assert counter.launches == 0 and planned["site"] == 2
    _check(fused, plain, x, launches=1)
    assert planned["site"] == 3
    r21d.set_backend("triton")  # the process-wide choice, no context
    try:
        with _launch.count() as counter:
            torch.testing.assert_close(fused(x), plain(x), **TOL)
        assert counter.launches == 1
    finally:
        r21d.backends._global_choice = None
    assert planned["site"] == 3  # the same request: the same plan
    # a configuration the Triton kernels do not run (float64): the warning, then the torch path;
    # re-checked on every call, so that R21D_STRICT=1 later still raises
    monkeypatch.delenv("R21D_STRICT")
    plain64, fused64 = _pair()
    plain64.double(), fused64.double()
    before = planned["site"]
    with r21d.use_backend("triton"):
        with pytest.warns(r21d.FallbackWarning, match="float64"):
            torch.testing.assert_close(fused64(x.double()), plain64(x.double()))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per configuration
            torch.testing.assert_close(fused64(x.double()), plain64(x.double()))
        assert planned["site"] == before + 2
        monkeypatch.setenv("R21D_STRICT", "1")
        with pytest.raises(r21d.FusedKernelUnavailable):
            fused64(x.double())


@pytest.mark.parametrize("momentum", [0.1, None], ids=["exponential", "cumulative"])
def test_train_eval_switches_and_running_statistics_every_call(planned, momentum):
    plain, fused = _pair(momentum=momentum)
    for step, training in enumerate((False, True, True, True, False, False, True)):
        plain.train(training), fused.train(training)
        _check(fused, plain, _x(2, 4, 2, 4, 4, seed=step))
    # running statistics and num_batches_tracked updated on every training call (4 of them)
    assert fused[1].num_batches_tracked.item() == 4 == plain[1].num_batches_tracked.item()
    assert planned["site"] == 4  # eval, train, eval, train
    fused[1].track_running_stats = plain[1].track_running_stats = False  # batch statistics only
    _check(fused, plain, _x(2, 4, 2, 4, 4, seed=9))
    assert fused[1].num_batches_tracked.item() == 4
    assert planned["site"] == 5
    fused.eval(), plain.eval()
    fused[1].running_mean = plain[1].running_mean = None  # eval with batch statistics
    fused[1].running_var = plain[1].running_var = None
    _check(fused, plain, _x(2, 4, 2, 4, 4, seed=10))
    assert planned["site"] == 6


def _grads(module: nn.Module, x: torch.Tensor) -> list:
    return [t.grad for t in (x, *module.parameters())]


def test_grad_mode_and_requires_grad_replan(planned):
    plain, fused = _pair(training=True)
    with torch.no_grad():  # a plan that keeps nothing for backward
        _check(fused, plain, _x(2, 4, 2, 4, 4))
    assert planned["site"] == 1
    xa, xb = (_x(2, 4, 2, 4, 4, seed=2).requires_grad_() for _ in range(2))
    with r21d.use_backend("triton"):
        fused(xa).square().sum().backward()  # a stale plan: "ran with save_for_backward=False"
    plain(xb).square().sum().backward()
    for a, b in zip(_grads(fused, xa), _grads(plain, xb)):
        torch.testing.assert_close(a, b, **TOL)
    assert planned["site"] == 2
    # eval with parameters that need no gradient and an input that does not either: nothing kept
    fused.eval(), plain.eval()
    for p in (*fused.parameters(), *plain.parameters()):
        p.requires_grad_(False)
        p.grad = None
    y = _check(fused, plain, _x())
    assert not y.requires_grad and planned["site"] == 3
    fused[0].weight.requires_grad_(True), plain[0].weight.requires_grad_(True)
    with r21d.use_backend("triton"):
        y = fused(_x())
    assert y.requires_grad and planned["site"] == 4
    y.sum().backward()
    plain(_x()).sum().backward()
    torch.testing.assert_close(fused[0].weight.grad, plain[0].weight.grad, **TOL)


def test_deterministic_algorithms_flag_is_read_by_each_backward(planned):
    plain, fused = _pair(training=True)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            xa, xb = (_x(2, 4, 2, 4, 4).requires_grad_() for _ in range(2))
            with r21d.use_backend("triton"):
                fused(xa).sum().backward()
            plain(xb).sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert planned["site"] == 1  # the flag is no part of the plan: backward reads it


def test_autocast_state_and_dtype_replan(planned):
    plain, fused = _pair()
    x = _x()
    _check(fused, plain, x)
    with torch.autocast("cpu", dtype=torch.float16):
        with r21d.use_backend("triton"):
            y = fused(x)
            assert fused(x).dtype == torch.float16  # cached
        # the interpreter has no bf16 arithmetic: a stale fp16 plan would run it anyway
        with torch.autocast("cpu", dtype=torch.bfloat16), r21d.use_backend("triton"), \
                pytest.raises(r21d.FusedKernelUnavailable, match="bf16"):
            fused(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), plain(x), **FP16_TOL)
    assert planned["site"] == 3
    _check(fused, plain, x)  # autocast off again
    assert planned["site"] == 4


def test_replaced_parameters_and_buffers_and_dtype_conversions(planned):
    plain, fused = _pair(bias=True)
    x = _x()
    _check(fused, plain, x)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 4, 1, 3, 3, generator=g)
    fused[0].weight, plain[0].weight = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    fused[1].running_mean = torch.full((4,), 0.25)  # a new buffer tensor
    plain[1].running_mean = torch.full((4,), 0.25)
    _check(fused, plain, x)
    assert planned["site"] == 1  # same signature: the plan reads the tensors each call
    # .half() converts parameters in place (same Parameter objects, new dtype) and buffers
    fused.half()
    with r21d.use_backend("triton"):
        y = fused(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), plain(x), **FP16_TOL)
    fused.float()
    plain.half().float()  # the same rounding
    _check(fused, plain, x)
    assert planned["site"] == 3
    weight = fused[0].weight
    weight.data = weight.data.double()  # the weight alone (the same Parameter, another dtype)
    with r21d.use_backend("triton"), pytest.raises(TypeError, match="weight dtype"):
        fused(x)  # refused, not run with the float32 plan
    weight.data = weight.data.float()
    _check(fused, plain, x)
    assert planned["site"] == 5
    # a weight of another shape swapped in through .data (same Parameter)
    w1 = torch.randn(4, 4, 1, 1, 1, generator=g)
    fused[0].weight.data, plain[0].weight.data = w1.clone(), w1.clone()
    _check(fused, plain, x)
    # geometry changed on the module
    fused[0].padding = plain[0].padding = (0, 0, 0)
    _check(fused, plain, x)
    assert planned["site"] == 7
    # a missing BN affine parameter
    fused[1].weight = plain[1].weight = None
    _check(fused, plain, x)
    assert planned["site"] == 8


@pytest.mark.parametrize("where", ["bn forward hook", "conv pre-hook", "global hook"])
def test_hooks_on_the_site_or_global_run_the_modules(planned, monkeypatch, where):
    monkeypatch.delenv("R21D_STRICT")
    plain, fused = _pair()
    x = _x()
    _check(fused, plain, x, launches=1)
    calls = []

    def double(module, inputs, output):
        calls.append(type(module).__name__)
        return output * 2

    def pre(module, inputs):
        calls.append("pre")

    if where == "global hook":
        handles = [torch.nn.modules.module.register_module_forward_hook(double)]
    elif where == "bn forward hook":
        handles = [m[1].register_forward_hook(double) for m in (fused, plain)]
    else:
        handles = [m[0].register_forward_pre_hook(pre) for m in (fused, plain)]
    try:
        with r21d.use_backend("triton"), _launch.count() as counter, warnings.catch_warnings():
            warnings.simplefilter("ignore", r21d.FallbackWarning)
            outputs = [fused(x), fused(x)]
        fused_calls = len(calls)
        calls.clear()
        expected = plain(x)  # under the same hooks
    finally:
        for handle in handles:
            handle.remove()
    assert counter.launches == 0 and fused_calls == 2 * len(calls) > 0
    for y in outputs:
        torch.testing.assert_close(y, expected, **TOL)
    _check(fused, plain, x, launches=1)  # hooks removed: fused again


def test_sync_batchnorm_and_the_process_group_are_in_the_signature(planned, monkeypatch):
    plain, fused = _pair()
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert isinstance(fused[1], nn.SyncBatchNorm)
    x = _x()
    for training in (False, True, True):  # no process group: local statistics, like PyTorch's
        fused.train(training), plain.train(training)
        _check(fused, plain, _x(2, 4, 2, 4, 4))
    assert planned["site"] == 2
    conv, bn, act = fused
    key, _ = fused_site.site_signature(conv, bn, act, x, None)
    monkeypatch.setattr(fused_site, "sync_group", lambda bn: "group-of-four")
    assert fused_site.site_signature(conv, bn, act, x, None)[0] != key


def test_the_dispatch_device_checks_are_in_the_signature(monkeypatch):
    plain, fused = _pair()
    conv, bn, act = fused
    x = _x()
    key, _ = fused_site.site_signature(conv, bn, act, x, None)
    monkeypatch.setitem(dispatch._DEVICE_CHECKS, "triton", lambda cfg: None)  # bench's triton_on_cpu
    assert fused_site.site_signature(conv, bn, act, x, None)[0] != key


def test_training_refuses_an_input_sharing_memory_with_the_running_statistics(planned):
    plain, fused = _pair(training=True)
    storage = torch.randn(4 + 128)
    fused[1].running_mean = storage[:4]
    fused[1].running_mean.zero_()
    apart = storage[4:].view(1, 4, 2, 4, 4)
    with r21d.use_backend("triton"):
        fused(apart)
        fused(apart)
        assert planned["site"] == 1
        overlapping = storage[2:2 + 128].view(1, 4, 2, 4, 4)
        with pytest.raises(ValueError, match="share memory"):
            fused(overlapping)
        fused(apart)  # still fine
    assert planned["site"] == 3


def test_conv2d_site_replans_and_validates(planned):
    torch.manual_seed(0)
    plain = perturb_batchnorm(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    with torch.no_grad():
        plain[1].running_mean.uniform_(-0.2, 0.2)
    plain.eval()
    m = r21d.ConvBNReLU2d.from_modules(*copy.deepcopy(plain))
    for shape in ((1, 4, 4, 4), (1, 4, 4, 4), (2, 4, 3, 5)):
        _check(m, plain, _x(*shape))
    assert planned["site"] == 2
    with r21d.use_backend("triton"), pytest.raises(ValueError, match="4-D input"):
        m(_x())


def _unit(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb_batchnorm(r21d.SpatioTemporalConv(4, 4, 3, padding=1))


def test_unit_plans_eval_training_and_gradients(planned):
    m = _unit()
    ref = copy.deepcopy(m)
    x = _x(2, 4, 3, 4, 4)

    def plain(x):
        y = ref.relu(ref.bn1(ref.spatial_conv(x)))
        return ref.relu(ref.bn2(ref.temporal_conv(y)))

    def check(grad=False):
        xa, xb = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
        with r21d.use_backend("triton"), _launch.count() as counter:
            y = m(xa)
        expected = plain(xb)
        torch.testing.assert_close(y, expected, **TOL)
        _same_state(m, ref)
        if grad:
            y.sum().backward()
            expected.sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        return _kernels(counter)

    m.eval(), ref.eval()
    with torch.no_grad():
        assert check() == check() == ["_unit_eval_kernel"]  # one kernel, planned once
        assert planned["unit"] == 1
        with r21d.use_backend("triton"), pytest.raises(ValueError, match="x has 3 channels"):
            m(_x(2, 3, 3, 4, 4))  # checked, not run with the cached plan
        x = _x(1, 4, 4, 3, 4)
        assert check() == check() == ["_unit_eval_kernel"]
        x = _x(2, 4, 3, 4, 4)
        assert check() == ["_unit_eval_kernel"]
    assert planned["unit"] == 4
    m.train(), ref.train()
    train = check(grad=True)
    assert len(train) >= 2 and check(grad=True) == train  # the training unit, planned once
    assert planned["unit"] == 5
    m.eval(), ref.eval()
    assert len(check(grad=True)) == 2  # a gradient through an eval unit: its two sites
    assert planned["unit"] == 6
    with torch.no_grad():
        assert check() == ["_unit_eval_kernel"]
    assert planned["unit"] == 7
    slot = plan_cache.slot(m)
    assert slot.plan.kind == fused_unit.EVAL
    # grad mode on, but nothing needs a gradient: the one kernel; then the input does
    for module in (m, ref):
        module.requires_grad_(False)
    assert check() == ["_unit_eval_kernel"]
    assert planned["unit"] == 8
    assert len(check(grad=True)) == 2
    assert planned["unit"] == 9


def test_block_tail_keeps_its_parts_until_its_modules_change(planned, monkeypatch):
    resnet = pytest.importorskip("torchvision.models.video.resnet")
    torch.manual_seed(0)
    plain = perturb_batchnorm(resnet.BasicBlock(4, 4, resnet.Conv3DSimple)).eval()
    fused = r21d.fuse(copy.deepcopy(plain))
    x = _x(1, 4, 2, 4, 4)
    with torch.no_grad():
        _check(fused, plain, x, launches=2)
        _check(fused, plain, x, launches=2)
        assert planned["site"] == 2  # conv1's site, the tail's
        bn = perturb_batchnorm(nn.Sequential(nn.BatchNorm3d(4)))[0].eval()
        fused.conv2[1], plain.conv2[1] = bn, copy.deepcopy(bn)  # the tail's BN replaced
        _check(fused, plain, x, launches=2)  # the new BN's tensors, with the same plan
        assert planned["site"] == 2
        calls = []
        handles = [m.relu.register_forward_hook(lambda m, i, o: calls.append(1))
                   for m in (fused, plain)]
        monkeypatch.delenv("R21D_STRICT")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", r21d.FallbackWarning)
            # torchvision's arithmetic: conv2's own site, then the add and the hooked ReLU
            _check(fused, plain, x, launches=2)
        for handle in handles:
            handle.remove()
        assert len(calls) == 2
        assert planned["site"] == 3  # conv2 run as its sequential's site, planned there
        _check(fused, plain, x, launches=2)
        assert planned["site"] == 3  # the tail fused again, with its plan


def test_fused_sequential_lays_out_its_runs_again_when_children_change(planned):
    resnet = pytest.importorskip("torchvision.models.video.resnet")
    torch.manual_seed(0)
    plain = perturb_batchnorm(nn.Sequential(
        resnet.Conv2Plus1D(4, 4, 6), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 4, 1, bias=False), nn.BatchNorm3d(4))).eval()
    fused = r21d.fuse(copy.deepcopy(plain))
    x = _x(1, 4, 3, 4, 4)
    with torch.no_grad():
        _check(fused, plain, x, launches=2)  # the unit's kernel, the pointwise site's
        _check(fused, plain, x, launches=2)
        assert planned["unit"] == 1 and planned["site"] == 1
        program = fused.__dict__[PROGRAM]
        # a child replaced
        bn = perturb_batchnorm(nn.Sequential(nn.BatchNorm3d(4)))[0].eval()
        fused[4], plain[4] = bn, copy.deepcopy(bn)
        _check(fused, plain, x, launches=2)
        assert fused.__dict__[PROGRAM] is not program  # new runs, planned anew
        assert planned["unit"] == 2 and planned["site"] == 2
        # a child of the unit replaced by a module of another type: no unit any more
        fused[0][2], plain[0][2] = nn.SiLU(), nn.SiLU()
        _check(fused, plain, x)  # the spatial site, the plain temporal conv, ...
        assert planned["unit"] == 2
        fused[0][2], plain[0][2] = nn.ReLU(), nn.ReLU()
        _check(fused, plain, x, launches=2)
        # a hook on the unit: it runs as its own module, hook called
        calls = []
        handle = fused[0].register_forward_hook(lambda m, i, o: calls.append(1))
        units = planned["unit"]
        _check(fused, plain, x)
        handle.remove()
        assert calls == [1] and planned["unit"] == units  # not run as a unit
        _check(fused, plain, x, launches=2)
        assert planned["unit"] == units + 1  # a unit again


def test_copies_pickles_and_unfuse_drop_the_plans(planned):
    plain, fused = _pair()
    x = _x()
    _check(fused, plain, x)
    clone = copy.deepcopy(fused)
    assert clone.__dict__.get(PROGRAM) is None
    _check(clone, plain, x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert loaded.__dict__.get(PROGRAM) is None
    _check(loaded, plain, x)
    m = r21d.ConvBNReLU3d(4, 4, 1).eval()
    with r21d.use_backend("triton"):
        m(x)
    assert plan_cache.SLOTS in m.__dict__
    back = r21d.unfuse(m, inplace=True)
    assert plan_cache.SLOTS not in back.__dict__ and PROGRAM not in back.__dict__
    assert planned["site"] == 4


def test_no_plan_is_used_or_kept_while_compiling(planned, monkeypatch):
    """Under torch.compile the checked path is what gets traced (tests/ops/test_compile.py compiles
    fused models fullgraph); here is_compiling is faked to see that nothing is cached."""
    plain, fused = _pair()
    module = r21d.ConvBNReLU3d.from_modules(*copy.deepcopy(plain))  # run_site with its slot
    x = _x()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for m in (fused, module, fused, module):
        _check(m, plain, x)
    assert planned["site"] == 4 and fused.__dict__.get(PROGRAM) is None
    assert plan_cache.SLOTS not in module.__dict__


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_parametrized_conv_is_planned_on_every_call(planned):
    """A parametrized weight is a property computed on each access: never read past it."""
    from torch.nn.utils import parametrize

    plain, fused = _pair()
    for m in (plain, fused):
        parametrize.register_parametrization(m[0], "weight", _Doubled())
    x = _x()
    _check(fused, plain, x, launches=1)
    _check(fused, plain, x, launches=1)
    assert planned["site"] == 2
    with torch.no_grad():
        for m in (plain, fused):
            m[0].parametrizations.weight.original.mul_(0.5)
    _check(fused, plain, x, launches=1)
