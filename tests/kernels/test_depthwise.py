"""The fused depthwise conv + BN + activation kernels against the float64 oracle.

Triton on the CPU in the interpreter (fp32, fp16) and on a GPU (``-m gpu``, also bf16); the CUDA
C++ kernels (backend ``cuda``) on a GPU only. Strict mode throughout: a fallback to the torch path
would raise, and the launch counter proves the Triton kernels ran.
"""

import pytest
import torch

import r21d
from r21d.triton_kernels import _launch
from tests.utils import (
    DEVICE_DTYPES,
    ConvProblem,
    assert_oracle_close,
    check_backend,
    clone_inputs,
    gpu,
    make_inputs,
    oracle,
    run_backend,
)

pytestmark = pytest.mark.usefixtures("strict")


def depthwise(C=6, kernel=(3, 3, 3), padding=None, **kw):
    if padding is None:
        padding = tuple(k // 2 for k in kernel)
    return ConvProblem(C_in=C, C_out=C, groups=C, kernel=kernel, padding=padding, **kw)


# Every geometry class of the issue, on odd sizes, both layouts and a strided view.
GEOMETRIES = {
    "3x3x3": depthwise(C=5),
    "3x3x3-cl3d-residual": depthwise(C=8, layout="cl3d", residual=True),
    "1x3x3-stride2-hw": depthwise(C=7, kernel=(1, 3, 3), stride=(1, 2, 2), T=2, H=7, W=6),
    "3x1x1-T1": depthwise(C=9, kernel=(3, 1, 1), T=1, layout="cl3d"),
    "5x1x1-stem": depthwise(C=12, kernel=(5, 1, 1), T=6, H=3, W=3, activation="silu"),
    "1x5x5-pad0": depthwise(C=4, kernel=(1, 5, 5), padding=(0, 0, 0), H=6, W=7),
    "5x3x3-stride2-t": depthwise(C=6, kernel=(5, 3, 3), stride=(2, 1, 1), T=5, layout="cl3d"),
    "7x7x7-pad3": depthwise(C=3, kernel=(7, 7, 7), T=3, H=4, W=4, N=1),
    "dilation2-pad2": depthwise(C=5, dilation=(2, 2, 2), padding=(2, 2, 2), T=4),
    "dilation3-mixed": depthwise(C=6, dilation=(1, 3, 2), padding=(1, 3, 0), H=7, W=6, layout="cl3d"),
    "stride2-all-pad0": depthwise(C=10, stride=(2, 2, 2), padding=(0, 0, 0), T=5, H=6, W=7),
    "strided-view": depthwise(C=7, layout="strided", activation=None, bias=False),
    "no-affine": depthwise(C=5, affine=False, activation="silu"),
    "channels-54": depthwise(C=54, N=1, T=2, H=3, W=3, layout="cl3d"),
}
FP16_CASES = ("3x3x3-cl3d-residual", "1x3x3-stride2-hw", "5x1x1-stem", "dilation2-pad2")

# (backend, device, dtype): Triton everywhere, the CUDA C++ kernels on a GPU.
BACKEND_DEVICE_DTYPES = [
    pytest.param("triton", *p.values, id=f"triton-{p.id}", marks=p.marks) for p in DEVICE_DTYPES
] + [gpu("cuda", "cuda", dt, id=f"cuda-{str(dt)[6:]}") for dt in (torch.float32, torch.float16, torch.bfloat16)]


def _check(backend, device, dtype, case, training, momentum=0.1):
    y, counter = check_backend(backend, case, dtype, device, training, momentum)
    if backend == "triton":
        assert counter.launches > 0, "the fused kernels did not run"
    return y


def _params():
    for p in BACKEND_DEVICE_DTYPES:
        backend, device, dtype = p.values
        for name in GEOMETRIES:
            if device == "cpu" and dtype == torch.float16 and name not in FP16_CASES:
                continue
            yield pytest.param(backend, device, dtype, name, id=f"{p.id}-{name}", marks=p.marks)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend,device,dtype,name", list(_params()))
def test_forward_backward_matches_oracle(backend, device, dtype, name, training):
    case = GEOMETRIES[name]
    y = _check(backend, device, dtype, case, training)
    assert y.dtype == dtype
    fmt = torch.channels_last_3d if case.layout == "cl3d" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), "the output follows the input's memory format"


