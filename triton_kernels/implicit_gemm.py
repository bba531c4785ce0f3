"""Implicit-GEMM conv3d fused with BatchNorm and activation: spatial (1 x kh x kw), temporal
(kt x 1 x 1), dense (any kernel) and grouped convolutions, any stride, padding and dilation.

A conv is a GEMM whose A operand is gathered on the fly (im2col never exists): rows are output
positions (n, t, h, w), the reduction runs over K = (tap, input channel) of the row's group, and
columns are the group's output channels. Kernels (fp32 accumulation with ``_gemm.dot``):

``_igemm_fwd_kernel``    eval: y = act((conv(x) + b) * scale + shift [+ r]) with BN folded in the
                         epilogue (one launch); train (STATS): z and per-tile statistics for
                         batchnorm.py (see _gemm.bn_act_epilogue).
``_igemm_dgrad_kernel``  dx as a GEMM over input rows: for each tap, the output position it feeds
                         and dz there, rebuilt from dy and z in the prologue (never stored). Rows
                         are grouped by their residue modulo the stride, so every tap a program
                         visits is valid for all its rows (a strided conv wastes no MMA on taps
                         that feed nothing).
``_igemm_wgrad_kernel``  dW[co, (tap, ci)] = dz^T x(tap), split over rows into fp32 partials
                         summed in a fixed order (deterministic); written in the (C_out, kT, kH,
                         kW, C_in/groups) order of a channels_last_3d weight.

The K loop has two forms. Tap-major (C_in/groups >= FLAT_BELOW): for each tap, BLOCK_K channels
at a time, so a row's A slice is one contiguous channel vector. Flat (fewer channels per group,
e.g. the 3-channel stem): K = taps x channels is one axis decomposed per element, so a 3-channel
conv does not pad every tap to 16 channels.

Activations are addressed with contiguous channels (other layouts are converted at the boundary,
see _layout.py) and the weight with contiguous input channels (channels_last_3d: what
``model.to(memory_format=torch.channels_last_3d)`` gives; other weights are copied into it).
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
from ._launch import Tuned, alloc, launch, relayout
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
from ._replay import planned

# Input channels per group below which the K loop runs flat over (tap, channel).
FLAT_BELOW = 16
_tile = gm.tile


@triton.jit
def _tap(tap, KH, KW):
    """(kt, kh, kw) of flattened tap indices."""
    kw = tap % KW
    r = tap // KW
    return r // KH, r % KH, kw


@triton.jit
def _inside(t, h, w, T, H, W):
    # The t test applied as a select: t is a scalar in the (2+1)D unit's gathers (one frame at a
    # time), and a scalar condition &-ed with a block gives an int32 mask in Triton's interpreter,
    # which 3.9's tl.load refuses (tests/strict_interpreter.py); compiled, the same predicate.
    return tl.where((t >= 0) & (t < T), (h >= 0) & (h < H) & (w >= 0) & (w < W), False)


@triton.jit
def _bn_relu_prologue(v, ok, pre_ptr, chans, cmask, C):
    """relu(v * scale + shift) per input channel: a previous BN + ReLU applied as the conv loads
    its input (``pre_ptr``: scale at [0, C), shift at [C, 2C), fp32); 0 where ``ok`` is off, so
    the conv's zero padding stays zero after the transform."""
    scale = tl.load(pre_ptr + chans, mask=cmask, other=0.0)
    shift = tl.load(pre_ptr + C + chans, mask=cmask, other=0.0)
    y = cm.activation(v.to(tl.float32) * scale[None, :] + shift[None, :], 1)  # ReLU
    return tl.where(ok, y, 0.0).to(v.dtype)


@triton.jit
def _gather_tap(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, chans, cmask, T_in, H_in, W_in,
                sxt, sxh, sxw, dt, dh, dw, pre_ptr, C_pre, X_ALIGN: tl.constexpr,
                PRE: tl.constexpr):
    """[rows, channels] of x: for each row (tap (0, 0, 0) at input position (t0, h0, w0), offset
    ``x_rows``) the position tap (kt, kh, kw) reads, channels ``chans``; 0 outside the input.
    PRE: x is the pre-BN input of a BN + ReLU applied on load (:func:`_bn_relu_prologue`)."""
    ok = rmask & _inside(t0 + kt * dt, h0 + kh * dh, w0 + kw * dw, T_in, H_in, W_in)
    rows = x_rows + (cm.as_int64(kt * dt) * sxt + cm.as_int64(kh * dh) * sxh
                     + cm.as_int64(kw * dw) * sxw)
    if X_ALIGN > 1:
        rows = tl.multiple_of(rows, X_ALIGN)
    mask = ok[:, None] & cmask[None, :]
    v = tl.load(x_ptr + rows[:, None] + chans[None, :], mask=mask, other=0.0)
    if PRE:
        v = _bn_relu_prologue(v, mask, pre_ptr, chans, cmask, C_pre)
    return v


