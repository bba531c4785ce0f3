"""r21d.fused_site on its own: ``run_site(conv, bn, act, x, residual)`` called directly (no module,
no plan slot) against the float64 oracle (the same modules in float64 on the torch path), and the
helpers it is built from: which activation modules it takes (``activation_name``,
``register_activation``), which conv / BN pairs (``conv_base``, ``is_batchnorm_for``), how it
counts a batch and averages (``bn_momentum``: num_batches_tracked, momentum=None), the
configuration and blocker it describes a site with (``site_config``, ``site_geometry``: Conv2d
lifting, padding strings and modes), when a SyncBatchNorm spans a process group (``sync_group``),
what the torch path runs, and its errors.

Kernels run in the interpreter on a tiny pointwise site (the cheapest family), in strict mode.
Covered elsewhere, not repeated here: the plan kept in a slot and what replans it, hooks, the
in-place overlap check, SyncBatchNorm's signature (tests/nn/test_site_plan.py); BatchNorm variants
(affine=False, track_running_stats=False) through the drop-in modules and the torch path's
layouts (tests/nn/test_modules.py); no host sync for momentum=None (tests/nn/test_host_sync.py);
each family's kernels on odd shapes (tests/kernels/).
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import r21d
from r21d import fused_site
from r21d.fused_site import (
    activation_name,
    bn_momentum,
    conv_base,
    is_activation,
    is_batchnorm_for,
    register_activation,
    run_site,
    site_config,
    site_geometry,
    sync_group,
    uses_batch_stats,
)
from r21d.triton_kernels import _launch
from tests.utils import assert_oracle_close, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("strict")


class Swish(nn.Module):
    """A SiLU of another class (pytorchvideo's Swish): fused only once registered."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class LoudReLU(nn.ReLU):
    """A ReLU subclass that changes what it computes: not a ReLU to a fused site."""

    def forward(self, x):
        return super().forward(x) + 1


class QuietReLU(nn.ReLU):
    """A ReLU subclass with ReLU's own forward."""


def _site(act=None, conv=None, momentum=0.1, training=False, seed=0):
    """(conv, bn, act): ``conv`` (by default a 5 -> 6 pointwise conv with a bias) and its BN, away
    from its defaults."""
    torch.manual_seed(seed)
    conv = conv if conv is not None else nn.Conv3d(5, 6, 1)
    bn = (nn.BatchNorm2d if isinstance(conv, nn.Conv2d) else nn.BatchNorm3d)(
        conv.out_channels, momentum=momentum)
    randomize_batchnorm(bn, seed)
    return conv, bn.train(training), act


def _x(*shape, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(shape or (2, 5, 2, 3, 3)), generator=g).requires_grad_(requires_grad)


def _modules(conv, bn, act):
    """The site's modules as they run on the torch path: act(bn(conv(x)) + residual)."""
    def forward(x, residual=None):
        y = bn(conv(x))
        y = y if residual is None else y + residual
        return act(y) if act is not None else y
    return forward


def _copies(site, dtype):
    """Deep copies of a site's modules in ``dtype`` (float64: the oracle)."""
    return tuple(copy.deepcopy(m).to(dtype) if m is not None else None for m in site)


def _kernels(counter):
    return [k for k in counter.kernels if k != "relayout"]


# ---------------------------------------------------------------------------- activations
def test_activation_names():
    assert activation_name(None) is None
    assert activation_name(nn.Identity()) is None
    assert activation_name(nn.ReLU(inplace=True)) == "relu"
    assert activation_name(QuietReLU()) == "relu"
    assert activation_name(nn.SiLU()) == "silu"
    for module in (nn.GELU(), LoudReLU(), Swish(), nn.ReLU6()):
        with pytest.raises(ValueError, match=f"unsupported activation module {type(module).__name__}"):
            activation_name(module)
    assert is_activation(nn.ReLU()) and is_activation(nn.SiLU())
    assert not is_activation(nn.Identity()) and not is_activation(LoudReLU())


def test_register_activation_is_per_instance_and_weak():
    swish, other = Swish(), Swish()
    register_activation(swish, "silu")
    assert activation_name(swish) == "silu"
    with pytest.raises(ValueError, match="unsupported activation module Swish"):
        activation_name(other)  # the class is not registered, only the probed instance
    alive = weakref.ref(swish)
    del swish
    gc.collect()
    assert alive() is None  # the registration does not keep a dropped module alive


# ---------------------------------------------------------------------------- modules a site takes
def test_conv_base_and_batchnorm_pairs():
    class OwnConv(nn.Conv3d):
        def forward(self, x):
            return super().forward(x) * 2

    class OwnBN(nn.BatchNorm3d):
        def forward(self, x):
            return super().forward(x)

    conv3, conv2 = nn.Conv3d(4, 6, 1), nn.Conv2d(4, 6, 1)
    assert conv_base(conv3) is nn.Conv3d and conv_base(conv2) is nn.Conv2d
    assert conv_base(OwnConv(4, 6, 1)) is None and conv_base(nn.ConvTranspose3d(4, 6, 1)) is None
    assert is_batchnorm_for(nn.BatchNorm3d(6), conv3) and is_batchnorm_for(nn.BatchNorm2d(6), conv2)
    assert is_batchnorm_for(nn.SyncBatchNorm(6), conv3) and is_batchnorm_for(nn.SyncBatchNorm(6), conv2)
    assert not is_batchnorm_for(nn.BatchNorm2d(6), conv3) and not is_batchnorm_for(nn.BatchNorm3d(6), conv2)
    assert not is_batchnorm_for(nn.BatchNorm3d(4), conv3)  # features of the conv's input
    assert not is_batchnorm_for(OwnBN(6), conv3) and not is_batchnorm_for(nn.BatchNorm3d(6), OwnConv(4, 6, 1))


# ---------------------------------------------------------------------------- bn_momentum
def test_bn_momentum_counts_training_batches_only():
    bn = nn.BatchNorm3d(3, momentum=0.3).eval()
    assert bn_momentum(bn) == 0.3 and bn.num_batches_tracked.item() == 0
    bn.train()
    assert [bn_momentum(bn) for _ in range(3)] == [0.3] * 3
    assert bn.num_batches_tracked.item() == 3
    bn.momentum = None
    bn.eval()
    assert bn_momentum(bn) == 0.0 and bn.num_batches_tracked.item() == 3


def test_bn_momentum_none_is_the_cumulative_average_on_the_device():
    """1 / num_batches_tracked, counting this batch, as a 0-dim tensor in the running statistics'
    dtype on their device (reading the count on the host would wait for the GPU)."""
    bn = nn.BatchNorm3d(3, momentum=None).train().double()
    for n in (1, 2, 3):
        factor = bn_momentum(bn)
        assert isinstance(factor, torch.Tensor) and factor.dim() == 0
        assert factor.dtype == torch.float64 and factor.device == bn.running_mean.device
        assert factor.item() == 1 / n and bn.num_batches_tracked.item() == n


def test_bn_momentum_without_running_statistics_counts_nothing():
    for momentum, expected in ((0.2, 0.2), (None, 0.0)):
        bn = nn.BatchNorm3d(3, momentum=momentum, track_running_stats=False).train()
        assert bn_momentum(bn) == expected and bn.num_batches_tracked is None
    bn = nn.BatchNorm3d(3).train()
    bn.track_running_stats = False  # buffers kept, but not updated: not counted either
    assert bn_momentum(bn) == 0.1 and bn.num_batches_tracked.item() == 0


def test_uses_batch_stats():
    bn = nn.BatchNorm3d(3)
    assert uses_batch_stats(bn.train()) and not uses_batch_stats(bn.eval())
    bn.running_mean = bn.running_var = None
    assert uses_batch_stats(bn)  # eval without running statistics normalises with the batch's
    assert uses_batch_stats(nn.BatchNorm3d(3, track_running_stats=False).eval())


# ---------------------------------------------------------------------------- configuration
def test_site_config_describes_a_conv2d_site_as_3d():
    conv, bn, act = _site(nn.SiLU(), nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(1, 2),
                                             dilation=(1, 2)), training=True)
    cfg, blocker = site_config(conv, bn, act)
    assert blocker is None
    assert (cfg.family, cfg.kernel_size, cfg.stride, cfg.padding, cfg.dilation) == (
        "spatial", (1, 3, 5), (1, 2, 1), (0, 1, 2), (1, 1, 2))
    assert (cfg.dtype, cfg.device_type, cfg.training, cfg.activation, cfg.residual,
            cfg.sync_stats) == (torch.float32, "cpu", True, "silu", False, False)
    cfg, _ = site_config(conv, bn.eval(), None, dtype=torch.float16, device="cuda")
    assert (cfg.dtype, cfg.device_type, cfg.training, cfg.activation) == (torch.float16, "cuda", False, None)
    assert site_geometry(conv) == ((1, 2, 1), (0, 1, 2), (1, 1, 2), None)


