"""r21d.fuse / unfuse / fusion_report on nn.Sequential runs at any depth and on torchvision's
video ResNets: state dict, modes and outputs preserved; idempotent; reversible."""

import io

import pytest
import torch
from torch import nn

import r21d
from r21d.fused_sequential import FusedSequential
from r21d.triton_kernels import _launch


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(8), nn.ReLU(),
            nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(8, 16, 1), nn.BatchNorm3d(16), nn.SiLU(),
            nn.Conv3d(16, 16, 1), nn.BatchNorm3d(16),
        )
        self.blocks = nn.ModuleList([nn.Sequential(nn.Sequential(nn.Conv3d(16, 24, 1), nn.BatchNorm3d(24)))])
        self.head = nn.Conv3d(24, 4, 1)  # no BN: stays unfused

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class CustomSeq(nn.Sequential):
    def forward(self, x):  # its own forward: fuse must leave it alone
        return super().forward(x) * 2


def _randomize(model: nn.Module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fuse_keeps_state_mode_and_outputs():
    model = _randomize(Net()).eval()
    fused = r21d.fuse(model)
    assert fused is not model and type(model.stem) is nn.Sequential, "inplace=False left the original"
    assert type(fused.stem) is FusedSequential
    assert type(fused.blocks[0][0]) is FusedSequential and type(fused.blocks[0]) is nn.Sequential
    _same_state(fused, model)
    assert not fused.training and all(not m.training for m in fused.modules())
    x = torch.randn(2, 3, 3, 8, 8)
    with r21d.use_backend("torch"):
        assert torch.equal(fused(x), model(x))
    model.train()
    fused.train()
    with r21d.use_backend("torch"):
        assert torch.equal(fused(x), model(x))
    _same_state(fused, model)


def test_fuse_is_idempotent_and_inplace():
    model = Net()
    fused = r21d.fuse(model, inplace=True)
    assert fused is model
    again = r21d.fuse(fused, inplace=True)
    assert [type(m) for m in again.modules()] == [type(m) for m in fused.modules()]


def test_unfuse_restores_plain_classes():
    model = Net()
    original = [type(m) for m in model.modules()]
    back = r21d.unfuse(r21d.fuse(model))
    assert [type(m) for m in back.modules()] == original
    assert not any(isinstance(m, FusedSequential) for m in back.modules())
    x = torch.randn(1, 3, 2, 8, 8)
    model.eval()
    back.eval()
    assert torch.equal(back(x), model(x))


def test_custom_forward_and_custom_conv_are_left_alone():
    class ScaledConv(nn.Conv3d):
        def forward(self, x):
            return super().forward(x) * 0.5

    model = nn.Sequential(
        CustomSeq(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4)),
        nn.Sequential(ScaledConv(4, 4, 1), nn.BatchNorm3d(4), nn.ReLU()),
    )
    fused = r21d.fuse(model)
    assert type(fused[0]) is CustomSeq and type(fused[1]) is nn.Sequential
    report = r21d.fusion_report(fused)
    assert "CustomSeq has its own forward" in report and "ScaledConv has its own forward" in report


def test_fused_model_pickles():
    fused = r21d.fuse(_randomize(Net()))
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.stem) is FusedSequential
    _same_state(loaded, fused)
    assert type(r21d.unfuse(loaded).stem) is nn.Sequential


def test_fusion_report_lists_sites_and_unfused_convs():
    report = r21d.fusion_report(r21d.fuse(Net()))
    lines = report.splitlines()
    assert lines[0].split() == ["site", "pattern", "kernel", "backend", "note"]
    assert any(l.startswith("stem[0:3]") and "spatial" in l for l in lines)
    assert any(l.startswith("stem[4:7]") and "SiLU" in l and "pointwise" in l for l in lines)
    assert any(l.startswith("stem[7:9]") for l in lines)
    assert any(l.startswith("blocks.0.0[0:2]") for l in lines)
    assert any(l.startswith("head") and "unfused" in l and "inside Net" in l for l in lines)
    assert "4 fused sites, 1 convolutions unfused" in lines[-1]
    sites = r21d.fusion_sites(r21d.fuse(Net()))
    assert [(s.kernel, s.backend) for s in sites] == [
        ("spatial", "torch"), ("pointwise", "torch"), ("pointwise", "torch"), ("pointwise", "torch"),
        ("-", "unfused")]
    with r21d.use_backend("triton"):
        sites = r21d.fusion_sites(r21d.fuse(Net()))
    assert [(s.kernel, s.backend) for s in sites] == [
        ("spatial", "triton"), ("pointwise", "triton"), ("pointwise", "triton"),
        ("pointwise", "triton"), ("-", "unfused")]


TV_MODELS = ["r2plus1d_18", "r3d_18", "mc3_18"]


@pytest.mark.parametrize("name", TV_MODELS)
def test_torchvision_video_resnets(name):
    video = pytest.importorskip("torchvision.models.video")
    model = _randomize(getattr(video, name)(num_classes=7)).eval()
    fused = r21d.fuse(model)
    _same_state(fused, model)
    x = torch.randn(1, 3, 4, 32, 32)
    with r21d.use_backend("torch"):
        assert torch.equal(fused(x), model(x))
    sites = r21d.fusion_sites(fused)
    # stem runs, conv1/conv2 sequentials and the downsample shortcuts are fused
    assert sum(s.kernel == "pointwise" for s in sites) == 3
    assert [s for s in sites if s.backend == "unfused"] == []
    # r2plus1d_18: the stem and each block's Conv2Plus1D with the BN + ReLU of its parent run
    # as (2+1)D units
    units = [s for s in sites if s.pattern.startswith("(2+1)D unit")]
    assert len(units) == (17 if name == "r2plus1d_18" else 0)
    back = r21d.unfuse(fused)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]


def test_wrapped_torchvision_model_runs_every_site_fused(strict):
    """nn.Sequential(*children[:-1]) wrappers are fused too; with the triton backend every site of
    r3d_18 launches a fused kernel (strict mode: a fallback would raise): the 1x1x1 strided
    shortcuts the pointwise kernel, the 3x7x7 stem and the 3x3x3 convs the implicit GEMM. The
    launches are captured, not run (512-channel 3x3x3 convs take minutes in the interpreter; the
    kernel tests check the numbers)."""
    video = pytest.importorskip("torchvision.models.video")
    wrapped = nn.Sequential(*list(video.r3d_18().children())[:-1])
    fused = r21d.fuse(wrapped).eval()
    with torch.no_grad(), r21d.use_backend("triton"), _launch.count() as counter, _launch.capture():
        y = fused(torch.randn(1, 3, 4, 16, 16))
    assert y.shape == (1, 512, 1, 1, 1)
    assert counter.kernels.count("_pointwise_fwd_kernel") == 3  # layer2..4 shortcuts
    assert counter.kernels.count("_igemm_fwd_kernel") == 17  # the stem and 16 3x3x3 convs
