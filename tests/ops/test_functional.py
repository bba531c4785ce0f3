"""r21d.functional.conv_bn_act3d: exact on the torch path, and every bad input rejected with an
error that names the problem before any kernel launches."""

import pytest
import torch
import torch.nn.functional as F

import r21d
from r21d.triton_kernels import _launch
from tests.utils import ConvProblem, clone_inputs, conv_kwargs, make_inputs

GEOMETRIES = {
    "pointwise": ConvProblem(),
    "depthwise": ConvProblem(C_in=12, C_out=12, groups=12, kernel=(3, 3, 3), padding=(1, 1, 1)),
    "grouped": ConvProblem(C_in=12, C_out=18, groups=3, kernel=(3, 3, 3), padding=1 and (1, 1, 1)),
    "spatial": ConvProblem(C_in=8, C_out=14, kernel=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
    "temporal": ConvProblem(C_in=14, C_out=8, kernel=(3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0), T=5),
    "dense": ConvProblem(C_in=3, C_out=8, kernel=(3, 3, 3), dilation=(1, 2, 1), padding=(1, 2, 0), H=6),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_torch_path_is_exactly_pytorch(name, training):
    case = GEOMETRIES[name]
    args = make_inputs(case, torch.float32, "cpu")
    a, b = clone_inputs(args), clone_inputs(args)
    with r21d.use_backend("torch"):
        y = r21d.functional.conv_bn_act3d(
            a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["running_mean"],
            a["running_var"], **conv_kwargs(case, training))
    z = F.conv3d(b["x"], b["weight"], b["bias"], case.stride, case.padding, case.dilation, case.groups)
    ref = F.relu(F.batch_norm(z, b["running_mean"], b["running_var"], b["bn_weight"], b["bn_bias"],
                              training, 0.1, 1e-5))
    assert torch.equal(y, ref)
    assert torch.equal(a["running_mean"], b["running_mean"])
    assert torch.equal(a["running_var"], b["running_var"])


def _call(**overrides):
    case = ConvProblem(residual=True)
    args = make_inputs(case, torch.float32, "cpu")
    args.update({k: v for k, v in overrides.items() if k in args})
    kwargs = {k: v for k, v in overrides.items() if k not in args}
    with r21d.use_backend("triton"), _launch.count() as counter:
        try:
            r21d.functional.conv_bn_act3d(
                args["x"], args["weight"], args["bias"], args["bn_weight"], args["bn_bias"],
                args["running_mean"], args["running_var"], residual=args["residual"], **kwargs)
        finally:
            assert counter.launches == 0, "an invalid call launched a kernel"


X = torch.randn(2, 45, 3, 5, 4)
BAD_INPUTS = [
    ({"x": X[0]}, ValueError, "rank 5"),
    ({"x": X.unsqueeze(0)}, ValueError, "rank 5"),
    ({"x": X.to(torch.int32)}, TypeError, "x must be float16"),
    ({"x": X.to(torch.complex64)}, TypeError, "x must be float16"),
    ({"x": "tensor"}, TypeError, "x must be a Tensor"),
    ({"x": X[:, :40]}, ValueError, "x has 40 channels but weight expects 45"),
    ({"weight": torch.randn(37, 45)}, ValueError, "weight must have rank 5"),
    ({"weight": torch.randn(37, 45, 1, 1, 1, dtype=torch.float64)}, TypeError, "weight dtype"),
    ({"bias": torch.randn(36)}, ValueError, r"bias must have shape \(37,\)"),
    ({"bias": torch.randn(37, dtype=torch.float16)}, TypeError, "bias dtype"),
    ({"bn_weight": torch.randn(36)}, ValueError, r"bn_weight must have shape \(37,\)"),
    ({"bn_bias": torch.ones(37, dtype=torch.int64)}, TypeError, "bn_bias must be a floating-point"),
    ({"running_var": None}, ValueError, "both running_mean and running_var"),
    ({"running_mean": None, "running_var": None}, ValueError, "training=False normalises with running statistics"),
    ({"residual": torch.randn(2, 37, 3, 5, 5)}, ValueError, "residual must have the output's shape"),
    ({"residual": torch.ones(2, 37, 3, 5, 4, dtype=torch.int32)}, TypeError, "residual must be a floating-point"),
    ({"groups": 2}, ValueError, "groups=2 must divide"),
    ({"groups": 0}, ValueError, "groups must be a positive int"),
    ({"stride": 0}, ValueError, "every stride value must be >= 1"),
    ({"stride": (1, 2)}, TypeError, "stride must be an int or a sequence of 3 ints"),
    ({"padding": -1}, ValueError, "every padding value must be >= 0"),
    ({"padding": "same"}, TypeError, "padding must be an int"),
    ({"dilation": (1, 0, 1)}, ValueError, "every dilation value must be >= 1"),
    ({"stride": 1.5}, TypeError, "stride must be an int"),
    ({"activation": "gelu"}, ValueError, "unknown activation 'gelu'"),
    ({"momentum": None}, TypeError, "momentum must be a float"),
    ({"x": torch.randn(1, 45, 1, 1, 1), "residual": None, "training": True}, ValueError,
     "Expected more than 1 value per channel when training"),
]


@pytest.mark.parametrize("overrides,error,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_rejected_before_launch(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_kernel_larger_than_input_is_rejected():
    x = torch.randn(1, 4, 2, 5, 5)
    w = torch.randn(4, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        r21d.functional.conv_bn_act3d(x, w, running_mean=torch.zeros(4), running_var=torch.ones(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_is_rejected():
    x = torch.randn(2, 4, 2, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        r21d.functional.conv_bn_act3d(x, torch.randn(4, 4, 1, 1, 1), running_mean=torch.zeros(4),
                                      running_var=torch.ones(4))


def test_residual_of_another_dtype_falls_back(strict):
    case = ConvProblem(residual=True)
    args = make_inputs(case, torch.float32, "cpu")
    with r21d.use_backend("triton"), pytest.raises(r21d.FusedKernelUnavailable, match="PyTorch would promote"):
        r21d.functional.conv_bn_act3d(
            args["x"], args["weight"], args["bias"], args["bn_weight"], args["bn_bias"],
            args["running_mean"], args["running_var"], residual=args["residual"].double())


def test_autocast_casts_like_conv3d(strict):
    """Under autocast the conv runs in the autocast dtype and BN keeps fp32 parameters; the fused
    result matches eager autocast (fp16 on CPU: the interpreter has no bf16)."""
    case = ConvProblem(C_in=16, C_out=24)
    args = make_inputs(case, torch.float32, "cpu")
    outs = {}
    for backend in ("torch", "triton"):
        a = clone_inputs(args)
        with r21d.use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
            outs[backend] = r21d.functional.conv_bn_act3d(
                a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["running_mean"],
                a["running_var"], training=False)
    assert outs["triton"].dtype == outs["torch"].dtype == torch.float16
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=2e-3, atol=2e-3)


def test_more_positions_than_a_32_bit_row_index_falls_back(strict):
    """2^32 positions (a broadcast view: no memory): the kernels index rows in 32 bits."""
    x = torch.empty(1, 1, 1, 1, 1).expand(2**12, 1, 2**10, 2**9, 2)
    with r21d.use_backend("triton"), pytest.raises(r21d.FusedKernelUnavailable, match="32-bit row index"):
        r21d.functional.plan(x, torch.randn(1, 1, 1, 1, 1), running_mean=torch.zeros(1),
                             running_var=torch.ones(1))


def test_a_weight_beyond_a_32_bit_index_falls_back(strict):
    """2^31 weight elements (broadcast views: no memory): the kernels index weights in 32 bits."""
    x = torch.empty(1, 1, 1, 1, 1).expand(1, 2**15, 1, 2, 2)
    w = torch.empty(1, 1, 1, 1, 1).expand(2**16, 2**15, 1, 1, 1)
    with r21d.use_backend("triton"), pytest.raises(r21d.FusedKernelUnavailable, match="32-bit weight index"):
        r21d.functional.plan(x, w, running_mean=torch.zeros(2**16), running_var=torch.ones(2**16))
