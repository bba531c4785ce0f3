"""Implicit-GEMM conv3d fused with BatchNorm and activation: spatial (1 x kh x kw), temporal
(kt x 1 x 1), dense (any kernel) and grouped convolutions, any stride, padding and dilation.

A conv is a GEMM whose A operand is gathered on the fly (im2col never exists): rows are output
positions (n, t, h, w), the reduction runs over K = (tap, input channel) of the row's group, and
columns are the group's output channels. The forward kernel (fp32 accumulation with ``_gemm.dot``):

``_igemm_fwd_kernel``    eval: y = act((conv(x) + b) * scale + shift [+ r]) with BN folded in the
                         epilogue (one launch); train (STATS): z and per-tile statistics for
                         batchnorm.py (see _gemm.bn_act_epilogue).

The backward (dgrad and wgrad GEMMs) is implicit_gemm_bwd.py; it shares this file's geometry
and gathers.

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
from ._launch import Tuned, launch, relayout
from ._layout import (
    cdiv,
    channel_vector,
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
                stride_xt, stride_xh, stride_xw, dt, dh, dw, pre_ptr, C_pre, X_ALIGN: tl.constexpr,
                PRE: tl.constexpr):
    """[rows, channels] of x: for each row (tap (0, 0, 0) at input position (t0, h0, w0), offset
    ``x_rows``) the position tap (kt, kh, kw) reads, channels ``chans``; 0 outside the input.
    PRE: x is the pre-BN input of a BN + ReLU applied on load (:func:`_bn_relu_prologue`)."""
    ok = rmask & _inside(t0 + kt * dt, h0 + kh * dh, w0 + kw * dw, T_in, H_in, W_in)
    rows = x_rows + (cm.as_int64(kt * dt) * stride_xt + cm.as_int64(kh * dh) * stride_xh
                     + cm.as_int64(kw * dw) * stride_xw)
    if X_ALIGN > 1:
        rows = tl.multiple_of(rows, X_ALIGN)
    mask = ok[:, None] & cmask[None, :]
    v = tl.load(x_ptr + rows[:, None] + chans[None, :], mask=mask, other=0.0)
    if PRE:
        v = _bn_relu_prologue(v, mask, pre_ptr, chans, cmask, C_pre)
    return v


@triton.jit
def _gather_flat(x_ptr, x_rows, t0, h0, w0, rmask, kt, kh, kw, ci, kmask, T_in, H_in, W_in,
                 stride_xt, stride_xh, stride_xw, dt, dh, dw, pre_ptr, C_pre, PRE: tl.constexpr):
    """[rows, columns] of x where column j is tap (kt[j], kh[j], kw[j]), channel ci[j] (the flat
    K axis); 0 outside the input. PRE as in :func:`_gather_tap`."""
    ok = rmask[:, None] & kmask[None, :] & _inside(
        t0[:, None] + (kt * dt)[None, :], h0[:, None] + (kh * dh)[None, :],
        w0[:, None] + (kw * dw)[None, :], T_in, H_in, W_in)
    cols = (kt * dt).to(tl.int64) * stride_xt + (kh * dh).to(tl.int64) * stride_xh \
        + (kw * dw).to(tl.int64) * stride_xw + ci
    v = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=ok, other=0.0)
    if PRE:
        v = _bn_relu_prologue(v, ok, pre_ptr, ci, kmask, C_pre)
    return v


# ----------------------------------------------------------------------------- forward


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=['T_out', 'T_in', 'stride_xn', 'stride_on', 'stride_rn'])
def _igemm_fwd_kernel(
    x_ptr, w_ptr, pre_ptr, bias_ptr, bn_weight_ptr, bn_bias_ptr, rmean_ptr, rvar_ptr, res_ptr,
    out_ptr, z_ptr, save_mean_ptr, save_invstd_ptr, part_mean_ptr, part_m2_ptr,
    M, C_in_g, C_out_g, C_out, T_out, H_out, W_out, T_in, H_in, W_in, TAPS, KH, KW,
    stride_xn, stride_xt, stride_xh, stride_xw, stride_wo, stride_wi, stride_wt, stride_wh, stride_ww,
    stride_on, stride_ot, stride_oh, stride_ow,
    stride_rn, stride_rt, stride_rh, stride_rw,
    st, sh, sw, pt, ph, pw, dt, dh, dw, eps,
    HAS_BIAS: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
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
    x_rows = cm.position_offsets(n, t0, h0, w0, stride_xn, stride_xt, stride_xh, stride_xw)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    comask = co < C_out_g
    cols = co
    if GROUPED:  # the group's first channels; X_ALIGN and O_ALIGN divide the channels per group
        g = tl.program_id(1)
        x_rows += tl.multiple_of(g * C_in_g, X_ALIGN)
        cols = tl.multiple_of(g * C_out_g, O_ALIGN) + co
    w_cols = cols * stride_wo
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
                             T_in, H_in, W_in, stride_xt, stride_xh, stride_xw, dt, dh, dw, pre_ptr, C_in_g,
                             PRE)
            b_rows = ci * stride_wi + kt * stride_wt + kh * stride_wh + kw * stride_ww
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
                            T_in, H_in, W_in, stride_xt, stride_xh, stride_xw, dt, dh, dw, pre_ptr, C_in_g,
                            X_ALIGN, PRE)
            b_cols = w_cols + (kt * stride_wt + kh * stride_wh + kw * stride_ww)
            if W_ALIGN > 1:
                b_cols = tl.multiple_of(b_cols, W_ALIGN)
            b = tl.load(w_ptr + cc[:, None] * stride_wi + b_cols[None, :],
                        mask=kmask[:, None] & comask[None, :], other=0.0)
            acc = gm.dot(a, b, acc, PREC)

    gm.bn_act_epilogue(
        acc, pid_m, M, n, to, ho, wo, rmask, cols, comask, C_out,
        bias_ptr, bn_weight_ptr, bn_bias_ptr, rmean_ptr, rvar_ptr, res_ptr,
        out_ptr, z_ptr, save_mean_ptr, save_invstd_ptr, part_mean_ptr, part_m2_ptr,
        stride_on, stride_ot, stride_oh, stride_ow, stride_rn, stride_rt, stride_rh, stride_rw, eps,
        HAS_BIAS, HAS_BN_WEIGHT, HAS_BN_BIAS, HAS_RES, ACT, STATS, SAVE, O_ALIGN, R_ALIGN, BLOCK_M)


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
def conv_bn_act_fwd(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                    stride, padding, dilation, training: bool, momentum: float, eps: float,
                    activation: str | None, save: bool, running_in_place: bool = False, *,
                    pre: torch.Tensor | None = None, normalize: bool = True):
    """Implicit-GEMM conv + BN + activation forward (groups = C_in / weight.shape[1]); returns what
    _gemm.conv_bn_act_forward documents (``normalize`` and ``running_in_place`` as there).

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
            HAS_BIAS=bias is not None, HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None,
            HAS_RES=residual is not None and not training, ACT=cm.ACTIVATIONS[activation],
            STATS=training, SAVE=save, GROUPED=geom.groups > 1, FLAT_K=geom.flat,
            X_ALIGN=_alignment(x, geom, geom.C_in_g),
            # a weight's "rows" are its (output channel, tap) runs of input channels
            W_ALIGN=rows_alignment(w), O_ALIGN=_alignment(out, geom, geom.C_out_g),
            R_ALIGN=_alignment(residual, geom, geom.C_out_g),
            CI_VEC=channel_vector(geom.C_in_g, x), PREC=prec, PRE=pre is not None, **meta,
        )

    return gm.conv_bn_act_forward(x, bias, bn_weight, bn_bias, running_mean, running_var, residual,
                                  geom.out_shape, training, momentum, eps, activation, save,
                                  select, launch_gemm, normalize=normalize,
                                  running_in_place=running_in_place)