@pytest.mark.parametrize("conv,padding,blocker", [
    (nn.Conv3d(4, 4, (1, 3, 5), padding="same"), (0, 1, 2), None),
    (nn.Conv3d(4, 4, 3, padding="same", dilation=2), (2, 2, 2), None),
    (nn.Conv3d(4, 4, (3, 2, 3), padding="same"), (1, 1, 1), "asymmetric padding='same'"),
    (nn.Conv3d(4, 4, 3, padding="valid"), (0, 0, 0), None),
    (nn.Conv2d(4, 4, (3, 1), padding="same"), (0, 1, 0), None),
    (nn.Conv3d(4, 4, 3, padding=1, padding_mode="circular"), (1, 1, 1), "padding_mode='circular'"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (0, 1, 1), "padding_mode='reflect'"),
], ids=["same", "same-dilated", "same-even", "valid", "same-2d", "circular", "reflect-2d"])
def test_padding_strings_and_modes(conv, padding, blocker):
    """Padding as 3 ints (the output size is right even where the kernels cannot pad so), and a
    blocker where they cannot: non-zero padding modes, and 'same' with an even dilated extent."""
    _, geometry_padding, _, reason = site_geometry(conv)
    cfg, config_blocker = site_config(*_site(None, conv))
    assert geometry_padding == cfg.padding == padding
    assert reason == config_blocker == blocker


