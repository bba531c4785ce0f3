"""r21d.fuse on modules written the way users write them (attributes and a plain forward), found
by tracing what the forward computes (r21d.fused_traced): chains, activations written as calls,
residual tails, (2+1)D units; what must stay unfused and why; drop-in behaviour (state, class,
pickling, copies, hooks); the pytorchvideo zoo."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import r21d
from r21d.triton_kernels import _launch
from tests.utils import assert_module_matches_float64, randomize_batchnorm


class SpatioTemporalConv(nn.Module):
    """The R(2+1)D unit as most code writes it."""

    def __init__(self, cin, cout, k=3, stride=1, mid=None):
        super().__init__()
        mid = mid or cout
        self.spatial_conv = nn.Conv3d(cin, mid, (1, k, k), stride=(1, stride, stride),
                                      padding=(0, k // 2, k // 2), bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.temporal_conv = nn.Conv3d(mid, cout, (k, 1, 1), stride=(stride, 1, 1),
                                       padding=(k // 2, 0, 0), bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn2(self.temporal_conv(self.relu(self.bn1(self.spatial_conv(x))))))


class ResBlock(nn.Module):
    """outrelu(x + bn2(conv2(relu1(bn1(conv1(x)))))), with a strided shortcut when it downsamples."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.outrelu = nn.ReLU()
        self.downsample = stride != 1 or cin != cout
        if self.downsample:
            self.down_conv = nn.Conv3d(cin, cout, 1, stride=stride, bias=False)
            self.down_bn = nn.BatchNorm3d(cout)

    def forward(self, x):
        res = self.relu1(self.bn1(self.conv1(x)))
        res = self.bn2(self.conv2(res))
        if self.downsample:
            x = self.down_bn(self.down_conv(x))
        return self.outrelu(x + res)


class UserR2Plus1D(nn.Module):
    def __init__(self, width=16, classes=5):
        super().__init__()
        self.stem = SpatioTemporalConv(3, width, mid=8)
        self.layer1 = ResBlock(width, width)
        self.layer2 = ResBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3, 4)))


def _fused_and_unfused(model):
    rows = r21d.fusion_sites(model)
    return [r for r in rows if r.backend != "unfused"], [r for r in rows if r.backend == "unfused"]


def _step(model, x, training):
    """Output, input gradient, parameter gradients and buffers after one forward + backward."""
    model.train(training)
    torch.manual_seed(3)
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return (y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_user_r2plus1d_fuses_every_chain_and_computes_what_it_computed(training):
    model = randomize_batchnorm(UserR2Plus1D())
    fused = r21d.fuse(model)
    sites, unfused = _fused_and_unfused(fused)
    assert not unfused, unfused
    # 2 units (stem), 2 + 3 sites (blocks: conv1, conv2 + residual, the shortcut)
    assert [r.site for r in sites] == [
        "stem.spatial_conv", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2",
        "layer2.down_conv"]
    assert "(2+1)D unit" in sites[0].pattern and "+ residual" in sites[2].pattern
    x = torch.randn(2, 3, 4, 8, 8)
    with r21d.use_backend("torch"):
        got = _step(fused, x, training)
    want = _step(model, x, training)
    for a, b in zip(got, want):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)


def test_user_network_runs_fused_kernels_and_matches_float64(strict):
    """In the interpreter: no aten convolution for any chain, and forward + backward in training
    match a float64 copy of the plain model."""
    torch.manual_seed(0)
    model = randomize_batchnorm(UserR2Plus1D(width=4)).train()
    fused = r21d.fuse(model)
    x = torch.randn(1, 3, 2, 4, 4)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), r21d.use_backend("triton"), _launch.capture(), Ops() as ops:
        copy.deepcopy(fused)(x)  # launches captured, not run: the copy's statistics are garbage
    assert "convolution" not in ops.names and "native_batch_norm" not in ops.names, ops.names
    assert_module_matches_float64(fused, model, x)


