"""Drop-in modules: PyTorch's state-dict layout, exact torch-path results, BatchNorm semantics on
the fused path, and the (2+1)D / depthwise-separable building blocks."""

import copy

import pytest
import torch
from torch import nn

import r21d
from r21d.triton_kernels import _launch


def _plain(m: nn.Module) -> nn.Module:
    return r21d.unfuse(m)


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)


def _assert_same_state(a: nn.Module, b: nn.Module, rtol=0.0, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)


def test_conv_bn_relu3d_state_dict_is_pytorch_layout():
    m = r21d.ConvBNReLU3d(8, 16, 3, padding=1, bias=True)
    plain = nn.Sequential(nn.Conv3d(8, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU())
    assert list(m.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(m.state_dict())
    m.load_state_dict(plain.state_dict())
    assert isinstance(m.conv, nn.Conv3d) and isinstance(m.bn, nn.BatchNorm3d)
    assert m.activation == "relu"
    assert len(r21d.ConvBNReLU3d(8, 16, 1, activation=None)) == 2
    assert r21d.ConvBNReLU3d(8, 16, 1, activation="silu").activation == "silu"
    with pytest.raises(ValueError, match="unknown activation"):
        r21d.ConvBNReLU3d(8, 16, 1, activation="tanh")


def test_from_modules_shares_tensors_and_validates():
    conv, bn = nn.Conv3d(4, 6, 1, bias=False), nn.BatchNorm3d(6)
    m = r21d.ConvBNReLU3d.from_modules(conv, bn, nn.ReLU())
    assert m.conv is conv and m.bn is bn
    assert m.conv.weight.data_ptr() == conv.weight.data_ptr()
    with pytest.raises(TypeError, match="conv must be an Conv3d"):
        r21d.ConvBNReLU3d.from_modules(nn.Conv2d(4, 6, 1), bn)
    with pytest.raises(TypeError, match="with 6 features"):
        r21d.ConvBNReLU3d.from_modules(conv, nn.BatchNorm3d(5))
    with pytest.raises(ValueError, match="unsupported activation"):
        r21d.ConvBNReLU3d.from_modules(conv, bn, nn.GELU())


GEOMETRIES = [
    dict(in_channels=12, out_channels=12, kernel_size=3, padding=1, groups=12),  # depthwise
    dict(in_channels=12, out_channels=20, kernel_size=1, stride=(1, 2, 2)),  # pointwise
    dict(in_channels=8, out_channels=14, kernel_size=(1, 3, 3), padding=(0, 1, 1)),  # spatial
    dict(in_channels=14, out_channels=8, kernel_size=(3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0)),
    dict(in_channels=3, out_channels=8, kernel_size=(3, 5, 5), stride=2, padding=(1, 2, 2), bias=True),
    dict(in_channels=12, out_channels=18, kernel_size=3, padding=2, dilation=2, groups=3),  # grouped
]
BN_VARIANTS = {
    "default": {},
    "momentum-none": {"momentum": None},
    "no-affine": {"affine": False},
    "no-running-stats": {"track_running_stats": False},
}


def _make(geometry, bn_kwargs, activation="relu"):
    m = r21d.ConvBNReLU3d(**geometry, activation=activation)
    bn = nn.BatchNorm3d(geometry["out_channels"], **bn_kwargs)
    m = r21d.ConvBNReLU3d.from_modules(m.conv, bn, m[2] if len(m) > 2 else None)
    _randomize_bn(m.bn)
    return m


@pytest.mark.parametrize("layout", ["ncdhw", "cl3d", "strided", "empty"])
@pytest.mark.parametrize("bn_name", list(BN_VARIANTS))
@pytest.mark.parametrize("g", range(len(GEOMETRIES)))
def test_torch_path_is_exactly_the_plain_modules(g, bn_name, layout):
    geometry = GEOMETRIES[g]
    m = _make(geometry, BN_VARIANTS[bn_name])
    plain = _plain(m)
    assert type(plain) is nn.Sequential
    plain = copy.deepcopy(plain)
    N = 0 if layout == "empty" else 2
    x = torch.randn(N, geometry["in_channels"], 5, 9, 8)
    if layout == "cl3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = torch.randn(N, geometry["in_channels"], 5, 9, 16)[..., ::2]
    for training in (True, False, True):
        m.train(training)
        plain.train(training)
        with r21d.use_backend("torch"):
            y = m(x)
        assert torch.equal(y, plain(x))
    _assert_same_state(m, plain)


# a pointwise and an implicit-GEMM (spatial) kernel, with the T, H, W of their input
FUSED_GEOMETRIES = {
    "pointwise": (dict(in_channels=12, out_channels=20, kernel_size=1, stride=(1, 2, 2), bias=True),
                  (3, 7, 10)),
    "spatial": (dict(in_channels=16, out_channels=10, kernel_size=(1, 3, 3), stride=(1, 2, 1),
                     padding=(0, 1, 1), bias=True), (2, 5, 6)),
}


@pytest.mark.usefixtures("strict")
@pytest.mark.parametrize("activation,layout", [("relu", "ncdhw"), ("silu", "cl3d"), (None, "strided")])
@pytest.mark.parametrize("bn_name", list(BN_VARIANTS))
@pytest.mark.parametrize("family", list(FUSED_GEOMETRIES))
def test_fused_module_keeps_batchnorm_semantics(family, bn_name, activation, layout):
    geometry, (T, H, W) = FUSED_GEOMETRIES[family]
    m = _make(geometry, BN_VARIANTS[bn_name], activation)
    plain = copy.deepcopy(_plain(m))
    c = geometry["in_channels"]
    x = torch.randn(2, c, T, H, W)
    if layout == "cl3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = torch.randn(2, c, T, H, 2 * W)[..., ::2]
    for step, training in enumerate((True, True, False, True)):
        m.train(training)
        plain.train(training)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        with r21d.use_backend("triton"), _launch.count() as counter:
            y = m(xa)
        assert counter.launches >= 1
        ref = plain(xb)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5, msg=f"step {step}")
        grad = torch.randn_like(ref)
        y.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(m.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
        _assert_same_state(m, plain, rtol=1e-5, atol=1e-6)


def test_empty_batch_counts_a_batch_like_pytorch(strict):
    m = _make(dict(in_channels=4, out_channels=8, kernel_size=1), {})
    plain = copy.deepcopy(_plain(m))
    x = torch.randn(0, 4, 2, 3, 3)
    with r21d.use_backend("triton"):
        y = m.train()(x)
    assert y.shape == plain.train()(x).shape
    _assert_same_state(m, plain)


def test_hooked_site_runs_the_modules(recwarn):
    m = _make(dict(in_channels=4, out_channels=8, kernel_size=1), {}).eval()
    seen = []
    m.conv.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with r21d.use_backend("triton"):
        m(torch.randn(1, 4, 2, 3, 3))
    assert seen == [torch.Size([1, 8, 2, 3, 3])]
    assert any("hooks are registered" in str(w.message) for w in recwarn)


def test_conv_bn_relu2d_runs_4d_input(strict):
    m = r21d.ConvBNReLU2d(6, 10, 1, bias=True).eval()
    _randomize_bn(m.bn)
    plain = copy.deepcopy(_plain(m))
    x = torch.randn(3, 6, 5, 7)
    with r21d.use_backend("triton"):
        y = m(x)
    assert y.shape == (3, 10, 5, 7)
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,cin,cout,first,expected", [
    ((3, 3, 3), 64, 64, False, 144),
    ((3, 3, 3), 64, 128, False, 230),
    ((3, 3, 3), 128, 256, False, 460),
    ((3, 3, 3), 256, 512, False, 921),
    ((3, 7, 7), 3, 64, True, 45),
])
def test_spatiotemporal_intermediate_channels(kernel, cin, cout, first, expected):
    m = r21d.SpatioTemporalConv(cin, cout, kernel, first_conv=first)
    assert m.intermed_channels == expected
    assert m.spatial_conv.out_channels == m.bn1.num_features == expected
    assert m.spatial_conv.kernel_size == (1,) + kernel[1:]
    assert m.temporal_conv.kernel_size == (kernel[0], 1, 1)


