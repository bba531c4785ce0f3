"""Tensors of more than 2^31 elements (GPU only): the pointwise and implicit-GEMM kernels address
them with 64-bit offsets. A 2.3e9-element bf16 input (4.6 GB); the far corner, where 32-bit
offsets would wrap, against cuDNN. (The depthwise kernels' test is in
tests/kernels/test_depthwise.py.)"""

import pytest
import torch
import torch.nn.functional as F

import r21d

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("strict")]

SHAPE = (1, 64, 32, 1024, 1100)  # 2.31e9 elements; N*T*H*W = 36e6 rows (the row index is 32-bit)


@pytest.mark.parametrize("kernel,padding", [((1, 1, 1), 0), ((1, 3, 3), (0, 1, 1)),
                                            ((3, 1, 1), (1, 0, 0))],
                         ids=["pointwise", "spatial", "temporal"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_more_than_2_31_elements(kernel, padding, training):
    torch.manual_seed(0)
    x = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    assert x.numel() > 2**31
    fan_in = 64 * kernel[0] * kernel[1] * kernel[2]
    w = (torch.randn(64, 64, *kernel, device="cuda") / fan_in ** 0.5).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    with torch.no_grad(), r21d.use_backend("triton"):
        y = r21d.functional.conv_bn_act3d(x, w, None, None, None, rm, rv, padding=padding,
                                          training=training)
        ref_rm, ref_rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
        z = F.conv3d(x, w, padding=padding)
        ref = torch.relu(F.batch_norm(z.float(), ref_rm, ref_rv, training=training))
        del z
    corner = (slice(None), slice(None), slice(-3, None), slice(-3, None), slice(-3, None))
    torch.testing.assert_close(y[corner].float(), ref[corner], rtol=2e-2, atol=2e-2)
    if training:  # statistics over all 36e6 rows per channel
        torch.testing.assert_close(rm, ref_rm, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(rv, ref_rv, rtol=1e-3, atol=1e-4)