class Classifier(nn.Module):
    """Three Conv3d -> BN -> F.relu layers with pooling between, then a linear head."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.conv2, self.bn2 = nn.Conv3d(8, 16, 3, padding=1), nn.BatchNorm3d(16)
        self.conv3, self.bn3 = nn.Conv3d(16, 16, 3, padding=1), nn.BatchNorm3d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool3d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool3d(x, 1), 1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_three_layer_classifier(training):
    model = randomize_batchnorm(Classifier())
    fused = r21d.fuse(model)
    sites, unfused = _fused_and_unfused(fused)
    assert [r.site for r in sites] == ["conv1", "conv2", "conv3"] and not unfused
    x = torch.randn(2, 3, 4, 8, 8)
    with r21d.use_backend("torch"):
        got = _step(fused, x, training)
    want = _step(model, x, training)
    assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))


class Activated(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(4)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Swish(nn.Module):  # pytorchvideo's, as a plain expression
    def forward(self, x):
        return x * torch.sigmoid(x)


class Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


ACTIVATIONS = {
    "ReLU": (nn.ReLU(), "ReLU"), "ReLU-inplace": (nn.ReLU(inplace=True), "ReLU"),
    "SiLU": (nn.SiLU(), "SiLU"), "Swish": (Swish(), "SiLU"),
    "F.relu": (F.relu, "ReLU"), "F.relu-inplace": (lambda y: F.relu(y, inplace=True), "ReLU"),
    "torch.relu": (torch.relu, "ReLU"), ".relu()": (lambda y: y.relu(), "ReLU"),
    ".relu_()": (lambda y: y.relu_(), "ReLU"), "F.silu": (F.silu, "SiLU"),
    "none": (lambda y: y, "BatchNorm3d"),
    "clamp(0, 100)": (Call(lambda y: y.clamp(0, 100)), "BatchNorm3d"),  # not a ReLU: left as written
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_modules_and_calls(name):
    act, ends = ACTIVATIONS[name]
    if not isinstance(act, nn.Module):
        fn = act

        class Block(Activated):
            def forward(self, x):
                return fn(self.bn(self.conv(x)))
        model = Block(nn.Identity())
    else:
        model = Activated(act)
    model = randomize_batchnorm(model).eval()
    fused = r21d.fuse(model)
    (site,), unfused = _fused_and_unfused(fused)
    assert not unfused and site.pattern.endswith(ends), site
    x = torch.randn(1, 4, 3, 5, 5)
    with r21d.use_backend("torch"), torch.no_grad():
        assert torch.equal(fused(x), model(x))


class X3DStyle(nn.Module):
    """pytorchvideo's bottleneck without SE: conv_b -> norm_b = Sequential(BN, Identity) -> Swish."""

    def __init__(self):
        super().__init__()
        self.conv_b = nn.Conv3d(4, 4, 3, padding=1, groups=4, bias=False)
        self.norm_b = nn.Sequential(nn.BatchNorm3d(4), nn.Identity())
        self.act_b = Swish()

    def forward(self, x):
        return self.act_b(self.norm_b(self.conv_b(x)))


def test_a_bn_in_a_sequential_with_an_identity_fuses_with_the_activation_after_it():
    model = randomize_batchnorm(X3DStyle()).eval()
    fused = r21d.fuse(model)
    (site,), _ = _fused_and_unfused(fused)
    assert site.kernel == "depthwise" and site.pattern.endswith("BatchNorm3d -> SiLU"), site
    x = torch.randn(1, 4, 3, 5, 5)
    with r21d.use_backend("torch"), torch.no_grad():
        assert torch.equal(fused(x), model(x))
        seen = []
        fused.norm_b[1].register_forward_hook(lambda m, a, out: seen.append(out))
        assert torch.equal(fused(x), model(x)) and len(seen) == 1  # the identity runs again