def test_spatiotemporal_conv_matches_its_modules():
    m = r21d.SpatioTemporalConv(8, 12, (3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1))
    _randomize_bn(m.bn1, 1)
    _randomize_bn(m.bn2, 2)
    assert list(dict(m.named_children())) == ["spatial_conv", "bn1", "temporal_conv", "bn2", "relu"]
    assert m.spatial_conv.stride == (1, 2, 2) and m.temporal_conv.stride == (2, 1, 1)
    x = torch.randn(2, 8, 6, 9, 9)
    for training in (True, False):
        m.train(training)
        with r21d.use_backend("torch"):
            y = m(x)
        ref_model = copy.deepcopy(m)
        ref = ref_model.relu(ref_model.bn2(ref_model.temporal_conv(
            ref_model.relu(ref_model.bn1(ref_model.spatial_conv(x))))))
        if training:  # ref_model ran one more batch than m: compare outputs only
            torch.testing.assert_close(y, ref)
        else:
            assert torch.equal(y, ref)


def test_conv2plus1d_loads_torchvision_weights():
    resnet = pytest.importorskip("torchvision.models.video.resnet")
    tv = resnet.Conv2Plus1D(16, 32, 40, stride=2)
    _randomize_bn(tv[1])
    ours = r21d.Conv2Plus1d(16, 32, 40, stride=2)
    ours.load_state_dict(tv.state_dict())
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert r21d.Conv2Plus1d.get_downsample_stride(2) == resnet.Conv2Plus1D.get_downsample_stride(2)
    x = torch.randn(2, 16, 4, 10, 10)
    tv.eval()
    ours.eval()
    with r21d.use_backend("torch"):
        assert torch.equal(ours(x), tv(x))


