"""Depthwise conv3d (groups == C_in == C_out) fused with BatchNorm and activation.

A depthwise conv is a per-channel stencil: memory-bound, so the kernels aim to read each input once
from HBM (the taps' overlapping reads hit L1/L2) and write each output once. Programs own tiles of
positions x BLOCK_C channels, oriented for the layout (cm.pc_tile): channels innermost for
channels_last_3d (channel vectors move at once), positions innermost for NCDHW (consecutive W
coalesce). Both layouts and any strides are addressed in place: no conversions. The forward's
tile is BH x BW output positions of one sample, walked through t_chunk consecutive frames (the
input planes a frame reads were mostly read for the frame before); the backward's is BLOCK_P
consecutive input positions.

``_depthwise_fwd_kernel``  MODE_EVAL: y = act((conv(x) + b) * scale + shift [+ r]) with the
                           running statistics folded in (one launch); MODE_STATS: the training
                           pass that writes nothing but, per program, its position count and each
                           channel's mean and M2 (batchnorm.finalize_stats merges them); MODE_APPLY: the training
                           pass that recomputes the conv (cheaper than storing and re-reading it)
                           and normalises with the batch statistics.
The backward (``_depthwise_bwd_kernel``) is depthwise_bwd.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm
from . import batchnorm as bn
from ._launch import Tuned, alloc, interpreted, launch
from ._layout import alloc_like, cdiv, channel_vector, channels_last, out_size, pc_strides, rows_alignment
from ._replay import planned

MODE_EVAL, MODE_STATS, MODE_APPLY = 0, 1, 2


@triton.jit
def _zero_tile(BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CL: tl.constexpr):
    return cm.pc_tile(tl.zeros((BLOCK_P,), tl.float32), tl.zeros((BLOCK_C,), tl.float32), CL)


@triton.jit
def _offsets(n, t, h, w, cols64, stride_n, stride_c, stride_t, stride_h, stride_w,
             ALIGN: tl.constexpr, CL: tl.constexpr):
    rows = cm.row_offsets(cm.as_int64(n), cm.as_int64(t), h, w, stride_n, stride_t, stride_h, stride_w, ALIGN)
    return cm.pc_tile(rows, cols64 * stride_c, CL)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _conv_tile(x_ptr, w_ptr, n, to, ho, wo, pmask, cols, cmask, x_c,
               T_in, H_in, W_in,
               stride_xn, stride_xt, stride_xh, stride_xw,
               stride_wc, stride_wt, stride_wh, stride_ww,
               pt, ph, pw, dt, dh, dw,
               KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, X_ALIGN: tl.constexpr,
               CL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise conv (no bias) of one frame ``to`` of sample ``n`` at the tile's (ho, wo)."""
    t0 = to * ST - pt
    h0 = ho * SH - ph
    w0 = wo * SW - pw
    acc = _zero_tile(BLOCK_P, BLOCK_C, CL)
    # Loops over kT and kH, unrolled over kW: KW taps' loads in flight per thread keep registers
    # bounded (fully unrolled, a 3x3x3 stencil hoists 27 loads and spills).
    for kt in range(KT):
        ti = t0 + kt * dt
        x_t = cm.as_int64(n) * stride_xn + cm.as_int64(ti) * stride_xt
        ok_t = (ti >= 0) & (ti < T_in)  # a scalar: one frame
        for kh in range(KH):
            hi = h0 + kh * dh
            # the scalar ok_t applied as a select, not as pmask & ok_t: a scalar condition
            # &-ed with a block gives an int32 mask in Triton's interpreter, which 3.9's tl.load
            # refuses (tests/strict_interpreter.py); compiled, it is the same predicate
            ok_h = tl.where(ok_t, pmask, False) & (hi >= 0) & (hi < H_in)
            for kw in tl.static_range(KW):
                wi = w0 + kw * dw
                ok = ok_h & (wi >= 0) & (wi < W_in)
                x_off = x_t + hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw
                if X_ALIGN > 1:
                    x_off = tl.multiple_of(x_off, X_ALIGN)
                xv = tl.load(x_ptr + cm.pc_tile(x_off, x_c, CL), mask=cm.pc_mask(ok, cmask, CL),
                             other=0.0)
                w_tap = kt * stride_wt + kh * stride_wh + kw * stride_ww
                wv = tl.load(w_ptr + cols * stride_wc + w_tap, mask=cmask, other=0.0)
                acc += xv.to(tl.float32) * cm.per_channel(wv.to(tl.float32), CL)
    return acc


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=[
    'T_out', 'T_in', 'stride_xn', 'stride_on', 'stride_rn', 'stride_zn'])
