"""BatchNorm statistics reduced across a process group: what SyncBatchNorm adds to the fused ops.

An op that runs a SyncBatchNorm in training takes the group's name (``sync_group``) and runs its
launchers inside :func:`over`; the two places where per-channel statistics become final read the
group from here:

* forward, ``batchnorm.finalize_stats``: every rank merges its tiles into (count, mean, M2), the
  ranks all-gather those triples and merge them in rank order (Chan's formula, float64), so that
  every rank normalises with the same statistics of the whole global batch and updates its running
  statistics like ``nn.SyncBatchNorm`` (unbiased variance over the global count);
* backward, ``batchnorm.bwd_reduce_finalize``: the per-channel sums of g and g * xhat and the
  count are all-reduced, so the conv-output gradient includes the batch statistics' dependence on
  every rank's inputs. dbn_weight and dbn_bias stay local, as in ``nn.SyncBatchNorm`` (DDP reduces them).

Every rank must run the same ops in the same order (as with ``nn.SyncBatchNorm``). The group is
passed by name (``ProcessGroup.group_name``) because op schemas take strings, not groups; the
context is set inside the op's implementation, so it holds wherever the op runs (eager, compiled,
or replayed from a CUDA graph built from eager calls).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.distributed as dist

_GROUP: contextvars.ContextVar = contextvars.ContextVar("r21d_sync_group", default=None)


def group_name(group) -> str:
    """The name an op takes for ``group`` (None: the default group)."""
    return (group if group is not None else dist.group.WORLD).group_name


@contextlib.contextmanager
def over(name: str):
    """BN statistics are reduced over the process group called ``name`` ("" = this process only)
    while the block runs."""
    if not name:
        yield
        return
    from torch.distributed.distributed_c10d import _resolve_process_group

    token = _GROUP.set(_resolve_process_group(name))
    try:
        yield
    finally:
        _GROUP.reset(token)


def current():
    """The process group statistics are reduced over now, or None."""
    return _GROUP.get()


def merge_stats(group, count: int, mean: torch.Tensor, m2: torch.Tensor):
    """(global count, mean, M2) in float64 from each rank's (count, per-channel mean, M2)."""
    local = torch.stack([torch.full_like(mean, float(count)), mean, m2]).double()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    counts, means, m2s = torch.stack(gathered).unbind(1)  # each (ranks, C)
    total = counts.sum(0)
    global_mean = (counts * means).sum(0) / total
    global_m2 = m2s.sum(0) + (counts * (means - global_mean) ** 2).sum(0)
    return total, global_mean, global_m2


def finalize(group, count: int, mean, m2, running_mean, running_var, momentum: float, eps: float):
    """(mean, invstd) of the global batch and the updated running statistics (new tensors, None
    without running statistics), from this rank's per-channel ``mean`` and ``m2`` over ``count``
    rows."""
    total, global_mean, global_m2 = merge_stats(group, count, mean, m2)
    var = global_m2 / total
    invstd = torch.rsqrt(var + eps).float()
    new_rm = new_rv = None
    if running_mean is not None:
        unbiased = var * (total / (total - 1))
        new_rm = ((1 - momentum) * running_mean.double() + momentum * global_mean).to(running_mean.dtype)
        new_rv = ((1 - momentum) * running_var.double() + momentum * unbiased).to(running_var.dtype)
    return global_mean.float(), invstd, new_rm, new_rv


def backward_coefficients(group, count: int, part_g, part_gx, mean, invstd, bn_weight, bn_bias, z=None):
    """The backward's coefficient table (batchnorm's COEF rows: mean, a, bn_bias, k_g, k_z, k_0) with
    the batch statistics' terms over every rank's rows, and this rank's fp32 sums dbn_weight, dbn_bias
    and, given the conv output ``z``, dbias (else None), from the per-tile sums of g and g * xhat.
    Torch ops on device tensors: the global count never visits the host (no sync; capturable)."""
    local_g, local_gx = part_g.sum(0), part_gx.sum(0)  # fixed-order reductions
    C = local_g.numel()
    packed = torch.cat([local_g.double(), local_gx.double(),
                        local_g.new_full((1,), float(count), dtype=torch.float64)])
    dist.all_reduce(packed, group=group)
    sum_g, sum_gx, total = packed.split([C, C, 1])
    a = invstd * bn_weight.float() if bn_weight is not None else invstd
    k_z = -a * invstd * (sum_gx / total).float()
    k_0 = -a * (sum_g / total).float()
    shift = bn_bias.float() if bn_bias is not None else torch.zeros_like(mean)
    coef = torch.stack([mean, a, shift, a, k_z, k_0])
    dbias = None
    if z is not None:
        # The row sum of this rank's dz = k_g * g + k_z * (z - mean) + k_0. Unlike one process,
        # this rank's sum of (z - mean) is not zero (only all ranks' together are).
        centred = z.sum((0, 2, 3, 4), dtype=torch.float64) - count * mean.double()
        dbias = a * local_g + k_z * centred.float() + k_0 * count
    return coef, local_gx, local_g, dbias
