"""The fused (2+1)D unit (r21d.fused_unit, r21d.triton_kernels.conv2plus1d) against the float64
oracle: the same modules run in float64 on the torch path.

Eval (inference) runs one kernel with the intermediate kept on chip; training runs two chained
implicit GEMMs with the intermediate's BN + ReLU in the temporal conv's prologue; gradients through
an eval-mode unit run its two fused sites. On the CPU the kernels run in the Triton interpreter (fp32, fp16)
on tiny odd shapes; on a GPU (``-m gpu``) also in bf16 and on r2plus1d_18's units, where the bound
is twice cuDNN's own error. Strict mode throughout: a fallback would raise.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import r21d
from r21d.fused_unit import run_unit
from r21d.triton_kernels import _launch, conv2plus1d
from tests.utils import DEVICE_DTYPES, assert_module_matches_float64, assert_oracle_close, gpu

pytestmark = pytest.mark.usefixtures("strict")


@dataclasses.dataclass(frozen=True)
class Unit:
    """A (2+1)D unit: spatial conv (1, kh, kw) stride (1, sh, sw) padding (0, ph, pw), BN, ReLU,
    temporal conv (kt, 1, 1) stride (st, 1, 1) padding (pt, 0, 0), BN [+ residual], activation."""

    C_in: int = 5
    C_mid: int = 7
    C_out: int = 9
    N: int = 2
    T: int = 3
    H: int = 5
    W: int = 4
    kernel: tuple = (3, 3, 3)  # (kt, kh, kw)
    stride: tuple = (1, 1, 1)  # (st, sh, sw)
    padding: tuple = (1, 1, 1)  # (pt, ph, pw)
    bias: bool = False
    affine: bool = True
    residual: bool = False
    activation: str | None = "relu"
    layout: str = "cl3d"

    def modules(self, seed: int = 0):
        """(spatial, bn1, relu, temporal, bn2, act), eval mode, random weights and statistics."""
        torch.manual_seed(seed)
        (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = self.kernel, self.stride, self.padding
        spatial = nn.Conv3d(self.C_in, self.C_mid, (1, kh, kw), (1, sh, sw), (0, ph, pw), bias=self.bias)
        temporal = nn.Conv3d(self.C_mid, self.C_out, (kt, 1, 1), (st, 1, 1), (pt, 0, 0), bias=self.bias)
        bn1 = nn.BatchNorm3d(self.C_mid, affine=self.affine)
        bn2 = nn.BatchNorm3d(self.C_out, affine=self.affine)
        for bn in (bn1, bn2):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            if self.affine:
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.normal_(0, 0.5)
        act = {"relu": nn.ReLU(), "silu": nn.SiLU(), None: None}[self.activation]
        mods = [spatial, bn1, nn.ReLU(), temporal, bn2, act]
        for m in mods:
            if m is not None:
                m.eval()
        return mods

    def output_shape(self):
        (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = self.kernel, self.stride, self.padding
        return (self.N, self.C_out, (self.T + 2 * pt - kt) // st + 1, (self.H + 2 * ph - kh) // sh + 1,
                (self.W + 2 * pw - kw) // sw + 1)

    def inputs(self, dtype, device, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        fmt = torch.channels_last_3d if self.layout == "cl3d" else torch.contiguous_format
        x = torch.randn(self.N, self.C_in, self.T, self.H, self.W, generator=g)
        r = torch.randn(self.output_shape(), generator=g) if self.residual else None
        return tuple(t.to(device, dtype).contiguous(memory_format=fmt) if t is not None else None
                     for t in (x, r))


def _to(mods, dtype, device, fmt=torch.channels_last_3d):
    """Copies of the modules in ``dtype`` on ``device``, conv weights in ``fmt``; BN stays fp32
    as under autocast-free mixed precision (the kernels take either)."""
    out = []
    for m in mods:
        if m is None:
            out.append(None)
            continue
        m = copy.deepcopy(m).to(device)
        if isinstance(m, nn.Conv3d):
            m = m.to(dtype=dtype, memory_format=fmt)
        out.append(m)
    return out


def _run(backend, mods, x, residual):
    with r21d.use_backend(backend), torch.no_grad():
        return run_unit(*mods, x, residual)


def _reference(unit: Unit, mods, x, residual):
    m64 = [copy.deepcopy(m).double() if m is not None else None for m in mods]
    r64 = residual.double() if residual is not None else None
    return _run("torch", m64, x.double().cpu(), r64.cpu() if r64 is not None else None)


UNITS = {
    "r2plus1d-like-aligned": Unit(C_in=16, C_mid=24, C_out=16, T=4, H=5, W=6),
    "odd-channels-residual": Unit(residual=True),
    "downsample-stride2": Unit(C_in=8, C_mid=18, C_out=12, T=5, H=7, W=6, stride=(2, 2, 2)),
    "T1": Unit(T=1, N=3, H=3, W=3),
    "stem-1x7x7-stride2": Unit(C_in=3, C_mid=10, C_out=8, N=1, T=3, H=9, W=9, kernel=(3, 7, 7),
                               stride=(1, 2, 2), padding=(1, 3, 3)),
    "kt2-no-padding-bias-silu": Unit(kernel=(2, 3, 3), padding=(0, 1, 1), bias=True, T=4,
                                     activation="silu"),
    "kt5-stride2-no-affine": Unit(kernel=(5, 3, 3), stride=(2, 1, 1), padding=(2, 1, 1), T=6,
                                  affine=False, activation=None),
    "kt1-pointwise-temporal": Unit(kernel=(1, 3, 3), padding=(0, 1, 1), residual=True),
    "ncdhw": Unit(layout="ncdhw", bias=True),
}


@pytest.mark.parametrize("name", list(UNITS))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_eval_unit_matches_oracle(device, dtype, name):
    unit = UNITS[name]
    mods = unit.modules()
    x, residual = unit.inputs(dtype, device)
    fused = _to(mods, dtype, device)
    with _launch.count() as counter, _launch.poisoned():
        y = _run("triton", fused, x, residual)
    assert counter.kernels.count("_unit_eval_kernel") == 1, counter.kernels
    ref = _reference(unit, mods, x, residual)
    base = _run("torch", fused, x, residual) if device == "cuda" else None
    assert_oracle_close(name, y, ref, dtype, base)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) == (unit.layout == "cl3d")


def test_one_program_walks_every_frame(monkeypatch):
    """With the frames not split across programs, each program rotates its output accumulators
    over all T frames (the default splits tiny interpreter problems down to one frame each)."""
    monkeypatch.setattr(conv2plus1d, "_TARGET_PROGRAMS", 1)
    for name in ("odd-channels-residual", "downsample-stride2", "kt5-stride2-no-affine",
                 "kt2-no-padding-bias-silu"):
        unit = dataclasses.replace(UNITS[name], T=7)
        mods = unit.modules()
        x, residual = unit.inputs(torch.float32, "cpu")
        with _launch.capture() as launches:
            _run("triton", _to(mods, torch.float32, "cpu"), x, residual)
        (unit_launch,) = launches
        assert unit_launch.grid(unit_launch.kwargs)[1] == 1  # one run of frames per program
        y = _run("triton", _to(mods, torch.float32, "cpu"), x, residual)
        assert_oracle_close(name, y, _reference(unit, mods, x, residual), torch.float32)


def test_eval_unit_is_one_launch_allocating_only_its_output():
    """The structural fusion check (docs/testing.md): no intermediate tensor exists."""
    unit = UNITS["r2plus1d-like-aligned"]
    mods = _to(unit.modules(), torch.float32, "cpu")
    x, _ = unit.inputs(torch.float32, "cpu")
    with _launch.count() as counter:
        y = _run("triton", mods, x, None)
    assert counter.launches == 1 and counter.allocations == 1, counter
    assert counter.kernels == ["_unit_eval_kernel"]
    assert y.shape == unit.output_shape()


def _fp32_modules(unit: Unit):
    return _to(unit.modules(), torch.float32, "cpu")


def _forward_backward(backend, mods, x, residual, grad_out):
    """The unit's output, the gradients of x, the residual and every parameter, and every
    buffer after one forward + backward on ``backend``."""
    x = x.detach().clone().requires_grad_()
    residual = residual.detach().clone().requires_grad_() if residual is not None else None
    with r21d.use_backend(backend):
        y = run_unit(*mods, x, residual)
    y.backward(torch.empty_like(y).copy_(grad_out))  # in y's memory format
    grads = {"x": x.grad, **({"residual": residual.grad} if residual is not None else {})}
    buffers = {}
    for i, m in enumerate(mods):
        if m is not None:
            grads.update({f"{i}.{n}": p.grad for n, p in m.named_parameters()})
            buffers.update({f"{i}.{n}": b for n, b in m.named_buffers()})
    return y, grads, buffers


def _check_training(name, unit, dtype, device, mods=None):
    """The unit in training mode against the same modules in float64 on the torch path (and the
    torch path in ``dtype``, whose error doubled bounds ours): the output, every gradient, the
    running statistics and batch counts. Returns the launch counter of the fused forward."""
    mods = mods or unit.modules()
    for m in mods:
        if m is not None:
            m.train()
    x, residual = unit.inputs(dtype, device)
    grad_out = torch.randn(unit.output_shape(), dtype=torch.float64)
    fused = _to(mods, dtype, device)
    with _launch.count() as counter, _launch.poisoned():
        y, grads, buffers = _forward_backward("triton", fused, x, residual, grad_out.to(device))
    m64 = [copy.deepcopy(m).double() if m is not None else None for m in mods]
    r64 = residual.double().cpu() if residual is not None else None
    ref, ref_grads, ref_buffers = _forward_backward("torch", m64, x.double().cpu(), r64, grad_out)
    base, base_grads, base_buffers = _forward_backward("torch", _to(mods, dtype, device), x,
                                                       residual, grad_out.to(device))
    assert_oracle_close(f"{name} out", y, ref, dtype, base)
    assert grads.keys() == ref_grads.keys()
    for key, g in ref_grads.items():
        assert_oracle_close(f"{name} grad {key}", grads[key], g, dtype, base_grads[key])
    for key, b in ref_buffers.items():
        if b.dtype == torch.long:  # num_batches_tracked
            assert torch.equal(buffers[key].cpu(), b), key
        else:  # float32 statistics of a conv output computed in ``dtype``
            assert_oracle_close(f"{name} {key}", buffers[key], b, torch.float32,
                                base_buffers[key])
    return counter


# The training unit's forward: the spatial conv's statistics only, the temporal conv (BN1 + ReLU
# in its prologue) and its statistics, then the one normalise pass, of the output.
TRAIN_FORWARD = ["_igemm_fwd_kernel", "_bn_stats_finalize_kernel", "_igemm_fwd_kernel",
                 "_bn_stats_finalize_kernel", "_bn_act_normalize_kernel"]


@pytest.mark.parametrize("name", list(UNITS))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_training_unit_matches_oracle(device, dtype, name):
    """Training runs the unit as two chained implicit GEMMs with the intermediate's BN + ReLU
    applied in the temporal conv's prologue (forward and wgrad), never normalised in memory."""
    counter = _check_training(name, UNITS[name], dtype, device)
    forward = counter.kernels[:counter.kernels.index("_bn_act_normalize_kernel") + 1]
    if UNITS[name].layout == "cl3d":
        assert "relayout" not in counter.kernels, counter.kernels
    else:  # NCDHW is converted at the unit's boundary (x in, the output out), not between
        forward = [k for k in forward if k != "relayout"]
    assert forward == TRAIN_FORWARD, counter.kernels


