"""The BatchNorm passes every conv family shares (r21d.triton_kernels.batchnorm), their launchers
called directly in the interpreter against float64:

* ``finalize_stats``: batch mean and invstd merged from per-tile (mean, M2) partials with Chan's
  formula (tiles of ``rows_per_tile`` rows with a short last one, or of per-tile counts), over more
  tiles than one block of the merge loop and more channels than one program; far from zero mean
  too, where the textbook E[x^2] - E[x]^2 loses every digit; the running statistics' update with
  momentum as new tensors (unbiased variance; the inputs untouched); one tile of two rows.
* ``normalize_act``: act((z - mean) * invstd * bn_weight + bn_bias [+ residual]), in place or not.
* ``bwd_reduce_finalize``: dbn_weight, dbn_bias, the conv bias's gradient, the residual's gradient and
  the coefficient table from which the conv backward rebuilds dz, against autograd of the float64
  BatchNorm (training: batch statistics; eval: running ones), in both tile orientations
  (channels_last_3d and NCDHW).

Every buffer the launchers allocate is poisoned with NaN. Covered elsewhere, not repeated here:
these passes inside each family's op and module against the oracle (tests/kernels/test_*.py,
tests/nn/), across ranks (tests/ops/test_distributed.py, tests/kernels/test_sync_stats.py), NaN and
Inf (tests/ops/test_nan_inf.py), the block sizes' limits (tests/kernels/test_limits.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from r21d.reference import ACTIVATIONS
from r21d.triton_kernels import _common, _launch, batchnorm
from tests.utils import assert_oracle_close

EPS = 1e-5


def _rows(M, C, offset=0.0, seed=0) -> torch.Tensor:
    """(M, C) float32 rows of per-channel scale 0.5-1.5, centred on ``offset`` x (1 to 2)."""
    g = torch.Generator().manual_seed(seed)
    scale, shift = torch.rand(C, generator=g) + 0.5, offset * (1 + torch.rand(C, generator=g))
    return torch.randn(M, C, generator=g) * scale + shift


def _partials(rows: torch.Tensor, sizes) -> tuple:
    """Per-tile (mean, M2) in fp32, as a conv epilogue writes them, of consecutive tiles of
    ``sizes`` rows (computed in float64, then rounded)."""
    tiles = rows.double().split(list(sizes))
    mean = torch.stack([t.mean(0) for t in tiles])
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    return mean.float(), m2.float()


def _tile_sizes(M, rows_per_tile):
    return [min(rows_per_tile, M - i) for i in range(0, M, rows_per_tile)]


def _running(C, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, generator=g) * 0.3, torch.rand(C, generator=g) + 0.5


def _check_stats(name, rows, mean, invstd, floor=None):
    """mean and invstd of ``rows`` against float64, at most twice PyTorch's own float32 error
    (torch.var_mean), or ``floor``."""
    var64, mean64 = torch.var_mean(rows.double(), 0, correction=0)
    var32, mean32 = torch.var_mean(rows, 0, correction=0)
    assert_oracle_close(f"{name} mean", mean, mean64, torch.float32, mean32, floor)
    assert_oracle_close(f"{name} invstd", invstd, (var64 + EPS).rsqrt(), torch.float32,
                        (var32 + EPS).rsqrt(), floor)


# ---------------------------------------------------------------------------- finalize_stats
# Interpreter blocks: 16 tiles per step of the merge loop, 16 channels per program. 118 rows in
# tiles of 4: 30 tiles (two steps, the second one short), the last tile of 2 rows; 21 channels:
# two programs, the second one masked.
M, C, ROWS_PER_TILE = 118, 21, 4

# An offset of 1e4 (x 1 to 2) against a spread of ~1: fp32 holds each tile mean only to half an
# ulp of ~2e4 (~1e-3), and the merge works from their differences, so the variance is good to
# ~offset x 2^-24 relative to the spread (2e-4 here); the textbook E[x^2] - E[x]^2 in fp32 is
# off by ~2000%. (PyTorch's CPU var_mean accumulates in float64: no yardstick here.)
OFFSET_FLOOR = 2e4 * 2.0 ** -24


@pytest.mark.parametrize("offset,floor", [(0.0, None), (1e4, OFFSET_FLOOR)], ids=["centred", "offset-1e4"])
def test_statistics_merged_from_row_tiles(offset, floor):
    rows = _rows(M, C, offset)
    part_mean, part_m2 = _partials(rows, _tile_sizes(M, ROWS_PER_TILE))
    with _launch.poisoned():
        mean, invstd, new_rm, new_rv = batchnorm.finalize_stats(
            part_mean, part_m2, ROWS_PER_TILE, M, None, None, 0.1, EPS)
    assert new_rm is None and new_rv is None
    assert mean.dtype == invstd.dtype == torch.float32
    _check_stats(offset, rows, mean, invstd, floor)


def test_statistics_merged_from_tiles_of_given_counts():
    """Tiles of any size, each with its count (the depthwise statistics tiles), one of one row
    (M2 = 0)."""
    g = torch.Generator().manual_seed(4)
    sizes = torch.randint(1, 9, (25,), generator=g).tolist()
    sizes[7] = 1
    rows = _rows(sum(sizes), C, seed=5)
    part_mean, part_m2 = _partials(rows, sizes)
    counts = torch.tensor(sizes, dtype=torch.float32)
    with _launch.poisoned():
        mean, invstd, _, _ = batchnorm.finalize_stats(
            part_mean, part_m2, None, sum(sizes), None, None, 0.1, EPS, part_count=counts)
    _check_stats("counted", rows, mean, invstd)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_running_statistics_update_with_momentum(momentum, dtype):
    """(1 - momentum) x running + momentum x batch, the variance unbiased (M / (M - 1)), written
    to new tensors in the running statistics' dtype; the running statistics themselves are not
    touched (the op's caller copies back)."""
    rows = _rows(M, C, seed=6)
    part_mean, part_m2 = _partials(rows, _tile_sizes(M, ROWS_PER_TILE))
    rm, rv = (t.to(dtype) for t in _running(C))
    before = rm.clone(), rv.clone()
    with _launch.poisoned():
        _, _, new_rm, new_rv = batchnorm.finalize_stats(
            part_mean, part_m2, ROWS_PER_TILE, M, rm, rv, momentum, EPS)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert new_rm.dtype == new_rv.dtype == dtype
    assert new_rm.data_ptr() != rm.data_ptr() and new_rv.data_ptr() != rv.data_ptr()
    unbiased, mean = torch.var_mean(rows.double(), 0, correction=1)
    ref_rm = (1 - momentum) * rm.double() + momentum * mean
    ref_rv = (1 - momentum) * rv.double() + momentum * unbiased
    # PyTorch's own: F.batch_norm updating copies in the same dtype from float32 rows
    base_rm, base_rv = rm.float().clone(), rv.float().clone()
    F.batch_norm(rows, base_rm, base_rv, training=True, momentum=momentum, eps=EPS)
    assert_oracle_close("running_mean", new_rm, ref_rm, dtype, base_rm.to(dtype))
    assert_oracle_close("running_var", new_rv, ref_rv, dtype, base_rv.to(dtype))


def test_one_tile_of_two_rows():
    """The smallest batch training allows: one tile, two rows, one channel: mean (a + b) / 2,
    biased variance ((a - b) / 2)^2, unbiased (a - b)^2 / 2."""
    rows = torch.tensor([[1.5], [-0.25]])
    part_mean, part_m2 = _partials(rows, [2])
    rm, rv = torch.tensor([0.5]), torch.tensor([2.0])
    with _launch.poisoned():
        mean, invstd, new_rm, new_rv = batchnorm.finalize_stats(
            part_mean, part_m2, 16, 2, rm, rv, 0.5, EPS)
    torch.testing.assert_close(mean, torch.tensor([0.625]))
    torch.testing.assert_close(invstd, torch.tensor([0.875 ** 2 + EPS]).rsqrt())
    torch.testing.assert_close(new_rm, torch.tensor([0.5 * 0.5 + 0.5 * 0.625]))
    torch.testing.assert_close(new_rv, torch.tensor([0.5 * 2.0 + 0.5 * 1.75 ** 2 / 2]))


# ---------------------------------------------------------------------------- normalize_act
def _bn_inputs(C, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, generator=g) * 0.3, torch.rand(C, generator=g) + 0.5,
            torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.5)