def test_conv2plus1d_is_a_videoresnet_conv_maker():
    resnet = pytest.importorskip("torchvision.models.video.resnet")
    model = resnet.VideoResNet(resnet.BasicBlock, [r21d.Conv2Plus1d] * 4, [1, 1, 1, 1],
                               resnet.R2Plus1dStem, num_classes=5)
    reference = resnet.VideoResNet(resnet.BasicBlock, [resnet.Conv2Plus1D] * 4, [1, 1, 1, 1],
                                   resnet.R2Plus1dStem, num_classes=5)
    reference.load_state_dict(model.state_dict())
    model.eval()
    reference.eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with r21d.use_backend("torch"):
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("cls,x_shape", [
    (r21d.DepthwiseSeparableConv3d, (2, 12, 4, 9, 9)),
    (r21d.DepthwiseSeparableConv2d, (2, 12, 9, 9)),
])
def test_depthwise_separable(cls, x_shape):
    m = cls(12, 20, 3, stride=2, padding=1)
    assert list(dict(m.named_children())) == ["depthwise", "pointwise"]
    assert m.depthwise.conv.groups == 12 and m.pointwise.conv.kernel_size in ((1, 1, 1), (1, 1))
    x = torch.randn(*x_shape)
    ref = nn.Sequential(*_plain(m.depthwise), *_plain(m.pointwise))
    m.eval()
    ref.eval()
    with r21d.use_backend("torch"):
        y = m(x)
    assert y.shape[:2] == (2, 20)
    assert torch.equal(y, ref(x))


@pytest.mark.parametrize("cls,x_shape,layout", [
    (r21d.DepthwiseSeparableConv3d, (2, 12, 3, 5, 5), torch.contiguous_format),
    (r21d.DepthwiseSeparableConv3d, (2, 12, 3, 5, 5), torch.channels_last_3d),
    (r21d.DepthwiseSeparableConv2d, (2, 12, 5, 6), torch.contiguous_format),
], ids=["3d-ncdhw", "3d-cl3d", "2d"])
def test_depthwise_separable_runs_both_fused_kernels(strict, cls, x_shape, layout):
    m = cls(12, 20, 3, padding=1)
    x = torch.randn(*x_shape)
    if layout != torch.contiguous_format:
        x = x.contiguous(memory_format=layout)
    for training in (False, True):
        m.train(training)
        ref = copy.deepcopy(m)
        with r21d.use_backend("triton"), _launch.count() as counter:
            y = m(x)
        with r21d.use_backend("torch"):
            y_ref = ref(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.state_dict(), ref.state_dict(), rtol=1e-4, atol=1e-5)
        assert counter.kernels.count("_depthwise_fwd_kernel") == (2 if training else 1)
        assert counter.kernels.count("_pointwise_fwd_kernel") == 1