@triton.jit
def _gather_flat(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, ci, kmask, T_in, H_in, W_in,
                 sxt, sxh, sxw, dt, dh, dw, pre_ptr, C_pre, PRE: tl.constexpr):
    """[rows, columns] of x where column j is tap (kt[j], kh[j], kw[j]), channel ci[j] (the flat
    K axis); 0 outside the input. PRE as in :func:`_gather_tap`."""
    ok = rmask[:, None] & kmask[None, :] & _inside(
        t0[:, None] + (kt * dt)[None, :], h0[:, None] + (kh * dh)[None, :],
        w0[:, None] + (kw * dw)[None, :], T_in, H_in, W_in)
    cols = (kt * dt).to(tl.int64) * sxt + (kh * dh).to(tl.int64) * sxh \
        + (kw * dw).to(tl.int64) * sxw + ci
    v = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=ok, other=0.0)
    if PRE:
        v = _bn_relu_prologue(v, ok, pre_ptr, ci, kmask, C_pre)
    return v


# ----------------------------------------------------------------------------- forward


@triton.jit
def _igemm_fwd_kernel(
    x_ptr, w_ptr, pre_ptr, bias_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, res_ptr,
    out_ptr, z_ptr, save_mean_ptr, save_invstd_ptr, part_mean_ptr, part_m2_ptr,
    M, C_in_g, C_out_g, C_out, T_out, H_out, W_out, T_in, H_in, W_in, TAPS, KH, KW,
    sxn, sxt, sxh, sxw, swo, swi, swt, swh, sww,
    son, sot, soh, sow,
    srn, srt, srh, srw,
    st, sh, sw, pt, ph, pw, dt, dh, dw, eps,
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, SAVE: tl.constexpr,
    GROUPED: tl.constexpr, FLAT_K: tl.constexpr, X_ALIGN: tl.constexpr, W_ALIGN: tl.constexpr,
    O_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr, CI_VEC: tl.constexpr, PREC: tl.constexpr,
    PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_out_g, BLOCK_N)
    pid_m = pid // num_n  # consecutive programs share the gathered x tile (L2 reuse)
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n, to, ho, wo = cm.split_rows(rows, T_out, H_out, W_out)
    t0 = to * st - pt  # the input position of tap (0, 0, 0)
    h0 = ho * sh - ph
    w0 = wo * sw - pw
    x_rows = cm.position_offsets(n, t0, h0, w0, sxn, sxt, sxh, sxw)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < C_out_g
    cols = co
    if GROUPED:  # the group's first channels; X_ALIGN and O_ALIGN divide the channels per group
        g = tl.program_id(1)
        x_rows += tl.multiple_of(g * C_in_g, X_ALIGN)
        cols = tl.multiple_of(g * C_out_g, O_ALIGN) + co
    w_cols = cols * swo
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        K = TAPS * C_in_g
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            kmask = kk < K
            tap = kk // C_in_g
            ci = kk - tap * C_in_g
            kt, kh, kw = _tap(tap, KH, KW)
            a = _gather_flat(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, ci, kmask,
                             T_in, H_in, W_in, sxt, sxh, sxw, dt, dh, dw, pre_ptr, C_in_g, PRE)
            b_rows = ci * swi + kt * swt + kh * swh + kw * sww
            b = tl.load(w_ptr + b_rows[:, None] + w_cols[None, :],
                        mask=kmask[:, None] & comask[None, :], other=0.0)
            acc = gm.dot(a, b, acc, PREC)
    else:
        num_cb = tl.cdiv(C_in_g, BLOCK_K)
        for step in range(0, TAPS * num_cb):
            tap = step // num_cb
            cc = (step - tap * num_cb) * BLOCK_K + ks
            kmask = cm.channel_mask(cc, C_in_g, CI_VEC)
            kt, kh, kw = _tap(tap, KH, KW)
            a = _gather_tap(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, cc, kmask,
                            T_in, H_in, W_in, sxt, sxh, sxw, dt, dh, dw, pre_ptr, C_in_g,
                            X_ALIGN, PRE)
            b_cols = w_cols + (kt * swt + kh * swh + kw * sww)
            if W_ALIGN > 1:
                b_cols = tl.multiple_of(b_cols, W_ALIGN)
            b = tl.load(w_ptr + cc[:, None] * swi + b_cols[None, :],
                        mask=kmask[:, None] & comask[None, :], other=0.0)
            acc = gm.dot(a, b, acc, PREC)

    gm.bn_act_epilogue(
        acc, pid_m, M, n, to, ho, wo, rmask, cols, comask, C_out,
        bias_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, res_ptr,
        out_ptr, z_ptr, save_mean_ptr, save_invstd_ptr, part_mean_ptr, part_m2_ptr,
        son, sot, soh, sow, srn, srt, srh, srw, eps,
        HAS_BIAS, HAS_GAMMA, HAS_BETA, HAS_RES, ACT, STATS, SAVE, O_ALIGN, R_ALIGN, BLOCK_M)