@pytest.mark.parametrize("dtype,act,affine,residual,in_place", [
    (torch.float32, "silu", True, True, True),
    (torch.float16, "relu", False, False, False),
], ids=["fp32-silu-residual-in-place", "fp16-relu-no-affine"])
def test_normalize_act(dtype, act, affine, residual, in_place):
    shape = (2, C, 3, 4, 5)
    g = torch.Generator().manual_seed(8)
    z = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    r = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last_3d) \
        if residual else None
    mean, invstd, bn_weight, bn_bias = _bn_inputs(C)
    bn_weight, bn_bias = (bn_weight, bn_bias) if affine else (None, None)
    view = (1, C, 1, 1, 1)
    ref = (z.double() - mean.double().view(view)) * invstd.double().view(view)
    if affine:
        ref = ref * bn_weight.double().view(view) + bn_bias.double().view(view)
    ref = ACTIVATIONS[act](ref + r.double() if residual else ref)
    with _launch.poisoned():
        out = z if in_place else torch.full_like(z, float("nan"))
        y = batchnorm.normalize_act(z, mean, invstd, bn_weight, bn_bias, r, _common.ACTIVATIONS[act], out)
    assert y is out and y.dtype == dtype
    assert_oracle_close("normalize_act", y, ref, dtype)


