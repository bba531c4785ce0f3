"""The torch.library ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch) and
torch.compile(fullgraph=True) through them without a graph break."""

import pytest
import torch

import r21d
from tests.utils import ConvProblem, clone_inputs, make_inputs

pytestmark = pytest.mark.usefixtures("strict")


def _op_args(case, training, save, dtype=torch.float32):
    a = make_inputs(case, dtype, "cpu")
    return (a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["running_mean"],
            a["running_var"], a["residual"], list(case.stride), list(case.padding),
            list(case.dilation), training, 0.1, 1e-5, case.activation or "none", save, "")


def _depthwise(C=6, **kw):
    # small frames: opcheck runs the op a dozen times, and the interpreter's stencil is slow
    kw = {"T": 2, "H": 4, "W": 3, **kw}
    return ConvProblem(C_in=C, C_out=C, groups=C, kernel=(3, 3, 3), padding=(1, 1, 1), **kw)


# (op, case, training)
OPCHECK_CASES = {
    "pointwise-eval": ("pointwise_conv_bn_act", ConvProblem(C_in=9, C_out=12, residual=True), False),
    "pointwise-train": ("pointwise_conv_bn_act",
                        ConvProblem(C_in=9, C_out=12, stride=(1, 2, 2), padding=(0, 1, 0)), True),
    "pointwise-train-cl3d-silu": ("pointwise_conv_bn_act",
                                  ConvProblem(C_in=8, C_out=16, layout="cl3d", activation="silu", bias=False), True),
    "depthwise-eval": ("depthwise_conv_bn_act", _depthwise(residual=True), False),
    "depthwise-train-cl3d-silu": ("depthwise_conv_bn_act",
                                  _depthwise(C=8, layout="cl3d", activation="silu", stride=(1, 2, 2)), True),
    "implicit-gemm-eval": ("implicit_gemm_conv_bn_act",
                           ConvProblem(C_in=16, C_out=12, kernel=(1, 3, 3), padding=(0, 1, 1), residual=True), False),
    "implicit-gemm-train-grouped-cl3d": ("implicit_gemm_conv_bn_act",
                                         ConvProblem(C_in=8, C_out=12, groups=2, kernel=(3, 3, 3), stride=(2, 1, 1),
                                                  padding=(1, 1, 1), T=4, layout="cl3d", activation="silu"), True),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck_forward(name):
    op, case, training = OPCHECK_CASES[name]
    args = _op_args(case, training, save=True)
    for t in args[:5] + (args[7],):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.r21d, op).default, args)


@pytest.mark.parametrize("op,case", [("pointwise_conv_bn_act", ConvProblem(C_in=9, C_out=12, residual=True)),
                                     ("depthwise_conv_bn_act", _depthwise(residual=True, layout="cl3d")),
                                     ("implicit_gemm_conv_bn_act",
                                      ConvProblem(C_in=16, C_out=10, kernel=(3, 1, 1), stride=(2, 1, 1),
                                               padding=(1, 0, 0), T=5, residual=True))],
                         ids=["pointwise", "depthwise", "implicit-gemm"])
def test_opcheck_backward(op, case):
    args = _op_args(case, True, save=True)
    out, z, mean, invstd, _, _ = getattr(torch.ops.r21d, op)(*args)
    x, weight, bias, g, b, _, _, residual = args[:8]
    bwd_args = (torch.randn_like(out), x, weight, bias, z, mean, invstd, g, b, residual,
                list(case.stride), list(case.padding), list(case.dilation), True, "relu", [True] * 6,
                False, "")
    torch.library.opcheck(getattr(torch.ops.r21d, op + "_backward").default, bwd_args)


def test_compile_fullgraph_forward_and_backward():
    case = ConvProblem(C_in=10, C_out=14, residual=True, layout="cl3d")
    args = make_inputs(case, torch.float32, "cpu")

    def forward(a):
        return r21d.functional.conv_bn_act3d(
            a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["running_mean"],
            a["running_var"], training=True, residual=a["residual"]).square()

    results = {}
    for mode in ("eager", "compiled"):
        a = clone_inputs(args, requires_grad=True)
        fn = forward if mode == "eager" else torch.compile(forward, fullgraph=True, backend="aot_eager")
        with r21d.use_backend("triton"):
            y = fn(a)
            y.sum().backward()
        results[mode] = (y.detach(), {k: v.grad for k, v in a.items() if v is not None and v.grad is not None},
                         a["running_mean"], a["running_var"])
    (ye, ge, rme, rve), (yc, gc, rmc, rvc) = results["eager"], results["compiled"]
    torch.testing.assert_close(yc, ye)
    assert set(gc) == set(ge) == {"x", "weight", "bias", "bn_weight", "bn_bias", "residual"}
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], msg=k)
    torch.testing.assert_close(rmc, rme)
    torch.testing.assert_close(rvc, rve)


def test_backward_without_saved_tensors_is_a_clear_error():
    case = ConvProblem(C_in=4, C_out=4)
    args = list(_op_args(case, False, save=False))
    args[0].requires_grad_(True)
    out = torch.ops.r21d.pointwise_conv_bn_act(*args)[0]
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()


