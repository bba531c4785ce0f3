"""The implicit-GEMM conv + BN + activation kernels (spatial, temporal, dense, grouped) against the
float64 oracle.

On the CPU they run in the Triton interpreter (fp32, fp16) on tiny odd shapes; on a GPU (``-m gpu``)
in fp32, fp16 and bf16, where the bound is twice cuDNN's own error, and on the real shapes of
r2plus1d_18. Strict mode throughout: a fallback to the torch path would raise, and the launch
counter proves the kernels ran.
"""

import pytest
import torch

import r21d
from r21d import dispatch
from r21d.triton_kernels import _launch, implicit_gemm_bwd
from tests.utils import DEVICE_DTYPES, ConvProblem, check_backend, clone_inputs, make_inputs, run_backend

pytestmark = pytest.mark.usefixtures("strict")


def conv(kernel, padding=None, **kw):
    if padding is None:
        padding = tuple(k // 2 for k in kernel)
    return ConvProblem(kernel=kernel, padding=padding, **kw)


# Every geometry class of the issue on odd sizes, both K-loop forms (tap-major with >= 16 input
# channels per group, flat below), both layouts and a strided view.
GEOMETRIES = {
    "spatial-1x3x3-cl3d": conv((1, 3, 3), C_in=16, C_out=24, T=2, H=5, W=4, layout="cl3d"),
    "spatial-stride2-odd": conv((1, 3, 3), stride=(1, 2, 2), C_in=23, C_out=19, T=2, H=7, W=6),
    "spatial-dilation2-pad2": conv((1, 3, 3), dilation=(1, 2, 2), padding=(0, 2, 2), C_in=16,
                                   C_out=10, T=2, H=6, W=5, layout="cl3d"),
    "spatial-kernel2-stride3": conv((1, 2, 2), stride=(1, 3, 3), padding=(0, 0, 0), C_in=16,
                                    C_out=12, T=2, H=7, W=8),  # some inputs feed no output
    "temporal-3x1x1-residual": conv((3, 1, 1), C_in=20, C_out=45, T=4, H=3, W=3, layout="cl3d",
                                    residual=True),
    "temporal-stride2": conv((3, 1, 1), stride=(2, 1, 1), C_in=17, C_out=9, T=5, H=3, W=3),
    "temporal-T1": conv((3, 1, 1), C_in=16, C_out=16, N=3, T=1, H=3, W=3, layout="cl3d"),
    "spatial-pad2-larger-output": conv((1, 3, 3), padding=(0, 2, 2), C_in=16, C_out=8, T=1, H=3,
                                       W=4),
    "dense-3x3x3": conv((3, 3, 3), C_in=16, C_out=10, T=3, H=4, W=4),
    "dense-3x3x3-flat-dilated-silu": conv((3, 3, 3), dilation=(2, 1, 2), padding=(2, 1, 1), C_in=8,
                                          C_out=12, T=4, H=4, W=5, activation="silu"),
    "stem-1x7x7-stride2": conv((1, 7, 7), stride=(1, 2, 2), C_in=3, C_out=45, N=1, T=2, H=9, W=9,
                               bias=False),
    "sign-3x7x7-stride2-bias": conv((3, 7, 7), stride=(2, 2, 2), padding=(1, 3, 3), C_in=3,
                                    C_out=8, T=4, H=9, W=9, N=1),
    "sign-3x5x5-stride2": conv((3, 5, 5), stride=(2, 2, 2), padding=(1, 2, 2), C_in=8, C_out=16,
                               T=4, H=7, W=7, N=1, layout="cl3d"),
    "stride-dilation-mixed": conv((3, 3, 3), stride=(2, 2, 1), dilation=(2, 1, 1),
                                  padding=(2, 1, 0), C_in=16, C_out=8, T=5, H=5, W=4),
    "grouped-flat": conv((3, 3, 3), groups=4, C_in=16, C_out=8, T=3, H=3, W=4),
    "grouped-tap-major-cl3d": conv((1, 3, 3), groups=2, C_in=32, C_out=12, T=2, H=4, W=3,
                                   layout="cl3d", residual=True),
    "depth-multiplier": conv((3, 3, 3), groups=4, C_in=4, C_out=8, T=3, H=4, W=4),
    "strided-view": conv((1, 3, 3), layout="strided", C_in=16, C_out=20, T=2, activation=None,
                         bias=False),
    "no-affine": conv((3, 1, 1), affine=False, C_in=18, C_out=7, T=3, activation="silu"),
    "channels-45-230": conv((1, 3, 3), C_in=45, C_out=230, N=1, T=1, H=3, W=3, layout="cl3d"),
}
FP16_CASES = ("spatial-1x3x3-cl3d", "temporal-3x1x1-residual", "stem-1x7x7-stride2", "grouped-flat")


def _params():
    for p in DEVICE_DTYPES:
        device, dtype = p.values
        for name in GEOMETRIES:
            if device == "cpu" and dtype == torch.float16 and name not in FP16_CASES:
                continue
            yield pytest.param(device, dtype, name, id=f"{p.id}-{name}", marks=p.marks)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("device,dtype,name", list(_params()))
def test_forward_backward_matches_oracle(device, dtype, name, training):
    case = GEOMETRIES[name]
    assert dispatch.conv_family(case.kernel, case.groups, case.C_in, case.C_out) not in (
        "pointwise", "depthwise")
    y, counter = check_backend("triton", case, dtype, device, training)
    assert any(k.startswith("_igemm_") for k in counter.kernels), counter.kernels
    assert y.dtype == dtype
    fmt = torch.channels_last_3d if case.layout == "cl3d" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), "the output follows the input's memory format"


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_training_without_running_stats_and_other_momentum(device, dtype):
    check_backend("triton", conv((1, 3, 3), running=False, C_in=16, C_out=12, T=2), dtype, device,
                  training=True)
    check_backend("triton", conv((3, 1, 1), C_in=12, C_out=20, T=3, layout="cl3d"), dtype, device,
                  training=True, momentum=0.7)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_empty_batch(device, dtype):
    case = conv((1, 3, 3), N=0, C_in=16, C_out=8)
    args = make_inputs(case, dtype, device)
    for training in (False, True):
        before = args["running_mean"].clone()
        y, grads, (rm, _) = run_backend("triton", args, case, training,
                                        torch.randn(case.output_shape(), dtype=dtype, device=device))
        assert y.shape == case.output_shape()
        assert torch.equal(rm, before), "an empty batch must leave the running statistics alone"
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        assert grads["weight"].shape == args["weight"].shape