# ---------------------------------------------------------------------------- bwd_reduce_finalize
def _act_grad(act, pre):
    if act == "relu":
        return (pre > 0).double()
    if act == "silu":
        s = torch.sigmoid(pre)
        return s * (1 + pre * (1 - s))
    return torch.ones_like(pre)


BACKWARD_CASES = {
    "train-relu-residual-cl3d": (True, "relu", True, True, "cl3d", torch.float32),
    "train-silu-ncdhw": (True, "silu", True, False, "ncdhw", torch.float32),
    "train-none-residual-fp16-cl3d": (True, None, True, True, "cl3d", torch.float16),
    "eval-relu-residual-ncdhw": (False, "relu", True, True, "ncdhw", torch.float32),
    "eval-silu-no-affine-cl3d": (False, "silu", False, False, "cl3d", torch.float32),
}


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_reductions_and_coefficients_match_autograd(name):
    """dbn_weight = sum(g * xhat), dbn_bias = sum(g), dres = g, dbias = sum(dz), and the coefficient
    table's dz = k_g * g + k_z * (z - mean) + k_0 with g = dy * act'(pre) rebuilt from it (as the
    conv backward prologues do), against autograd of the float64 BatchNorm, bounded by twice
    autograd's error in ``dtype``'s float32 arithmetic (or the floor)."""
    training, act, affine, residual, layout, dtype = BACKWARD_CASES[name]
    shape = (2, 13, 3, 4, 5)
    Cz = shape[1]
    fmt = torch.channels_last_3d if layout == "cl3d" else torch.contiguous_format
    g = torch.Generator().manual_seed(9)
    z, dy, r = (torch.randn(shape, generator=g).mul(2).add(0.5).to(dtype).contiguous(memory_format=fmt)
                for _ in range(3))
    r = r if residual else None
    rm, rv, bn_weight, bn_bias = _bn_inputs(Cz, seed=10)
    bn_weight, bn_bias = (bn_weight, bn_bias) if affine else (None, None)
    if training:
        var, mean = torch.var_mean(z.double(), (0, 2, 3, 4), correction=0)
        mean, invstd = mean.float(), (var + EPS).rsqrt().float()
    else:
        mean, invstd = rm, (rv.double() + EPS).rsqrt().float()

    def autograd(t):
        """The BatchNorm's forward and backward in ``t``: (dz, dbn_weight, dbn_bias, dbias, dres)."""
        leaves = [v.detach().to(t).requires_grad_() if v is not None else None
                  for v in (z, bn_weight, bn_bias, r)]
        zt, gt, bt, rt = leaves
        running = (None, None) if training else (rm.to(t), rv.to(t))
        y = F.batch_norm(zt, *running, gt, bt, training, 0.0, EPS)
        y = ACTIVATIONS[act](y + rt if rt is not None else y)
        y.backward(dy.to(t))
        return zt.grad, gt.grad if affine else None, bt.grad if affine else None, \
            zt.grad.sum((0, 2, 3, 4)), rt.grad if residual else None

    ref_dz, *ref = autograd(torch.float64)
    base_dz, *base = autograd(torch.float32)
    with _launch.poisoned():
        coef, *grads = batchnorm.bwd_reduce_finalize(
            dy, z, mean, invstd, bn_weight, bn_bias, r, _common.ACTIVATIONS[act], training,
            need_dbn_weight=affine, need_dbn_bias=affine, need_dbias=True, need_dres=residual,
            bias_dtype=dtype)
    assert coef.shape == (batchnorm.NUM_COEF, Cz) and coef.dtype == torch.float32
    for key, got, want, yardstick in zip(("dbn_weight", "dbn_bias", "dbias", "dres"), grads, ref, base):
        if want is None:
            assert got is None, key
        else:
            assert_oracle_close(f"{name} {key}", got, want, dtype, yardstick)
    if residual:
        assert grads[3].is_contiguous(memory_format=fmt)
    assert grads[2].dtype == dtype

    # the conv-output gradient as the dgrad / wgrad prologues rebuild it from the table
    c_mean, a, shift, k_g, k_z, k_0 = coef.double().view(batchnorm.NUM_COEF, 1, Cz, 1, 1, 1)
    zc = z.double() - c_mean
    pre = zc * a + shift + (r.double() if residual else 0)
    dz = k_g * dy.double() * _act_grad(act, pre) + k_z * zc + k_0
    assert_oracle_close(f"{name} dz", dz, ref_dz, dtype, base_dz)
    if not training:  # running statistics: no batch-statistics terms at all
        assert not k_z.any() and not k_0.any()
