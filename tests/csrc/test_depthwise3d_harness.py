"""CPU harness of the csrc depthwise conv3d + BN + activation kernels (docs/testing.md, "Speed
without a GPU"): compiles tests/csrc/depthwise3d_harness.cpp (plain g++, csrc/depthwise3d.h with
-DR21D_CPU_HARNESS), runs the header's per-thread functions over the whole index space in float32
and compares with the float64 torch oracle: F.conv3d(groups=C) -> F.batch_norm -> + residual ->
activation, gradients by autograd."""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "tests", "csrc", "depthwise3d_harness.cpp")
ACTS = {"none": 0, "relu": 1, "silu": 2}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the CPU harness of the csrc kernels needs a C++17 compiler")
    exe = str(tmp_path_factory.mktemp("dw3d_harness") / "harness")
    cmd = [gxx, "-std=c++17", "-O1", "-DR21D_CPU_HARNESS", "-I", os.path.join(ROOT, "csrc"), SRC, "-o", exe]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"harness failed to compile:\n{' '.join(cmd)}\n{res.stderr}"
    return exe


# ----------------------------------------------------------------------------- layouts


def layout_strides(shape, layout):
    """(strides, buffer elements) of a (N, C, T, H, W) tensor in `layout`."""
    N, C, T, H, W = shape
    if layout == "ncdhw":
        s = (C * T * H * W, T * H * W, H * W, W, 1)
    elif layout == "ndhwc":
        s = (T * H * W * C, 1, H * W * C, W * C, C)
    elif layout == "padded":  # any strides: gaps everywhere, W not unit-stride
        sw = 2
        sh = sw * W + 1
        st = sh * H + 3
        sc = st * T + 5
        s = (sc * C + 7, sc, st, sh, sw)
    else:
        raise ValueError(layout)
    size = 1 + sum((d - 1) * st for d, st in zip(shape, s)) if all(shape) else 0
    return s, size


def pack(t, layout):
    s, size = layout_strides(tuple(t.shape), layout)
    buf = torch.randn(max(size, 1), dtype=torch.float32)[:size]  # gaps hold junk, never zeros
    if size:
        torch.as_strided(buf, t.shape, s).copy_(t)
    return buf, s, size


def unpack(buf, shape, layout):
    s, size = layout_strides(shape, layout)
    assert buf.numel() == size
    return torch.as_strided(buf, shape, s).clone()


def fmt(v):
    return " ".join(str(int(a)) if isinstance(a, (bool, int)) else repr(float(a)) for a in v)


# ----------------------------------------------------------------------------- oracle


def oracle(inp, c):
    d = {k: (v.double().clone().requires_grad_(k not in ("rm", "rv", "dy")) if v is not None else None)
         for k, v in inp.items()}
    C = d["x"].shape[1]
    z = F.conv3d(d["x"], d["w"], d["bias"], c["stride"], c["padding"], c["dilation"], groups=C)
    z.retain_grad()
    rm = d["rm"].detach().clone() if d["rm"] is not None else None
    rv = d["rv"].detach().clone() if d["rv"] is not None else None
    y = F.batch_norm(z, rm, rv, d["bn_weight"], d["bn_bias"], training=c["train"], momentum=c["momentum"], eps=c["eps"])
    if d["res"] is not None:
        y = y + d["res"]
    y = {"none": lambda t: t, "relu": F.relu, "silu": F.silu}[c["act"]](y)
    y.backward(d["dy"])
    dims = (0, 2, 3, 4)
    if c["train"]:
        mean = z.detach().mean(dims)
        var = z.detach().var(dims, unbiased=False)
    else:
        mean, var = d["rm"].detach(), d["rv"].detach()
    out = dict(out=y.detach(), z=z.detach(), mean=mean, invstd=1 / torch.sqrt(var + c["eps"]),
               dx=d["x"].grad, dw=d["w"].grad)
    if c["train"] and rm is not None:
        out.update(nrm=rm, nrv=rv)
    for k, name in (("bias", "dbias"), ("bn_weight", "dbn_weight"), ("bn_bias", "dbn_bias"), ("res", "dres")):
        if d[k] is not None:
            out[name] = d[k].grad
    return out


def check(name, got, ref, rtol=2e-4, atol=2e-4):
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten element?)"
    err = torch.linalg.norm(got - ref).item()
    bound = rtol * torch.linalg.norm(ref).item() + atol * math.sqrt(max(ref.numel(), 1))
    assert err <= bound, f"{name}: |err| {err:.3e} > {bound:.3e} (|ref| {torch.linalg.norm(ref).item():.3e})"


# ----------------------------------------------------------------------------- cases


