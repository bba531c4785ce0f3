"""r21d.fuse / unfuse / fusion_report on nn.Sequential runs at any depth and on torchvision's
video ResNets: state dict, modes and outputs preserved; idempotent; reversible."""

import copy
import io

import pytest
import torch
from torch import nn

import r21d
from r21d.bench.narrow import narrow_r2plus1d_18
from r21d.fused_sequential import FusedSequential
from r21d.triton_kernels import _launch
from tests.utils import assert_module_matches_float64, assert_oracle_close, randomize_batchnorm


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


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fuse_keeps_state_mode_and_outputs():
    model = randomize_batchnorm(Net()).eval()
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
    fused = r21d.fuse(randomize_batchnorm(Net()))
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
    assert any(l.startswith("head") and "unfused" in l
               and "no BatchNorm follows it (its output goes to output)" in l for l in lines)
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
    model = randomize_batchnorm(getattr(video, name)(num_classes=7)).eval()
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


def test_torchvision_s3d():
    """S3D: every Conv3dNormActivation (a Sequential subclass with Sequential's forward) inside
    its separable convs and inception branches is a fused site; the classifier conv has no BN."""
    video = pytest.importorskip("torchvision.models.video")
    torch.manual_seed(0)
    model = randomize_batchnorm(video.s3d(num_classes=5))
    fused = r21d.fuse(model)
    _same_state(fused, model)
    sites = r21d.fusion_sites(fused)
    unfused = [s.site for s in sites if s.backend == "unfused"]
    assert unfused == ["classifier.1"]
    convs = sum(isinstance(m, nn.Conv3d) for m in model.modules())
    assert convs == 78 and len(sites) == convs  # 77 fused sites, one row per unfused conv
    assert {s.kernel for s in sites} == {"pointwise", "spatial", "temporal", "-"}
    x = torch.randn(2, 3, 8, 48, 48)  # the features (the head's 2x7x7 pooling needs 16x224x224)
    with r21d.use_backend("torch"):
        for mode in (False, True):
            model.train(mode), fused.train(mode)
            assert torch.equal(fused.features(x), model.features(x))
    _same_state(fused, model)  # training updated both models' running stats alike
    back = r21d.unfuse(fused)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_narrow_r2plus1d_18_runs_fused_in_the_interpreter(training, strict):
    """r2plus1d_18's whole architecture (its stem, (2+1)D units, strided units, shortcuts and
    residual tails, at 1/16 of its widths) through the Triton kernels in the interpreter, strict
    mode: the output, the input gradient, every parameter gradient and the running statistics
    against the float64 model; in eval without gradients, one launch per fused site (a unit
    kernel or a unit's two sites) and the logits against float64."""
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = randomize_batchnorm(narrow_r2plus1d_18()).train(training).to(memory_format=torch.channels_last_3d)
    fused = r21d.fuse(plain)
    # Training: 24x24 frames, so layer4's batch statistics see 8 values per channel (over 16x16
    # they see 2, and BN's backward cancels to a few bits). The baseline, CPU torch in float32,
    # sums BN's statistics and gradients in float64 (acc_type on the CPU), unlike cuDNN and the
    # kernels, so over 37 layers its error is no yardstick for fp32 sums: a training gradient may
    # be off by 1e-4 relative (~800 fp32 units of rounding; a wrong gradient is off by ~1).
    size, floor = (24, 1e-4) if training else (16, None)
    x = torch.randn(2, 3, 4, size, size, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last_3d)
    counter = assert_module_matches_float64(fused, plain, x, floor)
    assert counter.launches > 0
    if training:
        return
    with torch.no_grad():
        ref = copy.deepcopy(plain).double()(x.double())
        with r21d.use_backend("triton"), _launch.count() as counter:
            logits = fused(x)
            rows = r21d.fusion_sites(fused)
    assert all(r.backend == "triton" for r in rows)
    assert counter.launches == sum(1 if "+" not in r.kernel else 2 for r in rows)
    assert_oracle_close("logits", logits, ref, torch.float32)


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


def test_fused_r2plus1d_18_eval_launches_one_kernel_per_fused_conv(strict):
    """The structural check of a whole fused r2plus1d_18 eval forward (launches captured, not
    run): every site is one kernel, so one launch per fused (2+1)D unit kernel and per conv of a
    unit run as its two sites, with no relayout, no separate BN, ReLU or residual-add pass;
    against the operations the plain model runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    video = pytest.importorskip("torchvision.models.video")
    model = video.r2plus1d_18().eval().to(memory_format=torch.channels_last_3d)
    fused = r21d.fuse(model)
    x = torch.randn(1, 3, 4, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    rows = r21d.fusion_sites(fused, device="cuda")
    expected = sum(1 if "+" not in r.kernel else 2 for r in rows)  # "spatial+temporal": two sites
    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), r21d.use_backend("triton"), _launch.count() as counter, \
            _launch.capture(), RecordOps() as fused_ops:
        fused(x)
    assert "relayout" not in counter.kernels
    assert counter.launches == expected, (counter.kernels, [r.kernel for r in rows])
    # 17 units (the stem and 4 layer1 units one kernel each, 12 two-site units) + 3 shortcuts
    assert counter.launches == 1 + 4 + 2 * 12 + 3
    # besides r21d's ops, torch computes nothing but the head (pooling, linear): no conv, BN,
    # ReLU or residual add of its own
    computed = {n for n in fused_ops.names if not n.endswith("_bn_act")} - {
        "empty", "empty_strided", "view", "permute", "as_strided", "as_strided_", "detach",
        "alias", "t"}
    assert computed <= {"mean", "adaptive_avg_pool3d", "_adaptive_avg_pool3d", "addmm", "mm",
                        "squeeze", "flatten", "_unsafe_view"}, computed
    assert {"conv2plus1d_bn_act", "implicit_gemm_conv_bn_act", "pointwise_conv_bn_act"} \
        <= set(fused_ops.names)
    with torch.no_grad(), RecordOps() as plain_ops:
        model(x)
    plain = set(plain_ops.names)
    assert {"convolution", "relu_", "add_"} <= plain, plain  # what fusion removed


def _grad_cam(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM on ``model.layer4``: activations from a forward hook, their gradient from a full
    backward hook; returns the map sum_c mean(grad_c) * act_c before Grad-CAM's final ReLU (on
    a 2x2 map that ReLU can zero everything, which would compare nothing)."""
    seen = {}
    handles = [
        model.layer4.register_forward_hook(lambda m, args, out: seen.__setitem__("act", out)),
        model.layer4.register_full_backward_hook(lambda m, gin, gout: seen.__setitem__("grad", gout[0])),
    ]
    try:
        model(x)[:, target].sum().backward()
    finally:
        for h in handles:
            h.remove()
    weights = seen["grad"].mean(dim=(2, 3, 4), keepdim=True)
    return (weights * seen["act"]).sum(dim=1)