class Tail(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv = nn.Conv3d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(4)

    def forward(self, x, identity):
        out = self.bn(self.conv(x))
        if self.form == "iadd":
            out += identity
        elif self.form == "radd":
            out = identity + out
        else:
            out = torch.add(out, identity)
        return F.relu(out)


@pytest.mark.parametrize("form", ["iadd", "radd", "torch.add"])
def test_residual_tails(form):
    model = randomize_batchnorm(Tail(form)).eval()
    fused = r21d.fuse(model)
    (site,), _ = _fused_and_unfused(fused)
    assert "+ residual -> ReLU" in site.pattern
    x, identity = torch.randn(1, 4, 3, 5, 5), torch.randn(1, 4, 3, 5, 5)
    with r21d.use_backend("torch"), torch.no_grad():
        assert torch.equal(fused(x, identity), model(x, identity))
        # a residual the kernels cannot add (broadcast, another dtype) runs the ops as written
        for other in (identity[:, :1], identity.double()):
            assert torch.equal(fused(x, other), model(x, other))


class NotChains(nn.Module):
    def __init__(self):
        super().__init__()
        self.twice = nn.Conv3d(4, 4, 1)
        self.bn_twice = nn.BatchNorm3d(4)
        self.viewed = nn.Conv3d(4, 4, 1)
        self.bn_viewed = nn.BatchNorm3d(4)
        self.plain = nn.Conv3d(4, 4, 1)

    def forward(self, x):
        a = self.twice(x)
        y = self.bn_twice(a) + a  # the conv's output is used again: BN cannot absorb it
        v = self.viewed(y)
        y = self.bn_viewed(v.transpose(3, 4))  # through a view: not a chain
        return self.plain(y)


def test_what_must_not_fuse_is_reported_with_its_reason():
    model = randomize_batchnorm(NotChains()).eval()
    fused = r21d.fuse(model)
    sites, unfused = _fused_and_unfused(fused)
    assert not sites and type(fused) is NotChains
    notes = {r.site: r.note for r in unfused}
    assert notes["twice"] == "its output is used 2 times"
    assert notes["viewed"] == "no BatchNorm follows it (its output goes to transpose)"
    x = torch.randn(1, 4, 2, 3, 3)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


class DataDependent(Activated):
    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # control flow on values: tracing fails
            return self.act(y)
        return y


def test_a_block_that_cannot_be_traced_fuses_nothing_and_says_why():
    model = nn.Sequential(DataDependent(nn.ReLU())).eval()
    fused = r21d.fuse(model)  # never raises
    assert type(fused[0]) is DataDependent
    (row,) = r21d.fusion_sites(fused)
    assert row.backend == "unfused" and row.note.startswith("not traceable: TraceError"), row
    x = torch.randn(1, 4, 2, 3, 3)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


def test_hooks_on_a_chain_run_it_as_written_and_fire():
    model = randomize_batchnorm(UserR2Plus1D()).eval()
    fused = r21d.fuse(model)
    x = torch.randn(1, 3, 4, 8, 8)
    seen = []
    handle = fused.layer1.outrelu.register_forward_hook(lambda m, a, out: seen.append(out))
    with r21d.use_backend("torch"), torch.no_grad():
        assert torch.equal(fused(x), model(x))
    assert len(seen) == 1
    handle.remove()
    # a global module hook sees every module of the plain forward
    called = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: called.append(type(m).__name__))
    try:
        with r21d.use_backend("torch"), torch.no_grad():
            assert torch.equal(fused(x), model(x))
    finally:
        handle.remove()
    assert called[:len(called) // 2] == called[len(called) // 2:]  # fused, then plain: alike
    # a child replaced after fuse: the forward is traced again for the new children
    fused.layer1.bn2 = nn.BatchNorm3d(16).eval()
    model.layer1.bn2 = copy.deepcopy(fused.layer1.bn2)
    with r21d.use_backend("torch"), torch.no_grad():
        assert torch.equal(fused(x), model(x))


class ModeBranch(Activated):
    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return y * 2 if self.training else y  # resolved when traced: the mode is part of the trace


def test_a_forward_that_branches_on_its_mode_is_traced_again_when_the_mode_changes():
    model = randomize_batchnorm(ModeBranch(nn.ReLU())).eval()
    fused = r21d.fuse(model)
    x = torch.randn(2, 4, 3, 5, 5)
    for training in (False, True, False):
        model.train(training)
        fused.train(training)
        with r21d.use_backend("torch"), torch.no_grad():
            assert torch.equal(fused(x), model(x)), training


def test_drop_in_state_class_copies_pickling_and_unfuse():
    model = randomize_batchnorm(UserR2Plus1D()).eval()
    fused = r21d.fuse(model)
    assert fused.stem is not model.stem
    assert isinstance(fused.stem, SpatioTemporalConv) and isinstance(fused.layer1, ResBlock)
    assert type(fused.stem).__name__ == "SpatioTemporalConv" and type(fused.stem) is not SpatioTemporalConv
    sa, sb = fused.state_dict(), model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert r21d.fuse(fused, inplace=True) is fused  # idempotent
    assert [type(m) for m in r21d.fuse(fused).modules()] == [type(m) for m in fused.modules()]
    x = torch.randn(1, 3, 4, 8, 8)
    want = model(x).detach()
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fused), torch.load(buf, weights_only=False)):
        assert type(other.stem) is type(fused.stem)
        with torch.no_grad():
            assert torch.equal(other(x), want)
    back = r21d.unfuse(fused)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]


def test_frozen_batchnorm_inside_a_training_model_follows_the_plain_model():
    model = randomize_batchnorm(UserR2Plus1D()).train()
    model.layer1.bn1.eval()
    for p in model.layer2.bn2.parameters():
        p.requires_grad_(False)
    fused = r21d.fuse(model)
    x = torch.randn(2, 3, 4, 8, 8)
    with r21d.use_backend("torch"):
        got = _step(fused, x, True)
    want = _step(model, x, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# The pytorchvideo zoo, built small: every traced conv -> BN chain fused, outputs unchanged.
ZOO = {  # (head pools sized for 32x32 clips)
    "x3d": lambda m: m.x3d.create_x3d(input_clip_length=4, input_crop_size=32, depth_factor=0.5,
                                     model_num_class=5),
    "csn": lambda m: m.csn.create_csn(model_num_class=5, head_pool_kernel_size=(1, 1, 1)),
    "r2plus1d": lambda m: m.r2plus1d.create_r2plus1d(model_num_class=5,
                                                      head_pool_kernel_size=(1, 1, 1)),
    "slow": lambda m: m.resnet.create_resnet(model_num_class=5, head_pool_kernel_size=(1, 1, 1)),
    "slowfast": lambda m: m.slowfast.create_slowfast(
        model_num_class=5, head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1))),
}