def test_training_unit_writes_the_intermediate_once():
    """The structural check of the training unit: the forward allocates one tensor of the
    intermediate's shape (z1, kept for backward) where two sites allocate two (z1 and its
    normalised copy), and launches no normalise pass between the convs."""
    unit = UNITS["odd-channels-residual"]
    mid = (unit.N, unit.C_mid, unit.T, unit.H, unit.W)
    mods = _fp32_modules(unit)
    for m in mods:
        m.train()
    x, residual = unit.inputs(torch.float32, "cpu")
    with r21d.use_backend("triton"), _launch.count() as counter:
        y = run_unit(*mods, x.requires_grad_(), residual)
    assert counter.kernels == TRAIN_FORWARD
    assert counter.shapes.count(mid) == 1, counter.shapes
    with _launch.count() as counter:
        y.backward(torch.randn_like(y))
    # the gradient of the normalised intermediate (the temporal dgrad's output) is the one
    # intermediate-shaped tensor backward allocates; relu(bn1(z1)) is recomputed as it is loaded
    assert counter.shapes.count(mid) == 1, counter.shapes
    assert "relayout" not in counter.kernels


def test_training_unit_without_running_stats_and_cumulative_momentum():
    """nn.BatchNorm's variants: track_running_stats=False normalises with batch statistics and
    keeps none; momentum=None averages cumulatively (num_batches_tracked counts each call)."""
    unit = Unit(C_in=6, C_mid=10, C_out=8, T=4, H=4, W=3, stride=(2, 1, 1))
    mods = unit.modules()
    mods[1].track_running_stats = False
    mods[1].running_mean = mods[1].running_var = mods[1].num_batches_tracked = None
    mods[4].momentum = None
    for _ in range(2):
        _check_training("variants", unit, torch.float32, "cpu", mods)
        mods[4].num_batches_tracked.add_(1)  # the reference's copy counted the call, not mods


