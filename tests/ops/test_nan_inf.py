"""NaN and Inf propagate through the fused ops as through PyTorch's conv3d -> batch_norm ->
activation: the same elements come out NaN, +Inf and -Inf, in the output and in every gradient.

The interpreter computes with numpy, whose maximum propagates NaN where a GPU's plain max.f32
does not; so the GPU arithmetic is also checked where it is decided, without a GPU: the PTX of
the Triton ReLU (sm_90) and the csrc header's activation functions compiled by g++.
"""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import r21d
from r21d.fused_unit import UNIT_KERNEL, UNIT_TRAIN_KERNEL, choose_unit, run_unit
from tests.utils import (
    REPO_ROOT,
    ConvProblem,
    assert_oracle_close,
    gpu,
    make_inputs,
    oracle,
    perturb_batchnorm,
    run_backend,
)

pytestmark = pytest.mark.usefixtures("strict")

# One case per conv family (r21d.dispatch.conv_family); the (2+1)D unit is below.
CASES = {
    "pointwise": ConvProblem(C_in=6, C_out=5, residual=True),
    "depthwise": ConvProblem(C_in=5, C_out=5, groups=5, kernel=(3, 3, 3), padding=(1, 1, 1), layout="cl3d"),
    "spatial": ConvProblem(C_in=4, C_out=6, kernel=(1, 3, 3), padding=(0, 1, 1), activation="silu"),
    "temporal": ConvProblem(C_in=4, C_out=6, kernel=(3, 1, 1), padding=(1, 0, 0), T=4, layout="cl3d"),
    "dense": ConvProblem(C_in=3, C_out=4, kernel=(3, 3, 3), padding=(1, 1, 1), T=3, H=4, W=4),
    "grouped": ConvProblem(C_in=4, C_out=6, groups=2, kernel=(1, 3, 3), padding=(0, 1, 1),
                        layout="cl3d"),
}


def _poison(t: torch.Tensor, seed: int, margin=(0, 0, 0)) -> torch.Tensor:
    """A copy of ``t`` (same strides) with a NaN, a +Inf and a -Inf at seeded positions at least
    ``margin`` from the T, H and W borders."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.zeros(t.shape, dtype=torch.bool)
    (mt, mh, mw), (T, H, W) = margin, t.shape[2:]
    allowed[:, :, mt:T - mt, mh:H - mh, mw:W - mw] = True
    candidates = allowed.flatten().nonzero().flatten()
    picked = candidates[torch.randperm(candidates.numel(), generator=g)[:3]]
    out = t.detach().clone(memory_format=torch.preserve_format)
    out[torch.unravel_index(picked, t.shape)] = torch.tensor(
        [float("nan"), float("inf"), float("-inf")], dtype=t.dtype, device=t.device)
    return out


def assert_same_specials(name: str, out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor) -> None:
    """Same NaN / +Inf / -Inf elements as the float64 ``ref``; the finite ones within twice the
    float32 torch ``baseline``'s error (tests.utils.assert_oracle_close)."""
    out, ref, baseline = (t.detach().double().cpu() for t in (out, ref, baseline))
    for kind, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = test(out), test(ref)
        assert torch.equal(got, want), (f"{name}: {kind} at {int(got.sum())} elements, PyTorch "
                                        f"{int(want.sum())}; first difference at "
                                        f"{tuple((got != want).nonzero()[0].tolist())}")
    finite = torch.isfinite(ref)
    if finite.any():
        assert_oracle_close(name + " (finite elements)", out[finite], ref[finite], torch.float32,
                            baseline[finite])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device", ["cpu", gpu("cuda")])
def test_specials_in_x_propagate_like_pytorch(name, training, device):
    case = CASES[name]
    args = make_inputs(case, torch.float32, device)
    args["x"] = _poison(args["x"], seed=1)
    out, _, stats = run_backend("triton", args, case, training)
    ref, _, ref_stats = oracle(args, case, training)
    base, _, base_stats = run_backend("torch", args, case, training)
    assert_same_specials("out", out, ref, base)
    if training:  # the running statistics take the NaN / Inf batch statistics like PyTorch's
        for got, want, b, what in zip(stats, ref_stats, base_stats, ("running_mean", "running_var")):
            assert_same_specials(what, got, want, b)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device", ["cpu", gpu("cuda")])
def test_relu_gradient_passes_where_its_input_is_nan(name, device):
    """Eval (running statistics: the NaN stays where it is): ReLU's gradient is threshold_backward,
    0 where its input <= 0 and dy elsewhere, NaN inputs included; a multiply or a ``pre > 0``
    select would block dy there and change the finite gradients around it."""
    case = CASES[name]
    args = make_inputs(case, torch.float32, device)
    args["x"] = _poison(args["x"], seed=1)
    grad_out = torch.randn(case.output_shape(), generator=torch.Generator().manual_seed(4)).to(device)
    _, grads, _ = run_backend("triton", args, case, False, grad_out)
    _, ref_grads, _ = oracle(args, case, False, grad_out)
    _, base_grads, _ = run_backend("torch", args, case, False, grad_out)
    for key in ref_grads:
        assert_same_specials(f"grad {key}", grads[key], ref_grads[key], base_grads[key])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device", ["cpu", gpu("cuda")])