# Where the dtype changes nothing a test checks (momentum, summation order), the interpreter runs
# fp32 only: its fp16 runs cost CI time and cover what the oracle tests cover.
NO_CPU_FP16 = [p for p in BACKEND_DEVICE_DTYPES if p.id != "triton-cpu-fp16"]


@pytest.mark.parametrize("backend,device,dtype", NO_CPU_FP16)
def test_training_without_running_stats_and_other_momentum(backend, device, dtype):
    _check(backend, device, dtype, depthwise(C=6, running=False), training=True)
    _check(backend, device, dtype, depthwise(C=6, layout="cl3d"), training=True, momentum=0.7)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DEVICE_DTYPES)
def test_large_mean_offset_is_numerically_safe(backend, device, dtype):
    """Conv outputs far from zero: a naive sum-of-squares variance would lose them. 2 x 4 x 9 x 9
    positions: more statistics tiles than one block of the merge."""
    case = depthwise(C=4, T=4, H=9, W=9, layout="cl3d")
    args = make_inputs(case, dtype, device)
    args["bias"] = args["bias"] + (1000.0 if dtype == torch.float32 else 60.0)
    y, _, (_, rv) = run_backend(backend, args, case, True)
    ref, _, (_, ref_rv) = oracle(args, case, True)
    base, _, _ = run_backend("torch", args, case, True)
    assert_oracle_close("out", y, ref, dtype, base)
    assert_oracle_close("running_var", rv, ref_rv, torch.float32)


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DEVICE_DTYPES)
def test_empty_batch(backend, device, dtype):
    case = depthwise(C=4, N=0)
    args = make_inputs(case, dtype, device)
    for training in (False, True):
        before = args["running_mean"].clone()
        grad_out = torch.randn(case.output_shape(), dtype=dtype, device=device)
        y, grads, (rm, _) = run_backend(backend, args, case, training, grad_out)
        assert y.shape == case.output_shape()
        assert torch.equal(rm, before), "an empty batch must leave the running statistics alone"
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        assert grads["weight"].shape == args["weight"].shape