def case(shape, k, stride=1, padding=0, dilation=1, act="relu", train=False, bias=True, affine=True, running=True,
         res=False, layout="ncdhw", res_layout=None, nb=3):
    t3 = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v, v))
    return dict(shape=shape, k=t3(k), stride=t3(stride), padding=t3(padding), dilation=t3(dilation), act=act,
                train=train, bias=bias, affine=affine, running=running, res=res, layout=layout,
                res_layout=res_layout or layout, nb=nb, momentum=0.1, eps=1e-5)


CASES = {
    "k333_eval_relu": case((2, 5, 4, 6, 7), 3, padding=1),
    "k333_train_relu_cl": case((2, 5, 4, 6, 7), 3, padding=1, train=True, layout="ndhwc"),
    "k133_train_silu_res": case((2, 5, 3, 7, 9), (1, 3, 3), padding=(0, 1, 1), act="silu", train=True, res=True),
    "k311_eval_none_cl_res": case((1, 5, 6, 5, 5), (3, 1, 1), padding=(1, 0, 0), act="none", res=True,
                                  layout="ndhwc"),
    "k511_train_stride2": case((2, 4, 9, 5, 6), (5, 1, 1), stride=(2, 1, 1), padding=(2, 0, 0), train=True,
                               layout="ndhwc", nb=7),
    "k155_eval_stride2_dil2": case((1, 6, 3, 11, 13), (1, 5, 5), stride=(1, 2, 2), padding=(0, 3, 2),
                                   dilation=(1, 2, 2), act="silu", layout="ndhwc"),
    "k533_train_dil3_pad3": case((2, 3, 10, 9, 8), (5, 3, 3), padding=(3, 3, 2), dilation=(3, 2, 3),
                                 act="silu", train=True, res=True, layout="padded", res_layout="ndhwc"),
    "k777_tiny_train": case((1, 2, 7, 8, 7), 7, padding=3, stride=2, train=True, layout="ndhwc", nb=2),
    "k777_tiny_eval": case((1, 3, 7, 7, 9), 7, padding=(3, 2, 1), act="none", res=True),
    "T1_affine_false_train": case((3, 5, 1, 5, 7), (1, 3, 3), padding=(0, 1, 1), train=True, affine=False,
                                  layout="ndhwc"),
    "no_running_train_nobias": case((2, 5, 3, 4, 5), 3, padding=(1, 0, 2), train=True, running=False,
                                    bias=False, act="silu", layout="padded"),
    "pad0_stride2_all_eval": case((2, 5, 5, 7, 9), 3, stride=2, act="relu", res=True, layout="ndhwc",
                                  res_layout="ncdhw"),
    "dil2_stride2_train_mixed": case((2, 4, 6, 9, 10), 3, stride=(2, 1, 2), padding=(2, 1, 0), dilation=2,
                                     train=True, res=True, layout="ncdhw", res_layout="padded", nb=5),
}


def out_shape(c):
    N, C, T, H, W = c["shape"]
    return (N, C, *[(n + 2 * p - d * (k - 1) - 1) // s + 1
                    for n, k, s, p, d in zip((T, H, W), c["k"], c["stride"], c["padding"], c["dilation"])])


def make_inputs(c):
    N, C, T, H, W = c["shape"]
    kt, kh, kw = c["k"]
    oshape = out_shape(c)
    return dict(
        x=torch.randn(c["shape"]),
        w=torch.randn(C, 1, kt, kh, kw) / math.sqrt(kt * kh * kw),
        bias=torch.randn(C) * 0.5 if c["bias"] else None,
        bn_weight=torch.randn(C) * 0.5 + 1.0 if c["affine"] else None,
        bn_bias=torch.randn(C) * 0.3 if c["affine"] else None,
        rm=torch.randn(C) * 0.2 if c["running"] else None,
        rv=torch.rand(C) + 0.5 if c["running"] else None,
        res=torch.randn(oshape) if c["res"] else None,
        dy=torch.randn(oshape),
    )


