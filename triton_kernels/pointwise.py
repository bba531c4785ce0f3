"""Pointwise (1x1x1, any stride and padding) conv3d fused with BatchNorm and activation.

A 1x1x1 convolution is a GEMM: rows are output positions (n, t, h, w), K = C_in, N = C_out;
the row of x an output reads is (n, t*st - pt, h*sh - ph, w*sw - pw), zero where that is
padding. Kernels (all accumulate in fp32 with ``_gemm.dot``):

``_pointwise_fwd_kernel``    eval: y = act((x W^T + b) * scale + shift [+ r]) with BN folded in
                             the epilogue (one launch); train (STATS): writes z = x W^T + b and,
                             per tile of rows, each channel's mean and M2 for batchnorm.py.
``_pointwise_dgrad_kernel``  dx = dz W over input rows, dz rebuilt in the prologue from dy and z
                             with the BN/activation backward coefficients (never stored).
``_pointwise_wgrad_kernel``  dW = dz^T x, split over rows into fp32 partials (deterministic).

Activations are addressed with contiguous channels (see _layout.py): inputs in another layout are
converted at the boundary, and the output comes back in the input's memory format.
"""

from __future__ import annotations

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
    channels_contiguous,
    in_format_of,
    out_size,
    rows_alignment,
    rows_strides,
)
from ._replay import planned

STATS_BLOCK_M = gm.STATS_BLOCK_M
_tile = gm.tile


def _fully_aligned(*tensors) -> bool:
    """Every row of every tensor starts on a 16-byte boundary (full-width channel vectors)."""
    return all(rows_alignment(t) * t.element_size() == 16 for t in tensors if t is not None)


