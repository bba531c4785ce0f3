"""Implicit-GEMM conv3d + BN + activation, backward: the gradients of implicit_gemm.py's forward.

``_igemm_dgrad_kernel``  dx as a GEMM over input rows: for each tap, the output position it feeds
                         and dz there, rebuilt from dy and z in the prologue (never stored). Rows
                         are grouped by their residue modulo the stride, so every tap a program
                         visits is valid for all its rows (a strided conv wastes no MMA on taps
                         that feed nothing).
``_igemm_wgrad_kernel``  dW[co, (tap, ci)] = dz^T x(tap), split over rows into fp32 partials
                         summed in a fixed order (deterministic); written in the (C_out, kT, kH,
                         kW, C_in/groups) order of a channels_last_3d weight.

Both share the forward's geometry, gathers and K-loop forms (tap-major / flat): see implicit_gemm.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common as cm
from . import _gemm as gm
from . import batchnorm as bn
from . import splitk
from ._launch import Tuned, alloc, launch
from ._layout import (
    alloc_channels_last,
    cdiv,
    channel_vector,
    channels_contiguous,
    in_format_of,
    rows_strides,
)
from ._replay import planned
from .implicit_gemm import (
    _alignment,
    _check_pre,
    _gather_flat,
    _gather_tap,
    _Geometry,
    _group_alignment,
    _inside,
    _tap,
    _unaligned,
    _weight_cl,
)

_tile = gm.tile

@triton.jit
def _first_tap(r, p, d, s, K):
    """The smallest tap k in [0, K) through which input index r (mod the stride s) receives a
    gradient, (r + p - k * d) % s == 0; K when there is none."""
    first = K
    for i in range(0, K):
        k = K - 1 - i
        first = tl.where((r + p - k * d) % s == 0, k, first)
    return first


# not on divisibility: what varies with clip length and batch (docs/kernels.md); the batch
# strides stay specialised here (without them the dx store lost its vectors and spilled)
@triton.jit(do_not_specialize_on_alignment=['T_in', 'T_out', 'QT'])
def _igemm_dgrad_kernel(
    dy_ptr, z_ptr, res_ptr, coef_ptr, w_ptr, dx_ptr,
    R, C_in_g, C_out_g, C_out, T_in, H_in, W_in, T_out, H_out, W_out, QT, QH, QW, KT, KH, KW,
    stride_dn, stride_dt, stride_dh, stride_dw,
    stride_zn, stride_zt, stride_zh, stride_zw,
    stride_rn, stride_rt, stride_rh, stride_rw,
    stride_xn, stride_xt, stride_xh, stride_xw, stride_wo, stride_wi, stride_wt, stride_wh, stride_ww,
    st, sh, sw, pt, ph, pw, dt, dh, dw, jt_step, jh_step, jw_step,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr, GROUPED: tl.constexpr,
    D_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr, CO_ALIGN: tl.constexpr,
    X_ALIGN: tl.constexpr, CO_VEC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Rows: the input positions of one residue class (rt, rh, rw) modulo the stride, at
    # (qt * st + rt, qh * sh + rh, qw * sw + rw): the taps that feed them are the same for every
    # row, an arithmetic progression per axis (first tap, step s / gcd(s, d)).
    pid = tl.program_id(0)
    cls = tl.program_id(1)
    num_n = tl.cdiv(C_in_g, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rw = cls % sw
    rh = (cls // sw) % sh
    rt = cls // (sw * sh)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, qt, qh, qw = cm.split_rows(rows, QT, QH, QW)
    ti = qt * st + rt
    hi = qh * sh + rh
    wi = qw * sw + rw
    rmask = (rows < R) & (ti < T_in) & (hi < H_in) & (wi < W_in)
    ft = _first_tap(rt, pt, dt, st, KT)
    fh = _first_tap(rh, ph, dh, sh, KH)
    fw = _first_tap(rw, pw, dw, sw, KW)
    nt = (KT - ft + jt_step - 1) // jt_step
    nh = (KH - fh + jh_step - 1) // jh_step
    nw = (KW - fw + jw_step - 1) // jw_step
    d_base = cm.position_offsets(n, qt, qh, qw, stride_dn, stride_dt, stride_dh, stride_dw)
    z_base = cm.position_offsets(n, qt, qh, qw, stride_zn, stride_zt, stride_zh, stride_zw)
    r_base = cm.position_offsets(n, qt, qh, qw, stride_rn, stride_rt, stride_rh, stride_rw)
    x_rows = cm.position_offsets(n, ti, hi, wi, stride_xn, stride_xt, stride_xh, stride_xw)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cimask = ci < C_in_g
    co_base = 0
    if GROUPED:  # CO_ALIGN and X_ALIGN divide the channels per group
        g = tl.program_id(2)
        co_base = tl.multiple_of(g * C_out_g, CO_ALIGN)
        d_base += co_base
        z_base += co_base
        r_base += co_base
        x_rows += tl.multiple_of(g * C_in_g, X_ALIGN)
    ks = tl.arange(0, BLOCK_K)
    num_cb = tl.cdiv(C_out_g, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, nt * nh * nw * num_cb):
        j = step // num_cb
        kk = (step - j * num_cb) * BLOCK_K + ks
        kmask = cm.channel_mask(kk, C_out_g, CO_VEC)
        jw = j % nw
        jh = (j // nw) % nh
        jt = j // (nw * nh)
        kt = ft + jt * jt_step
        kh = fh + jh * jh_step
        kw = fw + jw * jw_step
        # the output position this tap reads from is q + (r + p - k * d) / s (an exact division)
        ot = (rt + pt - kt * dt) // st
        oh = (rh + ph - kh * dh) // sh
        ow = (rw + pw - kw * dw) // sw
        ok = rmask & _inside(qt + ot, qh + oh, qw + ow, T_out, H_out, W_out)
        d_rows = d_base + (cm.as_int64(ot) * stride_dt + cm.as_int64(oh) * stride_dh
                             + cm.as_int64(ow) * stride_dw)
        z_rows = z_base + (cm.as_int64(ot) * stride_zt + cm.as_int64(oh) * stride_zh
                             + cm.as_int64(ow) * stride_zw)
        r_rows = r_base + (cm.as_int64(ot) * stride_rt + cm.as_int64(oh) * stride_rh
                             + cm.as_int64(ow) * stride_rw)
        if D_ALIGN > 1:
            d_rows = tl.multiple_of(d_rows, D_ALIGN)
        if Z_ALIGN > 1:
            z_rows = tl.multiple_of(z_rows, Z_ALIGN)
        if R_ALIGN > 1:
            r_rows = tl.multiple_of(r_rows, R_ALIGN)
        dz = gm.dz_tile(dy_ptr, z_ptr, res_ptr, coef_ptr, d_rows[:, None] + kk[None, :],
                        z_rows[:, None] + kk[None, :], r_rows[:, None] + kk[None, :], co_base + kk,
                        ok[:, None] & kmask[None, :], C_out, HAS_RES, ACT, TRAINING)
        w_tap = kt * stride_wt + kh * stride_wh + kw * stride_ww
        b = tl.load(w_ptr + ((co_base + kk) * stride_wo + w_tap)[:, None] + (ci * stride_wi)[None, :],
                    mask=kmask[:, None] & cimask[None, :], other=0.0)
        acc = gm.dot(dz.to(w_ptr.dtype.element_ty), b, acc, PREC)

    if X_ALIGN > 1:
        x_rows = tl.multiple_of(x_rows, X_ALIGN)
    tl.store(dx_ptr + x_rows[:, None] + ci[None, :], acc, mask=rmask[:, None] & cimask[None, :])


# not on divisibility: what varies with clip length and batch (docs/kernels.md); conv strides
# as plain values: stride-1 and stride-2 layers share a compile
@triton.jit(do_not_specialize=['st', 'sh', 'sw'],
            do_not_specialize_on_alignment=['T_out', 'T_in', 'stride_dn', 'stride_zn', 'stride_rn',
                                            'stride_xn'])
def _igemm_wgrad_kernel(
    dy_ptr, z_ptr, res_ptr, coef_ptr, x_ptr, pre_ptr, dw_ptr,
    M, C_in_g, C_out_g, C_out, T_out, H_out, W_out, T_in, H_in, W_in, TAPS, KH, KW, rows_per_split,
    stride_dn, stride_dt, stride_dh, stride_dw,
    stride_zn, stride_zt, stride_zh, stride_zw,
    stride_rn, stride_rt, stride_rh, stride_rw,
    stride_xn, stride_xt, stride_xh, stride_xw,
    st, sh, sw, pt, ph, pw, dt, dh, dw,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr, GROUPED: tl.constexpr,
    FLAT_K: tl.constexpr,
    D_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr, CO_ALIGN: tl.constexpr,
    X_ALIGN: tl.constexpr, CI_VEC: tl.constexpr, PREC: tl.constexpr, PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tile: BLOCK_M output channels x BLOCK_N columns of the group's (tap, input channel) axis;
    # the reduction (BLOCK_K per step) runs over this split's output rows.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    K = TAPS * C_in_g
    if FLAT_K:
        num_n = tl.cdiv(K, BLOCK_N)
    else:
        num_n = TAPS * tl.cdiv(C_in_g, BLOCK_N)
    num_m = tl.cdiv(C_out_g, BLOCK_M)
    pid_n = pid % num_n
    pid_m = (pid // num_n) % num_m
    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    comask = co < C_out_g
    chans = co
    ci_base = 0
    if GROUPED:  # CO_ALIGN and X_ALIGN divide the channels per group
        g = pid // (num_n * num_m)
        chans = tl.multiple_of(g * C_out_g, CO_ALIGN) + co
        ci_base = tl.multiple_of(g * C_in_g, X_ALIGN)
    if FLAT_K:
        kk = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = kk < K
        tap = kk // C_in_g
        ci = kk - tap * C_in_g
    else:
        num_cb = tl.cdiv(C_in_g, BLOCK_N)
        tap = pid_n // num_cb
        ci = (pid_n - tap * num_cb) * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = cm.channel_mask(ci, C_in_g, CI_VEC)
        kk = tap * C_in_g + ci
    kt, kh, kw = _tap(tap, KH, KW)
    r_start = split * rows_per_split
    r_end = cm.split_end(r_start, rows_per_split, M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        rmask = rows < r_end
        n, to, ho, wo = cm.split_rows(rows, T_out, H_out, W_out)
        dz = gm.dz_at_rows(dy_ptr, z_ptr, res_ptr, coef_ptr, n, to, ho, wo, chans,
                           rmask[:, None] & comask[None, :], C_out,
                           stride_dn, stride_dt, stride_dh, stride_dw, stride_zn, stride_zt, stride_zh,
                           stride_zw, stride_rn, stride_rt, stride_rh, stride_rw,
                           HAS_RES, ACT, TRAINING, D_ALIGN, Z_ALIGN, R_ALIGN)
        t0 = to * st - pt
        h0 = ho * sh - ph
        w0 = wo * sw - pw
        x_rows = cm.position_offsets(n, t0, h0, w0, stride_xn, stride_xt, stride_xh, stride_xw) + ci_base
        if FLAT_K:
            xa = _gather_flat(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, ci, kmask,
                              T_in, H_in, W_in, stride_xt, stride_xh, stride_xw, dt, dh, dw, pre_ptr, C_in_g,
                              PRE)
        else:
            xa = _gather_tap(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, ci, kmask,
                             T_in, H_in, W_in, stride_xt, stride_xh, stride_xw, dt, dh, dw, pre_ptr, C_in_g,
                             X_ALIGN, PRE)
        acc = gm.dot(tl.trans(dz.to(x_ptr.dtype.element_ty)), xa, acc, PREC)

    w_off = split.to(tl.int64) * C_out * K + chans[:, None] * K + kk[None, :]
    tl.store(dw_ptr + w_off, acc, mask=comask[:, None] & kmask[None, :])


# dgrad (BLOCK_M input rows x BLOCK_N input channels, K = output channels per tap) and wgrad
# (BLOCK_M output channels x BLOCK_N (tap, input channel) columns, K = rows): the pointwise
# backward's classes, with the gathers' extra registers.
_BWD_TILES = {
    # (wgrad: 64x64x64 with 4 warps spilled on sm_80 with Triton 3.6, BN1 + ReLU prologue)
    "16bit": [_tile(128, 128, 32, 8, 3), _tile(64, 128, 32, 8, 3), _tile(64, 64, 32, 4, 3)],
    "16bit-unaligned": [_tile(128, 64, 32, 8, 2), _tile(64, 128, 32, 8, 2), _tile(64, 64, 32, 4, 3)],
    "tf32": [_tile(128, 128, 32, 8, 3), _tile(128, 64, 32, 8, 3), _tile(64, 64, 32, 4, 3)],
    "tf32-unaligned": [_tile(128, 64, 32, 8, 2), _tile(64, 128, 32, 8, 2), _tile(64, 64, 32, 4, 3)],
    "ieee": [_tile(64, 64, 16, 8, 2), _tile(64, 32, 16, 8, 2)],
    "ieee-unaligned": [_tile(32, 32, 16, 4, 2), _tile(64, 32, 16, 8, 1)],
}
# Fewer than FLAT_BELOW input channels per group: dgrad's columns (input channels) are narrow
# tiles; wgrad's run flat over (tap, channel).
_DGRAD = Tuned(
    _igemm_dgrad_kernel,
    {**_BWD_TILES, "16bit-flat": [_tile(64, 16, 32, 8, 2), _tile(128, 16, 16, 8, 2)],
     "tf32-flat": [_tile(64, 16, 32, 8, 2)],
     # (64x16x16 with one stage spilled on sm_90 with Triton 3.6 and 3.9, on sm_80 with 3.8)
     "ieee-flat": [_tile(64, 16, 16, 8, 2)],
     # 64-wide tiles with 4 warps spilled on sm_90 (64x64x64, every Triton 3.6-3.9; 64x64x32
     # with unaligned channels, 3.6 and 3.8), 64x128 ones on sm_80 (3.6): 128-row or 8-warp tiles
     "16bit": [_tile(128, 128, 32, 8, 3), _tile(128, 64, 32, 8, 3)],
     "16bit-unaligned": [_tile(128, 64, 32, 8, 2), _tile(64, 64, 32, 8, 3)],
     # 128x64x32 spills 16 bytes on sm_90 for a strided conv with unaligned output channels;
     # with TF32-rounded operands 128x64x16 and 64x128x32 spilled too (3.6 sm_90, 3.9 sm_80)
     "tf32-unaligned": [_tile(64, 64, 16, 8, 2), _tile(128, 64, 32, 8, 3)],
     # IEEE fp32 (FMA dots, not a fast path): larger tiles spilled on sm_90 (3.6, 3.9)
     "ieee": [_tile(32, 64, 16, 4, 1)], "ieee-unaligned": [_tile(32, 16, 16, 4, 1)]},
    key=["R", "C_in_g", "C_out_g", "KT", "KH", "KW", "HAS_RES"], interpret=gm.INTERPRET_GEMM,
    # sm_80 (mma.sync accumulators in registers): the second 16-bit and TF32 tiles and the 4-warp
    # IEEE one spilled 8-40 B (Triton 3.6, 3.8 or 3.9); these compile clean on all three
    arch_configs={80: {"16bit": [_tile(128, 128, 32, 8, 3)],
                       "16bit-unaligned": [_tile(128, 64, 32, 8, 2)],
                       "tf32-unaligned": [_tile(64, 64, 16, 8, 2)],
                       "ieee": [_tile(32, 64, 16, 8, 1)]}})
_WGRAD = Tuned(
    _igemm_wgrad_kernel,
    # 64x128x32 spilled 40-168 B (sm_90 and sm_80, Triton 3.6) in the flat (stem) wgrad, and
    # 128x128x32 TF32 on sm_80 (3.6)
    {**_BWD_TILES, "16bit-flat": [_tile(64, 64, 32, 8, 2)],
     "tf32": [_tile(128, 64, 32, 8, 3), _tile(64, 64, 32, 4, 3)],
     "tf32-flat": [_tile(64, 64, 32, 8, 2)], "ieee-flat": [_tile(64, 32, 16, 4, 2)]},
    key=["M", "C_in_g", "C_out_g", "TAPS", "HAS_RES", "PRE"], interpret=gm.INTERPRET_GEMM,
    # sm_80: the flat TF32 tile's two stages spilled 8 B in the stem unit's wgrad (3.8, 3.9)
    arch_configs={80: {"tf32-flat": [_tile(64, 64, 32, 8, 1)]}})


@planned
def conv_bn_act_bwd(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual, stride,
                    padding, dilation, training: bool, activation: str | None, needs, *,
                    pre: torch.Tensor | None = None):
    """Gradients (dx, dweight, dbias, dbn_weight, dbn_bias, dresidual) of conv_bn_act_fwd, with ``z``,
    ``mean`` and ``invstd`` as it saved them; dx, dweight and dresidual in the memory formats of
    x, weight and residual. ``needs`` says which of the six are wanted (the others are None).

    With the forward's ``pre``, the wgrad applies it to x as it loads it (the conv's input was
    ``relu(x * scale + shift)``) and dx is the gradient of that input, not of x."""
    need_dx, need_dw, need_db, need_dbn_weight, need_dbn_bias, need_dres = needs
    geom = _Geometry(x.shape, weight.shape, stride, padding, dilation)
    _check_pre(pre, geom)
    act = cm.ACTIVATIONS[activation]
    x_in, residual_in = x, residual
    grad_out, residual = channels_contiguous(grad_out), channels_contiguous(residual)
    coef, dbn_weight, dbn_bias, dbias, dres = bn.bwd_reduce_finalize(
        grad_out, z, mean, invstd, bn_weight, bn_bias, residual, act, training,
        need_dbn_weight, need_dbn_bias, need_db, need_dres,
        bias_dtype=bias.dtype if bias is not None else None)
    prec = gm.dot_precision(x.dtype)
    cls = gm.operand_class(x.dtype, prec)
    d_align, z_align = _alignment(grad_out, geom, geom.C_out_g), _alignment(z, geom, geom.C_out_g)
    r_align = _alignment(residual, geom, geom.C_out_g)
    dz_aligns = (d_align, z_align, *([r_align] if residual is not None else []))
    co_align = _group_alignment(16, geom, geom.C_out_g)  # what a group's first channel keeps
    common = dict(
        HAS_RES=residual is not None, ACT=act, TRAINING=training, GROUPED=geom.groups > 1,
        D_ALIGN=d_align, Z_ALIGN=z_align, R_ALIGN=r_align, CO_ALIGN=co_align, PREC=prec,
    )
    some = z
    dx = dw = None
    if need_dx:
        st, sh, sw = stride
        q = (cdiv(geom.T_in, st), cdiv(geom.H_in, sh), cdiv(geom.W_in, sw))
        R = geom.N * q[0] * q[1] * q[2]
        steps = [s // math.gcd(s, d) for s, d in zip(stride, dilation)]
        dx = alloc_channels_last(x.shape, x)
        w = _weight_cl(weight, geom)
        x_align = _alignment(dx, geom, geom.C_in_g)
        variant = cls + ("-flat" if geom.flat else _unaligned(x.dtype, *dz_aligns, x_align))
        kernel, meta = _DGRAD.select(variant)

        def grid(meta):
            return (cdiv(R, meta["BLOCK_M"]) * cdiv(geom.C_in_g, meta["BLOCK_N"]),
                    st * sh * sw, geom.groups)

        launch(
            kernel, grid,
            grad_out, z, residual if residual is not None else some, coef, w, dx,
            R, geom.C_in_g, geom.C_out_g, geom.C_out, geom.T_in, geom.H_in, geom.W_in,
            geom.T_out, geom.H_out, geom.W_out, *q, geom.KT, geom.KH, geom.KW,
            *rows_strides(grad_out), *rows_strides(z), *rows_strides(residual), *rows_strides(dx),
            w.stride(0), w.stride(1), *w.stride()[2:], *geom.conv_args(), *steps,
            X_ALIGN=x_align, CO_VEC=channel_vector(geom.C_out_g, grad_out, z, residual),
            **common, **meta,
        )
        dx = in_format_of(dx, x_in)
    if need_dw:
        x = channels_contiguous(x)
        K = geom.taps * geom.C_in_g
        splits, rows_per_split = splitk.row_splits(geom.M, cdiv(geom.C_out, 128) * cdiv(K, 128),
                                                   x.device)
        partial = alloc((splits, geom.C_out, K), dtype=torch.float32, device=x.device)
        x_align = _alignment(x, geom, geom.C_in_g)
        variant = cls + ("-flat" if geom.flat else _unaligned(x.dtype, *dz_aligns, x_align))
        kernel, meta = _WGRAD.select(variant)

        def grid(meta):
            if geom.flat:
                num_n = cdiv(K, meta["BLOCK_N"])
            else:
                num_n = geom.taps * cdiv(geom.C_in_g, meta["BLOCK_N"])
            return (geom.groups * cdiv(geom.C_out_g, meta["BLOCK_M"]) * num_n, splits)

        launch(
            kernel, grid,
            grad_out, z, residual if residual is not None else some, coef, x,
            pre if pre is not None else x, partial,
            geom.M, geom.C_in_g, geom.C_out_g, geom.C_out, geom.T_out, geom.H_out, geom.W_out,
            geom.T_in, geom.H_in, geom.W_in, geom.taps, geom.KH, geom.KW, rows_per_split,
            *rows_strides(grad_out), *rows_strides(z), *rows_strides(residual), *rows_strides(x),
            *geom.conv_args(), FLAT_K=geom.flat, X_ALIGN=x_align,
            CI_VEC=channel_vector(geom.C_in_g, x), PRE=pre is not None, **common, **meta,
        )
        # (C_out, kT, kH, kW, C_in/groups): the weight's shape with channels_last_3d strides
        dw = splitk.sum_splits(partial, weight.dtype).view(
            geom.C_out, geom.KT, geom.KH, geom.KW, geom.C_in_g).permute(0, 4, 1, 2, 3)
        dw = in_format_of(dw, weight)
    if dres is not None:
        dres = in_format_of(dres, residual_in)
    return dx, dw, dbias, dbn_weight, dbn_bias, dres