def run_harness(harness, tmp_path, c, inp, seed):
    """Runs the harness on ``inp`` (case ``c``): (what it computed, the float64 oracle's), as
    dicts of the same keys."""
    C = c["shape"][1]
    kt, kh, kw = c["k"]
    oshape = out_shape(c)
    osz = oshape[2:]
    if not c["train"]:
        assert c["running"]
    lay = dict(x=c["layout"], out=c["layout"], res=c["res_layout"], dy=c["res_layout"])
    cfg = dict(geom=c["shape"], kernel=c["k"], stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
               act=[ACTS[c["act"]]], train=[c["train"]], momentum=[c["momentum"]], eps=[c["eps"]],
               has_bias=[c["bias"]], has_bn_weight=[c["affine"]], has_bn_bias=[c["affine"]], has_running=[c["running"]],
               has_res=[c["res"]], nb=[c["nb"]])
    for key, t in (("x", inp["x"]), ("res", inp["res"]), ("dy", inp["dy"])):
        if t is None:
            continue
        buf, s, size = pack(t, lay[key])
        buf.numpy().tofile(tmp_path / f"{key}.bin")
        cfg["s" + ("r" if key == "res" else key)] = s
        cfg["b" + ("r" if key == "res" else key)] = [size]
    cfg["so"], cfg["bo"] = layout_strides(oshape, lay["out"])
    cfg["bo"] = [cfg["bo"]]
    if not c["res"]:
        cfg["sr"], cfg["br"] = (0, 0, 0, 0, 0), [0]
    for key in ("w", "bias", "bn_weight", "bn_bias", "rm", "rv"):
        if inp[key] is not None:
            inp[key].contiguous().numpy().tofile(tmp_path / f"{key}.bin")
    (tmp_path / "config.txt").write_text("".join(f"{k} {fmt(v)}\n" for k, v in cfg.items()))

    run = subprocess.run([harness, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"harness failed (seed {seed}): {run.stderr}"
    assert tuple(int(v) for v in (tmp_path / "out_size.txt").read_text().split()) == tuple(osz)

    def load(name, shape=None, layout=None):
        buf = torch.from_numpy(__import__("numpy").fromfile(tmp_path / f"{name}.bin", dtype="float32"))
        return unpack(buf, shape, layout) if layout else buf.reshape(shape)

    ref = oracle(inp, c)
    got = dict(out=load("out", oshape, lay["out"]), z=load("z", oshape, lay["out"]),
               mean=load("mean", (C,)), invstd=load("invstd", (C,)),
               dx=load("dx", c["shape"], lay["x"]), dw=load("dw", (C, 1, kt, kh, kw)))
    if c["train"] and c["running"]:
        got.update(nrm=load("nrm", (C,)), nrv=load("nrv", (C,)))
    if c["bias"]:
        got["dbias"] = load("dbias", (C,))
    if c["affine"]:
        got.update(dbn_weight=load("dbn_weight", (C,)), dbn_bias=load("dbn_bias", (C,)))
    if c["res"]:
        got["dres"] = load("dres", oshape, lay["res"])
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    return got, ref


@pytest.mark.parametrize("name", sorted(CASES))
def test_harness_matches_float64_oracle(harness, tmp_path, name):
    c = CASES[name]
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    got, ref = run_harness(harness, tmp_path, c, make_inputs(c), seed)
    for key in sorted(ref):
        check(f"{name}/{key} (seed {seed})", got[key], ref[key])


def poison(t, c, seed):
    """A copy of x ``t`` with a NaN, a +Inf and a -Inf in three different channels, each at a
    seeded position that some output reads (so that z has a NaN, a +Inf or -Inf and a +Inf or
    -Inf that do not meet)."""
    ones = torch.ones(t.shape, dtype=torch.float64, requires_grad=True)
    C = t.shape[1]
    F.conv3d(ones, torch.ones(C, 1, *c["k"], dtype=torch.float64), None, c["stride"], c["padding"],
             c["dilation"], groups=C).sum().backward()
    read = ones.grad > 0
    g = torch.Generator().manual_seed(seed)
    out = t.clone()
    for ch, v in zip(torch.randperm(C, generator=g)[:3].tolist(), (float("nan"), float("inf"), float("-inf"))):
        cand = read[:, ch].flatten().nonzero().flatten()
        n, tt, h, w = torch.unravel_index(cand[torch.randint(cand.numel(), (), generator=g)], read[:, ch].shape)
        out[n, ch, tt, h, w] = v
    return out


def check_specials(name, got, ref):
    """NaN, +Inf and -Inf at the same elements as the float64 oracle, the finite ones close."""
    got, ref = got.double(), ref.double()
    for kind, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        g, r = test(got), test(ref)
        assert torch.equal(g, r), (f"{name}: {kind} at {int(g.sum())} elements, PyTorch {int(r.sum())}; first "
                                   f"difference at {tuple((g != r).nonzero()[0].tolist())}")
    finite = torch.isfinite(ref)
    check(name + " (finite elements)", got[finite], ref[finite])


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if not c["train"]))
def test_eval_specials_in_x_propagate_like_pytorch(harness, tmp_path, name):
    """Eval (running statistics): a NaN, +Inf and -Inf in x make z NaN / +-Inf where they are read.
    PyTorch's batch_norm input gradient is then dy * act' * bn_weight * invstd, finite where that
    product is (no (z - mean) term: 0 * Inf would be NaN), and ReLU's gradient is
    threshold_backward, dy where its input is NaN. Every output and gradient has NaN / +-Inf at
    exactly PyTorch's elements, the finite ones close to the float64 oracle."""
    c = CASES[name]
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    inp = make_inputs(c)
    inp["x"] = poison(inp["x"], c, seed)
    got, ref = run_harness(harness, tmp_path, c, inp, seed)
    assert torch.isinf(ref["z"]).any() and torch.isfinite(ref["dx"]).any()
    for key in sorted(ref):
        check_specials(f"{name}/{key} (seed {seed})", got[key], ref[key])