# ----------------------------------------------------------------------------- forward


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=['T_out', 'T_in', 'stride_xn', 'stride_on', 'stride_rn'])
def _pointwise_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, bn_weight_ptr, bn_bias_ptr, rmean_ptr, rvar_ptr, res_ptr,
    out_ptr, z_ptr, save_mean_ptr, save_invstd_ptr, part_mean_ptr, part_m2_ptr,
    M, C_in, C_out, T_out, H_out, W_out, T_in, H_in, W_in,
    stride_xn, stride_xt, stride_xh, stride_xw, stride_wo, stride_wi,
    stride_on, stride_ot, stride_oh, stride_ow,
    stride_rn, stride_rt, stride_rh, stride_rw,
    st, sh, sw, pt, ph, pw, eps,
    HAS_BIAS: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, SAVE: tl.constexpr,
    X_ALIGN: tl.constexpr, O_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_out, BLOCK_N)
    pid_m = pid // num_n  # consecutive programs share the x tile (L2 reuse)
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n, to, ho, wo = cm.split_rows(rows, T_out, H_out, W_out)
    ti = to * st - pt
    hi = ho * sh - ph
    wi = wo * sw - pw
    inside = rmask & (ti >= 0) & (ti < T_in) & (hi >= 0) & (hi < H_in) & (wi >= 0) & (wi < W_in)
    x_rows = cm.row_offsets(n, ti, hi, wi, stride_xn, stride_xt, stride_xh, stride_xw, X_ALIGN)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C_out
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C_in, BLOCK_K):
        kk = k0 + ks
        kmask = kk < C_in
        a = tl.load(x_ptr + x_rows[:, None] + kk[None, :],
                    mask=inside[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + kk[:, None] * stride_wi + cols[None, :] * stride_wo,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = gm.dot(a, b, acc, PREC)

    gm.bn_act_epilogue(
        acc, pid_m, M, n, to, ho, wo, rmask, cols, cmask, C_out,
        bias_ptr, bn_weight_ptr, bn_bias_ptr, rmean_ptr, rvar_ptr, res_ptr,
        out_ptr, z_ptr, save_mean_ptr, save_invstd_ptr, part_mean_ptr, part_m2_ptr,
        stride_on, stride_ot, stride_oh, stride_ow, stride_rn, stride_rt, stride_rh, stride_rw, eps,
        HAS_BIAS, HAS_BN_WEIGHT, HAS_BN_BIAS, HAS_RES, ACT, STATS, SAVE, O_ALIGN, R_ALIGN, BLOCK_M)


# Tile sizes per variant, kept to those that compile without spills on sm_90 and sm_80
# (python -m r21d.static checks every one, with SiLU, the costlier activation): a larger epilogue
# ("-res": a residual, or z and the statistics saved for autograd) and fp32 operands need smaller
# tiles, IEEE fp32 (no tensor cores) smaller still; "-unaligned" rows (not 16-byte aligned: odd
# channel counts) move channel vectors narrower than 16 bytes, whose addresses take registers,
# so fewer pipeline stages.
_FWD_EVAL = Tuned(
    _pointwise_fwd_kernel,
    {
        "16bit": [_tile(128, 128, 64, 8, 3), _tile(128, 64, 64, 4, 4), _tile(64, 128, 64, 4, 4),
                  _tile(64, 64, 64, 4, 4)],
        "16bit-res": [_tile(128, 64, 64, 4, 4), _tile(64, 128, 64, 4, 4), _tile(64, 64, 64, 4, 4)],
        "16bit-unaligned": [_tile(128, 64, 64, 8, 2), _tile(128, 64, 32, 8, 2),
                            _tile(64, 128, 32, 8, 2), _tile(64, 64, 32, 4, 3)],
        "16bit-res-unaligned": [_tile(64, 64, 32, 8, 2), _tile(64, 64, 16, 8, 2),
                                _tile(64, 32, 32, 4, 2)],
        # 128x128x32 spilled (208-256 B) on sm_90 with Triton 3.6 and 3.9 once the TF32 operands
        # are rounded; 64x128x32 with 4 warps spilled on sm_80 (3.6)
        "tf32": [_tile(128, 64, 32, 4, 3), _tile(64, 128, 32, 8, 3), _tile(64, 64, 32, 4, 3)],
        "tf32-res": [_tile(128, 64, 32, 8, 3), _tile(64, 128, 32, 8, 3), _tile(64, 64, 32, 4, 3)],
        "tf32-unaligned": [_tile(128, 64, 16, 8, 2), _tile(128, 64, 32, 8, 1),
                           _tile(64, 128, 16, 8, 2), _tile(64, 64, 32, 4, 3)],
        "tf32-res-unaligned": [_tile(64, 64, 32, 8, 2), _tile(64, 64, 16, 8, 2),
                               _tile(64, 32, 32, 4, 2)],
        # 64x64x32 with 4 warps spilled 256 B on sm_90 with Triton 3.9
        "ieee": [_tile(64, 64, 16, 4, 2), _tile(128, 64, 16, 8, 2), _tile(128, 128, 16, 8, 2)],
        "ieee-res": [_tile(128, 64, 16, 8, 1), _tile(64, 128, 16, 8, 1), _tile(64, 64, 32, 8, 2),
                     _tile(64, 64, 16, 4, 3)],
        "ieee-unaligned": [_tile(128, 64, 16, 8, 2), _tile(64, 128, 16, 8, 2),
                           _tile(64, 64, 16, 4, 2)],
        "ieee-res-unaligned": [_tile(128, 64, 16, 8, 1), _tile(64, 128, 16, 8, 1),
                               _tile(64, 64, 32, 8, 2), _tile(64, 64, 16, 8, 2)],
    },
    key=["M", "C_in", "C_out", "SAVE"], interpret=gm.INTERPRET_GEMM,
    # sm_80 (mma.sync accumulators in the general registers): 64x64x32 TF32 with 4 warps and
    # unaligned rows spilled 8 B (Triton 3.6)
    arch_configs={80: {"tf32-unaligned": [_tile(128, 64, 16, 8, 2), _tile(128, 64, 32, 8, 1),
                                          _tile(64, 128, 16, 8, 2)]}},
)
_FWD_STATS = Tuned(
    _pointwise_fwd_kernel,
    {
        "16bit": [_tile(STATS_BLOCK_M, 128, 64, 8, 3), _tile(STATS_BLOCK_M, 64, 64, 4, 4),
                  _tile(STATS_BLOCK_M, 128, 32, 8, 4)],
        # (128x128x32 spilled on sm_90 with Triton 3.9)
        "16bit-unaligned": [_tile(STATS_BLOCK_M, 64, 64, 8, 2), _tile(STATS_BLOCK_M, 64, 32, 8, 2)],
        "tf32": [_tile(STATS_BLOCK_M, 128, 32, 8, 3), _tile(STATS_BLOCK_M, 64, 32, 4, 3)],
        "tf32-unaligned": [_tile(STATS_BLOCK_M, 64, 16, 8, 2), _tile(STATS_BLOCK_M, 64, 32, 8, 1),
                           _tile(STATS_BLOCK_M, 128, 32, 8, 1)],
        "ieee": [_tile(STATS_BLOCK_M, 64, 16, 8, 2), _tile(STATS_BLOCK_M, 128, 16, 8, 2)],
        "ieee-unaligned": [_tile(STATS_BLOCK_M, 64, 16, 8, 2)],
    },
    key=["M", "C_in", "C_out"], interpret=gm.INTERPRET_GEMM,
)


@planned
def conv_bn_act_fwd(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                    stride, padding, training: bool, momentum: float, eps: float,
                    activation: str | None, save: bool, running_in_place: bool = False):
    """Pointwise conv + BN + activation forward; returns what _gemm.conv_bn_act_forward documents
    (``running_in_place`` as there)."""
    N, C_in, T_in, H_in, W_in = x.shape
    C_out = weight.shape[0]
    (st, sh, sw), (pt, ph, pw) = stride, padding
    T_out, H_out, W_out = out_size(T_in, 1, st, pt), out_size(H_in, 1, sh, ph), out_size(W_in, 1, sw, pw)
    M = N * T_out * H_out * W_out
    prec = gm.dot_precision(x.dtype)

    def select(x, out, residual, training, heavy):
        unaligned = "" if _fully_aligned(x, out, residual) else "-unaligned"
        if training:
            return _FWD_STATS.select(gm.operand_class(x.dtype, prec) + unaligned)
        return _FWD_EVAL.select(gm.operand_class(x.dtype, prec) + ("-res" if heavy else "") + unaligned)

    def launch_gemm(kernel, meta, x, residual, out, pointers):
        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * cdiv(C_out, meta["BLOCK_N"]),)

        launch(
            kernel, grid, x, weight, *pointers,
            M, C_in, C_out, T_out, H_out, W_out, T_in, H_in, W_in,
            *rows_strides(x), weight.stride(0), weight.stride(1),
            *rows_strides(out), *rows_strides(residual),
            st, sh, sw, pt, ph, pw, float(eps),
            HAS_BIAS=bias is not None, HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None,
            HAS_RES=residual is not None and not training, ACT=cm.ACTIVATIONS[activation],
            STATS=training, SAVE=save, X_ALIGN=rows_alignment(x), O_ALIGN=rows_alignment(out),
            R_ALIGN=rows_alignment(residual), PREC=prec, **meta,
        )

    return gm.conv_bn_act_forward(x, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                                  (N, C_out, T_out, H_out, W_out), training, momentum, eps,
                                  activation, save, select, launch_gemm,
                                  running_in_place=running_in_place)


# ----------------------------------------------------------------------------- backward


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=[
    'T_in', 'T_out', 'stride_dn', 'stride_zn', 'stride_rn', 'stride_xn'])