def test_hooks_block_a_site():
    conv, bn, act = _site(nn.ReLU())
    act.register_forward_pre_hook(lambda m, i: None)
    assert site_config(conv, bn, act)[1] == "hooks are registered on its modules"


def test_sync_group_spans_a_process_group_in_training_only(monkeypatch):
    """A SyncBatchNorm in training whose group has several ranks reduces over it; otherwise (one
    process, eval, a plain BatchNorm, a group of one) its statistics are local: ""."""
    conv, bn, act = _site(nn.ReLU(), training=True)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bn))[0]
    assert sync_group(sync) == ""  # no process group initialised: local, as nn.SyncBatchNorm
    monkeypatch.setattr(fused_site.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(fused_site.sync_stats, "group_name", lambda group: "group-of-two")
    world = {"size": 2}
    monkeypatch.setattr(fused_site.dist, "get_world_size", lambda group=None: world["size"])
    assert sync_group(sync) == "group-of-two" and sync_group(bn) == ""
    assert site_config(conv, sync, act)[0].sync_stats
    assert sync_group(sync.eval()) == ""
    sync.train()
    world["size"] = 1
    assert sync_group(sync) == ""


# ---------------------------------------------------------------------------- run_site: fused
ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu-inplace": lambda: nn.ReLU(inplace=True),
    "silu": nn.SiLU,
    "identity": nn.Identity,
    "none": lambda: None,
    "registered-swish": Swish,
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_eval_site_with_residual_matches_oracle(name):
    """Eval: one fused launch of act(bn(conv(x)) + residual) with the running statistics, which
    stay as they are (and no batch is counted)."""
    site = _site(ACTIVATIONS[name]())
    if name == "registered-swish":
        register_activation(site[2], "silu")
    x, residual = _x(), _x(2, 6, 2, 3, 3, seed=2)
    buffers = [b.clone() for b in site[1].buffers()]
    with r21d.use_backend("triton"), _launch.count() as counter, _launch.poisoned():
        y = run_site(*site, x, residual)
    assert _kernels(counter) == ["_pointwise_fwd_kernel"]
    ref = _modules(*_copies(site, torch.float64))(x.double(), residual.double())
    base = _modules(*_copies(site, torch.float32))(x, residual)
    assert_oracle_close(name, y, ref, torch.float32, base)
    for before, after in zip(buffers, site[1].buffers()):
        assert torch.equal(before, after)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["exponential", "cumulative"])