# Tile sizes per variant (the pointwise tables' classes, see pointwise.py), kept to those that
# compile without spills on sm_90 and sm_80 (python -m r21d.static checks every one, with SiLU):
# the gathered A operand's per-row masks and addresses take registers the pointwise GEMM does
# not need; "-flat" (per-element tap decomposition) more still.
_FWD_TILES = {
    # 128x64x64 with 4 warps (and 64x128x64 with 4 warps and a residual) spilled on sm_80 with
    # Triton 3.6 and 3.9: 8 warps
    "16bit": [_tile(128, 128, 64, 8, 3), _tile(128, 64, 64, 8, 3), _tile(64, 128, 64, 4, 3),
              _tile(64, 64, 64, 4, 4)],
    "16bit-res": [_tile(128, 64, 64, 8, 3), _tile(64, 128, 64, 8, 3), _tile(64, 64, 64, 4, 3)],
    "16bit-unaligned": [_tile(128, 64, 32, 8, 2), _tile(64, 128, 32, 8, 2), _tile(64, 64, 32, 8, 2)],
    "16bit-res-unaligned": [_tile(64, 64, 32, 8, 2), _tile(64, 64, 16, 8, 2), _tile(64, 32, 32, 4, 2)],
    "16bit-flat": [_tile(128, 64, 32, 8, 2), _tile(64, 64, 32, 4, 2)],
    "16bit-flat-res": [_tile(64, 64, 32, 8, 2), _tile(64, 32, 32, 4, 2)],
    "tf32": [_tile(128, 128, 32, 8, 3), _tile(128, 64, 32, 4, 3), _tile(64, 64, 32, 4, 3)],
    "tf32-res": [_tile(128, 64, 32, 8, 3), _tile(64, 64, 32, 4, 3)],
    # (64x64x32 with 4 warps spilled on sm_90 with Triton 3.6 and 3.9 and TF32-rounded operands)
    "tf32-unaligned": [_tile(128, 64, 16, 8, 2), _tile(64, 128, 16, 8, 2), _tile(64, 64, 16, 4, 2)],
    "tf32-res-unaligned": [_tile(64, 64, 32, 8, 2), _tile(64, 32, 32, 4, 2)],
    "tf32-flat": [_tile(128, 64, 16, 8, 2), _tile(64, 64, 16, 4, 2)],
    "tf32-flat-res": [_tile(64, 64, 16, 8, 2), _tile(64, 32, 16, 4, 2)],
    "ieee": [_tile(64, 64, 16, 4, 2), _tile(128, 64, 16, 8, 2)],
    "ieee-res": [_tile(64, 64, 16, 4, 2), _tile(64, 128, 16, 8, 1)],
    "ieee-unaligned": [_tile(64, 64, 16, 4, 2), _tile(128, 64, 16, 8, 2)],
    "ieee-res-unaligned": [_tile(64, 64, 16, 8, 2), _tile(64, 32, 16, 4, 2)],
    # (64x32x16 with two stages spilled 16 B on sm_90 with Triton 3.9)
    "ieee-flat": [_tile(64, 32, 16, 4, 1)],
    "ieee-flat-res": [_tile(64, 32, 16, 4, 1)],
}
_FWD_EVAL = Tuned(_igemm_fwd_kernel, _FWD_TILES,
                  key=["M", "C_in_g", "C_out_g", "TAPS", "SAVE", "PRE"], interpret=gm.INTERPRET_GEMM)