def test_double_backward_is_refused():
    case = ConvProblem(C_in=4, C_out=4)
    a = clone_inputs(make_inputs(case, torch.float32, "cpu"), requires_grad=True)
    with r21d.use_backend("triton"):
        y = r21d.functional.conv_bn_act3d(a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"],
                                          a["running_mean"], a["running_var"])
    (gx,) = torch.autograd.grad(y.sum(), a["x"], create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.parametrize("layout", ["cl3d", "ncdhw"])
def test_opcheck_conv2plus1d_unit(layout):
    """The inference-only unit op: schema, fake tensor (shape and memory format) and dispatch."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last_3d if layout == "cl3d" else torch.contiguous_format
    x = torch.randn(2, 5, 4, 6, 5, generator=g).contiguous(memory_format=fmt)

    def bn(c):
        return (torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g),
                torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5)

    args = (x, torch.randn(7, 5, 1, 3, 3, generator=g), torch.randn(7, generator=g), *bn(7), 1e-5,
            torch.randn(9, 7, 3, 1, 1, generator=g), None, *bn(9), 1e-3,
            torch.randn(2, 9, 2, 3, 3, generator=g).contiguous(memory_format=fmt),
            [2, 2], [1, 1], 2, 1, "silu")
    torch.library.opcheck(torch.ops.r21d.conv2plus1d_bn_act.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("layout", ["cl3d", "ncdhw"])
def test_opcheck_conv2plus1d_train_unit(layout):
    """The training unit op and its backward: schema, fake tensors, autograd registration and
    dispatch through AOT (forward and backward), with and without running statistics."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last_3d if layout == "cl3d" else torch.contiguous_format
    x = torch.randn(2, 5, 4, 6, 5, generator=g).contiguous(memory_format=fmt).requires_grad_()

    def param(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    running = (torch.zeros(7), torch.ones(7))
    args = (x, param(7, 5, 1, 3, 3), param(7), param(7), param(7), *running, 0.1, 1e-5,
            param(9, 7, 3, 1, 1), None, param(9), param(9), None, None, 0.0, 1e-3,
            torch.randn(2, 9, 2, 3, 3, generator=g).contiguous(memory_format=fmt).requires_grad_(),
            [1, 2, 2], [0, 1, 1], [1, 1, 1], [2, 1, 1], [1, 0, 0], [1, 1, 1], "silu", True, "")
    with r21d.use_backend("triton"):
        torch.library.opcheck(torch.ops.r21d.conv2plus1d_bn_act_train.default, args)
        # and the backward op itself, on what the forward saved
        _out, z1, mean1, invstd1, z2, mean2, invstd2, *_ = torch.ops.r21d.conv2plus1d_bn_act_train(*args)
        x, w1, b1, g1, be1 = (t.detach() for t in args[:5])
        w2, _b2, g2, be2 = (t.detach() if t is not None else None for t in args[9:13])
        residual = args[17].detach()
        bwd = (torch.randn_like(_out), x, w1, b1, g1, be1, z1, mean1, invstd1, w2, None, g2, be2, z2,
               mean2, invstd2, residual, *args[18:24], "silu", [True, True, True, True, True, True,
                                                                False, True, True, True], "")
        torch.library.opcheck(torch.ops.r21d.conv2plus1d_bn_act_train_backward.default, bwd)


# The ops opchecked above and, on a GPU, in tests/csrc/test_depthwise3d_cuda.py::test_opcheck.
OPCHECKED = {op for op, _, _ in OPCHECK_CASES.values()} | {
    "pointwise_conv_bn_act_backward", "depthwise_conv_bn_act_backward",
    "implicit_gemm_conv_bn_act_backward", "conv2plus1d_bn_act", "conv2plus1d_bn_act_train",
    "conv2plus1d_bn_act_train_backward", "depthwise3d_conv_bn_act",
    "depthwise3d_conv_bn_act_backward"}


def test_every_op_is_opchecked():
    """A new op in the r21d namespace needs an opcheck test (build_info takes no tensors)."""
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("r21d::")}
    assert registered - {"build_info"} <= OPCHECKED, registered - OPCHECKED


def test_modules_call_the_ops_through_their_autograd_function(monkeypatch):
    """A training step of fused sites and a (2+1)D unit calls each forward op under its
    autograd.Function (r21d._op_common.differentiable), never through the op's own autograd
    wrapper, whose per-call default filling is quadratic in the schema's length."""
    import torch._library.utils as library_utils
    from torch import nn

    calls = []
    fill = library_utils.fill_defaults
    monkeypatch.setattr(library_utils, "fill_defaults", lambda *a: calls.append(1) or fill(*a))
    torch.manual_seed(0)
    model = r21d.fuse(nn.Sequential(
        nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(4), nn.ReLU(),
        r21d.SpatioTemporalConv(4, 4, 3, padding=1)))
    x = torch.randn(1, 3, 2, 3, 3, requires_grad=True)
    with r21d.use_backend("triton"):
        model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None
    assert not calls


def test_eager_calls_run_the_launchers_unless_something_would_see_the_op(monkeypatch):
    """Eager, a fused site calls its family's launchers itself (r21d.direct_calls); a dispatch
    mode, the profiler and torch.jit.trace still see the op (the first two get the same
    result)."""
    import collections

    from torch import nn

    from r21d import direct_calls
    from tests.utils import OpsSeen

    direct = collections.Counter()
    run = direct_calls.run
    monkeypatch.setattr(direct_calls, "run", lambda family, *a: direct.update([family.forward])
                        or run(family, *a))
    torch.manual_seed(0)
    model = r21d.fuse(nn.Sequential(nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1), bias=False),
                                    nn.BatchNorm3d(4), nn.ReLU()).eval())
    x = torch.randn(1, 3, 2, 3, 3)
    name = "r21d::implicit_gemm_conv_bn_act"

    with r21d.use_backend("triton"), torch.no_grad():
        y = model(x)
        assert direct == {name: 1}
        with OpsSeen() as seen:
            torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        assert name + ".default" in seen.ops or name in seen.ops
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        assert any(e.name == name for e in prof.events())
        assert name in str(torch.jit.trace(model, x, check_trace=False).graph)
    assert direct == {name: 1}