def test_training_site_matches_oracle_over_several_batches(momentum):
    """Training, three batches: the output, every gradient, the running statistics (exponential
    or cumulative average) and num_batches_tracked after each, against the same modules in
    float64 (bounded by twice the float32 modules' error)."""
    site = _site(nn.SiLU(), momentum=momentum, training=True)
    ref_site, base_site = _copies(site, torch.float64), _copies(site, torch.float32)
    for step in range(3):
        x = _x(2 + step, 5, 2, 3, 3, seed=step)  # the batch size changes too
        residual = _x(2 + step, 6, 2, 3, 3, seed=10 + step)
        grad_out = _x(2 + step, 6, 2, 3, 3, seed=20 + step)
        results = []
        for fused, modules, dtype in ((True, site, torch.float32),
                                      (False, ref_site, torch.float64),
                                      (False, base_site, torch.float32)):
            xi, ri = (t.to(dtype).clone().requires_grad_() for t in (x, residual))
            for m in modules[:2]:
                m.zero_grad()
            with r21d.use_backend("triton"), _launch.count() as counter, _launch.poisoned():
                y = run_site(*modules, xi, ri) if fused else _modules(*modules)(xi, ri)
                y.backward(grad_out.to(dtype))
            assert fused == ("_pointwise_dgrad_kernel" in counter.kernels)
            grads = {"x": xi.grad, "residual": ri.grad,
                     **{f"{i}.{n}": p.grad for i, m in enumerate(modules[:2])
                        for n, p in m.named_parameters()}}
            results.append((y, grads, dict(modules[1].named_buffers())))
        (y, grads, buffers), (ref, ref_grads, ref_buffers), (base, base_grads, base_buffers) = results
        assert_oracle_close(f"step {step} out", y, ref, torch.float32, base)
        for key, g in ref_grads.items():
            assert_oracle_close(f"step {step} grad {key}", grads[key], g, torch.float32, base_grads[key])
        for key in ("running_mean", "running_var"):
            assert_oracle_close(f"step {step} {key}", buffers[key], ref_buffers[key], torch.float32,
                                base_buffers[key])
        assert buffers["num_batches_tracked"].item() == step + 1


def test_conv2d_site_in_training_with_residual_matches_oracle():
    """A Conv2d site runs as a 3D one with T = 1: 4-D input, residual and output."""
    site = _site(nn.ReLU(), nn.Conv2d(5, 6, 1), training=True)
    ref_site, base_site = _copies(site, torch.float64), _copies(site, torch.float32)
    x, residual = _x(3, 5, 3, 4), _x(3, 6, 3, 4, seed=2)
    with r21d.use_backend("triton"), _launch.count() as counter:
        y = run_site(*site, x, residual)
    assert "_pointwise_fwd_kernel" in counter.kernels
    ref = _modules(*ref_site)(x.double(), residual.double())
    assert y.shape == (3, 6, 3, 4)
    assert_oracle_close("conv2d out", y, ref, torch.float32, _modules(*base_site)(x, residual))
    assert_oracle_close("running_var", site[1].running_var, ref_site[1].running_var, torch.float32,
                        base_site[1].running_var)


def test_padding_same_runs_fused_with_its_symmetric_padding():
    site = _site(nn.ReLU(), nn.Conv3d(5, 6, (1, 3, 3), padding="same"))
    x = _x(1, 5, 2, 4, 3)
    with r21d.use_backend("triton"), _launch.count() as counter:
        y = run_site(*site, x)
    assert _kernels(counter) == ["_igemm_fwd_kernel"]
    assert_oracle_close("same", y, _modules(*_copies(site, torch.float64))(x.double()), torch.float32)


