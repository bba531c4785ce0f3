"""GPU tests of the csrc depthwise conv3d + BN + activation ops (torch.ops.r21d.depthwise3d_conv_bn_act
and ..._backward) against the float64 torch oracle, on both layouts and fp32 / fp16 / bf16, eval and
train. Marked `gpu`: skipped without CUDA; run with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from r21d import _extension

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _extension.loaded(), reason=str(_extension.unavailable_reason())),
]

RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
MASK_ALL = [True, True, True, True, True, True]

GEOMS = {
    "k333": dict(shape=(2, 32, 5, 9, 11), k=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1)),
    "k133_s2": dict(shape=(2, 24, 3, 13, 10), k=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), dilation=(1, 1, 1)),
    "k511_d2": dict(shape=(1, 16, 12, 5, 6), k=(5, 1, 1), stride=(2, 1, 1), padding=(3, 0, 0), dilation=(2, 1, 1)),
    "k155_c5": dict(shape=(2, 5, 2, 9, 9), k=(1, 5, 5), stride=(1, 1, 2), padding=(0, 2, 3), dilation=(1, 3, 2)),
}


def rel_err(got, ref, floor=0.0):
    got, ref = got.double().cpu(), ref.double().cpu()
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    assert torch.isfinite(got).all()
    return torch.linalg.norm(got - ref).item() / max(torch.linalg.norm(ref).item(), floor, 1e-30)


def make_inputs(g, dtype, layout, residual, seed):
    torch.manual_seed(seed)
    N, C, T, H, W = g["shape"]
    osz = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, k, s, p, d in zip((T, H, W), g["k"], g["stride"], g["padding"], g["dilation"])]
    mf = torch.channels_last_3d if layout == "cl" else torch.contiguous_format
    dev = "cuda"
    x = torch.randn(g["shape"], device=dev).to(dtype).contiguous(memory_format=mf)
    w = (torch.randn(C, 1, *g["k"], device=dev) / math.sqrt(math.prod(g["k"]))).to(dtype)
    inp = dict(
        x=x, w=w, bias=(torch.randn(C, device=dev) * 0.5).to(dtype),
        bn_weight=torch.randn(C, device=dev) * 0.5 + 1, bn_bias=torch.randn(C, device=dev) * 0.3,
        rm=torch.randn(C, device=dev) * 0.2, rv=torch.rand(C, device=dev) + 0.5,
        res=torch.randn(N, C, *osz, device=dev).to(dtype).contiguous(memory_format=mf) if residual else None,
        dy=torch.randn(N, C, *osz, device=dev).to(dtype).contiguous(memory_format=mf),
    )
    return inp


def oracle(inp, g, train, act):
    d = {k: (v.detach().double().cpu().requires_grad_(k not in ("rm", "rv", "dy")) if v is not None else None)
         for k, v in inp.items()}
    C = d["x"].shape[1]
    z = F.conv3d(d["x"], d["w"], d["bias"], g["stride"], g["padding"], g["dilation"], groups=C)
    z.retain_grad()
    rm, rv = d["rm"].detach().clone(), d["rv"].detach().clone()
    y = F.batch_norm(z, rm, rv, d["bn_weight"], d["bn_bias"], training=train, momentum=0.1, eps=1e-5)
    if d["res"] is not None:
        y = y + d["res"]
    y = {"none": lambda t: t, "relu": F.relu, "silu": F.silu}[act](y)
    y.backward(d["dy"])
    return dict(out=y.detach(), z=z.detach(), rm=rm, rv=rv, dx=d["x"].grad, dw=d["w"].grad, dbias=d["bias"].grad,
                dbn_weight=d["bn_weight"].grad, dbn_bias=d["bn_bias"].grad,
                dres=d["res"].grad if d["res"] is not None else None,
                dz_abs_sum=z.grad.abs().sum((0, 2, 3, 4)))


def run_op(inp, g, train, act, deterministic=False, mask=MASK_ALL):
    out, z, mean, invstd, nrm, nrv = torch.ops.r21d.depthwise3d_conv_bn_act(
        inp["x"], inp["w"], inp["bias"], inp["bn_weight"], inp["bn_bias"], inp["rm"], inp["rv"], inp["res"],
        list(g["stride"]), list(g["padding"]), list(g["dilation"]), train, 0.1, 1e-5, act, True)
    grads = torch.ops.r21d.depthwise3d_conv_bn_act_backward(
        inp["dy"], inp["x"], inp["w"], inp["bias"], z, mean, invstd, inp["bn_weight"], inp["bn_bias"],
        inp["res"], list(g["stride"]), list(g["padding"]), list(g["dilation"]), train, act, mask,
        deterministic)
    return dict(out=out, z=z, mean=mean, invstd=invstd, rm=nrm, rv=nrv), grads


@pytest.mark.parametrize("geom", sorted(GEOMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_backward_match_float64(geom, dtype, layout, train):
    g = GEOMS[geom]
    act = "silu" if geom in ("k133_s2", "k155_c5") else "relu"
    residual = geom != "k511_d2"
    inp = make_inputs(g, dtype, layout, residual, seed=hash((geom, layout, train)) % 10000)
    fwd, (dx, dw, dbias, dbn_weight, dbn_bias, dres) = run_op(inp, g, train, act)
    ref = oracle(inp, g, train, act)
    tol = RTOL[dtype]
    want_cl = layout == "cl"
    assert fwd["out"].is_contiguous(memory_format=torch.channels_last_3d if want_cl else torch.contiguous_format)
    assert dx.is_contiguous(memory_format=torch.channels_last_3d if want_cl else torch.contiguous_format)
    assert fwd["out"].dtype == dtype and fwd["z"].dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert rel_err(fwd["out"], ref["out"]) < tol
    assert rel_err(fwd["z"], ref["z"]) < tol
    if train:
        assert rel_err(fwd["rm"], ref["rm"]) < tol
        assert rel_err(fwd["rv"], ref["rv"]) < tol
    else:
        assert fwd["rm"].numel() == 0 and fwd["rv"].numel() == 0
    assert rel_err(dx, ref["dx"]) < tol
    assert rel_err(dw, ref["dw"]) < tol
    assert rel_err(dbn_weight, ref["dbn_weight"]) < tol
    assert rel_err(dbn_bias, ref["dbn_bias"]) < tol
    # dbias is ~0 in training (sum of dz over the batch): relative to the summed |dz|
    assert rel_err(dbias, ref["dbias"], floor=torch.linalg.norm(ref["dz_abs_sum"]).item()) < tol
    if residual:
        assert rel_err(dres, ref["dres"]) < tol


def test_deterministic_dweight_is_bitwise_reproducible():
    g = GEOMS["k333"]
    for layout in ("ncdhw", "cl"):
        inp = make_inputs(g, torch.float32, layout, True, seed=7)
        _, g1 = run_op(inp, g, True, "relu", deterministic=True)
        _, g2 = run_op(inp, g, True, "relu", deterministic=True)
        assert torch.equal(g1[1], g2[1])
        _, g3 = run_op(inp, g, True, "relu", deterministic=False)
        assert rel_err(g3[1], g1[1]) < 1e-5


def test_unrequested_gradients_are_empty_and_distinct():
    g = GEOMS["k333"]
    inp = make_inputs(g, torch.float32, "cl", True, seed=3)
    _, grads = run_op(inp, g, True, "relu", mask=[True, False, False, True, False, False])
    assert grads[0].shape == inp["x"].shape and grads[3].shape == (g["shape"][1],)
    empties = [grads[i] for i in (1, 2, 4, 5)]
    assert all(t.numel() == 0 for t in empties)
    assert len({id(t) for t in grads}) == 6


def test_empty_batch_forward_saves_nothing():
    """N = 0: the output is empty and so is everything saved (r21d/ops.py's fake implementation
    says so too; autograd then returns zero gradients without calling the backward op)."""
    g = dict(GEOMS["k333"], shape=(0, 8, 4, 5, 6))
    inp = make_inputs(g, torch.float32, "ncdhw", False, seed=1)
    outs = torch.ops.r21d.depthwise3d_conv_bn_act(
        inp["x"], inp["w"], inp["bias"], inp["bn_weight"], inp["bn_bias"], inp["rm"], inp["rv"], None,
        list(g["stride"]), list(g["padding"]), list(g["dilation"]), True, 0.1, 1e-5, "relu", True)
    assert outs[0].shape == (0, 8, 4, 5, 6)
    assert all(t.numel() == 0 for t in outs[1:])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_opcheck(train):
    """Schema, fake tensors (shapes and strides as the kernels return them), autograd registration
    and AOT dispatch of both csrc ops."""
    g = GEOMS["k133_s2"]
    inp = make_inputs(g, torch.float32, "cl", True, seed=11)
    for k in ("x", "w", "bias", "bn_weight", "bn_bias", "res"):
        inp[k].requires_grad_(True)
    args = (inp["x"], inp["w"], inp["bias"], inp["bn_weight"], inp["bn_bias"], inp["rm"], inp["rv"],
            inp["res"], list(g["stride"]), list(g["padding"]), list(g["dilation"]), train, 0.1, 1e-5,
            "relu", True)
    torch.library.opcheck(torch.ops.r21d.depthwise3d_conv_bn_act.default, args)
    out, z, mean, invstd, _, _ = torch.ops.r21d.depthwise3d_conv_bn_act(*args)
    bwd = (inp["dy"], *(t.detach() for t in (inp["x"], inp["w"], inp["bias"], z, mean, invstd,
                                             inp["bn_weight"], inp["bn_bias"], inp["res"])),
           list(g["stride"]), list(g["padding"]), list(g["dilation"]), train, "relu", MASK_ALL, True)
    torch.library.opcheck(torch.ops.r21d.depthwise3d_conv_bn_act_backward.default, bwd)


def assert_same_specials(name, got, ref, tol):
    """NaN, +Inf and -Inf at the same elements as the float64 oracle, the finite ones close."""
    got, ref = got.double().cpu(), ref.double().cpu()
    for kind, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        g, r = test(got), test(ref)
        assert torch.equal(g, r), f"{name}: {kind} at {int(g.sum())} elements, PyTorch {int(r.sum())}"
    finite = torch.isfinite(ref)
    assert rel_err(got[finite], ref[finite]) < tol, name


@pytest.mark.parametrize("act", ["relu", "none", "silu"])
@pytest.mark.parametrize("layout", ["ncdhw", "cl"])
def test_eval_specials_in_x_propagate_like_pytorch(layout, act):
    """Eval: a NaN, +Inf and -Inf in x (three channels) make z NaN / +-Inf; the input gradient of
    PyTorch's eval batch_norm, dy * act' * bn_weight * invstd, stays finite there (no k_z (z - mean)
    term, 0 * Inf), ReLU's gradient passes dy where its input is NaN. Every output and gradient has
    PyTorch's NaN / Inf elements (tests/csrc/test_depthwise3d_harness.py: the same on the CPU)."""
    g = GEOMS["k333"]
    inp = make_inputs(g, torch.float32, layout, True, seed=5)
    for (n, c, t, h, w), v in (((0, 1, 2, 4, 5), "nan"), ((1, 7, 1, 3, 3), "inf"), ((0, 20, 3, 6, 8), "-inf")):
        inp["x"][n, c, t, h, w] = float(v)
    fwd, (dx, dw, dbias, dbn_weight, dbn_bias, dres) = run_op(inp, g, False, act)
    ref = oracle(inp, g, False, act)
    assert torch.isinf(ref["z"]).any() and torch.isfinite(ref["dx"]).any()
    got = dict(out=fwd["out"], z=fwd["z"], dx=dx, dw=dw, dbias=dbias, dbn_weight=dbn_weight,
               dbn_bias=dbn_bias, dres=dres)
    for key, t in got.items():
        assert_same_specials(f"{layout}/{act}/{key}", t, ref[key], RTOL[torch.float32])
