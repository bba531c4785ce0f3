"""A fused training step reads nothing back to the host: no tensor becomes a Python number or
bool, so a GPU never waits and the step can be captured in a CUDA graph. That includes
BatchNorm's cumulative average (momentum=None), whose factor 1 / num_batches_tracked stays on the
device (r21d.fused_site.bn_momentum, r21d._op_common.update_running_stats).

On the CPU (interpreter) every way a tensor reaches the host is made to raise during the fused
forward; on a GPU, CUDA's own sync detection does the same.
"""

import contextlib
import copy

import pytest
import torch
from torch import nn

import r21d
from tests.utils import gpu, perturb_batchnorm

# Every Tensor method that turns a tensor into a host value (a device sync on a GPU).
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    reads = []

    def refuse(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            raise AssertionError(f"Tensor.{name}: a host read (device sync) in a fused forward")
        return read

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, refuse(name))
        yield reads


def _model(momentum):
    """A conv site and a (2+1)D unit, their BNs averaging with ``momentum``."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(6), nn.ReLU(),
        nn.Conv3d(6, 5, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.BatchNorm3d(5), nn.ReLU())
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.momentum = momentum
    return perturb_batchnorm(net)


@pytest.mark.parametrize("momentum", [None, 0.1], ids=["cumulative", "exponential"])
@pytest.mark.parametrize("device", ["cpu", gpu("cuda")])
def test_fused_training_forward_reads_nothing_to_the_host(device, momentum, strict, monkeypatch):
    plain = _model(momentum).to(device).train()
    fused = r21d.fuse(copy.deepcopy(plain))
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # the cumulative average's factor changes each step: 1, 1/2, 1/3
        x = torch.randn(2, 3, 3, 4, 4, generator=g).to(device)
        with r21d.use_backend("triton"):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    fused(x)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            else:
                with no_host_reads(monkeypatch) as reads:
                    fused(x)
                assert reads == []
        with r21d.use_backend("torch"):
            plain(x)
        for (name, b), p in zip(fused.named_buffers(), plain.buffers()):
            if b.is_floating_point():
                torch.testing.assert_close(b, p, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
            else:
                assert torch.equal(b, p), (step, name)


def test_the_guard_sees_a_host_read(monkeypatch):
    with no_host_reads(monkeypatch) as reads, pytest.raises(AssertionError, match="host read"):
        float(torch.ones(()))
    assert reads == ["__float__"]
