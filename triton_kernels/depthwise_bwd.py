"""Depthwise conv3d + BN + activation, backward: the gradients of depthwise.py's forward.

``_depthwise_bwd_kernel``  input-centred: for a tile of BLOCK_P consecutive input positions, dx =
                           sum over taps of w * dz at the output position that tap reads from,
                           with dz rebuilt from dy and z by the BN/activation backward
                           coefficients (never stored), and the weight gradient's per-tap sums of
                           dz * x accumulated in registers over a range of tiles, written as
                           per-range partials that are summed in a fixed order (deterministic).

Tiles are oriented for the layout as in the forward (channels innermost for channels_last_3d,
positions innermost for NCDHW); both layouts and any strides are addressed in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm
from . import batchnorm as bn
from . import splitk
from ._launch import Tuned, alloc, interpreted, launch
from ._layout import alloc_like, cdiv, channel_vector, channels_last, pc_strides, rows_alignment
from ._replay import planned
from .depthwise import _offsets, _select, _zero_tile


def _cfg(block_p, block_c, warps):
    return triton.Config({"BLOCK_P": block_p, "BLOCK_C": block_c}, num_warps=warps, num_stages=1)


# The interpreter's one configuration per variant.
_INTERPRET = {"cl": dict(BLOCK_P=16, BLOCK_C=8, num_warps=1), "ncdhw": dict(BLOCK_P=16, BLOCK_C=4, num_warps=1)}
_INTERPRET["cl-fp32"] = _INTERPRET["cl"]


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=[
    'T_out', 'T_in', 'stride_dn', 'stride_zn', 'stride_rn', 'stride_xn', 'stride_gn'])
def _depthwise_bwd_kernel(
    dy_ptr, z_ptr, res_ptr, coef_ptr, x_ptr, w_ptr, dx_ptr, dw_part_ptr,
    M_in, C, T_out, H_out, W_out, T_in, H_in, W_in, rows_per_split,
    stride_dn, stride_dc, stride_dt, stride_dh, stride_dw,
    stride_zn, stride_zc, stride_zt, stride_zh, stride_zw,
    stride_rn, stride_rc, stride_rt, stride_rh, stride_rw,
    stride_xn, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_gn, stride_gc, stride_gt, stride_gh, stride_gw,
    stride_wc, stride_wt, stride_wh, stride_ww,
    pt, ph, pw, dt, dh, dw,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr,
    CL: tl.constexpr, D_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr,
    X_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, C_VEC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cm.channel_mask(cols, C, C_VEC)
    cols64 = cols.to(tl.int64)
    # dz = k_g * g [+ k_z * (z - mean) + k_0 in TRAINING, see _gemm.dz_tile],
    # g = dy * act'((z - mean) * a + bn_bias [+ r])
    mean = cm.per_channel(tl.load(coef_ptr + bn.COEF_MEAN * C + cols, mask=cmask, other=0.0), CL)
    a = cm.per_channel(tl.load(coef_ptr + bn.COEF_A * C + cols, mask=cmask, other=0.0), CL)
    bn_bias = cm.per_channel(tl.load(coef_ptr + bn.COEF_BN_BIAS * C + cols, mask=cmask, other=0.0), CL)
    k_g = cm.per_channel(tl.load(coef_ptr + bn.COEF_KG * C + cols, mask=cmask, other=0.0), CL)
    k_z = k_g  # stand-ins, used only in TRAINING
    k_0 = k_g
    if TRAINING:
        k_z = cm.per_channel(tl.load(coef_ptr + bn.COEF_KZ * C + cols, mask=cmask, other=0.0), CL)
        k_0 = cm.per_channel(tl.load(coef_ptr + bn.COEF_K0 * C + cols, mask=cmask, other=0.0), CL)
    taps = tl.arange(0, TAPS)
    dw_acc = tl.zeros((TAPS, BLOCK_C), tl.float32)

    row_start = split * rows_per_split
    row_end = cm.split_end(row_start, rows_per_split, M_in)
    for r0 in range(row_start, row_end, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        pmask = rows < row_end
        n, ti, hi, wi = cm.split_rows(rows, T_in, H_in, W_in)
        if NEED_DW:
            x_off = _offsets(n, ti, hi, wi, cols64,
                             stride_xn, stride_xc, stride_xt, stride_xh, stride_xw, X_ALIGN, CL)
            xv = tl.load(x_ptr + x_off, mask=cm.pc_mask(pmask, cmask, CL), other=0.0).to(tl.float32)
        dx = _zero_tile(BLOCK_P, BLOCK_C, CL)
        for kt in range(KT):  # not unrolled: each tap holds dy, z (and r) tiles and a dz
            tp = ti + pt - kt * dt  # = to * st for the output position this tap feeds
            to = tp // ST
            ok_t = pmask & (tp >= 0) & (tp % ST == 0) & (to < T_out)
            for kh in range(KH):
                hp = hi + ph - kh * dh
                ho = hp // SH
                ok_h = ok_t & (hp >= 0) & (hp % SH == 0) & (ho < H_out)
                for kw in range(KW):
                    wp = wi + pw - kw * dw
                    wo = wp // SW
                    ok = ok_h & (wp >= 0) & (wp % SW == 0) & (wo < W_out)
                    mask = cm.pc_mask(ok, cmask, CL)
                    d_off = _offsets(n, to, ho, wo, cols64,
                                     stride_dn, stride_dc, stride_dt, stride_dh, stride_dw, D_ALIGN, CL)
                    z_off = _offsets(n, to, ho, wo, cols64,
                                     stride_zn, stride_zc, stride_zt, stride_zh, stride_zw, Z_ALIGN, CL)
                    dyv = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
                    zc = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32) - mean
                    pre = zc * a + bn_bias
                    if HAS_RES:
                        r_off = _offsets(n, to, ho, wo, cols64,
                                         stride_rn, stride_rc, stride_rt, stride_rh, stride_rw, R_ALIGN, CL)
                        pre += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
                    g = cm.activation_grad(pre, dyv, ACT)
                    dz = k_g * g
                    if TRAINING:
                        dz += k_z * zc + k_0
                    dz = tl.where(mask, dz, 0.0)
                    if NEED_DX:
                        w_tap = kt * stride_wt + kh * stride_wh + kw * stride_ww
                        wv = tl.load(w_ptr + cols * stride_wc + w_tap, mask=cmask, other=0.0).to(tl.float32)
                        dx += dz * cm.per_channel(wv, CL)
                    if NEED_DW:
                        # only the pairs this tap connects: a NaN or Inf x must not meet the
                        # 0 of a tap whose output position does not exist (0 * Inf = NaN)
                        s = cm.sum_positions(tl.where(mask, dz * xv, 0.0), CL)
                        tap = (kt * KH + kh) * KW + kw
                        dw_acc += tl.where(taps[:, None] == tap, s[None, :], 0.0)
        if NEED_DX:
            g_off = _offsets(n, ti, hi, wi, cols64,
                             stride_gn, stride_gc, stride_gt, stride_gh, stride_gw, G_ALIGN, CL)
            tl.store(dx_ptr + g_off, dx, mask=cm.pc_mask(pmask, cmask, CL))

    if NEED_DW:  # partial[split, c, tap]: summed over splits it is the (C, 1, kT, kH, kW) gradient
        K = KT * KH * KW
        offs = split.to(tl.int64) * C * K + cols64[None, :] * K + taps[:, None]
        tl.store(dw_part_ptr + offs, dw_acc, mask=(taps[:, None] < K) & cmask[None, :])


_BWD = Tuned(
    _depthwise_bwd_kernel,
    {
        "cl": [_cfg(16, 64, 4), _cfg(32, 32, 4), _cfg(32, 64, 8)],
        # (fp32: 32 x 32 channels with 4 warps spilled on sm_90 with Triton 3.6)
        "cl-fp32": [_cfg(16, 64, 4), _cfg(32, 32, 8), _cfg(32, 64, 8)],
        "ncdhw": [_cfg(128, 8, 8), _cfg(64, 16, 8), _cfg(128, 4, 8)],
    },
    key=["M_in", "C", "T_out", "H_out", "W_out", "NEED_DX", "NEED_DW"], interpret=_INTERPRET,
    # sm_80: fp32 32 x 32 channels with 8 warps spilled 40 B with unaligned rows (3.8, 3.9)
    arch_configs={80: {"cl-fp32": [_cfg(16, 64, 4), _cfg(32, 64, 8)]}},
)

# Each program of the backward takes a range of input positions (a multiple of every BLOCK_P)
# for one channel block; the weight gradient is written per range, as partials summed in a fixed
# order. About 4 programs per SM of a 132-SM GPU keep it busy and the partials small.
_BWD_PROGRAMS = 4 * 132
_BWD_ROWS_QUANTUM = 256


def _rows_per_split(M_in: int, C: int) -> int:
    if interpreted():
        return 32
    c_blocks = cdiv(C, 64)
    per_program = cdiv(M_in, max(1, _BWD_PROGRAMS // c_blocks))
    return cdiv(per_program, _BWD_ROWS_QUANTUM) * _BWD_ROWS_QUANTUM


@planned
def conv_bn_act_bwd(grad_out, x, weight, bias, z, mean, invstd, bn_weight, bn_bias, residual, stride,
                    padding, dilation, training: bool, activation: str | None, needs):
    """Gradients (dx, dweight, dbias, dbn_weight, dbn_bias, dresidual) of conv_bn_act_fwd, given the
    ``z``, ``mean`` and ``invstd`` it saved; dx and dresidual in the memory formats of x and
    residual. ``needs`` says which of the six are wanted; the others come back as None. The
    weight gradient is deterministic (fixed-order partial sums)."""
    need_dx, need_dw, need_db, need_dbn_weight, need_dbn_bias, need_dres = needs
    N, C, T_in, H_in, W_in = x.shape
    KT, KH, KW = weight.shape[2:]
    _, _, T_out, H_out, W_out = z.shape
    (st, sh, sw), (pt, ph, pw), (dt, dh, dw_) = stride, padding, dilation
    M_in = N * T_in * H_in * W_in
    act = cm.ACTIVATIONS[activation]
    coef, dbn_weight, dbn_bias, dbias, dres = bn.bwd_reduce_finalize(
        grad_out, z, mean, invstd, bn_weight, bn_bias, residual, act, training,
        need_dbn_weight, need_dbn_bias, need_db, need_dres,
        bias_dtype=bias.dtype if bias is not None else None)
    dx = dw = None
    if need_dx or need_dw:
        cl = channels_last(x)
        kernel, meta = _select(_BWD, cl, x.dtype)
        if need_dx:
            dx = alloc_like(x.shape, x)
        K = KT * KH * KW
        rows_per_split = _rows_per_split(M_in, C) if need_dw else _BWD_ROWS_QUANTUM
        splits = cdiv(M_in, rows_per_split)
        partial = alloc((splits, C, K), dtype=torch.float32, device=x.device) if need_dw else None

        def grid(meta):
            return (splits, cdiv(C, meta["BLOCK_C"]))

        some = z
        launch(
            kernel, grid,
            grad_out, z, residual if residual is not None else some, coef, x, weight,
            dx if dx is not None else some, partial if partial is not None else coef,
            M_in, C, T_out, H_out, W_out, T_in, H_in, W_in, rows_per_split,
            *pc_strides(grad_out), *pc_strides(z), *pc_strides(residual), *pc_strides(x),
            *pc_strides(dx), *weight.stride()[:1], *weight.stride()[2:],
            pt, ph, pw, dt, dh, dw_,
            KT=KT, KH=KH, KW=KW, TAPS=triton.next_power_of_2(K), ST=st, SH=sh, SW=sw,
            HAS_RES=residual is not None,
            ACT=act, TRAINING=training, NEED_DX=need_dx, NEED_DW=need_dw, CL=cl,
            D_ALIGN=rows_alignment(grad_out), Z_ALIGN=rows_alignment(z),
            R_ALIGN=rows_alignment(residual), X_ALIGN=rows_alignment(x), G_ALIGN=rows_alignment(dx),
            C_VEC=channel_vector(C, grad_out, z, residual, x, dx) if cl else 1, **meta,
        )
        if need_dw:
            dw = splitk.sum_splits(partial, weight.dtype).view(weight.shape)
    return dx, dw, dbias, dbn_weight, dbn_bias, dres