@pytest.mark.parametrize("device,backend", [
    ("cpu", "torch"), pytest.param("cuda", "triton", marks=pytest.mark.gpu)])
def test_grad_cam_on_fused_r2plus1d_18_matches_the_plain_model(device, backend, strict,
                                                              monkeypatch):
    """Hooks users put on a block sequence that fuse() leaves as it is (layer4) see the same
    activations and gradients: the heat maps agree (float32; on a GPU in IEEE fp32, TF32 off for
    cuDNN and so for the kernels, which follow its setting)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    video = pytest.importorskip("torchvision.models.video")
    torch.manual_seed(0)  # the conv weights: the same model whatever ran before
    plain = randomize_batchnorm(video.r2plus1d_18(num_classes=6)).eval().to(device)
    fused = r21d.fuse(plain)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 4, 32, 32, generator=g).to(device)
    with r21d.use_backend("torch"):
        ref = _grad_cam(plain, x.clone().requires_grad_(), target=2)
    with r21d.use_backend(backend):
        cam = _grad_cam(fused, x.clone().requires_grad_(), target=2)
    assert cam.shape == ref.shape and (ref != 0).all()
    if backend == "torch":
        assert torch.equal(cam, ref)
    else:
        assert torch.allclose(cam, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_model_under_autocast_behaves_like_the_plain_model(training, strict):
    """Under torch.autocast (fp16 on the CPU: the interpreter has no bf16) every fused kind of site
    runs its convs in fp16 like Conv3d does, and BN parameters, running statistics and parameter
    gradients stay fp32: the features, their dtype and the running statistics match the plain
    model under autocast. (Gradient accuracy in fp16 is checked per op against float64 by the
    property tests: through a whole fp16 network, ReLU masks flip wherever two valid roundings of
    a pre-activation straddle 0, which moves sums such as dbn_bias by percents in either model.)"""
    pytest.importorskip("torchvision")
    from tests.utils import small_video_net

    plain = small_video_net().train(training)
    fused = r21d.fuse(copy.deepcopy(plain))
    x = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for model, backend in ((fused, "triton"), (plain, "torch")):
        xi = x.clone().requires_grad_()
        with r21d.use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
            features = model[:-3](xi)  # the last site's output, before the fp32 head
            y = model[-3:](features)
        y.float().sum().backward()
        results.append((features, y, {n: p.grad for n, p in model.named_parameters()},
                        dict(model.named_buffers())))
    (f, y, grads, buffers), (rf, ry, rgrads, rbuffers) = results
    assert f.dtype == rf.dtype == torch.float16 and y.dtype == ry.dtype
    torch.testing.assert_close(f, rf, rtol=1e-2, atol=1e-2)
    for name, g in rgrads.items():
        assert grads[name].dtype == g.dtype == torch.float32 and grads[name].isfinite().all(), name
    for name, b in rbuffers.items():
        assert buffers[name].dtype == b.dtype, name
        torch.testing.assert_close(buffers[name], b, rtol=1e-2, atol=1e-3, msg=name)


def test_block_tail_with_an_fp32_residual_under_autocast_adds_like_torchvision(strict):
    """A BasicBlock fed fp32 input under autocast: torchvision's ``out += residual`` keeps the fp16
    conv output's dtype; the fused block does the same (its residual kernel takes fp16 only, so the
    add runs after the fused conv2) and nothing falls back."""
    pytest.importorskip("torchvision")
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D

    torch.manual_seed(0)
    plain = BasicBlock(4, 4, Conv2Plus1D).train()
    fused = r21d.fuse(copy.deepcopy(plain))
    x = torch.randn(2, 4, 3, 6, 6)
    outs = []
    for model, backend in ((fused, "triton"), (plain, "torch")):
        with r21d.use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
            outs.append(model(x))
    assert outs[0].dtype == outs[1].dtype == torch.float16
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("entry", ["fuse", "unfuse", "fusion_sites", "fusion_report"])
def test_a_model_that_is_not_a_module_is_named_in_the_error(entry):
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        getattr(r21d, entry)("r2plus1d_18")