def _cl3d(t):
    return t.contiguous(memory_format=torch.channels_last_3d)


def _run(case, training, *, weight_cl3d=True, backward=False):
    """The fused op on ``case``'s inputs (weight in channels_last_3d, as a converted model has),
    with launches counted: of the forward, or of the backward when ``backward``."""
    args = make_inputs(case, torch.float32, "cpu")
    if weight_cl3d:
        args["weight"] = _cl3d(args["weight"])
    a = clone_inputs(args, requires_grad=backward)
    with r21d.use_backend("triton"), _launch.count() as counter, torch.set_grad_enabled(backward):
        y = r21d.functional.conv_bn_act3d(
            a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["running_mean"],
            a["running_var"], stride=case.stride, padding=case.padding, groups=case.groups,
            training=training, residual=a["residual"])
    if not backward:
        return counter
    grad_out = _cl3d(torch.randn(case.output_shape()))
    with _launch.count() as counter:
        y.backward(grad_out)
    return counter, a


SPATIAL_CL3D = conv((1, 3, 3), C_in=16, C_out=24, T=2, H=5, W=4, layout="cl3d", residual=True)


def test_eval_forward_is_one_launch_allocating_only_its_output():
    counter = _run(SPATIAL_CL3D, training=False)
    assert counter.kernels == ["_igemm_fwd_kernel"]
    assert counter.allocations == 1


def test_eval_forward_copies_a_weight_without_contiguous_input_channels():
    """A contiguous (NCDHW-ordered) weight is copied into channels_last_3d first: one more launch;
    the flat K loop (fewer than 16 channels per group) reads any weight in place."""
    counter = _run(SPATIAL_CL3D, training=False, weight_cl3d=False)
    assert counter.kernels == ["relayout", "_igemm_fwd_kernel"]
    stem = conv((1, 7, 7), stride=(1, 2, 2), C_in=3, C_out=8, T=1, H=9, W=9, layout="cl3d")
    assert _run(stem, training=False, weight_cl3d=False).kernels == ["_igemm_fwd_kernel"]