def test_eval_with_gradients_runs_the_two_fused_sites():
    """Gradients through an eval-mode unit (frozen BN fine-tuning) run it as its two
    implicit-GEMM sites, with every gradient of the plain modules in float64."""
    unit = Unit(C_in=6, C_mid=10, C_out=8, T=3, H=4, W=4, bias=True, stride=(2, 1, 1))
    mods = unit.modules()
    x, _ = unit.inputs(torch.float32, "cpu")
    grad_out = torch.randn(unit.output_shape(), dtype=torch.float64)
    with _launch.count() as counter:
        y, grads, _ = _forward_backward("triton", _fp32_modules(unit), x, None, grad_out)
    assert "_unit_eval_kernel" not in counter.kernels
    assert counter.kernels.count("_igemm_fwd_kernel") == 2
    m64 = [copy.deepcopy(m).double() if m is not None else None for m in mods]
    ref, ref_grads, _ = _forward_backward("torch", m64, x.double(), None, grad_out)
    assert_oracle_close("out", y, ref, torch.float32)
    for key, g in ref_grads.items():
        assert_oracle_close(f"grad {key}", grads[key], g, torch.float32)


def test_uncovered_unit_raises_in_strict_mode_and_otherwise_runs_two_sites(monkeypatch):
    """ceil(kt / st) > 3 open output frames: the one-kernel path refuses (strict), or warns and
    runs the unit as its two fused sites."""
    unit = Unit(kernel=(4, 3, 3), padding=(1, 1, 1), T=5)
    mods = _fp32_modules(unit)
    x, _ = unit.inputs(torch.float32, "cpu")
    with pytest.raises(r21d.FusedKernelUnavailable, match="output frames open"):
        _run("triton", mods, x, None)
    monkeypatch.delenv("R21D_STRICT")
    with pytest.warns(r21d.FallbackWarning, match="two fused sites"), _launch.count() as counter:
        y = _run("triton", mods, x, None)
    assert counter.kernels.count("_igemm_fwd_kernel") == 2
    assert_oracle_close("out", y, _reference(unit, unit.modules(), x, None), torch.float32)