# Training tiles are STATS_BLOCK_M rows (the partial-statistics buffers depend on it): the eval
# tables' first two tiles, resized, except where those spilled.
_FWD_STATS = Tuned(
    _igemm_fwd_kernel,
    {**{variant: [_tile(gm.STATS_BLOCK_M, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], 8,
                        c.num_stages) for c in configs[:2]]
        for variant, configs in _FWD_TILES.items() if "-res" not in variant},
     # IEEE fp32 with the BN1 + ReLU prologue (the training unit's temporal conv): 128x64x16
     # with two stages spilled 8-16 B on sm_90 with Triton 3.6 and 3.9; one stage does not
     "ieee": [_tile(gm.STATS_BLOCK_M, 64, 16, 8, 1)],
     "ieee-flat": [_tile(gm.STATS_BLOCK_M, 32, 16, 8, 2)],
     # (128x128x32 spilled 16 B on sm_90 with Triton 3.9, unaligned 16-bit rows)
     "16bit-unaligned": [_tile(gm.STATS_BLOCK_M, 64, 32, 8, 2)]},
    key=["M", "C_in_g", "C_out_g", "TAPS", "PRE"], interpret=gm.INTERPRET_GEMM,
    # sm_80: that tile's two stages spilled 8 B with the prologue (the strided unit, 3.8 and 3.9)
    arch_configs={80: {"16bit-unaligned": [_tile(gm.STATS_BLOCK_M, 64, 32, 8, 1),
                                           _tile(gm.STATS_BLOCK_M, 32, 32, 8, 2)]}},
)


class _Geometry:
    """Sizes of one conv call, shared by the forward and backward launchers."""

    def __init__(self, x_shape, weight_shape, stride, padding, dilation):
        self.N, self.C_in, self.T_in, self.H_in, self.W_in = x_shape
        self.C_out, self.C_in_g, self.KT, self.KH, self.KW = weight_shape
        self.groups = self.C_in // self.C_in_g
        self.C_out_g = self.C_out // self.groups
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.T_out, self.H_out, self.W_out = (
            out_size(n, k, s, p, d) for n, k, s, p, d in
            zip((self.T_in, self.H_in, self.W_in), (self.KT, self.KH, self.KW), stride, padding, dilation))
        self.M = self.N * self.T_out * self.H_out * self.W_out
        self.taps = self.KT * self.KH * self.KW
        self.flat = self.C_in_g < FLAT_BELOW

    @property
    def out_shape(self):
        return (self.N, self.C_out, self.T_out, self.H_out, self.W_out)

    def conv_args(self):
        """stride, padding and dilation, flattened as the kernels take them."""
        return (*self.stride, *self.padding, *self.dilation)


def _group_alignment(align: int, geom: _Geometry, channels_per_group: int) -> int:
    """``align`` reduced so that a group's first channel (g * channels_per_group) keeps it."""
    if geom.groups == 1:
        return align
    return math.gcd(align, channels_per_group)


def _alignment(t: torch.Tensor | None, geom: _Geometry, channels_per_group: int) -> int:
    """The channel vector (elements) every row of ``t`` starts on at every group's first channel."""
    return _group_alignment(rows_alignment(t), geom, channels_per_group)


def _unaligned(dtype: torch.dtype, *aligns: int) -> str:
    """"-unaligned" (the tile tables' class of narrower channel vectors) unless every alignment is a
    16-byte vector."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return "" if all(a == vec for a in aligns) else "-unaligned"


def _weight_cl(weight: torch.Tensor, geom: _Geometry) -> torch.Tensor:
    """The weight with contiguous input channels (a counted copy if it has not), for the tap-major
    kernels' vector loads; with fewer than FLAT_BELOW channels per group there are no vectors."""
    if geom.flat or weight.stride(1) == 1:
        return weight
    return relayout(weight, torch.channels_last_3d)


def _check_pre(pre: torch.Tensor | None, geom: _Geometry) -> None:
    if pre is None:
        return
    if geom.groups != 1 or pre.shape != (2 * geom.C_in,) or pre.dtype != torch.float32 \
            or not pre.is_contiguous():
        raise ValueError(f"pre must be a contiguous float32 ({2 * geom.C_in},) vector of an "
                         f"ungrouped conv, got {tuple(pre.shape)} {pre.dtype}, groups={geom.groups}")