def test_specials_in_grad_out_propagate_like_pytorch(name, training, device):
    """An infinite or NaN output gradient: ReLU passes 0 where its input was <= 0 (PyTorch's
    threshold_backward selects, it does not multiply), the rest spreads through the conv and,
    in training, the batch statistics' terms."""
    case = CASES[name]
    args = make_inputs(case, torch.float32, device)
    g = torch.Generator().manual_seed(3)
    # Away from the borders: there PyTorch's CPU conv backward multiplies the zero padding by the
    # gradient (0 x Inf = NaN), while r21d's kernels skip padded taps (they contribute nothing).
    grad_out = _poison(torch.randn(case.output_shape(), generator=g), seed=2,
                       margin=case.padding).to(device)
    _, grads, _ = run_backend("triton", args, case, training, grad_out)
    _, ref_grads, _ = oracle(args, case, training, grad_out)
    _, base_grads, _ = run_backend("torch", args, case, training, grad_out)
    assert grads.keys() == ref_grads.keys()
    for key in ref_grads:
        assert_same_specials(f"grad {key}", grads[key], ref_grads[key], base_grads[key])


def _unit_modules(training: bool, device: str):
    """A (2+1)D unit's modules (spatial 1x3x3, BN, ReLU, temporal 3x1x1, BN, ReLU) with BN away
    from its defaults."""
    torch.manual_seed(0)
    mods = nn.Sequential(
        nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(6), nn.ReLU(),
        nn.Conv3d(6, 5, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.BatchNorm3d(5), nn.ReLU())
    return list(perturb_batchnorm(mods).to(device).train(training))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("device", ["cpu", gpu("cuda")])
def test_specials_in_x_propagate_through_the_unit(training, device):
    """The (2+1)D unit's kernels (eval: one kernel, BN1 + ReLU in registers; training: the BN1 +
    ReLU prologue of the temporal conv) keep NaN and Inf where PyTorch does: in training one NaN
    in x makes the batch statistics, and so every output, NaN."""
    mods = _unit_modules(training, device)
    g = torch.Generator().manual_seed(5)
    x = _poison(torch.randn(2, 4, 3, 4, 4, generator=g), seed=1).to(device)
    with r21d.use_backend("triton"):
        assert choose_unit(*mods).kernel == (UNIT_TRAIN_KERNEL if training else UNIT_KERNEL)
    results = []
    for backend, dtype, dev in (("triton", torch.float32, device), ("torch", torch.float64, "cpu"),
                                ("torch", torch.float32, device)):
        m = [copy.deepcopy(mod).to(dev, dtype) for mod in mods]
        with r21d.use_backend(backend), torch.no_grad():
            results.append((run_unit(*m, x.to(dev, dtype)), m))
    (out, m), (ref, m_ref), (base, m_base) = results
    assert_same_specials("out", out, ref, base)
    for i in (1, 4):  # the BNs' running statistics take the batch statistics' NaN and Inf
        for stat in ("running_mean", "running_var"):
            assert_same_specials(f"bn{i}.{stat}", getattr(m[i], stat), getattr(m_ref[i], stat),
                                 getattr(m_base[i], stat))


RELU_PTX = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from r21d.triton_kernels import _common as cm

@triton.jit
def relu(x_ptr, y_ptr):
    i = tl.arange(0, 32)
    tl.store(y_ptr + i, cm.activation(tl.load(x_ptr + i), 1))

src = ASTSource(fn=relu, signature={"x_ptr": "*fp32", "y_ptr": "*fp32"}, constexprs={}, attrs={})
print(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
"""


def test_triton_relu_keeps_nan_on_the_gpu(tmp_path):
    """The ReLU every Triton kernel applies compiles to PTX's NaN-propagating max for sm_90."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "relu_ptx.py"  # a file: triton.jit reads the kernel's source
    script.write_text(RELU_PTX)
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    maxes = [line.split()[0] for line in done.stdout.splitlines() if line.strip().startswith("max")]
    assert maxes == ["max.NaN.f32"], maxes


CSRC_ACTIVATIONS = r"""
#include <cmath>
#include <cstdio>
#include "depthwise3d.h"
using namespace r21d::dw3d;
int main() {
  float xhat;
  std::printf("%g %g %g %g\n", act_fwd(NAN, kActRelu), act_fwd(-INFINITY, kActRelu),
              bwd_g(INFINITY, -1.f, 1.f, 1.f, 0.f, 0.f, kActRelu, xhat),
              bwd_g(NAN, 1.f, 1.f, 1.f, 0.f, 0.f, kActRelu, xhat));
}
"""


def test_csrc_relu_keeps_nan_and_selects_its_gradient(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    root = str(REPO_ROOT)
    src = tmp_path / "acts.cpp"
    src.write_text(CSRC_ACTIVATIONS)
    exe = tmp_path / "acts"
    build = subprocess.run([gxx, "-std=c++17", "-DR21D_CPU_HARNESS", "-I", os.path.join(root, "csrc"),
                            str(src), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    relu_nan, relu_neg_inf, grad_inf_below_zero, grad_nan_above_zero = \
        subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    # torch.relu(nan) = nan, relu(-inf) = 0; threshold_backward: 0 where the input <= 0
    assert (relu_nan, relu_neg_inf, grad_inf_below_zero, grad_nan_above_zero) == ("nan", "0", "0", "nan")
