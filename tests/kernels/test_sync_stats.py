"""SyncBatchNorm's statistics (r21d.triton_kernels.sync_stats) in one process: the arithmetic of
merging every rank's (count, mean, M2), of the global running-statistics update and of the
backward coefficients over every rank's rows, against float64 statistics and autograd of the
whole batch; the batchnorm launchers run inside ``over(group)``; the group context itself; and a
real process group of one rank.

The other ranks are simulated: ``sync_stats.dist`` is replaced by collectives that hand this rank
(rank 0) the other ranks' contributions, computed in float64 from their rows, as gloo or NCCL
would deliver them (same shape and dtype on every rank). The ranks hold batches of different
sizes and far-apart means, so a merge that weighted ranks equally, or dropped the
between-rank term, fails. Covered elsewhere, not repeated here: two real gloo ranks running fused
models with SyncBatchNorm and DDP end to end (tests/ops/test_distributed.py), the process group in
a site's signature (tests/nn/test_site_plan.py), when a site is a SyncBatchNorm one
(tests/nn/test_fused_site.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from r21d import functional, fused_site
from r21d.triton_kernels import _common, _launch, batchnorm, sync_stats
from tests.utils import assert_oracle_close

EPS = 1e-5
C = 6
SHAPE = (C, 2, 3, 3)  # C, T, H, W of each rank's batch
BATCHES = (2, 1, 3)  # rank 0 (this process), then the simulated ranks
OFFSETS = (0.0, 3.0, -2.0)  # each rank's rows centred elsewhere

GROUP = object()  # the process group the collectives are called with


class Collectives:
    """``torch.distributed`` as sync_stats calls it, for rank 0 of a group whose other ranks
    contribute ``gathered`` (to all_gather) and ``reduced`` (to all_reduce)."""

    def __init__(self, gathered=(), reduced=()):
        self.gathered, self.reduced = list(gathered), list(reduced)
        self.calls = []

    def get_world_size(self, group=None):
        assert group is GROUP
        return len(BATCHES)

    def all_gather(self, out, tensor, group=None):
        assert group is GROUP and len(out) == 1 + len(self.gathered)
        for o, t in zip(out, [tensor, *self.gathered]):
            assert o.shape == t.shape and o.dtype == t.dtype  # what every rank must send
            o.copy_(t)
        self.calls.append("all_gather")

    def all_reduce(self, tensor, group=None):
        assert group is GROUP
        for t in self.reduced:
            assert tensor.shape == t.shape and tensor.dtype == t.dtype
            tensor.add_(t)
        self.calls.append("all_reduce")


def _batches():
    """Each rank's conv output z and its output gradient, (N_r, C, T, H, W) float32."""
    g = torch.Generator().manual_seed(0)
    zs = [(torch.randn(n, *SHAPE, generator=g) * (torch.rand(C, 1, 1, 1, generator=g) + 0.5) + off)
          for n, off in zip(BATCHES, OFFSETS)]
    dys = [torch.randn(n, *SHAPE, generator=g) for n in BATCHES]
    return zs, dys


def _affine():
    g = torch.Generator().manual_seed(1)
    return torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.5


def _rows(z):
    return z.double().transpose(0, 1).reshape(C, -1)  # (C, rows)


def _triple(z):
    """A rank's (count, mean, M2) as its finalize pass leaves them: fp32 mean and M2."""
    rows = _rows(z)
    mean = rows.mean(1)
    return rows.shape[1], mean.float(), ((rows - mean[:, None]) ** 2).sum(1).float()


def _global(zs):
    """(count, mean, biased variance) of every rank's rows together, float64."""
    rows = torch.cat([_rows(z) for z in zs], 1)
    var, mean = torch.var_mean(rows, 1, correction=0)
    return rows.shape[1], mean, var


