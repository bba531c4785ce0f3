"""fp32 convolutions in TF32, as cuDNN runs them: the GEMM kernels follow PyTorch's cuDNN
convolution precision flags and round both operands of every matrix product to TF32 (to nearest,
ties away from zero: PTX cvt.rna.tf32.f32) before the tensor cores read them, which would
otherwise drop the low 13 mantissa bits (truncation: about 3x the error of rounding on zero-mean
data, and a systematic shrink of products of positive values, e.g. post-ReLU activations).

On the CPU the interpreter multiplies in fp32, so a kernel's TF32 result is exactly the product
of its rounded operands accumulated in fp32: the fused ops must then match a float64 convolution
of the operands rounded to TF32 (an emulated cuDNN) to fp32 accuracy, far closer than TF32's own
error, which tells whether each operand was rounded, and how. The sm_90 / sm_80 PTX of every TF32
kernel is checked for the rounding instruction by the static report (tests/tools/test_static.py); on a
GPU the kernels' GPU tests bound the error by twice cuDNN's.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import r21d
from r21d.fused_unit import run_unit
from r21d.triton_kernels import _launch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from r21d.triton_kernels import _gemm  # noqa: E402  (imports Triton)
from tests.utils import ConvProblem, clone_inputs, make_inputs, perturb_batchnorm, rel_err, run_backend

pytestmark = [
    pytest.mark.usefixtures("strict"),
    pytest.mark.skipif(not _launch.interpreted(), reason="interpreter emulation of TF32 (CPU)"),
]


def tf32_reference(t: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32 (1 + 10 significant bits, fp32's exponent range, subnormals on
    a fixed grid of 2^-136), to nearest with ties away from zero, computed in float64 without bit
    tricks (the kernels' interpreter path uses bits; the GPU path is one PTX cvt.rna)."""
    v = t.double()
    mantissa, exponent = torch.frexp(v.abs())  # |v| = mantissa * 2^exponent, mantissa in [0.5, 1)
    quantum = torch.ldexp(torch.ones_like(v), (exponent - 11).clamp(min=-136))
    rounded = torch.floor(v.abs() / quantum + 0.5) * quantum
    rounded = torch.where(rounded >= 2.0**128, torch.inf, rounded)
    return torch.where(torch.isfinite(v), torch.copysign(rounded, v), v).to(t.dtype)


