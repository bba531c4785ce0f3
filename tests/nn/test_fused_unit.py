"""r21d.fused_unit on its own: which module layouts are a (2+1)D unit (``unit_children``,
``inline_unit``), how a unit would run and why not as one of its kernels (``choose_unit``,
``_unit_reason``, ``recompute_reason`` at its threshold), and what ``run_unit`` does in the cases
that are not the unit kernels' own: BNs in different modes, a middle activation other than ReLU,
eval-mode BNs without running statistics, a residual the kernels do not take, and bad input.

Pure Python where the choice is all there is; kernels in the interpreter, strict, on tiny units
otherwise, against the same modules in float64 on the torch path. Covered elsewhere, not
repeated here: the eval and training unit kernels against the oracle on odd shapes, their launches
and allocations, gradients through an eval unit, momentum=None and track_running_stats=False in
training, the open-frames fallback at run time and the wide unit's report
(tests/kernels/test_conv2plus1d.py); the unit's plan and what replans it
(tests/nn/test_site_plan.py); SyncBatchNorm units across ranks (tests/ops/test_distributed.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import r21d
from r21d import fused_unit
from r21d.fused_unit import (
    FLOPS_PER_BYTE,
    UNIT_BLOCK_N,
    UNIT_KERNEL,
    UNIT_TRAIN_KERNEL,
    UnitChoice,
    choose_unit,
    inline_unit,
    recompute_reason,
    run_unit,
    unit_children,
)
from r21d.triton_kernels import _launch
from tests.utils import assert_oracle_close, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("strict")


def _unit(c_in=3, c_mid=5, c_out=4, kt=3, st=1, mid=nn.ReLU, act=nn.ReLU, seed=0):
    """[spatial 1x3x3, bn1, mid, temporal kt x1x1 stride st, bn2, act] in eval mode, BNs away from
    their defaults."""
    torch.manual_seed(seed)
    mods = [nn.Conv3d(c_in, c_mid, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(c_mid),
            mid(), nn.Conv3d(c_mid, c_out, (kt, 1, 1), (st, 1, 1), (1, 0, 0), bias=False),
            nn.BatchNorm3d(c_out), act() if act is not None else None]
    randomize_batchnorm(nn.Sequential(mods[1], mods[4]), seed)
    return [m.eval() if m is not None else None for m in mods]


def _x(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(shape or (2, 3, 3, 4, 4)), generator=g)


def _plain(mods, x, residual=None):
    """The unit's modules, one after another (the torch path)."""
    spatial, bn1, mid, temporal, bn2, act = mods
    y = bn2(temporal(mid(bn1(spatial(x)))))
    y = y if residual is None else y + residual
    return act(y) if act is not None else y


def _copies(mods, dtype=torch.float64):
    return [copy.deepcopy(m).to(dtype) if m is not None else None for m in mods]


def _kernels(counter):
    return [k for k in counter.kernels if k != "relayout"]


# ---------------------------------------------------------------------------- which layouts
def test_unit_children_is_torchvision_s_conv2plus1d_layout():
    resnet = pytest.importorskip("torchvision.models.video.resnet")
    tv = resnet.Conv2Plus1D(3, 4, 5)
    assert unit_children(tv) == tuple(tv)
    spatial, bn1, relu, temporal, _, _ = _unit()
    assert unit_children(nn.Sequential(spatial, bn1, relu, temporal)) == (spatial, bn1, relu, temporal)
    for parts in (
        (spatial, bn1, relu),  # three children
        (spatial, bn1, nn.SiLU(), temporal),  # the unit kernels apply ReLU in the middle
        (spatial, bn1, nn.GELU(), temporal),  # unsupported: None, not an error
        (spatial, nn.BatchNorm3d(4), relu, temporal),  # a BN of other features
        (spatial, bn1, relu, nn.Conv3d(4, 4, (3, 1, 1))),  # the temporal conv takes 4 channels
        (nn.Conv3d(3, 5, 3), bn1, relu, temporal),  # not 1xkxk
        (spatial, bn1, relu, nn.Conv3d(5, 4, (3, 3, 1))),  # not kx1x1
        (nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), relu, temporal),
    ):
        assert unit_children(nn.Sequential(*parts)) is None, parts
    assert unit_children(nn.ModuleList([spatial, bn1, relu, temporal])) is None


