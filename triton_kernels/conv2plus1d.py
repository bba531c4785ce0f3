"""The R(2+1)D unit in eval mode as one kernel: spatial conv (1, kh, kw) -> folded BN -> ReLU ->
temporal conv (kt, 1, 1) -> folded BN [+ residual] -> activation, the intermediate kept on chip.

A program owns one image n, a tile of BLOCK_M output positions (h, w), BLOCK_N output channels
and a run of output frames. It walks its frames in time: each intermediate frame is computed once
(for each BLOCK_MID slice of the intermediate channels, an implicit GEMM over the spatial taps
and input channels, then BN1 + ReLU in registers) and immediately multiplied into the temporal
conv's accumulators of every output frame it feeds. With temporal stride ST the frames come in
groups of ST per step, and an output frame is open for NSLOT = ceil(KT / ST) consecutive steps:
NSLOT accumulators rotate, so each (frame, tap) product lands in a slot known at compile time,
and after every step the oldest slot is complete and goes through the BN2 epilogue
(_gemm.bn_act_epilogue). The intermediate is never written to memory.

Each intermediate frame is recomputed only by programs that share it: the other BLOCK_N slices of
the output channels, and the KT - ST halo frames of the neighbouring frame run when the frames
are split across programs (only to fill the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm
from . import _gemm as gm
from . import batchnorm as bn
from . import implicit_gemm as ig
from ._launch import Tuned, launch, relayout
from ._layout import (
    alloc_channels_last,
    cdiv,
    channel_vector,
    channels_contiguous,
    in_format_of,
    out_size,
    rows_alignment,
    rows_strides,
)
from ._limits import UNIT_MAX_OPEN_FRAMES
from ._replay import planned

# Split the frames across programs until there are this many (about two per H100 SM).
_TARGET_PROGRAMS = 264


@triton.jit
def _temporal_tap(acc_a, acc_b, acc_c, mid, w2_ptr, mids, mmask, w2_cols, comask, stride_w2i, stride_w2t,
                  R: tl.constexpr, KT: tl.constexpr, ST: tl.constexpr, NSLOT: tl.constexpr,
                  PREC: tl.constexpr):
    """Multiply intermediate frame ``mid`` (the R-th of this step's ST frames) into every open
    output frame it feeds: slot s holds the output frame whose tap s * ST + R this frame is."""
    for s in tl.static_range(NSLOT):
        if s * ST + R < KT:
            b = tl.load(w2_ptr + (mids * stride_w2i)[:, None] + w2_cols[None, :] + (s * ST + R) * stride_w2t,
                        mask=mmask[:, None] & comask[None, :], other=0.0)
            if s == 0:
                acc_a = gm.dot(mid, b, acc_a, PREC)
            elif s == 1:
                acc_b = gm.dot(mid, b, acc_b, PREC)
            else:
                acc_c = gm.dot(mid, b, acc_c, PREC)
    return acc_a, acc_b, acc_c


@triton.jit
def _unit_eval_kernel(
    x_ptr, w1_ptr, w2_ptr,
    bias1_ptr, bn1_weight_ptr, bn1_bias_ptr, rmean1_ptr, rvar1_ptr,
    bias2_ptr, bn2_weight_ptr, bn2_bias_ptr, rmean2_ptr, rvar2_ptr,
    res_ptr, out_ptr,
    HW, C_in, C_mid, C_out, T_in, H_in, W_in, T_out, H_out, W_out, KH, KW, frames_per_program,
    stride_xn, stride_xt, stride_xh, stride_xw,
    stride_w1o, stride_w1i, stride_w1h, stride_w1w,
    stride_w2o, stride_w2i, stride_w2t,
    stride_on, stride_ot, stride_oh, stride_ow,
    stride_rn, stride_rt, stride_rh, stride_rw,
    sh, sw, ph, pw, pt, eps1, eps2,
    HAS_BIAS1: tl.constexpr, HAS_BN1_WEIGHT: tl.constexpr, HAS_BN1_BIAS: tl.constexpr,
    HAS_BIAS2: tl.constexpr, HAS_BN2_WEIGHT: tl.constexpr, HAS_BN2_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, KT: tl.constexpr, ST: tl.constexpr,
    NSLOT: tl.constexpr, X_ALIGN: tl.constexpr, W1_ALIGN: tl.constexpr, O_ALIGN: tl.constexpr,
    R_ALIGN: tl.constexpr, CI_VEC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MID: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid x: (image, position tile, channel tile), channels fastest: consecutive programs share
    # the gathered x tile (L2 reuse); N is not a grid axis of its own (y and z stop at 65535)
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_out, BLOCK_N)
    per_image = tl.cdiv(HW, BLOCK_M) * num_n
    n = pid // per_image
    pid = pid - n * per_image
    pid_m = pid // num_n
    pid_n = pid % num_n
    o_first = tl.program_id(1) * frames_per_program
    o_end = cm.split_end(o_first, frames_per_program, T_out)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < HW
    ho = rows // W_out
    wo = rows % W_out
    h0 = ho * sh - ph  # the input position of spatial tap (0, 0)
    w0 = wo * sw - pw
    n_rows = tl.zeros_like(rows) + n
    x_plane = cm.position_offsets(n_rows, tl.zeros_like(rows), h0, w0,
                                  stride_xn, stride_xt, stride_xh, stride_xw)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < C_out
    w2_cols = co * stride_w2o
    ks = tl.arange(0, BLOCK_K)
    num_cb = tl.cdiv(C_in, BLOCK_K)
    # the last intermediate frame any of this program's output frames reads
    t_last = tl.minimum((o_end - 1) * ST - pt + KT - 1, T_in - 1,
                        propagate_nan=tl.PropagateNan.ALL)

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # slot 0: the newest output frame
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Step i reads intermediate frames i * ST - pt + r (r < ST) and opens output frame i.
    for i in range(o_first, o_end + NSLOT - 1):
        for r in tl.static_range(ST):
            t = i * ST - pt + r
            if (t >= 0) & (t <= t_last):
                x_rows = x_plane + cm.as_int64(t) * stride_xt
                for m0 in range(0, C_mid, BLOCK_MID):
                    mids = m0 + tl.arange(0, BLOCK_MID)
                    mmask = mids < C_mid
                    w1_cols = mids * stride_w1o
                    acc1 = tl.zeros((BLOCK_M, BLOCK_MID), dtype=tl.float32)
                    for step in range(0, KH * KW * num_cb):
                        tap = step // num_cb
                        cc = (step - tap * num_cb) * BLOCK_K + ks
                        kmask = cm.channel_mask(cc, C_in, CI_VEC)
                        kh = tap // KW
                        kw = tap - kh * KW
                        a = ig._gather_tap(x_ptr, x_rows, t, h0, w0, rmask, 0, kh, kw, cc, kmask,
                                           T_in, H_in, W_in, stride_xt, stride_xh, stride_xw,
                                           1, 1, 1, x_ptr, 0, X_ALIGN, False)
                        b_cols = w1_cols + (kh * stride_w1h + kw * stride_w1w)
                        if W1_ALIGN > 1:
                            b_cols = tl.multiple_of(b_cols, W1_ALIGN)
                        b = tl.load(w1_ptr + cc[:, None] * stride_w1i + b_cols[None, :],
                                    mask=kmask[:, None] & mmask[None, :], other=0.0)
                        acc1 = gm.dot(a, b, acc1, PREC)
                    # BN1 (folded with the spatial bias) + ReLU, in the dtype the next GEMM reads
                    bias1 = tl.zeros((BLOCK_MID,), tl.float32)
                    if HAS_BIAS1:
                        bias1 = tl.load(bias1_ptr + mids, mask=mmask, other=0.0).to(tl.float32)
                    mean1 = tl.load(rmean1_ptr + mids, mask=mmask, other=0.0).to(tl.float32)
                    var1 = tl.load(rvar1_ptr + mids, mask=mmask, other=1.0).to(tl.float32)
                    scale1, shift1 = bn.fold(mean1, 1.0 / tl.sqrt(var1 + eps1), bias1,
                                             bn1_weight_ptr, bn1_bias_ptr, mids, mmask,
                                             HAS_BN1_WEIGHT, HAS_BN1_BIAS)
                    mid = cm.activation(acc1 * scale1[None, :] + shift1[None, :], 1)  # ReLU
                    # channels past C_mid are 0 (an Inf in x would make them 0 * Inf = NaN, and
                    # the temporal GEMM would spread it)
                    mid = tl.where(mmask[None, :], mid, 0.0)
                    acc_a, acc_b, acc_c = _temporal_tap(
                        acc_a, acc_b, acc_c, mid.to(x_ptr.dtype.element_ty), w2_ptr, mids, mmask,
                        w2_cols, comask, stride_w2i, stride_w2t, r, KT, ST, NSLOT, PREC)
        # Output frame i - (NSLOT - 1) has had all its taps.
        o = i - (NSLOT - 1)
        if NSLOT == 3:
            done = acc_c
        elif NSLOT == 2:
            done = acc_b
        else:
            done = acc_a
        if o >= o_first:
            gm.bn_act_epilogue(
                done, pid_m, HW, n_rows, tl.zeros_like(rows) + o, ho, wo, rmask, co, comask, C_out,
                bias2_ptr, bn2_weight_ptr, bn2_bias_ptr, rmean2_ptr, rvar2_ptr, res_ptr,
                out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr,
                stride_on, stride_ot, stride_oh, stride_ow,
                stride_rn, stride_rt, stride_rh, stride_rw, eps2,
                HAS_BIAS2, HAS_BN2_WEIGHT, HAS_BN2_BIAS, HAS_RES, ACT, False, False, O_ALIGN, R_ALIGN,
                BLOCK_M)
        acc_c = acc_b
        acc_b = acc_a
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


def _config(bm, bn_, bmid, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn_, "BLOCK_MID": bmid, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


# Registers hold NSLOT = 3 output accumulators (BLOCK_M x BLOCK_N fp32) next to the
# intermediate's (BLOCK_M x BLOCK_MID): the tiles are kept to those that compile without spills
# on sm_90 (python -m r21d.static checks every one; BLOCK_N = 128 or BLOCK_MID = 64 with
# unaligned rows spilled).
_TILES = {
    "16bit": [_config(64, 64, 64, 64, 8, 3), _config(64, 64, 32, 64, 8, 3)],
    "16bit-unaligned": [_config(64, 64, 32, 32, 8, 2), _config(64, 64, 16, 32, 8, 2)],
    "tf32": [_config(64, 64, 32, 32, 8, 3), _config(64, 64, 32, 64, 8, 2)],
    # (64x64 spilled on sm_90 with Triton 3.9 and 3.5 KB on sm_80: 32 output channels a tile)
    "tf32-unaligned": [_config(64, 32, 16, 32, 8, 2)],
    "ieee": [_config(64, 32, 16, 32, 8, 1)],
    "ieee-unaligned": [_config(64, 32, 16, 32, 8, 1)],
}
# sm_80 (and Ada): mma.sync keeps the accumulators in the general registers, where wgmma has its
# own, so every 64x64 tile above spills there (up to 600 B with Triton 3.6-3.9): half the tile,
# 32 rows (or 32 output channels, which recomputes the spatial conv once more per output
# channel tile) and 4 warps, clean with Triton 3.6, 3.8 and 3.9.
_TILES_SM80 = {
    "16bit": [_config(32, 64, 32, 64, 4, 2), _config(64, 32, 32, 32, 4, 3),
              _config(64, 32, 32, 32, 4, 2)],
    "16bit-unaligned": [_config(32, 64, 16, 32, 4, 2), _config(64, 32, 32, 32, 4, 2)],
    "tf32": [_config(64, 32, 16, 32, 4, 2), _config(32, 32, 16, 32, 4, 2)],
    "tf32-unaligned": [_config(64, 32, 16, 32, 4, 2), _config(32, 32, 16, 32, 4, 2)],
}
_UNIT = Tuned(_unit_eval_kernel, _TILES,
              key=["HW", "C_in", "C_mid", "C_out", "T_out", "KH", "KW", "frames_per_program"],
              interpret=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_MID=16, BLOCK_K=16, num_warps=4),
              arch_configs={80: _TILES_SM80})


def _frames_per_program(T_out: int, programs: int) -> int:
    """Output frames per program: all of them, unless the other grid axes leave the GPU idle."""
    splits = min(T_out, max(1, -(-_TARGET_PROGRAMS // max(programs, 1))))
    return -(-T_out // splits)


def _weight_cl(w: torch.Tensor) -> torch.Tensor:
    """The weight with contiguous input channels (the spatial weight's vector loads)."""
    return w if w.stride(1) == 1 else relayout(w, torch.channels_last_3d)


def _alignment_class(dtype: torch.dtype, *aligns: int) -> str:
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return "" if all(a == vec for a in aligns) else "-unaligned"


@planned
def unit_eval(x, w1, bias1, bn1_weight, bn1_bias, rmean1, rvar1, eps1,
              w2, bias2, bn2_weight, bn2_bias, rmean2, rvar2, eps2, residual,
              spatial_stride, spatial_padding, temporal_stride, temporal_padding,
              activation: str | None) -> torch.Tensor:
    """act(bn2(conv_t(relu(bn1(conv_s(x))))) [+ residual]) with both BNs in eval mode.

    ``w1``: (C_mid, C_in, 1, kh, kw), stride (1, *spatial_stride), padding (0, *spatial_padding);
    ``w2``: (C_out, C_mid, kt, 1, 1), stride (temporal_stride, 1, 1), padding
    (temporal_padding, 0, 0). The output follows x's memory format; in channels_last_3d the call
    is one launch that allocates only its output."""
    N, C_in, T_in, H_in, W_in = x.shape
    C_mid, _, _, KH, KW = w1.shape
    C_out, _, KT, _, _ = w2.shape
    sh, sw = spatial_stride
    ph, pw = spatial_padding
    H_out, W_out = out_size(H_in, KH, sh, ph), out_size(W_in, KW, sw, pw)
    T_out = out_size(T_in, KT, temporal_stride, temporal_padding)
    slots = -(-KT // temporal_stride)
    if slots > UNIT_MAX_OPEN_FRAMES:
        raise ValueError(f"unit_eval keeps at most {UNIT_MAX_OPEN_FRAMES} output frames open, got "
                         f"ceil(kt / st) = {slots}")
    x_in, x, residual = x, channels_contiguous(x), channels_contiguous(residual)
    out = alloc_channels_last((N, C_out, T_out, H_out, W_out), x)
    if out.numel() == 0:
        return in_format_of(out, x_in)
    w1, w2 = _weight_cl(w1), w2
    prec = gm.dot_precision(x.dtype)
    x_align, o_align = rows_alignment(x), rows_alignment(out)
    r_align = rows_alignment(residual)
    variant = gm.operand_class(x.dtype, prec) + _alignment_class(
        x.dtype, x_align, o_align, *([r_align] if residual is not None else []))
    kernel, meta = _UNIT.select(variant)
    HW = H_out * W_out
    if meta:  # a fixed tile (the interpreter's)
        frames = _frames_per_program(T_out, N * cdiv(HW, meta["BLOCK_M"])
                                     * cdiv(C_out, meta["BLOCK_N"]))
    else:  # the launch picks the tile from the grid; split the frames for the smallest one
        frames = _frames_per_program(T_out, N * cdiv(HW, 128) * cdiv(C_out, 128))

    def grid(meta):
        return (N * cdiv(HW, meta["BLOCK_M"]) * cdiv(C_out, meta["BLOCK_N"]),
                cdiv(T_out, frames))

    absent = x  # stands in for the optional vectors that are not given
    launch(
        kernel, grid, x, w1, w2,
        *(t if t is not None else absent for t in (bias1, bn1_weight, bn1_bias)), rmean1, rvar1,
        *(t if t is not None else absent for t in (bias2, bn2_weight, bn2_bias)), rmean2, rvar2,
        residual if residual is not None else absent, out,
        HW, C_in, C_mid, C_out, T_in, H_in, W_in, T_out, H_out, W_out, KH, KW, frames,
        *rows_strides(x), w1.stride(0), w1.stride(1), w1.stride(3), w1.stride(4),
        w2.stride(0), w2.stride(1), w2.stride(2),
        *rows_strides(out), *rows_strides(residual),
        sh, sw, ph, pw, temporal_padding, float(eps1), float(eps2),
        HAS_BIAS1=bias1 is not None, HAS_BN1_WEIGHT=bn1_weight is not None, HAS_BN1_BIAS=bn1_bias is not None,
        HAS_BIAS2=bias2 is not None, HAS_BN2_WEIGHT=bn2_weight is not None, HAS_BN2_BIAS=bn2_bias is not None,
        HAS_RES=residual is not None, ACT=cm.ACTIVATIONS[activation], KT=KT, ST=temporal_stride,
        NSLOT=slots, X_ALIGN=x_align, W1_ALIGN=rows_alignment(w1),
        O_ALIGN=o_align, R_ALIGN=r_align, CI_VEC=channel_vector(C_in, x), PREC=prec, **meta,
    )
    return in_format_of(out, x_in)