@pytest.fixture
def ranks(monkeypatch):
    """Every rank's batch, with the simulated ranks' contributions to both collectives
    (computed from their rows in float64) wired into ``sync_stats.dist``."""
    zs, dys = _batches()
    bn_weight, bn_bias = _affine()
    _, mean, var = _global(zs)
    view = (1, C, 1, 1, 1)
    gathered, reduced = [], []
    for z, dy in zip(zs[1:], dys[1:]):
        count, m, m2 = _triple(z)
        gathered.append(torch.stack([torch.full((C,), float(count)), m, m2]).double())
        xhat = (z.double() - mean.view(view)) * (var.view(view) + EPS).rsqrt()
        g = dy.double() * (xhat * bn_weight.double().view(view) + bn_bias.double().view(view) > 0)
        sums = (g.sum((0, 2, 3, 4)), (g * xhat).sum((0, 2, 3, 4)))
        reduced.append(torch.cat([*(s.float().double() for s in sums),
                                  torch.tensor([float(count)], dtype=torch.float64)]))
    collectives = Collectives(gathered, reduced)
    monkeypatch.setattr(sync_stats, "dist", collectives)
    return zs, dys, bn_weight, bn_bias, collectives


def _whole_batch_autograd(zs, dys, bn_weight, bn_bias):
    """relu(batch_norm(z)) of every rank's rows in float64: rank 0's rows of dz, and rank 0's
    shares of dbn_weight and dbn_bias (the gradient with the other ranks' dy zeroed)."""
    n0 = BATCHES[0]
    results = []
    for dy in (torch.cat(dys), torch.cat([dys[0], *(torch.zeros_like(d) for d in dys[1:])])):
        z = torch.cat(zs).double().requires_grad_()
        g, b = bn_weight.double().requires_grad_(), bn_bias.double().requires_grad_()
        F.relu(F.batch_norm(z, None, None, g, b, True, 0.0, EPS)).backward(dy.double())
        results.append((z.grad[:n0], g.grad, b.grad))
    (dz, _, _), (_, dbn_weight, dbn_bias) = results
    return dz, dbn_weight, dbn_bias


def _dz_from_coef(coef, z, dy):
    """dz as the conv backward rebuilds it from the coefficient table (batchnorm.py), for ReLU."""
    mean, a, shift, k_g, k_z, k_0 = coef.double().view(batchnorm.NUM_COEF, 1, C, 1, 1, 1)
    zc = z.double() - mean
    return k_g * dy.double() * (zc * a + shift > 0) + k_z * zc + k_0


# ---------------------------------------------------------------------------- the merge
def test_merge_weights_each_rank_by_its_count(ranks):
    zs, _, _, _, collectives = ranks
    total, mean, m2 = sync_stats.merge_stats(GROUP, *_triple(zs[0]))
    count, ref_mean, ref_var = _global(zs)
    assert collectives.calls == ["all_gather"]
    assert total.dtype == mean.dtype == m2.dtype == torch.float64  # merged in float64
    assert torch.equal(total, torch.full((C,), float(count), dtype=torch.float64))
    assert_oracle_close("mean", mean, ref_mean, torch.float32)
    assert_oracle_close("M2", m2, ref_var * count, torch.float32)


@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_finalize_normalises_with_the_global_batch_and_updates_like_sync_batchnorm(ranks, momentum):
    """(mean, invstd) of every rank's rows, and the running statistics updated with the unbiased
    variance over the global count, as new tensors in their own dtype."""
    zs = ranks[0]
    g = torch.Generator().manual_seed(2)
    rm, rv = torch.randn(C, generator=g).half(), (torch.rand(C, generator=g) + 0.5).half()
    before = rm.clone(), rv.clone()
    count, m, m2 = _triple(zs[0])
    mean, invstd, new_rm, new_rv = sync_stats.finalize(GROUP, count, m, m2, rm, rv, momentum, EPS)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert mean.dtype == invstd.dtype == torch.float32 and new_rm.dtype == new_rv.dtype == torch.float16
    total, ref_mean, ref_var = _global(zs)
    assert_oracle_close("mean", mean, ref_mean, torch.float32)
    assert_oracle_close("invstd", invstd, (ref_var + EPS).rsqrt(), torch.float32)
    unbiased = ref_var * total / (total - 1)
    assert_oracle_close("running_mean", new_rm, (1 - momentum) * rm.double() + momentum * ref_mean,
                        torch.float16)
    assert_oracle_close("running_var", new_rv, (1 - momentum) * rv.double() + momentum * unbiased,
                        torch.float16)
    assert sync_stats.finalize(GROUP, count, m, m2, None, None, momentum, EPS)[2:] == (None, None)