def test_inline_unit_is_r2plus1d_stem_s_layout():
    """Five children written out (1xkxk conv with k > 1, BN, ReLU, tx1x1 conv with t > 1, BN)."""
    spatial, bn1, relu, temporal, bn2, act = _unit()
    children = [nn.Identity(), spatial, bn1, relu, temporal, bn2, act]
    assert inline_unit(children, 1) == (spatial, bn1, relu, temporal, bn2)
    assert inline_unit(children, 0) is None
    assert inline_unit(children, 3) is None  # runs past the end
    assert inline_unit([spatial, bn1, relu, temporal, nn.BatchNorm3d(5)], 0) is None
    pointwise = nn.Conv3d(3, 5, 1, bias=False)
    assert inline_unit([pointwise, bn1, relu, temporal, bn2], 0) is None
    frame = nn.Conv3d(5, 4, 1, bias=False)
    assert inline_unit([spatial, bn1, relu, frame, bn2], 0) is None


# ---------------------------------------------------------------------------- how a unit runs
def test_recompute_reason_at_its_threshold():
    """The one kernel recomputes the spatial conv per UNIT_BLOCK_N output channels; it pays while
    the extra FLOPs per intermediate element stay within FLOPS_PER_BYTE x its 4 bytes' round trip
    (2 * C_in * kh * kw FLOPs per extra block)."""
    c_in = FLOPS_PER_BYTE * 2 * 2 // 2  # a 1x1 spatial conv at the threshold
    narrow = nn.Conv3d(c_in, 4, 1)
    assert recompute_reason(narrow, nn.Conv3d(4, UNIT_BLOCK_N + 1, 1)) is None
    assert recompute_reason(nn.Conv3d(c_in + 1, 4, 1), nn.Conv3d(4, UNIT_BLOCK_N, 1)) is None  # one block
    reason = recompute_reason(nn.Conv3d(c_in + 1, 4, 1), nn.Conv3d(4, UNIT_BLOCK_N + 1, 1))
    assert reason == (f"{UNIT_BLOCK_N + 1} output channels: the one kernel would recompute the "
                      "spatial conv 2 times; writing the intermediate once costs less")
    assert "3 times" in recompute_reason(nn.Conv3d(64, 4, (1, 3, 3)), nn.Conv3d(4, 2 * UNIT_BLOCK_N + 1, 1))


def _choice(mods, training=False, **kwargs) -> UnitChoice:
    for m in mods:
        if m is not None:
            m.train(training)
    return choose_unit(*mods, **kwargs)


def test_choose_unit_per_mode_and_backend():
    mods = _unit()
    assert _choice(mods) == UnitChoice("sites", "the torch backend runs its spatial conv")  # auto, CPU
    assert _choice(mods, device="cuda") == UnitChoice(UNIT_KERNEL, None)  # auto, GPU
    assert _choice(mods, training=True, device="cuda") == UnitChoice(UNIT_TRAIN_KERNEL, None)
    with r21d.use_backend("triton"):
        assert _choice(mods, residual=True) == UnitChoice(UNIT_KERNEL, None)
        assert _choice(mods, training=True) == UnitChoice(UNIT_TRAIN_KERNEL, None)
        assert "no bf16 arithmetic" in _choice(mods, dtype=torch.bfloat16).reason
        # _unit_reason: the same question for a dtype and device of the caller's
        assert fused_unit._unit_reason(*mods, torch.float16, "cpu", True) is None
        assert "not torch.float64" in fused_unit._unit_reason(*mods, torch.float64, "cpu", False)
    with r21d.use_backend("cuda"):
        assert _choice(mods, device="cuda").reason == "the cuda backend has no spatial kernel yet"


def test_choose_unit_reasons_to_run_two_sites():
    with r21d.use_backend("triton"):
        mixed = _unit()
        mixed[1].train()
        assert "one BN normalises with batch statistics" in choose_unit(*mixed).reason
        assert "apply ReLU between the convs" in _choice(_unit(mid=nn.SiLU)).reason
        four = _unit(kt=4)
        assert "at most 3 output frames open" in _choice(four).reason
        assert _choice(four, training=True) == UnitChoice(UNIT_TRAIN_KERNEL, None)
        wide = _unit(c_in=64, c_mid=4, c_out=2 * UNIT_BLOCK_N)
        assert "recompute the spatial conv 2 times" in _choice(wide).reason
        assert _choice(wide, training=True) == UnitChoice(UNIT_TRAIN_KERNEL, None)  # eval only
        reflect = _unit()
        reflect[0].padding_mode = "reflect"
        assert "padding_mode='reflect'" in _choice(reflect).reason
        hooked = _unit()
        hooked[4].register_forward_hook(lambda m, i, o: None)
        assert "hooks are registered" in _choice(hooked).reason


def test_choose_unit_needs_both_bns_over_the_same_process_group(monkeypatch):
    mods = _unit()
    monkeypatch.setattr(fused_unit, "sync_group", lambda bn: "pair" if bn is mods[1] else "")
    with r21d.use_backend("triton"):
        assert "different process groups" in _choice(mods, training=True).reason