@planned
def conv_bn_act_fwd(x, weight, bias, gamma, beta, running_mean, running_var, residual,
                    stride, padding, dilation, training: bool, momentum: float, eps: float,
                    activation: str | None, save: bool, *, pre: torch.Tensor | None = None,
                    normalize: bool = True):
    """Implicit-GEMM conv + BN + activation forward (groups = C_in / weight.shape[1]); returns what
    _gemm.conv_bn_act_forward documents (``normalize`` as there).

    ``pre`` (float32, [2 * C_in]: scale then shift): x is the conv output of a previous BN + ReLU,
    applied per input channel as x is loaded, ``relu(x * scale + shift)``, so that the normalised
    tensor is never written (the (2+1)D unit in training; groups = 1 only)."""
    geom = _Geometry(x.shape, weight.shape, stride, padding, dilation)
    _check_pre(pre, geom)
    prec = gm.dot_precision(x.dtype)

    def select(x, out, residual, training, heavy):
        variant = gm.operand_class(x.dtype, prec)
        if geom.flat:
            variant += "-flat"
        if not training and heavy:
            variant += "-res"
        if not geom.flat:
            variant += _unaligned(x.dtype, _alignment(x, geom, geom.C_in_g),
                                  _alignment(out, geom, geom.C_out_g),
                                  *([_alignment(residual, geom, geom.C_out_g)] if residual is not None else []))
        return (_FWD_STATS if training else _FWD_EVAL).select(variant)

    def launch_gemm(kernel, meta, x, residual, out, pointers):
        w = _weight_cl(weight, geom)

        def grid(meta):
            return (cdiv(geom.M, meta["BLOCK_M"]) * cdiv(geom.C_out_g, meta["BLOCK_N"]),
                    geom.groups)

        launch(
            kernel, grid, x, w, pre if pre is not None else x, *pointers,
            geom.M, geom.C_in_g, geom.C_out_g, geom.C_out, geom.T_out, geom.H_out, geom.W_out,
            geom.T_in, geom.H_in, geom.W_in, geom.taps, geom.KH, geom.KW,
            *rows_strides(x), w.stride(0), w.stride(1), *w.stride()[2:],
            *rows_strides(out), *rows_strides(residual), *geom.conv_args(), float(eps),
            HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
            HAS_RES=residual is not None and not training, ACT=cm.ACTIVATIONS[activation],
            STATS=training, SAVE=save, GROUPED=geom.groups > 1, FLAT_K=geom.flat,
            X_ALIGN=_alignment(x, geom, geom.C_in_g),
            # a weight's "rows" are its (output channel, tap) runs of input channels
            W_ALIGN=rows_alignment(w), O_ALIGN=_alignment(out, geom, geom.C_out_g),
            R_ALIGN=_alignment(residual, geom, geom.C_out_g),
            CI_VEC=channel_vector(geom.C_in_g, x), PREC=prec, PRE=pre is not None, **meta,
        )

    return gm.conv_bn_act_forward(x, bias, gamma, beta, running_mean, running_var, residual,
                                  geom.out_shape, training, momentum, eps, activation, save,
                                  select, launch_gemm, normalize=normalize)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _first_tap(r, p, d, s, K):
    """The smallest tap k in [0, K) through which input index r (mod the stride s) receives a
    gradient, (r + p - k * d) % s == 0; K when there is none."""
    first = K
    for i in range(0, K):
        k = K - 1 - i
        first = tl.where((r + p - k * d) % s == 0, k, first)
    return first