# ---------------------------------------------------------------------------- run_site: torch path
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_path_is_the_modules_themselves(backend):
    """On the torch backend (and auto on the CPU) run_site calls the modules: the same bits,
    buffers and batch count as calling them, residual added before the activation."""
    site = _site(nn.ReLU(inplace=True), momentum=None, training=True)
    plain = _copies(site, torch.float32)
    for step in range(2):
        x, residual = _x(seed=step), _x(2, 6, 2, 3, 3, seed=5 + step)
        with r21d.use_backend(backend), _launch.count() as counter:
            y = run_site(*site, x, residual)
        assert counter.launches == 0
        assert torch.equal(y, _modules(*plain)(x, residual))
        for (name, a), b in zip(site[1].named_buffers(), plain[1].buffers()):
            assert torch.equal(a, b), name


def test_a_blocked_site_warns_and_runs_the_modules(monkeypatch):
    """A padding mode the kernels cannot express: under R21D_STRICT=1 an error, otherwise the
    one-time warning and the modules' own result."""
    site = _site(nn.SiLU(), nn.Conv3d(5, 6, 3, padding=1, padding_mode="replicate"))
    x = _x()
    with r21d.use_backend("triton"), pytest.raises(r21d.FusedKernelUnavailable,
                                                   match="padding_mode='replicate'"):
        run_site(*site, x)
    monkeypatch.delenv("R21D_STRICT")
    with r21d.use_backend("triton"), _launch.count() as counter, \
            pytest.warns(r21d.FallbackWarning, match="padding_mode='replicate'"):
        y = run_site(*site, x)
    assert counter.launches == 0
    assert torch.equal(y, _modules(*site)(x))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_unsupported_activation_is_refused_before_counting_a_batch(backend):
    """Refused on every backend alike (a model must not run on one and fail on another), before
    the BN counts the batch."""
    site = _site(nn.GELU(), training=True)
    with r21d.use_backend(backend), pytest.raises(ValueError, match="unsupported activation module GELU"):
        run_site(*site, _x())
    assert site[1].num_batches_tracked.item() == 0


@pytest.mark.parametrize("conv,shape,match", [
    (nn.Conv3d(5, 6, 1), (5, 2, 3, 3), "x must have rank 5"),  # unbatched
    (nn.Conv3d(5, 6, 1), (1, 2, 5, 2, 3, 3), "x must have rank 5"),
    (nn.Conv2d(5, 6, 1), (2, 5, 2, 3, 3), "expects a 4-D input"),
    (nn.Conv2d(5, 6, 1), (5, 3, 3), "expects a 4-D input"),
], ids=["3d-rank4", "3d-rank6", "2d-rank5", "2d-rank3"])
def test_wrong_rank_input_is_refused(conv, shape, match):
    site = _site(nn.ReLU(), conv, training=True)
    with r21d.use_backend("triton"), pytest.raises(ValueError, match=match):
        run_site(*site, torch.randn(*shape))
    assert site[1].num_batches_tracked.item() == 0


def test_wrong_residual_is_refused():
    site = _site(nn.ReLU())
    with r21d.use_backend("triton"), pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 6, 2, 3, 3\)"):
        run_site(*site, _x(), _x(2, 5, 2, 3, 3))
    with r21d.use_backend("triton"), pytest.raises(TypeError, match="residual must be a floating-point tensor"):
        run_site(*site, _x(), torch.ones(2, 6, 2, 3, 3, dtype=torch.int32))


def test_training_with_removed_running_statistics_and_cumulative_momentum():
    """nn.BatchNorm normalises with the batch's statistics and counts the batch when its running
    statistics are set to None in training (track_running_stats left True); momentum=None then
    has nothing to average."""
    site = _site(nn.ReLU(), momentum=None, training=True)
    site[1].running_mean = site[1].running_var = None
    plain = _copies(site, torch.float64)
    x = _x()
    with r21d.use_backend("triton"):
        y = run_site(*site, x)
    assert_oracle_close("out", y, _modules(*plain)(x.double()), torch.float32)
    assert site[1].num_batches_tracked.item() == plain[1].num_batches_tracked.item() == 1