def _depthwise_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, res_ptr,
    out_ptr, z_ptr, save_mean_ptr, save_invstd_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
    C, T_out, H_out, W_out, T_in, H_in, W_in, t_chunk,
    stride_xn, stride_xc, stride_xt, stride_xh, stride_xw,
    stride_wc, stride_wt, stride_wh, stride_ww,
    stride_on, stride_oc, stride_ot, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rt, stride_rh, stride_rw,
    stride_zn, stride_zc, stride_zt, stride_zh, stride_zw,
    pt, ph, pw, dt, dh, dw, eps,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, SAVE: tl.constexpr, CL: tl.constexpr,
    X_ALIGN: tl.constexpr, O_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr,
    C_VEC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # A program owns a BH x BW tile of output positions of one sample, for t_chunk consecutive
    # frames, and walks them in order: the kT input planes a frame reads were mostly read by the
    # frames before it, so they come from L1 / L2 and x crosses HBM about once.
    BLOCK_P: tl.constexpr = BH * BW
    pid = tl.program_id(0)
    num_wb = tl.cdiv(W_out, BW)
    num_hb = tl.cdiv(H_out, BH)
    num_tc = tl.cdiv(T_out, t_chunk)
    wb = pid % num_wb
    hb = (pid // num_wb) % num_hb
    tc = (pid // (num_wb * num_hb)) % num_tc
    n = pid // (num_wb * num_hb * num_tc)
    i = tl.arange(0, BLOCK_P)
    ho = hb * BH + i // BW
    wo = wb * BW + i % BW
    pmask = (ho < H_out) & (wo < W_out)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cm.channel_mask(cols, C, C_VEC)
    cols64 = cols.to(tl.int64)
    x_c = cols64 * stride_xc
    mask = cm.pc_mask(pmask, cmask, CL)
    bias = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    t_start = tc * t_chunk
    t_end = cm.split_end(t_start, t_chunk, T_out)

    if MODE == 1:  # MODE_STATS: per-channel (count, mean, M2) of this program's positions
        count_t = tl.sum(pmask.to(tl.float32), axis=0)  # positions per frame
        n_a = count_t * 0.0
        mean_a = tl.zeros((BLOCK_C,), tl.float32)
        m2_a = tl.zeros((BLOCK_C,), tl.float32)
        for to in range(t_start, t_end):
            z = _conv_tile(x_ptr, w_ptr, n, to, ho, wo, pmask, cols, cmask, x_c, T_in, H_in, W_in,
                           stride_xn, stride_xt, stride_xh, stride_xw, stride_wc, stride_wt, stride_wh,
                           stride_ww, pt, ph, pw, dt, dh, dw,
                           KT, KH, KW, ST, SH, SW, X_ALIGN, CL, BLOCK_P, BLOCK_C)
            z += cm.per_channel(bias, CL)
            # this frame's mean and M2, merged into the running triple (Chan et al.); divisions
            # approximate (2 ulp, as the CUDA kernels' __fdividef): IEEE ones call a slow path
            mean_t = tl.fdiv(cm.sum_positions(tl.where(mask, z, 0.0), CL), count_t, ieee_rounding=False)
            d = tl.where(mask, z - cm.per_channel(mean_t, CL), 0.0)
            m2_t = cm.sum_positions(d * d, CL)
            n_b = n_a + count_t
            frac = tl.fdiv(count_t, n_b, ieee_rounding=False)
            delta = mean_t - mean_a
            mean_a += delta * frac
            m2_a += m2_t + delta * delta * (n_a * frac)
            n_a = n_b
        part = pid.to(tl.int64) * C + cols
        tl.store(part_mean_ptr + part, mean_a, mask=cmask)
        tl.store(part_m2_ptr + part, m2_a, mask=cmask)
        if tl.program_id(1) == 0:
            tl.store(part_count_ptr + pid, n_a)
    else:
        if MODE == 0:  # MODE_EVAL: the running statistics, folded here so the op is one launch
            mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            # rsqrt, not 1 / sqrt: an IEEE division's slow path is a call with a stack frame
            invstd = tl.math.rsqrt(tl.load(var_ptr + cols, mask=cmask, other=1.0).to(tl.float32) + eps)
            if SAVE:  # autograd needs the statistics used
                if pid == 0:
                    tl.store(save_mean_ptr + cols, mean, mask=cmask)
                    tl.store(save_invstd_ptr + cols, invstd, mask=cmask)
        else:  # MODE_APPLY: the batch statistics (var_ptr holds invstd)
            mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
            invstd = tl.load(var_ptr + cols, mask=cmask, other=0.0)
        scale, shift = bn.fold(mean, invstd, bias, bn_weight_ptr, bn_bias_ptr, cols, cmask,
                               HAS_BN_WEIGHT, HAS_BN_BIAS)
        for to in range(t_start, t_end):
            acc = _conv_tile(x_ptr, w_ptr, n, to, ho, wo, pmask, cols, cmask, x_c, T_in, H_in, W_in,
                             stride_xn, stride_xt, stride_xh, stride_xw, stride_wc, stride_wt, stride_wh,
                             stride_ww, pt, ph, pw, dt, dh, dw,
                             KT, KH, KW, ST, SH, SW, X_ALIGN, CL, BLOCK_P, BLOCK_C)
            if SAVE:  # autograd needs z (conv + bias)
                z_off = _offsets(n, to, ho, wo, cols64,
                                 stride_zn, stride_zc, stride_zt, stride_zh, stride_zw, Z_ALIGN, CL)
                tl.store(z_ptr + z_off, acc + cm.per_channel(bias, CL), mask=mask)
            v = acc * cm.per_channel(scale, CL) + cm.per_channel(shift, CL)
            if HAS_RES:
                r_off = _offsets(n, to, ho, wo, cols64,
                                 stride_rn, stride_rc, stride_rt, stride_rh, stride_rw, R_ALIGN, CL)
                v += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
            v = cm.activation(v, ACT)
            o_off = _offsets(n, to, ho, wo, cols64,
                             stride_on, stride_oc, stride_ot, stride_oh, stride_ow, O_ALIGN, CL)
            tl.store(out_ptr + o_off, v, mask=mask)


def _tile(bh, bw, block_c, warps):
    return triton.Config({"BH": bh, "BW": bw, "BLOCK_C": block_c}, num_warps=warps, num_stages=1)


# The interpreter's one configuration per variant.
_INTERPRET_FWD = {"cl": dict(BH=2, BW=4, BLOCK_C=8, num_warps=1),
                  "ncdhw": dict(BH=2, BW=8, BLOCK_C=4, num_warps=1)}
_INTERPRET_FWD["cl-fp32"] = _INTERPRET_FWD["cl"]
# Training statistics: the partial-statistics buffers are sized by the tile, so every statistics
# configuration of an orientation has the same BH x BW.
STATS_TILE = {True: (4, 8), False: (2, 32)}

# Variants: "cl" tiles channels-innermost (channels_last_3d), "ncdhw" positions-innermost (W
# runs of 16-64 positions). Kept to configurations that compile without spills on sm_90 and
# sm_80 and, in channels_last_3d, give every thread a 16-byte channel vector
# (python -m r21d.static checks both). The forward's channels_last_3d tiles differ by element
# size ("cl" 16-bit, "cl-fp32"): a 16-byte vector is 8 or 4 channels, and with Triton 3.6-3.9
# the fp32 stencil spilled with 8 warps over 4x8 x 64 channels (8 per thread), the 16-bit
# statistics pass with 4x8 x 32 and 4x8 x 128 channels.
_FWD = Tuned(
    _depthwise_fwd_kernel,
    {
        "cl": [_tile(4, 8, 32, 4), _tile(4, 8, 64, 8)],
        "cl-fp32": [_tile(4, 8, 32, 4), _tile(4, 8, 64, 16)],
        "ncdhw": [_tile(2, 32, 8, 4), _tile(4, 16, 8, 4), _tile(2, 64, 8, 8), _tile(4, 32, 8, 8)],
    },
    key=["C", "T_out", "H_out", "W_out", "t_chunk"], interpret=_INTERPRET_FWD,
    # sm_80: the fp32 stencil with 16 warps (at most 128 registers a thread) spilled 8-16 B in
    # the eval and normalising passes (Triton 3.8, 3.9)
    arch_configs={80: {"cl-fp32": [_tile(4, 8, 32, 4)]}},
)
_FWD_STATS = Tuned(
    _depthwise_fwd_kernel,
    {
        "cl": [_tile(*STATS_TILE[True], 64, 8)],
        "cl-fp32": [_tile(*STATS_TILE[True], bc, 16) for bc in (64, 128)],
        # (4 channels with 8 warps spilled on sm_90 with Triton 3.8)
        "ncdhw": [_tile(*STATS_TILE[False], bc, w) for bc, w in ((2, 4), (4, 4), (8, 8))],
    },
    key=["C", "T_out", "H_out", "W_out", "t_chunk"], interpret=_INTERPRET_FWD,
)

# About 8 programs per SM of a 132-SM GPU: a program walks t_chunk frames of its tile, so the
# frames are chunked only as far as that many programs need.
_FWD_PROGRAMS = 8 * 132


def _t_chunk(N: int, T_out: int, H_out: int, W_out: int, C: int, cl: bool) -> int:
    if interpreted():
        return 2
    bh, bw, bc = (4, 8, 32) if cl else (2, 32, 8)  # a typical tile
    per_frame = N * cdiv(H_out, bh) * cdiv(W_out, bw) * cdiv(C, bc)
    chunks = min(T_out, max(1, cdiv(_FWD_PROGRAMS, per_frame)))
    return cdiv(T_out, chunks)


def _select(tuned: Tuned, cl: bool, dtype: torch.dtype | None = None):
    """The variant: the layout, and in channels_last_3d the element size where the kernel has
    tiles per element size ("cl-fp32")."""
    variant = "cl" if cl else "ncdhw"
    if cl and dtype == torch.float32 and "cl-fp32" in tuned.configs:
        variant = "cl-fp32"
    return tuned.select(variant)


@planned
def conv_bn_act_fwd(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                    stride, padding, dilation, training: bool, momentum: float, eps: float,
                    activation: str | None, save: bool, running_in_place: bool = False):
    """Depthwise conv + BN + activation forward; x in any layout and strides, weight (C, 1, kT, kH,
    kW). Returns (out, z, mean, invstd, new_running_mean, new_running_var) like
    pointwise.conv_bn_act_fwd, with ``out`` and ``z`` (conv output incl. bias, saved for autograd
    when ``save``) in ``x``'s memory format. Nothing is modified in place (but the running
    statistics with ``running_in_place``, as batchnorm.finalize_stats documents).
    """
    N, C, T_in, H_in, W_in = x.shape
    KT, KH, KW = weight.shape[2:]
    (st, sh, sw), (pt, ph, pw), (dt, dh, dw) = stride, padding, dilation
    T_out, H_out, W_out = (out_size(T_in, KT, st, pt, dt), out_size(H_in, KH, sh, ph, dh),
                           out_size(W_in, KW, sw, pw, dw))
    M = N * T_out * H_out * W_out
    dev = x.device
    act = cm.ACTIVATIONS[activation]

    def absent(dtype=torch.float32):  # a distinct empty tensor for each output not produced
        return x.new_empty(0, dtype=dtype)

    out = alloc_like((N, C, T_out, H_out, W_out), x)
    z = absent(x.dtype)
    mean, invstd, new_rm, new_rv = absent(), absent(), absent(), absent()
    if M == 0:  # PyTorch leaves the running statistics as they are
        return out, z, mean, invstd, new_rm, new_rv
    if save:
        z = alloc_like(out.shape, x)
    cl = channels_last(x)
    some = x  # stands in for absent optional pointers (never dereferenced)
    t_chunk = _t_chunk(N, T_out, H_out, W_out, C, cl)

    def programs(bh, bw):  # tiles of positions: (sample, frame chunk, H tile, W tile)
        return N * cdiv(T_out, t_chunk) * cdiv(H_out, bh) * cdiv(W_out, bw)

    def run(selected, mode, mean_arg, var_arg, parts, save_here):
        kernel, meta = selected

        def grid(meta):
            return (programs(meta["BH"], meta["BW"]), cdiv(C, meta["BLOCK_C"]))

        launch(
            kernel, grid,
            x, weight, bias if bias is not None else some,
            bn_weight if bn_weight is not None else some, bn_bias if bn_bias is not None else some,
            mean_arg, var_arg, residual if residual is not None else some,
            out, z if z.numel() else out, mean if mean.numel() else some,
            invstd if invstd.numel() else some, *parts,
            C, T_out, H_out, W_out, T_in, H_in, W_in, t_chunk,
            *pc_strides(x), *weight.stride()[:1], *weight.stride()[2:],
            *pc_strides(out), *pc_strides(residual), *pc_strides(z if z.numel() else None),
            pt, ph, pw, dt, dh, dw, float(eps),
            KT=KT, KH=KH, KW=KW, ST=st, SH=sh, SW=sw, MODE=mode, HAS_BIAS=bias is not None,
            HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None,
            HAS_RES=residual is not None and mode != MODE_STATS, ACT=act, SAVE=save_here, CL=cl,
            X_ALIGN=rows_alignment(x), O_ALIGN=rows_alignment(out),
            R_ALIGN=rows_alignment(residual), Z_ALIGN=rows_alignment(z if z.numel() else None),
            C_VEC=channel_vector(C, x, out, residual, z if z.numel() else None) if cl else 1,
            **meta,
        )

    if not training:
        if save:
            mean = alloc((C,), dtype=torch.float32, device=dev)
            invstd = alloc((C,), dtype=torch.float32, device=dev)
        run(_select(_FWD, cl, x.dtype), MODE_EVAL, running_mean, running_var, (some,) * 3, save)
        return out, z, mean, invstd, new_rm, new_rv

    stats = _select(_FWD_STATS, cl, x.dtype)
    num_tiles = programs(*((stats[1]["BH"], stats[1]["BW"]) if interpreted() else STATS_TILE[cl]))
    part_mean = alloc((num_tiles, C), dtype=torch.float32, device=dev)
    part_m2 = alloc((num_tiles, C), dtype=torch.float32, device=dev)
    part_count = alloc((num_tiles,), dtype=torch.float32, device=dev)
    run(stats, MODE_STATS, some, some, (part_mean, part_m2, part_count), False)
    bmean, binvstd, rm, rv = bn.finalize_stats(part_mean, part_m2, None, M, running_mean,
                                               running_var, momentum, eps, part_count=part_count,
                                               running_in_place=running_in_place)
    run(_select(_FWD, cl, x.dtype), MODE_APPLY, bmean, binvstd, (some,) * 3, save)
    if save:
        mean, invstd = bmean, binvstd
    if running_mean is not None:
        new_rm, new_rv = rm, rv
    return out, z, mean, invstd, new_rm, new_rv