@pytest.fixture
def tf32(monkeypatch):
    """cuDNN's fp32 convolutions in TF32 (PyTorch's default on a GPU; tests/__init__ turns it off
    for the CPU tests)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)


@triton.jit
def _round_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, _gemm.round_tf32(tl.load(x_ptr + i)))


def test_round_tf32_rounds_to_nearest_ties_away():
    one = 1.0
    specials = [one, one + 2**-11, one + 3 * 2**-12, one + 2**-12, -(one + 2**-11), 2**-126 * 1.5,
                1e-40, -3e-39, 3.4028234663852886e38, 3.3e38, -3.4e38, 0.0, -0.0, torch.inf,
                -torch.inf, torch.nan, 1 / 3, -2 / 3]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(specials), torch.randn(46, generator=g) * 10.0 ** torch.randint(
        -30, 30, (46,), generator=g)]).float()
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, N=64)
    want = tf32_reference(x)
    same = (y == want) & (torch.signbit(y) == torch.signbit(want)) | (y.isnan() & want.isnan())
    assert same.all(), torch.stack([x, y, want], 1)[~same]


@pytest.fixture
def restore_precision():
    names = [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cudnn, "fp32_precision"),
             (torch.backends, "fp32_precision")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in names]
    yield
    for obj, name, value in reversed(saved):
        setattr(obj, name, value)


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
                    reason="torch < 2.9 has only the legacy allow_tf32 flag")
def test_precision_follows_torch_flags_like_cudnn(restore_precision):
    """cudnn.conv, else cudnn, else the generic flag ("none" defers); TF32 only for "tf32"."""
    from r21d.triton_kernels._gemm import dot_precision

    cudnn = torch.backends.cudnn
    cudnn.allow_tf32 = True  # the legacy switch: conv (and RNN) "tf32"
    assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "ieee"
    cudnn.allow_tf32 = False
    assert dot_precision(torch.float32) == "ieee"
    cudnn.conv.fp32_precision = "none"
    for cudnn_level, generic, want in (("tf32", "ieee", "tf32"), ("ieee", "tf32", "ieee"),
                                       ("none", "tf32", "tf32"), ("none", "ieee", "ieee"),
                                       ("none", "none", "ieee")):
        cudnn.fp32_precision, torch.backends.fp32_precision = cudnn_level, generic
        assert dot_precision(torch.float32) == want, (cudnn_level, generic)
    cudnn.conv.fp32_precision = "tf32"
    assert dot_precision(torch.float32) == "tf32"


def _conv_args(case: ConvProblem):
    return dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)


def emulated_cudnn_tf32(args: dict, case: ConvProblem, training: bool, grad_out: torch.Tensor):
    """Output, dx and dweight of conv + BN + act with every conv product's operands rounded to
    TF32 and everything else in float64: (out, {"x": dx, "weight": dw})."""
    a = clone_inputs(args, dtype=torch.float64)
    x, w = tf32_reference(a["x"].float()).double(), tf32_reference(a["weight"].float()).double()
    z = F.conv3d(x, w, a["bias"], **_conv_args(case)).requires_grad_()
    y = F.batch_norm(z, a["running_mean"], a["running_var"], a["bn_weight"], a["bn_bias"],
                     training, 0.1, 1e-5)
    y = {"relu": F.relu, "silu": F.silu, None: lambda v: v}[case.activation](y)
    y.backward(grad_out.double())
    dz = tf32_reference(z.grad.float()).double()
    dx = torch.nn.grad.conv3d_input(x.shape, w, dz, **_conv_args(case))
    dw = torch.nn.grad.conv3d_weight(x, w.shape, dz, **_conv_args(case))
    return y.detach(), {"x": dx, "weight": dw}


# A GEMM of each form: pointwise, implicit GEMM with the tap-major K loop, with the flat K loop
# (3 input channels), grouped; post-ReLU inputs (>= 0), where truncation is biased.
CASES = {
    "pointwise": ConvProblem(C_in=24, C_out=20, T=2, H=3, W=5, layout="cl3d"),
    "spatial": ConvProblem(C_in=16, C_out=12, kernel=(1, 3, 3), padding=(0, 1, 1), T=2, H=4, W=5,
                        layout="cl3d"),
    "stem-flat-k": ConvProblem(C_in=3, C_out=8, kernel=(1, 3, 3), padding=(0, 1, 1), stride=(1, 2, 2),
                            T=2, H=5, W=6),
    "grouped": ConvProblem(C_in=32, C_out=16, groups=2, kernel=(3, 1, 1), padding=(1, 0, 0), T=3, H=3,
                        W=3, layout="cl3d"),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_tf32_is_cudnn_tf32(name, training, tf32):
    case = CASES[name]
    args = make_inputs(case, torch.float32, "cpu")
    args["x"] = args["x"].relu() + 0.01
    grad_out = torch.randn(case.output_shape(), generator=torch.Generator().manual_seed(1))
    with _launch.count() as counter:
        out, grads, _ = run_backend("triton", args, case, training, grad_out)
    assert counter.launches
    want, want_grads = emulated_cudnn_tf32(args, case, training, grad_out)
    exact, exact_grads, _ = run_backend("torch", clone_inputs(args, dtype=torch.float64), case,
                                        training, grad_out.double())
    for what, got, emulated, ref in (("out", out, want, exact),
                                     *((f"grad {k}", grads[k], want_grads[k], exact_grads[k])
                                       for k in ("x", "weight"))):
        tf32_error = rel_err(emulated, ref)
        # TF32 really ran (its own error is far above fp32's), and as cuDNN would: the fused
        # result is within a small fraction of TF32's error of the emulation
        assert tf32_error > 1e-5, (what, tf32_error)
        assert rel_err(got, emulated) <= 0.05 * tf32_error, (what, rel_err(got, emulated), tf32_error)


def test_unit_kernel_rounds_both_gemms(tf32):
    """The eval (2+1)D unit kernel: the spatial GEMM's operands and the on-chip intermediate with
    the temporal weight, each rounded to TF32."""
    torch.manual_seed(0)
    mods = list(perturb_batchnorm(nn.Sequential(
        nn.Conv3d(16, 24, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(24), nn.ReLU(),
        nn.Conv3d(24, 16, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.BatchNorm3d(16),
        nn.ReLU())).eval().to(memory_format=torch.channels_last_3d))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 3, 4, 5, generator=g).relu().contiguous(memory_format=torch.channels_last_3d)
    with r21d.use_backend("triton"), torch.no_grad(), _launch.count() as counter:
        out = run_unit(*mods, x)
    assert counter.kernels == ["_unit_eval_kernel"]
    m64 = [copy.deepcopy(m).double() for m in mods]

    def conv(m, v):  # float64 conv of TF32-rounded operands
        return F.conv3d(tf32_reference(v.float()).double(), tf32_reference(m.weight.float()).double(),
                        None, m.stride, m.padding)

    with torch.no_grad():
        mid = m64[2](m64[1](conv(m64[0], x.double())))
        want = m64[5](m64[4](conv(m64[3], mid)))
        exact = nn.Sequential(*m64)(x.double())
    assert rel_err(want, exact) > 1e-5
    assert rel_err(out, want) <= 0.05 * rel_err(want, exact), (rel_err(out, want), rel_err(want, exact))