@pytest.mark.parametrize("backend,device,dtype", NO_CPU_FP16)
def test_weight_gradient_is_deterministic(backend, device, dtype):
    case = depthwise(C=6, T=2, H=4, W=5, layout="cl3d")  # 80 input rows: 3 row splits interpreted
    args = make_inputs(case, dtype, device)
    grad_out = torch.randn(case.output_shape(), dtype=dtype, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run_backend(backend, args, case, True, grad_out)[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def _launches(case, training):
    args = make_inputs(case, torch.float32, "cpu")
    with torch.no_grad(), r21d.use_backend("triton"), _launch.count() as counter:
        r21d.functional.conv_bn_act3d(
            args["x"], args["weight"], args["bias"], args["bn_weight"], args["bn_bias"],
            args["running_mean"], args["running_var"], residual=args["residual"],
            groups=case.groups, padding=case.padding, training=training)
    return counter


@pytest.mark.parametrize("layout", ["ncdhw", "cl3d"])
def test_eval_forward_is_one_launch_allocating_only_its_output(layout):
    """Both layouts are addressed in place: no conversion before or after the kernel."""
    counter = _launches(depthwise(C=6, residual=True, layout=layout), training=False)
    assert counter.kernels == ["_depthwise_fwd_kernel"]
    assert counter.allocations == 1


def test_train_forward_launches_as_designed():
    """Statistics pass (writes only per-tile partials), their merge, then the conv recomputed with
    normalise + activation: the output is written once and no conv output is stored."""
    counter = _launches(depthwise(C=6, layout="cl3d"), training=True)
    assert counter.kernels == ["_depthwise_fwd_kernel", "_bn_stats_finalize_kernel",
                               "_depthwise_fwd_kernel"]
    # out, 3 partials (mean, M2, count), mean, invstd; the running statistics updated in place
    assert counter.allocations == 6


def test_backward_launches_as_designed():
    case = depthwise(C=6, layout="cl3d")
    args = clone_inputs(make_inputs(case, torch.float32, "cpu"), requires_grad=True)
    with r21d.use_backend("triton"):
        y = r21d.functional.conv_bn_act3d(
            args["x"], args["weight"], args["bias"], args["bn_weight"], args["bn_bias"],
            args["running_mean"], args["running_var"], groups=6, padding=1, training=True)
    with _launch.count() as counter:
        y.backward(torch.randn_like(y))
    assert counter.kernels == ["_bn_act_bwd_reduce_kernel", "_bn_bwd_finalize_kernel",
                               "_depthwise_bwd_kernel", "_sum_splits_kernel"]


def test_unsupported_geometry_falls_back_or_raises_in_strict_mode():
    case = depthwise(C=4, kernel=(1, 9, 9), H=9, W=9)
    args = make_inputs(case, torch.float32, "cpu")
    with pytest.raises(r21d.FusedKernelUnavailable, match="kernel sizes up to 7"):
        run_backend("triton", args, case, False)
    stride3 = depthwise(C=4, stride=(1, 3, 3), H=7, W=7)
    with pytest.raises(r21d.FusedKernelUnavailable, match="strides 1 or 2"):
        run_backend("triton", make_inputs(stride3, torch.float32, "cpu"), stride3, False)


def test_depth_multiplier_is_not_depthwise():
    """groups == C_in but C_out = 2 * C_in (a depth multiplier) is a grouped conv: the implicit
    GEMM runs it, not this kernel."""
    case = ConvProblem(C_in=4, C_out=8, groups=4, kernel=(3, 3, 3), padding=(1, 1, 1))
    _, counter = check_backend("triton", case, torch.float32, "cpu", training=False)
    assert "_igemm_fwd_kernel" in counter.kernels
    assert not any(k.startswith("_depthwise") for k in counter.kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["ncdhw", "cl3d"])
def test_more_than_2_31_elements(strict, backend, layout):
    """64-bit offsets: a 2.3e9-element input (4.6 GB in bf16); the far corner, where 32-bit
    offsets would wrap, against cuDNN on a crop."""
    torch.manual_seed(0)
    shape = (1, 64, 32, 1024, 1100)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    if layout == "cl3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    assert x.numel() > 2**31
    w = torch.randn(64, 1, 3, 3, 3, device="cuda", dtype=torch.bfloat16) / 27 ** 0.5
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    with torch.no_grad(), r21d.use_backend(backend):
        y = r21d.functional.conv_bn_act3d(x, w, None, None, None, rm, rv, padding=1, groups=64)
    crop = x[:, :, -4:, -4:, -4:].float()
    ref = torch.relu(torch.nn.functional.conv3d(crop, w.float(), padding=1, groups=64))[:, :, 1:, 1:, 1:]
    torch.testing.assert_close(y[:, :, -3:, -3:, -3:].float(), ref / (1 + 1e-5) ** 0.5, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_half_module_with_half_batchnorm(strict, backend):
    """A model cast with .half() has float16 BN parameters and running statistics too."""
    m = r21d.ConvBNReLU3d(24, 24, 3, padding=1, groups=24).cuda().half()
    ref = r21d.unfuse(m)
    x = torch.randn(2, 24, 4, 9, 9, device="cuda", dtype=torch.float16)
    for training in (True, False):
        m.train(training)
        ref.train(training)
        with r21d.use_backend(backend):
            y = m(x)
        torch.testing.assert_close(y, ref(x), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(m.state_dict(), ref.state_dict(), rtol=2e-2, atol=2e-2)
