"""The residual tail of torchvision's video ResNet blocks (r21d.fused_block): fuse() swaps
BasicBlock / Bottleneck for drop-in classes whose last conv applies BN + residual add + ReLU in its
epilogue. Small blocks run in the Triton interpreter (strict mode) against the plain block in
float64: outputs, every gradient and the running statistics, in eval and in training."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import r21d
from r21d.triton_kernels import _launch
from tests.utils import assert_module_matches_float64

resnet = pytest.importorskip("torchvision.models.video.resnet")

pytestmark = pytest.mark.usefixtures("strict")


def _downsample(c_in, c_out, stride):
    return nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm3d(c_out))


# name -> (block factory, input channels)
BLOCKS = {
    "basic-conv2plus1d": (lambda: resnet.BasicBlock(8, 8, resnet.Conv2Plus1D), 8),
    "basic-conv2plus1d-downsample": (
        lambda: resnet.BasicBlock(6, 10, resnet.Conv2Plus1D, stride=2, downsample=_downsample(6, 10, 2)), 6),
    "basic-conv3dsimple": (lambda: resnet.BasicBlock(8, 8, resnet.Conv3DSimple), 8),
    "basic-conv3dnotemporal-downsample": (
        lambda: resnet.BasicBlock(6, 12, resnet.Conv3DNoTemporal, stride=2,
                                  downsample=_downsample(6, 12, (1, 2, 2))), 6),
    "bottleneck-conv3dsimple": (
        lambda: resnet.Bottleneck(12, 4, resnet.Conv3DSimple, downsample=_downsample(12, 16, 1)), 12),
}


def _block(name: str, training: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    block = BLOCKS[name][0]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.3, generator=g)
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return block.train(training).to(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_fused_block_matches_the_plain_block(name, training):
    block = _block(name, training)
    fused = r21d.fuse(block)
    assert type(fused).__name__ == "Fused" + type(block).__name__
    assert fused.state_dict().keys() == block.state_dict().keys()
    rows = [s for s in r21d.fusion_sites(fused, device="cuda") if s.site.endswith("+ residual")]
    assert len(rows) == 1 and rows[0].backend == "triton", r21d.fusion_report(fused, device="cuda")
    x = torch.randn(2, BLOCKS[name][1], 4, 6, 6).contiguous(memory_format=torch.channels_last_3d)
    assert_module_matches_float64(fused, block, x)


def test_eval_block_launches_one_kernel_per_fused_site():
    """The tail's BN, residual add and ReLU cost no launch: a fused eval BasicBlock with a
    downsample shortcut runs its two (2+1)D units and the shortcut, three kernels in all."""
    fused = r21d.fuse(_block("basic-conv2plus1d-downsample", training=False))
    x = torch.randn(1, 6, 4, 6, 6).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad(), r21d.use_backend("triton"), _launch.count() as counter:
        fused(x)
    assert sorted(counter.kernels) == ["_pointwise_fwd_kernel", "_unit_eval_kernel", "_unit_eval_kernel"]


def test_hooked_tail_runs_the_plain_arithmetic_and_calls_the_hook(monkeypatch):
    """A hook on the block's ReLU sees the tensor the plain block gives it (conv2 + residual), so
    the tail is not fused: conv2's own sites still are."""
    monkeypatch.delenv("R21D_STRICT")
    block = _block("basic-conv3dsimple", training=False)
    fused = r21d.fuse(block)
    seen = {}

    def record(module, args):  # returns None: the input is not replaced
        seen["pre"] = args[0].clone()

    fused.relu.register_forward_pre_hook(record)
    (row,) = [s for s in r21d.fusion_sites(fused) if s.site.startswith("conv2")]
    assert "residual" not in row.pattern
    assert row.note.startswith("residual add + activation not fused: hooks are registered")
    x = torch.randn(1, 8, 3, 5, 5)
    with torch.no_grad(), r21d.use_backend("torch"):
        y = fused(x)
        plain_pre = block.conv2(block.conv1(x)) + x
    assert torch.equal(seen["pre"], plain_pre)
    assert torch.equal(y, torch.relu(plain_pre))


def test_unfuse_and_pickle_restore_torchvision_blocks():
    video = pytest.importorskip("torchvision.models.video")
    model = video.r3d_18(num_classes=5).eval()
    fused = r21d.fuse(model)
    assert {type(m).__name__ for m in fused.modules()} >= {"FusedBasicBlock"}
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in r21d.unfuse(loaded).modules()] == [type(m) for m in model.modules()]
    x = torch.randn(1, 3, 2, 16, 16)
    with torch.no_grad(), r21d.use_backend("torch"):
        assert torch.equal(fused(x), model(x))