@triton.jit
def _igemm_dgrad_kernel(
    dy_ptr, z_ptr, res_ptr, coef_ptr, w_ptr, dx_ptr,
    R, C_in_g, C_out_g, C_out, T_in, H_in, W_in, T_out, H_out, W_out, QT, QH, QW, KT, KH, KW,
    sdn, sdt, sdh, sdw,
    szn, szt, szh, szw,
    srn, srt, srh, srw,
    sxn, sxt, sxh, sxw, swo, swi, swt, swh, sww,
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
    d_base = cm.position_offsets(n, qt, qh, qw, sdn, sdt, sdh, sdw)
    z_base = cm.position_offsets(n, qt, qh, qw, szn, szt, szh, szw)
    r_base = cm.position_offsets(n, qt, qh, qw, srn, srt, srh, srw)
    x_rows = cm.position_offsets(n, ti, hi, wi, sxn, sxt, sxh, sxw)
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
        d_rows = d_base + (cm.as_int64(ot) * sdt + cm.as_int64(oh) * sdh + cm.as_int64(ow) * sdw)
        z_rows = z_base + (cm.as_int64(ot) * szt + cm.as_int64(oh) * szh + cm.as_int64(ow) * szw)
        r_rows = r_base + (cm.as_int64(ot) * srt + cm.as_int64(oh) * srh + cm.as_int64(ow) * srw)
        if D_ALIGN > 1:
            d_rows = tl.multiple_of(d_rows, D_ALIGN)
        if Z_ALIGN > 1:
            z_rows = tl.multiple_of(z_rows, Z_ALIGN)
        if R_ALIGN > 1:
            r_rows = tl.multiple_of(r_rows, R_ALIGN)
        dz = gm.dz_tile(dy_ptr, z_ptr, res_ptr, coef_ptr, d_rows[:, None] + kk[None, :],
                        z_rows[:, None] + kk[None, :], r_rows[:, None] + kk[None, :], co_base + kk,
                        ok[:, None] & kmask[None, :], C_out, HAS_RES, ACT, TRAINING)
        b = tl.load(w_ptr + ((co_base + kk) * swo + (kt * swt + kh * swh + kw * sww))[:, None]
                    + (ci * swi)[None, :], mask=kmask[:, None] & cimask[None, :], other=0.0)
        acc = gm.dot(dz.to(w_ptr.dtype.element_ty), b, acc, PREC)

    if X_ALIGN > 1:
        x_rows = tl.multiple_of(x_rows, X_ALIGN)
    tl.store(dx_ptr + x_rows[:, None] + ci[None, :], acc, mask=rmask[:, None] & cimask[None, :])


@triton.jit
def _igemm_wgrad_kernel(
    dy_ptr, z_ptr, res_ptr, coef_ptr, x_ptr, pre_ptr, dw_ptr,
    M, C_in_g, C_out_g, C_out, T_out, H_out, W_out, T_in, H_in, W_in, TAPS, KH, KW, rows_per_split,
    sdn, sdt, sdh, sdw,
    szn, szt, szh, szw,
    srn, srt, srh, srw,
    sxn, sxt, sxh, sxw,
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
                           sdn, sdt, sdh, sdw, szn, szt, szh, szw, srn, srt, srh, srw,
                           HAS_RES, ACT, TRAINING, D_ALIGN, Z_ALIGN, R_ALIGN)
        t0 = to * st - pt
        h0 = ho * sh - ph
        w0 = wo * sw - pw
        x_rows = cm.position_offsets(n, t0, h0, w0, sxn, sxt, sxh, sxw) + ci_base
        if FLAT_K:
            xa = _gather_flat(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, ci, kmask,
                              T_in, H_in, W_in, sxt, sxh, sxw, dt, dh, dw, pre_ptr, C_in_g, PRE)
        else:
            xa = _gather_tap(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, ci, kmask,
                             T_in, H_in, W_in, sxt, sxh, sxw, dt, dh, dw, pre_ptr, C_in_g,
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
def conv_bn_act_bwd(grad_out, x, weight, bias, z, mean, invstd, gamma, beta, residual, stride,
                    padding, dilation, training: bool, activation: str | None, needs, *,
                    pre: torch.Tensor | None = None):
    """Gradients (dx, dweight, dbias, dgamma, dbeta, dresidual) of conv_bn_act_fwd, with ``z``,
    ``mean`` and ``invstd`` as it saved them; dx, dweight and dresidual in the memory formats of
    x, weight and residual. ``needs`` says which of the six are wanted (the others are None).

    With the forward's ``pre``, the wgrad applies it to x as it loads it (the conv's input was
    ``relu(x * scale + shift)``) and dx is the gradient of that input, not of x."""
    need_dx, need_dw, need_db, need_dgamma, need_dbeta, need_dres = needs
    geom = _Geometry(x.shape, weight.shape, stride, padding, dilation)
    _check_pre(pre, geom)
    act = cm.ACTIVATIONS[activation]
    x_in, residual_in = x, residual
    grad_out, residual = channels_contiguous(grad_out), channels_contiguous(residual)
    coef, dgamma, dbeta, dbias, dres = bn.bwd_reduce_finalize(
        grad_out, z, mean, invstd, gamma, beta, residual, act, training,
        need_dgamma, need_dbeta, need_db, need_dres, bias_dtype=bias.dtype if bias is not None else None)
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
        splits = splitk.row_splits(geom.M, cdiv(geom.C_out, 128) * cdiv(K, 128), x.device)
        rows_per_split = cdiv(geom.M, splits)
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
    return dx, dw, dbias, dgamma, dbeta, dres
