"""The fused pointwise (1x1x1) conv + BN + activation kernels against the float64 oracle.

On the CPU they run in the Triton interpreter (fp32, fp16); on a GPU (``-m gpu``) in fp32, fp16
and bf16, where the bound is twice cuDNN's own error. Strict mode throughout: a fallback to the
torch path would raise, and the launch counter proves the kernels ran.
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
    make_inputs,
    oracle,
    run_backend,
)

pytestmark = pytest.mark.usefixtures("strict")

CASES = {
    "odd-channels": ConvProblem(),
    "cl3d": ConvProblem(layout="cl3d", C_in=16, C_out=24),
    "strided-view": ConvProblem(layout="strided", C_in=20, C_out=45),
    "stride2-pad1": ConvProblem(stride=(1, 2, 2), padding=(0, 1, 1), C_in=23, C_out=19, H=7, W=6),
    "stride2-all": ConvProblem(stride=(2, 2, 2), T=4, H=5, W=5, C_in=18, C_out=33),
    "residual": ConvProblem(residual=True, C_in=32, C_out=40),
    "residual-cl3d": ConvProblem(residual=True, layout="cl3d", C_in=40, C_out=32, T=2),
    "silu": ConvProblem(activation="silu"),
    "no-act": ConvProblem(activation=None, bias=False),
    "no-affine": ConvProblem(affine=False, C_in=17, C_out=9),
    "T1-N1": ConvProblem(N=1, T=1, H=3, W=5, C_in=8, C_out=16),
    "wide-K": ConvProblem(N=1, T=2, H=3, W=3, C_in=70, C_out=20),
    "pad2-mixed-stride": ConvProblem(stride=(2, 1, 2), padding=(2, 0, 1), C_in=14, C_out=10, T=3),
    "channels-230-921": ConvProblem(N=1, T=1, H=3, W=3, C_in=230, C_out=921, layout="cl3d"),
}


def _check(device, dtype, case, training, momentum=0.1):
    y, counter = check_backend("triton", case, dtype, device, training, momentum)
    assert counter.launches > 0, "the fused kernels did not run"
    return y


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_forward_backward_matches_oracle(device, dtype, name, training):
    case = CASES[name]
    y = _check(device, dtype, case, training)
    assert y.dtype == dtype
    expect_cl = case.layout == "cl3d"
    assert y.is_contiguous(memory_format=torch.channels_last_3d if expect_cl else torch.contiguous_format)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_training_without_running_stats(device, dtype):
    _check(device, dtype, ConvProblem(running=False, C_in=12, C_out=20), training=True)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_large_mean_offset_is_numerically_safe(device, dtype):
    """Conv outputs far from zero (a large bias): a naive sum-of-squares variance would lose it.
    648 rows: more tiles than one block of the statistics merge, so blocks merge too."""
    case = ConvProblem(C_in=8, C_out=16, T=4, H=9, W=9)
    args = make_inputs(case, dtype, device)
    offset = 1000.0 if dtype == torch.float32 else 60.0
    args["bias"] = args["bias"] + offset
    y, _, (rm, rv) = run_backend("triton", args, case, True)
    ref, _, (ref_rm, ref_rv) = oracle(args, case, True)
    base, _, _ = run_backend("torch", args, case, True)
    assert_oracle_close("out", y, ref, dtype, base)
    assert_oracle_close("running_var", rv, ref_rv, torch.float32)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_empty_batch(device, dtype):
    case = ConvProblem(N=0, C_in=8, C_out=16)
    args = make_inputs(case, dtype, device)
    for training in (False, True):
        before = args["running_mean"].clone()
        y, grads, (rm, _) = run_backend("triton", args, case, training, torch.randn(case.output_shape(), dtype=dtype, device=device))
        assert y.shape == case.output_shape()
        assert torch.equal(rm, before), "an empty batch must leave the running statistics alone"
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        assert grads["weight"].shape == args["weight"].shape


def _eval_launches(case):
    args = make_inputs(case, torch.float32, "cpu")
    with torch.no_grad(), r21d.use_backend("triton"), _launch.count() as counter:
        r21d.functional.conv_bn_act3d(
            args["x"], args["weight"], args["bias"], args["bn_weight"], args["bn_bias"],
            args["running_mean"], args["running_var"], residual=args["residual"], training=False)
    return counter


def test_eval_forward_is_one_launch_allocating_only_its_output():
    counter = _eval_launches(ConvProblem(residual=True, layout="cl3d"))
    assert counter.launches == 1, counter.kernels
    assert counter.allocations == 1


def test_ncdhw_eval_forward_converts_at_the_boundary():
    """The kernels address contiguous channels: NCDHW x and residual are converted in, the output
    converted back to NCDHW (an NCDHW fast path is future work; see benchmarks/NOTES.md)."""
    counter = _eval_launches(ConvProblem(residual=True, layout="ncdhw"))
    assert counter.kernels == ["relayout", "relayout", "_pointwise_fwd_kernel", "relayout"]


def test_train_forward_launches_as_designed():
    """GEMM with the statistics epilogue, the statistics merge, one normalise + activation pass."""
    case = ConvProblem(layout="cl3d")
    args = make_inputs(case, torch.float32, "cpu")
    with torch.no_grad(), r21d.use_backend("triton"), _launch.count() as counter:
        r21d.functional.conv_bn_act3d(
            args["x"], args["weight"], args["bias"], args["bn_weight"], args["bn_bias"],
            args["running_mean"], args["running_var"], training=True)
    assert counter.kernels == ["_pointwise_fwd_kernel", "_bn_stats_finalize_kernel",
                               "_bn_act_normalize_kernel"]


def test_backward_launches_as_designed():
    """BN + activation backward reduction and its finalisation, then the dgrad and wgrad GEMMs
    (the wgrad in row splits, summed in a fixed order)."""
    case = ConvProblem(layout="cl3d")
    args = make_inputs(case, torch.float32, "cpu")
    grad_out = torch.randn(case.output_shape()).contiguous(memory_format=torch.channels_last_3d)
    a = clone_inputs(args, requires_grad=True)
    with r21d.use_backend("triton"):
        y = r21d.functional.conv_bn_act3d(
            a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["running_mean"],
            a["running_var"], training=True)
    with _launch.count() as counter:
        y.backward(grad_out)
    assert counter.kernels == ["_bn_act_bwd_reduce_kernel", "_bn_bwd_finalize_kernel",
                               "_pointwise_dgrad_kernel", "_pointwise_wgrad_kernel",
                               "_sum_splits_kernel"]