def test_backward_coefficients_span_every_rank_s_rows(ranks):
    """The batch statistics' terms of dz over the global batch; dbn_weight, dbn_bias and dbias stay this
    rank's sums (DDP reduces them)."""
    zs, dys, bn_weight, bn_bias, collectives = ranks
    z, dy = zs[0], dys[0]
    _, mean, var = _global(zs)
    mean, invstd = mean.float(), (var + EPS).rsqrt().float()
    view = (1, C, 1, 1, 1)
    xhat = (z.double() - mean.double().view(view)) * invstd.double().view(view)
    g = dy.double() * (xhat * bn_weight.double().view(view) + bn_bias.double().view(view) > 0)
    # this rank's per-tile sums: tiles of 4 rows
    part_g = g.transpose(0, 1).reshape(C, -1, 4).sum(2).T.float()
    part_gx = (g * xhat).transpose(0, 1).reshape(C, -1, 4).sum(2).T.float()
    count = z.numel() // C
    coef, dbn_weight, dbn_bias, dbias = sync_stats.backward_coefficients(
        GROUP, count, part_g, part_gx, mean, invstd, bn_weight, bn_bias, z)
    assert collectives.calls == ["all_reduce"]
    ref_dz, ref_dbn_weight, ref_dbn_bias = _whole_batch_autograd(zs, dys, bn_weight, bn_bias)
    assert_oracle_close("dbn_weight", dbn_weight, ref_dbn_weight, torch.float32)
    assert_oracle_close("dbn_bias", dbn_bias, ref_dbn_bias, torch.float32)
    assert_oracle_close("dbias", dbias, ref_dz.sum((0, 2, 3, 4)), torch.float32)
    assert_oracle_close("dz", _dz_from_coef(coef, z, dy), ref_dz, torch.float32)
    assert sync_stats.backward_coefficients(GROUP, count, part_g, part_gx, mean, invstd, bn_weight,
                                            bn_bias)[3] is None  # no z: no dbias


# ---------------------------------------------------------------------------- the launchers inside over()
@pytest.fixture
def fake_group(monkeypatch):
    """``over("fake-group")`` resolves to GROUP."""
    from torch.distributed import distributed_c10d

    def resolve(name):
        if name != "fake-group":
            raise RuntimeError(f"Could not resolve the process group registered under the name {name}")
        return GROUP

    monkeypatch.setattr(distributed_c10d, "_resolve_process_group", resolve)


def test_launchers_inside_over_reduce_over_the_group(ranks, fake_group):
    """batchnorm.finalize_stats and bwd_reduce_finalize in training read the group from the
    context: global statistics and running statistics, global backward coefficients, this
    rank's dbn_weight, dbn_bias and dbias; in eval the backward stays local."""
    zs, dys, bn_weight, bn_bias, collectives = ranks
    z = zs[0].contiguous(memory_format=torch.channels_last_3d)
    dy = dys[0].contiguous(memory_format=torch.channels_last_3d)
    rows = _rows(z).T.float().contiguous()  # (M, C)
    M = rows.shape[0]
    tiles = rows.split(4)
    part_mean = torch.stack([t.double().mean(0) for t in tiles]).float()
    part_m2 = torch.stack([((t.double() - t.double().mean(0)) ** 2).sum(0) for t in tiles]).float()
    rm, rv = torch.zeros(C), torch.ones(C)
    relu = _common.ACTIVATIONS["relu"]
    with _launch.poisoned(), sync_stats.over("fake-group"):
        assert sync_stats.current() is GROUP
        mean, invstd, new_rm, new_rv = batchnorm.finalize_stats(
            part_mean, part_m2, 4, M, rm, rv, 0.5, EPS)
        coef, dbn_weight, dbn_bias, dbias, _ = batchnorm.bwd_reduce_finalize(
            dy, z, mean, invstd, bn_weight, bn_bias, None, relu, True, True, True, True, False, torch.float32)
        assert collectives.calls == ["all_gather", "all_reduce"]
        eval_coef = batchnorm.bwd_reduce_finalize(
            dy, z, mean, invstd, bn_weight, bn_bias, None, relu, False, False, False, False, False)[0]
        assert collectives.calls == ["all_gather", "all_reduce"]  # eval: no collective
    assert sync_stats.current() is None
    total, ref_mean, ref_var = _global(zs)
    assert_oracle_close("mean", mean, ref_mean, torch.float32)
    assert_oracle_close("invstd", invstd, (ref_var + EPS).rsqrt(), torch.float32)
    assert_oracle_close("running_mean", new_rm, 0.5 * ref_mean, torch.float32)
    assert_oracle_close("running_var", new_rv, 0.5 + 0.5 * ref_var * total / (total - 1), torch.float32)
    ref_dz, ref_dbn_weight, ref_dbn_bias = _whole_batch_autograd(zs, dys, bn_weight, bn_bias)
    assert_oracle_close("dbn_weight", dbn_weight, ref_dbn_weight, torch.float32)
    assert_oracle_close("dbn_bias", dbn_bias, ref_dbn_bias, torch.float32)
    assert_oracle_close("dbias", dbias, ref_dz.sum((0, 2, 3, 4)), torch.float32)
    assert_oracle_close("dz", _dz_from_coef(coef, z, dy), ref_dz, torch.float32)
    assert not eval_coef[batchnorm.COEF_KZ].any() and not eval_coef[batchnorm.COEF_K0].any()