# ---------------------------------------------------------------------------- run_unit
def test_eval_without_running_statistics_runs_the_training_unit():
    """Eval-mode BNs with no running statistics normalise with the batch's, as nn.BatchNorm does:
    the chained training kernels run, and nothing is counted."""
    mods = _unit()
    for bn in (mods[1], mods[4]):
        bn.running_mean = bn.running_var = None
    x = _x()
    with r21d.use_backend("triton"), torch.no_grad(), _launch.count() as counter, _launch.poisoned():
        y = run_unit(*mods, x)
    assert _kernels(counter)[:2] == ["_igemm_fwd_kernel", "_bn_stats_finalize_kernel"]
    assert "_unit_eval_kernel" not in counter.kernels
    ref = _plain(_copies(mods), x.double())
    assert_oracle_close("out", y, ref, torch.float32, _plain(_copies(mods, torch.float32), x))
    assert mods[1].num_batches_tracked.item() == mods[4].num_batches_tracked.item() == 0


def test_bns_in_different_modes_run_two_sites():
    """bn1 in training, bn2 in eval: two fused sites, bn1 normalising with (and averaging) the
    batch's statistics and counting it, bn2 with its running statistics, untouched."""
    mods = _unit(act=nn.SiLU)
    mods[1].train()
    ref_mods, base_mods = _copies(mods), _copies(mods, torch.float32)
    bn2_state = [b.clone() for b in mods[4].buffers()]
    x = _x()
    with r21d.use_backend("triton"), torch.no_grad(), _launch.count() as counter:
        y = run_unit(*mods, x)
    assert _kernels(counter).count("_igemm_fwd_kernel") == 2 and "_unit_eval_kernel" not in counter.kernels
    assert_oracle_close("out", y, _plain(ref_mods, x.double()), torch.float32, _plain(base_mods, x))
    for key in ("running_mean", "running_var"):
        assert_oracle_close(key, getattr(mods[1], key), getattr(ref_mods[1], key), torch.float32,
                            getattr(base_mods[1], key))
    assert mods[1].num_batches_tracked.item() == 1
    for before, after in zip(bn2_state, mods[4].buffers()):
        assert torch.equal(before, after)


def test_a_middle_activation_other_than_relu_runs_two_sites():
    mods = _unit(mid=nn.SiLU, act=None)
    x = _x()
    with r21d.use_backend("triton"), torch.no_grad(), _launch.count() as counter:
        y = run_unit(*mods, x)
    assert _kernels(counter) == ["_igemm_fwd_kernel", "_igemm_fwd_kernel"]
    assert_oracle_close("out", y, _plain(_copies(mods), x.double()), torch.float32)


def test_a_residual_of_another_dtype_goes_to_the_temporal_site(monkeypatch):
    """The unit kernels take a residual of the output's dtype only; another one reaches the
    temporal site, which refuses it under R21D_STRICT=1, else warns and promotes like PyTorch."""
    mods = _unit()
    x, residual = _x(), _x(2, 4, 3, 4, 4, seed=2).double()
    with r21d.use_backend("triton"), torch.no_grad(), \
            pytest.raises(r21d.FusedKernelUnavailable, match="residual dtype torch.float64"):
        run_unit(*mods, x, residual)
    monkeypatch.delenv("R21D_STRICT")
    with r21d.use_backend("triton"), torch.no_grad(), pytest.warns(r21d.FallbackWarning, match="residual dtype"):
        y = run_unit(*mods, x, residual)
    assert y.dtype == torch.float64
    assert_oracle_close("out", y, _plain(_copies(mods), x.double(), residual), torch.float32)


def test_bad_input_is_refused():
    mods = _unit()
    with r21d.use_backend("triton"), torch.no_grad():
        with pytest.raises(ValueError, match="x must have rank 5"):
            run_unit(*mods, _x(3, 3, 4, 4))
        with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 4, 3, 4, 4\)"):
            run_unit(*mods, _x(), _x(2, 4, 3, 4, 3))
    for m in mods:
        m.train()
    with r21d.use_backend("triton"), pytest.raises(ValueError, match="x must have rank 5"):
        run_unit(*mods, _x(3, 3, 4, 4))
    assert mods[1].num_batches_tracked.item() == 0  # refused before counting
    # one value per channel at the unit's output: PyTorch's error, from the temporal BN
    one = _unit(st=2)
    for m in one:
        m.train()
    x = _x(1, 3, 2, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as plain:
        _plain(_copies(one), x.double())
    with r21d.use_backend("triton"), pytest.raises(ValueError) as fused:
        run_unit(*one, x)
    assert str(fused.value) == str(plain.value)