def _pointwise_dgrad_kernel(
    dy_ptr, z_ptr, res_ptr, coef_ptr, w_ptr, dx_ptr,
    M_in, C_in, C_out, T_in, H_in, W_in, T_out, H_out, W_out,
    stride_dn, stride_dt, stride_dh, stride_dw,
    stride_zn, stride_zt, stride_zh, stride_zw,
    stride_rn, stride_rt, stride_rh, stride_rw,
    stride_xn, stride_xt, stride_xh, stride_xw, stride_wo, stride_wi,
    st, sh, sw, pt, ph, pw,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr,
    D_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr,
    X_ALIGN: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_in, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    # Rows are input positions; each one either feeds exactly one output position or none
    # (stride skips it, or it is never reached), in which case its gradient is 0.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M_in
    n, ti, hi, wi = cm.split_rows(rows, T_in, H_in, W_in)
    tp = ti + pt
    hp = hi + ph
    wp = wi + pw
    to = tp // st
    ho = hp // sh
    wo = wp // sw
    feeds = rmask & (tp % st == 0) & (to < T_out) & (hp % sh == 0) & (ho < H_out) \
        & (wp % sw == 0) & (wo < W_out)
    d_rows = cm.row_offsets(n, to, ho, wo, stride_dn, stride_dt, stride_dh, stride_dw, D_ALIGN)
    z_rows = cm.row_offsets(n, to, ho, wo, stride_zn, stride_zt, stride_zh, stride_zw, Z_ALIGN)
    r_rows = cm.row_offsets(n, to, ho, wo, stride_rn, stride_rt, stride_rh, stride_rw, R_ALIGN)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C_in
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C_out, BLOCK_K):
        kk = k0 + ks
        kmask = kk < C_out
        dz = gm.dz_tile(dy_ptr, z_ptr, res_ptr, coef_ptr, d_rows[:, None] + kk[None, :],
                      z_rows[:, None] + kk[None, :], r_rows[:, None] + kk[None, :], kk,
                      feeds[:, None] & kmask[None, :], C_out, HAS_RES, ACT, TRAINING)
        b = tl.load(w_ptr + kk[:, None] * stride_wo + cols[None, :] * stride_wi,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = gm.dot(dz.to(w_ptr.dtype.element_ty), b, acc, PREC)

    x_off = cm.row_offsets(n, ti, hi, wi, stride_xn, stride_xt, stride_xh, stride_xw, X_ALIGN)[:, None] \
        + cols[None, :]
    tl.store(dx_ptr + x_off, acc, mask=rmask[:, None] & cmask[None, :])


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=[
    'T_out', 'T_in', 'stride_dn', 'stride_zn', 'stride_rn', 'stride_xn'])