# ---------------------------------------------------------------------------- the group context
def test_over_sets_the_group_for_its_block_only(fake_group):
    assert sync_stats.current() is None
    with sync_stats.over(""):  # this process only
        assert sync_stats.current() is None
    with pytest.raises(KeyError), sync_stats.over("fake-group"):
        assert sync_stats.current() is GROUP
        with sync_stats.over(""):
            assert sync_stats.current() is GROUP  # "" adds no group of its own
        raise KeyError("inside")
    assert sync_stats.current() is None  # reset on the way out of an error
    with pytest.raises(RuntimeError, match="no-such-group"), sync_stats.over("no-such-group"):
        pass
    assert sync_stats.current() is None


def test_a_sync_batchnorm_call_needs_a_batch_on_every_rank():
    """An empty batch would leave its rank out of the statistics exchange, so it is refused; one
    value per channel is fine on one rank (the group's batch has more)."""
    x, w = torch.randn(0, 3, 2, 3, 3), torch.randn(4, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="non-empty batch on every rank"):
        functional.plan(x, w, training=True, sync_group="pair")
    one = torch.randn(1, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        functional.plan(one, w, training=True)
    p = functional.plan(one, w, training=True, sync_group="pair")
    assert p.sync_group == "pair" and p.config.sync_stats
    assert functional.plan(one, w, torch.randn(4), running_mean=torch.zeros(4),
                           running_var=torch.ones(4), training=False, sync_group="pair").sync_group == ""


@pytest.fixture
def world_of_one():
    """A real gloo process group of this process alone."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_a_group_of_one_computes_what_one_process_does(world_of_one):
    """Through the real collectives: the default group's name resolves to it, and statistics
    merged over it are this process's own."""
    name = sync_stats.group_name(None)
    assert name == sync_stats.group_name(world_of_one) == world_of_one.group_name
    assert fused_site.sync_group(torch.nn.SyncBatchNorm(C).train()) == ""  # nothing to span
    z = _batches()[0][0]
    count, m, m2 = _triple(z)
    total, mean, merged_m2 = sync_stats.merge_stats(world_of_one, count, m, m2)
    assert torch.equal(total, torch.full((C,), float(count), dtype=torch.float64))
    assert torch.equal(mean, m.double()) and torch.equal(merged_m2, m2.double())
    rows = _rows(z).T.float().contiguous()
    part_mean, part_m2 = (t.float() for t in (rows.double().mean(0, keepdim=True),
                                              rows.double().var(0, correction=0, keepdim=True) * count))
    running = torch.zeros(C), torch.ones(C)
    local = batchnorm.finalize_stats(part_mean, part_m2, count, count, *running, 0.1, EPS)
    with sync_stats.over(name):
        assert sync_stats.current() is world_of_one
        synced = batchnorm.finalize_stats(part_mean, part_m2, count, count, *running, 0.1, EPS)
    for key, a, b in zip(("mean", "invstd", "running_mean", "running_var"), synced, local):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=key)
