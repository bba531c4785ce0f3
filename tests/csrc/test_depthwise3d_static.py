"""Static checks of the compiled csrc depthwise kernels (docs/testing.md, "Speed without a GPU"):
no spills on any arch, 128-bit global loads in the channels-last kernels on sm_90; the op schemas;
a clear error on CPU tensors. Skipped where r21d._C is not built."""

from __future__ import annotations

import re

import pytest
import torch

from r21d import _extension

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason=str(_extension.unavailable_reason()))

FWD_SCHEMA = (
    "r21d::depthwise3d_conv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
    "Tensor? running_mean, Tensor? running_var, Tensor? residual, int[] stride, int[] padding, int[] dilation, "
    "bool training, float momentum, float eps, str activation, bool save_for_backward) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "r21d::depthwise3d_conv_bn_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor z, "
    "Tensor mean, Tensor invstd, Tensor? bn_weight, Tensor? bn_bias, Tensor? residual, int[] stride, "
    "int[] padding, int[] dilation, bool training, str activation, bool[] output_mask, bool deterministic) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# dw3d_fwd_kernel<float, 4, 0>, dw3d_bwd_dw_kernel<c10::Half, 8, 4>, ...
KERNEL = re.compile(r"(dw3d_\w+_kernel)(?:<([\w:]+)(?:, (\d+))?)?")


@pytest.fixture(scope="module")
def report():
    from r21d import static

    rep = static.csrc_report()
    if rep["status"] != "ok":
        pytest.skip(f"no csrc kernels to read: {rep['status']}")
    return rep


def depthwise(rep, arch=None):
    rows = [f for f in rep["functions"] if "r21d::dw3d::" in f["function"]]
    if arch is not None:
        rows = [f for f in rows if re.sub(r"\D", "", f["arch"]) == str(arch)]
    return rows


def parse(name):
    m = KERNEL.search(name)
    assert m, name
    return m.group(1), m.group(2), int(m.group(3) or 1)


def test_depthwise_kernels_do_not_spill(report):
    rows = depthwise(report)
    assert rows, "no r21d::dw3d kernels in r21d._C"
    bad = [(f["arch"], f["function"], f["local"], f["stack"]) for f in rows if f["local"] or f["stack"]]
    assert not bad, f"depthwise kernels with local memory / stack: {bad}"


def test_channels_last_kernels_use_128bit_loads_on_sm90(report):
    rows = depthwise(report, 90)
    if not rows:
        pytest.skip("r21d._C was not built for sm_90")
    vec_rows = [(parse(f["function"]), f) for f in rows if parse(f["function"])[2] > 1]
    fwd = [f for (k, _, _), f in vec_rows if k == "dw3d_fwd_kernel" and f["ldg128"] > 0]
    bwd = [f for (k, _, _), f in vec_rows if k.startswith("dw3d_bwd") and f["ldg128"] > 0]
    assert fwd, "no channels-last depthwise forward kernel with LDG.E.128 on sm_90"
    assert bwd, "no channels-last depthwise backward kernel with LDG.E.128 on sm_90"
    # every vectorised kernel moves channel vectors with 128-bit loads
    missing = [f["function"] for _, f in vec_rows if f["ldg128"] == 0]
    assert not missing, f"vectorised depthwise kernels without LDG.E.128: {missing}"


def test_schemas():
    assert str(torch.ops.r21d.depthwise3d_conv_bn_act.default._schema) == FWD_SCHEMA
    assert str(torch.ops.r21d.depthwise3d_conv_bn_act_backward.default._schema) == BWD_SCHEMA


def test_cpu_tensors_raise():
    x = torch.randn(1, 2, 3, 4, 4)
    w = torch.randn(2, 1, 3, 3, 3)
    rm, rv = torch.zeros(2), torch.ones(2)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.ops.r21d.depthwise3d_conv_bn_act(x, w, None, None, None, rm, rv, None, [1, 1, 1], [1, 1, 1],
                                               [1, 1, 1], False, 0.1, 1e-5, "relu", False)
    z = torch.randn(1, 2, 3, 4, 4)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.ops.r21d.depthwise3d_conv_bn_act_backward(z, x, w, None, z, rm, rv, None, None, None, [1, 1, 1],
                                                        [1, 1, 1], [1, 1, 1], False, "relu",
                                                        [True, True, False, False, False, False], False)