def test_wide_unit_runs_two_sites_by_design():
    """128 output channels from 64 inputs: recomputing the spatial conv for a second 64-channel
    output block costs more than the intermediate's round trip, so the unit runs as two fused
    sites (no warning, even in strict mode) and the report says why."""
    unit = Unit(C_in=64, C_mid=16, C_out=128, N=1, T=1, H=2, W=2)
    mods = _fp32_modules(unit)
    x, _ = unit.inputs(torch.float32, "cpu")
    with _launch.count() as counter:
        y = _run("triton", mods, x, None)
    assert counter.kernels.count("_igemm_fwd_kernel") == 2 and "_unit_eval_kernel" not in counter.kernels
    assert_oracle_close("out", y, _reference(unit, unit.modules(), x, None), torch.float32)
    model = nn.Sequential(nn.Sequential(*mods[:4]), mods[4], mods[5])
    (row,) = r21d.fusion_sites(r21d.fuse(model), device="cuda")
    assert row.kernel == "spatial+temporal" and "recompute" in row.note, row


def _eval_cl3d(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with random running statistics, channels_last_3d weights."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval().to(memory_format=torch.channels_last_3d)


def _check_one_kernel(name: str, fused: nn.Module, plain: nn.Module, x_shape) -> None:
    """``fused`` runs one unit kernel and matches ``plain`` run in float64."""
    x = torch.randn(*x_shape).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        with r21d.use_backend("torch"):
            ref = copy.deepcopy(plain).double()(x.double())
        with r21d.use_backend("triton"), _launch.count() as counter:
            y = fused(x)
    assert counter.kernels == ["_unit_eval_kernel"]
    assert_oracle_close(name, y, ref, torch.float32)


def test_spatiotemporal_conv_eval_runs_one_kernel_and_matches_plain_pytorch():
    m = _eval_cl3d(r21d.SpatioTemporalConv(6, 10, 3, stride=(1, 2, 2), padding=1))
    _check_one_kernel("SpatioTemporalConv", m, m, (2, 6, 4, 7, 7))


class _Block(nn.Module):
    """torchvision's BasicBlock conv1 layout: Sequential(Conv2Plus1D, BN, ReLU)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.video.resnet import Conv2Plus1D

        self.conv1 = nn.Sequential(Conv2Plus1D(6, 8, 10, stride=1), nn.BatchNorm3d(8), nn.ReLU())

    def forward(self, x):
        return self.conv1(x)


def test_fuse_runs_torchvision_conv2plus1d_and_its_parents_bn_relu_as_one_unit():
    model = _eval_cl3d(_Block())
    fused = r21d.fuse(model)
    assert fused.state_dict().keys() == model.state_dict().keys()
    report = r21d.fusion_report(fused, device="cuda")
    assert "(2+1)D unit" in report and "conv2plus1d" in report, report
    _check_one_kernel("fused block", fused, model, (2, 6, 3, 5, 5))
    assert type(r21d.unfuse(fused).conv1) is nn.Sequential


def test_fuse_trains_torchvision_conv2plus1d_block_as_the_training_unit():
    """In training, the fused Conv2Plus1D + parent BN/ReLU runs the chained training unit; its
    output, input gradient, parameter gradients and running statistics match the plain block."""
    model = _eval_cl3d(_Block()).train()
    fused = r21d.fuse(model)
    (row,) = r21d.fusion_sites(fused, device="cuda")
    assert (row.kernel, row.backend) == ("conv2plus1d-train", "triton"), row
    x = torch.randn(2, 6, 3, 5, 5).contiguous(memory_format=torch.channels_last_3d)
    counter = assert_module_matches_float64(fused, model, x)
    assert counter.kernels[:len(TRAIN_FORWARD)] == TRAIN_FORWARD


def test_fuse_runs_torchvision_r2plus1d_stem_as_one_unit():
    """R2Plus1dStem writes the unit out (1x7x7 conv, BN, ReLU, 3x1x1 conv, BN, ReLU)."""
    from torchvision.models.video.resnet import R2Plus1dStem

    stem = _eval_cl3d(R2Plus1dStem())
    fused = r21d.fuse(stem)
    (row,) = r21d.fusion_sites(fused, device="cuda")
    assert (row.site, row.kernel, row.backend) == ("<root>[0:6]", "conv2plus1d", "triton"), row
    _check_one_kernel("fused stem", fused, stem, (1, 3, 2, 9, 9))


# ---------------------------------------------------------------------------- GPU

# r2plus1d_18's (2+1)D units at batch 2 (the shapes of docs/benchmarks.md at a smaller batch).
R2PLUS1D_UNITS = {
    "layer1-64-144-64": Unit(C_in=64, C_mid=144, C_out=64, N=2, T=16, H=56, W=56),
    "layer2-down-64-230-128": Unit(C_in=64, C_mid=230, C_out=128, N=2, T=16, H=56, W=56,
                                   stride=(2, 2, 2)),
    "layer3-256-576-256": Unit(C_in=256, C_mid=576, C_out=256, N=2, T=4, H=14, W=14,
                               residual=True),
    "layer4-down-256-921-512": Unit(C_in=256, C_mid=921, C_out=512, N=2, T=4, H=14, W=14,
                                    stride=(2, 2, 2)),
    "stem-3-45-64": Unit(C_in=3, C_mid=45, C_out=64, N=2, T=16, H=112, W=112, kernel=(3, 7, 7),
                         stride=(1, 2, 2), padding=(1, 3, 3)),
}


@pytest.mark.parametrize("name", [gpu(n, id=n) for n in R2PLUS1D_UNITS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_r2plus1d_units_match_cudnn(name, dtype):
    unit = R2PLUS1D_UNITS[name]
    mods = unit.modules()
    x, residual = unit.inputs(dtype, "cuda")
    fused = _to(mods, dtype, "cuda")
    spatial, bn1, _, temporal, bn2, _ = fused
    # the kernel itself (run_unit sends the wider units to the two sites), then run_unit
    y = conv2plus1d.unit_eval(
        x, spatial.weight, None, bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, bn1.eps,
        temporal.weight, None, bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, bn2.eps,
        residual, spatial.stride[1:], spatial.padding[1:], temporal.stride[0],
        temporal.padding[0], "relu")
    ref = _reference(unit, mods, x.cpu(), residual.cpu() if residual is not None else None)
    base = _run("torch", fused, x, residual)
    assert_oracle_close(name, y, ref, dtype, base)
    assert_oracle_close(name, _run("triton", fused, x, residual), ref, dtype, base)


@pytest.mark.parametrize("name", [gpu(n, id=n) for n in ("layer1-64-144-64", "layer3-256-576-256")])
def test_r2plus1d_training_units_match_cudnn(name):
    """The training unit on r2plus1d_18 shapes in bf16: output, every gradient and the running
    statistics within twice cuDNN's error against float64."""
    counter = _check_training(name, R2PLUS1D_UNITS[name], torch.bfloat16, "cuda")
    assert counter.kernels[:len(TRAIN_FORWARD)] == TRAIN_FORWARD
