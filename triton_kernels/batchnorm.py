"""BatchNorm passes shared by every conv family: batch statistics, normalise + activation, and the
backward reduction that yields dbn_weight, dbn_bias and the coefficients of the conv backward prologue.

Training forward (after a conv kernel that wrote the conv output ``z`` and, per tile of rows,
each channel's tile mean and sum of squared deviations):
  1. ``finalize_stats``: merge the per-tile (count, mean, M2) triples with Chan's formula and
     return (mean, invstd) and the updated running statistics, computed like ``nn.BatchNorm3d``
     but written to new tensors (the ops stay functional; the caller copies them back);
  2. ``normalize_act``: y = act((z - mean) * invstd * bn_weight + bn_bias [+ residual]).

Backward (training or eval, with ``mean``/``invstd`` those the forward normalised with):
  1. ``bwd_reduce``: g = dy * act'(pre) per element; per channel sum(g) and sum(g * xhat) per tile
     of rows (and g itself as the residual's gradient when asked);
  2. ``bwd_finalize``: dbn_weight = sum(g * xhat), dbn_bias = sum(g), dbias, and the coefficient table
     COEF (6 x C, fp32) with which the dgrad / wgrad GEMM prologues rebuild the conv-output
     gradient as they load: pre = (z - mean) * a + bn_bias [+ r];  g = dy * act'(pre);
     dz = k_g * g + k_z * (z - mean) + k_0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm
from . import sync_stats
from ._launch import alloc, interpreted, launch
from ._layout import alloc_like, cdiv, channel_vector, channels_last, pc_strides, rows_alignment, rows_strides

# Row of the coefficient table (COEF[i * C + c]).
COEF_MEAN, COEF_A, COEF_BN_BIAS, COEF_KG, COEF_KZ, COEF_K0 = range(6)
NUM_COEF = 6


def _elementwise_blocks(C: int, channels_innermost: bool = True) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) for the row x channel passes, ~4K elements: up to 128 channels when
    channels are contiguous (16-byte channel vectors), else long runs of rows and few channels."""
    if not channels_innermost:
        block_c = min(triton.next_power_of_2(max(C, 1)), 4 if interpreted() else 8)
        return (32 if interpreted() else 4096 // block_c), block_c
    block_c = min(triton.next_power_of_2(max(C, 1)), 128)
    if interpreted():
        return 16, min(block_c, 32)
    return max(4096 // block_c, 16), block_c


@triton.jit
def fold(mean, invstd, bias, bn_weight_ptr, bn_bias_ptr, cols, cmask,
         HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr):
    """(scale, shift) per channel with bn(conv + bias) = conv * scale + shift: BN and the conv
    bias folded for a conv epilogue."""
    scale = invstd
    if HAS_BN_WEIGHT:
        scale = scale * tl.load(bn_weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    shift = (bias - mean) * scale
    if HAS_BN_BIAS:
        shift += tl.load(bn_bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return scale, shift


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=['num_tiles', 'rows_per_tile', 'M'])
def _bn_stats_finalize_kernel(
    part_mean_ptr, part_m2_ptr, part_count_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr,
    new_rmean_ptr, new_rvar_ptr, m2_ptr, num_tiles, rows_per_tile, M, Mf, C, momentum, eps,
    UPDATE_RUNNING: tl.constexpr, HAS_COUNT: tl.constexpr, WRITE_M2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n_a = tl.zeros((BLOCK_C,), tl.float32)  # rows merged so far (the same for every channel)
    mean_a = tl.zeros((BLOCK_C,), tl.float32)
    m2_a = tl.zeros((BLOCK_C,), tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        tmask = tiles < num_tiles
        if HAS_COUNT:  # tiles of any shape, each with its own count
            n_i = tl.load(part_count_ptr + tiles, mask=tmask, other=0.0)
        else:  # tiles of rows_per_tile consecutive rows
            first = tiles.to(tl.int64) * rows_per_tile  # masked tiles may pass 2^31
            n_i = tl.where(tmask, tl.minimum(rows_per_tile, M - first, propagate_nan=tl.PropagateNan.ALL),
                           0).to(tl.float32)
        offs = tiles[:, None].to(tl.int64) * C + cols[None, :]
        m = tmask[:, None] & cmask[None, :]
        pm = tl.load(part_mean_ptr + offs, mask=m, other=0.0)
        pm2 = tl.load(part_m2_ptr + offs, mask=m, other=0.0)
        # Merge this block of tiles (Chan et al.), then merge the block into the running triple.
        n_b = tl.sum(n_i, axis=0)
        mean_b = tl.sum(n_i[:, None] * pm, axis=0) / n_b
        d = pm - mean_b[None, :]
        m2_b = tl.sum(pm2, axis=0) + tl.sum(n_i[:, None] * d * d, axis=0)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    var = m2_a / Mf
    tl.store(mean_ptr + cols, mean_a, mask=cmask)
    if WRITE_M2:  # this rank's share, for sync_stats to merge across processes
        tl.store(m2_ptr + cols, m2_a, mask=cmask)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)
    if UPDATE_RUNNING:
        rm = tl.load(rmean_ptr + cols, mask=cmask).to(tl.float32)
        rv = tl.load(rvar_ptr + cols, mask=cmask).to(tl.float32)
        rm = (1.0 - momentum) * rm + momentum * mean_a
        rv = (1.0 - momentum) * rv + momentum * (var * (Mf / (Mf - 1.0)))
        tl.store(new_rmean_ptr + cols, rm, mask=cmask)
        tl.store(new_rvar_ptr + cols, rv, mask=cmask)


def finalize_stats(part_mean, part_m2, rows_per_tile: int | None, M: int, running_mean, running_var,
                   momentum: float, eps: float, part_count=None, running_in_place: bool = False):
    """Batch (mean, invstd) from per-tile partials, and the running statistics updated with
    ``momentum`` as new tensors (None when ``running_mean`` is None), or, with
    ``running_in_place``, written over ``running_mean`` and ``running_var`` (returned as such) as
    eager BatchNorm does: no buffers and no copy-back launches. Tile i holds the rows
    [i * rows_per_tile, (i + 1) * rows_per_tile), or ``part_count[i]`` rows when given. Inside
    ``sync_stats.over(group)``, the statistics are those of every rank's rows together (and the
    running statistics new tensors)."""
    num_tiles, C = part_mean.shape
    dev = part_mean.device
    group = sync_stats.current()
    mean = alloc((C,), dtype=torch.float32, device=dev)
    invstd = alloc((C,), dtype=torch.float32, device=dev)
    m2 = alloc((C,), dtype=torch.float32, device=dev) if group is not None else None
    update = running_mean is not None and group is None
    new_rm = new_rv = None
    if update and running_in_place:  # (each program reads a channel's values, then writes them)
        new_rm, new_rv = running_mean, running_var
    elif update:
        new_rm = alloc((C,), dtype=running_mean.dtype, device=dev)
        new_rv = alloc((C,), dtype=running_var.dtype, device=dev)
    block_c = min(triton.next_power_of_2(C), 16 if interpreted() else 64)
    block_t = 16 if interpreted() else 64
    launch(
        _bn_stats_finalize_kernel, (cdiv(C, block_c),),
        part_mean, part_m2, part_count if part_count is not None else mean, mean, invstd,
        running_mean if update else mean, running_var if update else invstd,
        new_rm if update else mean, new_rv if update else invstd, m2 if m2 is not None else mean,
        num_tiles, rows_per_tile or 1, M, float(M), C, float(momentum), float(eps),
        UPDATE_RUNNING=update, HAS_COUNT=part_count is not None, WRITE_M2=m2 is not None,
        BLOCK_T=block_t, BLOCK_C=block_c,
    )
    if group is not None:
        return sync_stats.finalize(group, M, mean, m2, running_mean, running_var, momentum, eps)
    return mean, invstd, new_rm, new_rv


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=['T', 'stride_zn', 'stride_rn', 'stride_on'])
def _bn_act_normalize_kernel(
    z_ptr, res_ptr, out_ptr, mean_ptr, invstd_ptr, bn_weight_ptr, bn_bias_ptr,
    M, C, T, H, W,
    stride_zn, stride_zt, stride_zh, stride_zw,
    stride_rn, stride_rt, stride_rh, stride_rw,
    stride_on, stride_ot, stride_oh, stride_ow,
    HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    Z_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr, O_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    n, t, h, w = cm.split_rows(rows, T, H, W)
    z_off = cm.row_offsets(n, t, h, w, stride_zn, stride_zt, stride_zh, stride_zw,
                           Z_ALIGN)[:, None] + cols[None, :]
    z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    scale = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    if HAS_BN_WEIGHT:
        scale = scale * tl.load(bn_weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    v = (z - mean[None, :]) * scale[None, :]
    if HAS_BN_BIAS:
        v = v + tl.load(bn_bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r_off = cm.row_offsets(n, t, h, w, stride_rn, stride_rt, stride_rh, stride_rw,
                               R_ALIGN)[:, None] + cols[None, :]
        v = v + tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    v = cm.activation(v, ACT)
    o_off = cm.row_offsets(n, t, h, w, stride_on, stride_ot, stride_oh, stride_ow,
                           O_ALIGN)[:, None] + cols[None, :]
    tl.store(out_ptr + o_off, v, mask=mask)


def normalize_act(z, mean, invstd, bn_weight, bn_bias, residual, act: int, out) -> torch.Tensor:
    """out = act((z - mean) * invstd * bn_weight + bn_bias [+ residual]); ``out`` may be ``z`` itself.
    All three have contiguous channels (see _layout.py)."""
    N, C, T, H, W = z.shape
    M = N * T * H * W
    block_m, block_c = _elementwise_blocks(C)
    launch(
        _bn_act_normalize_kernel, (cdiv(M, block_m), cdiv(C, block_c)),
        z, residual if residual is not None else z, out, mean, invstd,
        bn_weight if bn_weight is not None else mean, bn_bias if bn_bias is not None else mean,
        M, C, T, H, W,
        *rows_strides(z), *rows_strides(residual), *rows_strides(out),
        HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None, HAS_RES=residual is not None,
        ACT=act, Z_ALIGN=rows_alignment(z), R_ALIGN=rows_alignment(residual),
        O_ALIGN=rows_alignment(out), BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=['T', 'stride_dn', 'stride_zn', 'stride_rn', 'stride_gn'])
def _bn_act_bwd_reduce_kernel(
    dy_ptr, z_ptr, res_ptr, dres_ptr, mean_ptr, invstd_ptr, bn_weight_ptr, bn_bias_ptr,
    part_g_ptr, part_gx_ptr,
    M, C, T, H, W,
    stride_dn, stride_dc, stride_dt, stride_dh, stride_dw,
    stride_zn, stride_zc, stride_zt, stride_zh, stride_zw,
    stride_rn, stride_rc, stride_rt, stride_rh, stride_rw,
    stride_gn, stride_gc, stride_gt, stride_gh, stride_gw,
    HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    WRITE_DRES: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr,
    D_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr,
    G_ALIGN: tl.constexpr, C_VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Tiles of rows x channels in either orientation (cm.pc_tile): CL for contiguous channels.
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cm.channel_mask(cols, C, C_VEC)
    mask = cm.pc_mask(rmask, cmask, CL)
    n, t, h, w = cm.split_rows(rows, T, H, W)
    c64 = cols.to(tl.int64)
    d_off = cm.pc_tile(cm.row_offsets(n, t, h, w, stride_dn, stride_dt, stride_dh, stride_dw, D_ALIGN),
                       c64 * stride_dc, CL)
    z_off = cm.pc_tile(cm.row_offsets(n, t, h, w, stride_zn, stride_zt, stride_zh, stride_zw, Z_ALIGN),
                       c64 * stride_zc, CL)
    dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    xhat = (z - cm.per_channel(mean, CL)) * cm.per_channel(invstd, CL)
    pre = xhat
    if HAS_BN_WEIGHT:
        pre = pre * cm.per_channel(tl.load(bn_weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32), CL)
    if HAS_BN_BIAS:
        pre = pre + cm.per_channel(tl.load(bn_bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32), CL)
    if HAS_RES:
        r_off = cm.pc_tile(cm.row_offsets(n, t, h, w, stride_rn, stride_rt, stride_rh, stride_rw, R_ALIGN),
                           c64 * stride_rc, CL)
        pre = pre + tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(mask, cm.activation_grad(pre, dy, ACT), 0.0)
    if WRITE_DRES:
        g_off = cm.pc_tile(cm.row_offsets(n, t, h, w, stride_gn, stride_gt, stride_gh, stride_gw, G_ALIGN),
                           c64 * stride_gc, CL)
        tl.store(dres_ptr + g_off, g, mask=mask)
    part = pid_m.to(tl.int64) * C + cols
    tl.store(part_g_ptr + part, cm.sum_positions(g, CL), mask=cmask)
    tl.store(part_gx_ptr + part, cm.sum_positions(g * xhat, CL), mask=cmask)


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=['num_tiles'])
def _bn_bwd_finalize_kernel(
    part_g_ptr, part_gx_ptr, mean_ptr, invstd_ptr, bn_weight_ptr, bn_bias_ptr,
    coef_ptr, dbn_weight_ptr, dbn_bias_ptr, dbias_ptr,
    num_tiles, Mf, C,
    HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    WRITE_DBN_WEIGHT: tl.constexpr, WRITE_DBN_BIAS: tl.constexpr, WRITE_DBIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s_g = tl.zeros((BLOCK_C,), tl.float32)
    s_gx = tl.zeros((BLOCK_C,), tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        m = (tiles < num_tiles)[:, None] & cmask[None, :]
        offs = tiles[:, None].to(tl.int64) * C + cols[None, :]
        s_g += tl.sum(tl.load(part_g_ptr + offs, mask=m, other=0.0), axis=0)
        s_gx += tl.sum(tl.load(part_gx_ptr + offs, mask=m, other=0.0), axis=0)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    a = invstd
    if HAS_BN_WEIGHT:
        a = a * tl.load(bn_weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    bn_bias = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_BN_BIAS:
        bn_bias = tl.load(bn_bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    k_g = a
    if TRAINING:
        # d/dz of the batch statistics: dz = a * (g - mean(g) - xhat * mean(g * xhat)).
        k_z = -a * invstd * (s_gx / Mf)
        k_0 = -a * (s_g / Mf)
    else:
        k_z = tl.zeros((BLOCK_C,), tl.float32)
        k_0 = tl.zeros((BLOCK_C,), tl.float32)
    tl.store(coef_ptr + 0 * C + cols, mean, mask=cmask)
    tl.store(coef_ptr + 1 * C + cols, a, mask=cmask)
    tl.store(coef_ptr + 2 * C + cols, bn_bias, mask=cmask)
    tl.store(coef_ptr + 3 * C + cols, k_g, mask=cmask)
    tl.store(coef_ptr + 4 * C + cols, k_z, mask=cmask)
    tl.store(coef_ptr + 5 * C + cols, k_0, mask=cmask)
    if WRITE_DBN_WEIGHT:
        tl.store(dbn_weight_ptr + cols, s_gx, mask=cmask)
    if WRITE_DBN_BIAS:
        tl.store(dbn_bias_ptr + cols, s_g, mask=cmask)
    if WRITE_DBIAS:
        # sum over rows of dz; the k_z term drops: sum(z - mean) = 0 for batch statistics, and
        # k_z = 0 in eval.
        tl.store(dbias_ptr + cols, k_g * s_g + k_0 * Mf, mask=cmask)


def bwd_reduce_finalize(grad_out, z, mean, invstd, bn_weight, bn_bias, residual, act: int, training: bool,
                        need_dbn_weight: bool, need_dbn_bias: bool, need_dbias: bool, need_dres: bool,
                        bias_dtype: torch.dtype | None = None):
    """Runs the backward reduction and finalisation.

    ``grad_out``, ``z`` and ``residual`` have any strides (tiled channels-innermost when ``z``'s
    channels are contiguous); ``dres`` comes back in the residual's memory format. Returns (coef,
    dbn_weight, dbn_bias, dbias, dres); unrequested gradients are None. ``coef`` is the 6 x C fp32
    table of the module docstring, for the conv backward prologues; dbias (the conv bias's
    gradient, in ``bias_dtype``) is the row sum of dz, which needs no pass of its own.
    Inside ``sync_stats.over(group)`` in training, the batch statistics' terms of COEF span every
    rank's rows; dbn_weight, dbn_bias and dbias stay this rank's sums.
    """
    N, C, T, H, W = z.shape
    M = N * T * H * W
    dev = z.device
    cl = channels_last(z)
    block_m, block_c = _elementwise_blocks(C, cl)
    num_tiles = cdiv(M, block_m)
    part_g = alloc((num_tiles, C), dtype=torch.float32, device=dev)
    part_gx = alloc((num_tiles, C), dtype=torch.float32, device=dev)
    dres = None
    if need_dres:
        dres = alloc_like(residual.shape, residual)
    launch(
        _bn_act_bwd_reduce_kernel, (num_tiles, cdiv(C, block_c)),
        grad_out, z, residual if residual is not None else z, dres if dres is not None else z,
        mean, invstd, bn_weight if bn_weight is not None else mean, bn_bias if bn_bias is not None else mean,
        part_g, part_gx,
        M, C, T, H, W,
        *pc_strides(grad_out), *pc_strides(z), *pc_strides(residual), *pc_strides(dres),
        HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None, HAS_RES=residual is not None,
        WRITE_DRES=dres is not None, ACT=act, CL=cl,
        D_ALIGN=rows_alignment(grad_out), Z_ALIGN=rows_alignment(z),
        R_ALIGN=rows_alignment(residual), G_ALIGN=rows_alignment(dres),
        C_VEC=channel_vector(C, grad_out, z, residual, dres) if cl else 1,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=8,  # 4 warps spill with scalar (odd-C) loads
    )
    group = sync_stats.current() if training else None
    if group is not None:  # the batch statistics span every rank's rows
        coef, dbn_weight, dbn_bias, dbias = sync_stats.backward_coefficients(
            group, M, part_g, part_gx, mean, invstd, bn_weight, bn_bias, z if need_dbias else None)
        dbn_weight = dbn_weight.to(bn_weight.dtype) if need_dbn_weight else None
        dbn_bias = dbn_bias.to(bn_bias.dtype) if need_dbn_bias else None
        dbias = dbias.to(bias_dtype) if need_dbias else None
        return coef, dbn_weight, dbn_bias, dbias, dres
    coef = alloc((NUM_COEF, C), dtype=torch.float32, device=dev)
    dbn_weight = alloc((C,), dtype=bn_weight.dtype, device=dev) if need_dbn_weight else None
    dbn_bias = alloc((C,), dtype=bn_bias.dtype, device=dev) if need_dbn_bias else None
    dbias = alloc((C,), dtype=bias_dtype, device=dev) if need_dbias else None
    fin_c = min(triton.next_power_of_2(C), 16 if interpreted() else 64)
    launch(
        _bn_bwd_finalize_kernel, (cdiv(C, fin_c),),
        part_g, part_gx, mean, invstd,
        bn_weight if bn_weight is not None else mean, bn_bias if bn_bias is not None else mean,
        coef, dbn_weight if dbn_weight is not None else coef, dbn_bias if dbn_bias is not None else coef,
        dbias if dbias is not None else coef,
        num_tiles, float(M), C,
        HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None, TRAINING=training,
        WRITE_DBN_WEIGHT=need_dbn_weight, WRITE_DBN_BIAS=need_dbn_bias, WRITE_DBIAS=need_dbias,
        BLOCK_T=16 if interpreted() else 64, BLOCK_C=fin_c,
    )
    return coef, dbn_weight, dbn_bias, dbias, dres