class _Leaves(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return not m._modules


def _traced_chains(model: nn.Module) -> int:
    """Conv3d -> BatchNorm3d chains in the whole model's graph (every module without children a
    leaf): the count fuse must reach, found independently of r21d.fused_traced. A model fx cannot
    trace whole (SlowFast's list input) counts its BatchNorm3d modules (each follows a conv)."""
    try:
        graph = _Leaves().trace(model)
    except Exception:
        return sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    count = 0
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Conv3d):
            users = list(node.users)
            count += (len(users) == 1 and users[0].op == "call_module"
                      and isinstance(model.get_submodule(users[0].target), nn.BatchNorm3d))
    return count


@pytest.mark.parametrize("name", ZOO)
def test_pytorchvideo_zoo_every_chain_fused(name):
    pytest.importorskip("pytorchvideo")
    import pytorchvideo.models as zoo
    import pytorchvideo.models.csn  # noqa: F401  (the builders' modules)
    import pytorchvideo.models.r2plus1d  # noqa: F401
    import pytorchvideo.models.resnet  # noqa: F401
    import pytorchvideo.models.slowfast  # noqa: F401
    import pytorchvideo.models.x3d  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_batchnorm(ZOO[name](zoo)).eval()
    fused = r21d.fuse(model)
    sites, unfused = _fused_and_unfused(fused)
    fused_convs = sum(2 if "(2+1)D unit" in r.pattern else 1 for r in sites)
    assert fused_convs == _traced_chains(model), unfused
    if name == "slowfast":  # (a list its forward writes into: each call gets its own)
        slow, fast = torch.randn(1, 3, 2, 32, 32), torch.randn(1, 3, 8, 32, 32)
        inputs = lambda: [slow, fast]  # noqa: E731
    else:
        x = torch.randn(1, 3, 4 if name == "x3d" else 8, 32, 32)
        inputs = lambda: x  # noqa: E731
    with r21d.use_backend("torch"), torch.no_grad():
        assert torch.equal(fused(inputs()), model(inputs()))


def test_a_traced_model_compiles_fullgraph_with_eager_results(strict):
    """torch.compile(fullgraph=True) traces the rewritten forwards to the fused ops (aot_eager,
    the Triton interpreter); the (2+1)D unit, a residual tail and a shortcut among them."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    fused = r21d.fuse(randomize_batchnorm(UserR2Plus1D(width=4))).eval()
    x = torch.randn(1, 3, 2, 4, 4)
    with r21d.use_backend("triton"), torch.no_grad():
        with _launch.count() as eager_launches:
            expected = fused(x)
        with _launch.count() as compiled_launches:
            got = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    assert compiled_launches.kernels == eager_launches.kernels
    # the stem's unit as one kernel, 3 + 1 implicit-GEMM sites, the pointwise shortcut
    assert [k for k in eager_launches.kernels if k != "relayout"] == [
        "_unit_eval_kernel", "_igemm_fwd_kernel", "_igemm_fwd_kernel", "_igemm_fwd_kernel",
        "_pointwise_fwd_kernel", "_igemm_fwd_kernel"]
    torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["x3d", "csn"])
def test_pytorchvideo_depthwise_models_bf16_eval_as_accurate_as_cudnn(name, strict):
    """X3D and CSN, the depthwise family's models, fused on a GPU: bf16 logits against a float64
    model, within twice cuDNN's error."""
    pytest.importorskip("pytorchvideo")
    import pytorchvideo.models as zoo
    import pytorchvideo.models.csn  # noqa: F401
    import pytorchvideo.models.x3d  # noqa: F401

    from tests.utils import assert_oracle_close

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = randomize_batchnorm(ZOO[name](zoo)).eval()
    x = torch.randn(2, 3, 4 if name == "x3d" else 8, 32, 32)
    with torch.no_grad():
        ref = copy.deepcopy(plain).double().cuda()(x.double().cuda())
    cl = torch.channels_last_3d
    model = plain.cuda().to(torch.bfloat16).to(memory_format=cl)
    xin = x.cuda().to(torch.bfloat16).contiguous(memory_format=cl)
    fused = r21d.fuse(model)
    with torch.no_grad():
        with r21d.use_backend("torch"):
            cudnn = model(xin)
        with r21d.use_backend("triton"), _launch.count() as counter:
            out = fused(xin)
    assert "_depthwise_fwd_kernel" in counter.kernels
    assert_oracle_close("logits", out.float(), ref, torch.bfloat16, baseline=cudnn.float())
