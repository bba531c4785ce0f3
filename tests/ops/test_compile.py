"""torch.compile(fused_model, fullgraph=True): every kind of fused site (a conv site, a (2+1)D
unit, a residual tail, a strided pointwise shortcut, a depthwise site) traced with no graph break,
with eager's results forward and backward, in training and eval (aot_eager on the CPU with the
Triton interpreter; inductor on a GPU)."""

import copy

import pytest
import torch

import r21d
from tests.utils import gpu, small_video_net

pytestmark = pytest.mark.usefixtures("strict")


def _step(model, x, grad, run=None):
    """One forward + backward of ``run`` (default: ``model``, else its compiled wrapper)."""
    from r21d.triton_kernels import _launch

    x = x.clone().requires_grad_()
    with _launch.count() as counter:
        y = (run or model)(x)
        y.backward(grad)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, \
        {n: b.clone() for n, b in model.named_buffers()}, counter.kernels


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device,backend", [("cpu", "aot_eager"), gpu("cuda", "inductor")])
def test_fused_model_compiles_fullgraph_with_eager_results(device, backend, training):
    pytest.importorskip("torchvision")
    torch._dynamo.reset()
    fused = r21d.fuse(small_video_net()).to(device).train(training)
    eager, compiled = fused, copy.deepcopy(fused)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 8, 8, generator=g).to(device)
    grad = torch.randn(2, 3, generator=g).to(device)
    with r21d.use_backend("triton"):
        assert {s.backend for s in r21d.fusion_sites(fused, device=device)} == {"triton"}
        expected = _step(eager, x, grad)
        # fullgraph=True: a graph break is an error
        got = _step(compiled, x, grad, torch.compile(compiled, fullgraph=True, backend=backend))
    (y, gx, pg, buf, kernels), (ey, egx, epg, ebuf, ekernels) = got, expected
    assert kernels == ekernels and "_depthwise_fwd_kernel" in kernels  # the same fused kernels ran
    torch.testing.assert_close(y, ey)
    torch.testing.assert_close(gx, egx)
    assert pg.keys() == epg.keys()
    for name in epg:
        torch.testing.assert_close(pg[name], epg[name], msg=name)
    for name in ebuf:
        torch.testing.assert_close(buf[name], ebuf[name], msg=name)