def _pointwise_wgrad_kernel(
    dy_ptr, z_ptr, res_ptr, coef_ptr, x_ptr, dw_ptr,
    M, C_in, C_out, T_out, H_out, W_out, T_in, H_in, W_in, rows_per_split,
    stride_dn, stride_dt, stride_dh, stride_dw,
    stride_zn, stride_zt, stride_zh, stride_zw,
    stride_rn, stride_rt, stride_rh, stride_rw,
    stride_xn, stride_xt, stride_xh, stride_xw,
    st, sh, sw, pt, ph, pw,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr,
    D_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr,
    X_ALIGN: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tile: BLOCK_M output channels x BLOCK_N input channels; K runs over this split's rows.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_n = tl.cdiv(C_in, BLOCK_N)
    co = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < C_out
    cimask = ci < C_in
    r_start = split * rows_per_split
    r_end = cm.split_end(r_start, rows_per_split, M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        rmask = rows < r_end
        n, to, ho, wo = cm.split_rows(rows, T_out, H_out, W_out)
        dz = gm.dz_at_rows(dy_ptr, z_ptr, res_ptr, coef_ptr, n, to, ho, wo, co,
                           rmask[:, None] & comask[None, :], C_out,
                           stride_dn, stride_dt, stride_dh, stride_dw, stride_zn, stride_zt, stride_zh,
                           stride_zw, stride_rn, stride_rt, stride_rh, stride_rw,
                           HAS_RES, ACT, TRAINING, D_ALIGN, Z_ALIGN, R_ALIGN)
        ti = to * st - pt
        hi = ho * sh - ph
        wi = wo * sw - pw
        inside = rmask & (ti >= 0) & (ti < T_in) & (hi >= 0) & (hi < H_in) & (wi >= 0) & (wi < W_in)
        x_off = cm.row_offsets(n, ti, hi, wi, stride_xn, stride_xt, stride_xh, stride_xw,
                               X_ALIGN)[:, None] + ci[None, :]
        xa = tl.load(x_ptr + x_off, mask=inside[:, None] & cimask[None, :], other=0.0)
        acc = gm.dot(tl.trans(dz.to(x_ptr.dtype.element_ty)), xa, acc, PREC)

    w_off = split.to(tl.int64) * C_out * C_in + co[:, None] * C_in + ci[None, :]
    tl.store(dw_ptr + w_off, acc, mask=comask[:, None] & cimask[None, :])


# dgrad and wgrad (where BLOCK_M = output channels, BLOCK_N = input channels and BLOCK_K = rows
# per step) have the same register profile: one table of spill-free tiles serves both.
_BWD_TILES = {
    "16bit": [_tile(128, 128, 32, 8, 3), _tile(64, 128, 32, 4, 3), _tile(64, 64, 64, 4, 3)],
    "16bit-unaligned": [_tile(128, 64, 32, 8, 2), _tile(64, 128, 32, 8, 2), _tile(64, 64, 32, 4, 3)],
    "tf32": [_tile(128, 128, 32, 8, 3), _tile(128, 64, 32, 8, 3), _tile(64, 128, 32, 8, 3),
             _tile(64, 64, 32, 4, 3)],
    "tf32-unaligned": [_tile(128, 64, 32, 8, 2), _tile(64, 128, 32, 8, 2), _tile(128, 64, 16, 8, 2),
                       _tile(64, 64, 32, 4, 3)],
    "ieee": [_tile(64, 64, 16, 4, 2), _tile(128, 64, 16, 8, 2), _tile(128, 128, 16, 8, 2)],
    "ieee-unaligned": [_tile(64, 128, 16, 8, 2), _tile(64, 64, 16, 4, 2)],
}
# dgrad: 64x128x32 with 4 warps spilled on sm_80 (Triton 3.6), 64x64x64 with 4 warps on sm_80
# (3.8, 3.9) and sm_90 (3.9); every IEEE tile above 32x64 spilled on sm_90 with 3.9
_DGRAD_TILES = {**_BWD_TILES,
                "16bit": [_tile(128, 128, 32, 8, 3), _tile(64, 128, 32, 8, 3)],
                "ieee": [_tile(32, 64, 16, 4, 1)], "ieee-unaligned": [_tile(32, 64, 16, 4, 1)]}
_DGRAD = Tuned(_pointwise_dgrad_kernel, _DGRAD_TILES, key=["M_in", "C_in", "C_out", "HAS_RES"],
               interpret=gm.INTERPRET_GEMM)
_WGRAD = Tuned(_pointwise_wgrad_kernel, _BWD_TILES, key=["M", "C_in", "C_out", "HAS_RES"],
               interpret=gm.INTERPRET_GEMM)


@planned
def conv_bn_act_bwd(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual, stride,
                    padding, training: bool, activation: str | None, needs):
    """Gradients (dx, dweight, dbias, dbn_weight, dbn_bias, dresidual) of conv_bn_act_fwd, with ``z``,
    ``mean`` and ``invstd`` as it saved them; dx and dresidual in the memory format of x and
    residual. ``needs`` says which of the six are wanted; the others come back as None.
    """
    need_dx, need_dw, need_db, need_dbn_weight, need_dbn_bias, need_dres = needs
    N, C_in, T_in, H_in, W_in = x.shape
    C_out = weight.shape[0]
    _, _, T_out, H_out, W_out = z.shape
    (st, sh, sw), (pt, ph, pw) = stride, padding
    M = N * T_out * H_out * W_out
    M_in = N * T_in * H_in * W_in
    act = cm.ACTIVATIONS[activation]
    x_in, residual_in = x, residual
    grad_out, residual = channels_contiguous(grad_out), channels_contiguous(residual)
    coef, dbn_weight, dbn_bias, dbias, dres = bn.bwd_reduce_finalize(
        grad_out, z, mean, invstd, bn_weight, bn_bias, residual, act, training,
        need_dbn_weight, need_dbn_bias, need_db, need_dres,
        bias_dtype=bias.dtype if bias is not None else None)
    prec = gm.dot_precision(x.dtype)
    unaligned = "" if _fully_aligned(grad_out, z, residual) else "-unaligned"
    common = dict(
        HAS_RES=residual is not None, ACT=act, TRAINING=training,
        D_ALIGN=rows_alignment(grad_out),
        Z_ALIGN=rows_alignment(z), R_ALIGN=rows_alignment(residual), PREC=prec,
    )
    some = z
    dx = dw = None
    if need_dx:
        dx = alloc_channels_last(x.shape, x)
        aligned = unaligned or ("" if _fully_aligned(dx) else "-unaligned")
        kernel, meta = _DGRAD.select(gm.operand_class(x.dtype, prec) + aligned)

        def grid(meta):
            return (cdiv(M_in, meta["BLOCK_M"]) * cdiv(C_in, meta["BLOCK_N"]),)

        launch(
            kernel, grid,
            grad_out, z, residual if residual is not None else some, coef, weight, dx,
            M_in, C_in, C_out, T_in, H_in, W_in, T_out, H_out, W_out,
            *rows_strides(grad_out), *rows_strides(z), *rows_strides(residual),
            *rows_strides(dx), weight.stride(0), weight.stride(1),
            st, sh, sw, pt, ph, pw, X_ALIGN=rows_alignment(dx), **common, **meta,
        )
        dx = in_format_of(dx, x_in)
    if need_dw:
        x = channels_contiguous(x)
        splits, rows_per_split = splitk.row_splits(M, cdiv(C_out, 128) * cdiv(C_in, 128), x.device)
        partial = alloc((splits, C_out, C_in), dtype=torch.float32, device=x.device)
        aligned = unaligned or ("" if _fully_aligned(x) else "-unaligned")
        kernel, meta = _WGRAD.select(gm.operand_class(x.dtype, prec) + aligned)

        def grid(meta):
            return (cdiv(C_out, meta["BLOCK_M"]) * cdiv(C_in, meta["BLOCK_N"]), splits)

        launch(
            kernel, grid,
            grad_out, z, residual if residual is not None else some, coef, x, partial,
            M, C_in, C_out, T_out, H_out, W_out, T_in, H_in, W_in, rows_per_split,
            *rows_strides(grad_out), *rows_strides(z), *rows_strides(residual), *rows_strides(x),
            st, sh, sw, pt, ph, pw, X_ALIGN=rows_alignment(x), **common, **meta,
        )
        dw = splitk.sum_splits(partial, weight.dtype).view(weight.shape)
    if dres is not None:
        dres = in_format_of(dres, residual_in)
    return dx, dw, dbias, dbn_weight, dbn_bias, dres