def test_train_forward_launches_as_designed():
    """GEMM with the statistics epilogue, the statistics merge, one normalise + activation pass."""
    counter = _run(conv((3, 1, 1), C_in=16, C_out=24, T=3, layout="cl3d"), training=True)
    assert counter.kernels == ["_igemm_fwd_kernel", "_bn_stats_finalize_kernel",
                               "_bn_act_normalize_kernel"]


def test_backward_launches_as_designed_and_keeps_the_weight_layout():
    """BN + activation backward reduction and its finalisation, then the dgrad and wgrad implicit
    GEMMs (the wgrad in row splits, summed in a fixed order); the weight gradient comes back in
    the weight's memory format without a copy when that is channels_last_3d."""
    counter, a = _run(conv((1, 3, 3), C_in=16, C_out=24, T=2, layout="cl3d"), training=True,
                      backward=True)
    assert counter.kernels == ["_bn_act_bwd_reduce_kernel", "_bn_bwd_finalize_kernel",
                               "_igemm_dgrad_kernel", "_igemm_wgrad_kernel", "_sum_splits_kernel"]
    assert a["weight"].grad.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("stride,classes", [((1, 1, 1), 1), ((1, 2, 2), 4), ((2, 1, 1), 2)])
def test_dgrad_runs_one_program_row_per_stride_residue_class(stride, classes):
    """dx's grid has one axis for the residue classes of the input positions modulo the stride,
    so that every tap a program visits feeds all its rows."""
    case = conv((3, 3, 3), stride=stride, C_in=16, C_out=8, T=4, H=6, W=6, layout="cl3d")
    args = make_inputs(case, torch.float32, "cpu")
    z = _cl3d(torch.randn(case.output_shape()))
    with _launch.capture() as launches:
        implicit_gemm_bwd.conv_bn_act_bwd(
            z, args["x"], _cl3d(args["weight"]), None, z, torch.zeros(8), torch.ones(8), None, None,
            None, stride, case.padding, case.dilation, training=False, activation="relu",
            needs=(True, False, False, False, False, False))
    dgrad = [l for l in launches if _launch.kernel_name(l.kernel) == "_igemm_dgrad_kernel"]
    assert len(dgrad) == 1 and dgrad[0].grid(dgrad[0].kwargs)[1] == classes


def test_unsupported_geometry_falls_back_with_a_reason(monkeypatch):
    monkeypatch.delenv("R21D_STRICT")
    cfg = dispatch.FusedConfig("grouped", (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 70000,
                               torch.float32, "cuda", False, "relu", False)
    assert "at most 65535 groups" in dispatch.unsupported_reason("triton", cfg)


# ----------------------------------------------------------------------------- GPU: real shapes

# The r2plus1d_18 convolutions (docs/benchmarks.md) at batch 2: (in, out, kernel, stride, T, H, W)
R2PLUS1D_LAYERS = [
    (3, 45, (1, 7, 7), (1, 2, 2), 16, 112, 112),
    (45, 64, (3, 1, 1), (1, 1, 1), 16, 56, 56),
    (64, 144, (1, 3, 3), (1, 1, 1), 16, 56, 56),
    (64, 230, (1, 3, 3), (1, 2, 2), 16, 56, 56),
    (230, 128, (3, 1, 1), (2, 1, 1), 16, 28, 28),
    (460, 256, (3, 1, 1), (2, 1, 1), 8, 14, 14),
    (921, 512, (3, 1, 1), (2, 1, 1), 4, 7, 7),
    (512, 1152, (1, 3, 3), (1, 1, 1), 2, 7, 7),
]


@pytest.mark.gpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layer", R2PLUS1D_LAYERS, ids=lambda l: f"{l[0]}-{l[1]}-{''.join(map(str, l[2]))}")
def test_r2plus1d_layers_match_cudnn(layer, dtype, training):
    c_in, c_out, kernel, stride, T, H, W = layer
    case = ConvProblem(N=2, C_in=c_in, C_out=c_out, T=T, H=H, W=W, kernel=kernel, stride=stride,
                    padding=tuple(k // 2 for k in kernel), bias=False, layout="cl3d")
    check_backend("triton", case, dtype, "cuda", training)


@pytest.mark.gpu
def test_large_dense_conv_bf16():
    """A 3x3x3 conv of r3d_18's layer1 at batch 4 (25M output elements)."""
    case = conv((3, 3, 3), N=4, C_in=64, C_out=64, T=16, H=56, W=56, bias=False, layout="cl3d")
    check_backend("triton", case, torch.bfloat16, "cuda", training=True)

