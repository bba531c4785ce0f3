"""What the GEMM-shaped conv kernels (pointwise.py, implicit_gemm.py) share.

Host side: the forward launcher flow (buffers, GEMM, training statistics and normalisation), the
dot's input precision, the operand class that picks a tile table, tile configurations, the
interpreter's one configuration. Device side: the conv epilogue (BN folded
in eval, or z and per-tile batch statistics in training; residual; activation) and the backward
prologue that rebuilds the conv-output gradient dz from dy and z as a tile is loaded.

Rows are output positions (n, t, h, w) addressed as in _common.py; channels are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm
from . import batchnorm as bn
from ._launch import alloc, interpreted
from ._layout import alloc_channels_last, cdiv, channels_contiguous, in_format_of

# Training (STATS) tiles are always STATS_BLOCK_M rows: the partial-statistics buffers and their
# merge depend on it, so autotuning may change every other block size but not this one.
STATS_BLOCK_M = 128
INTERPRET_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4)


def cudnn_conv_allows_tf32() -> bool:
    """Whether PyTorch lets cuDNN run fp32 convolutions in TF32, resolved as ATen does
    (Context::float32Precision): cudnn.conv.fp32_precision, else cudnn.fp32_precision, else the
    generic torch.backends.fp32_precision, where "none" defers to the next; "tf32" allows it,
    anything else is IEEE. Torch < 2.9 has only the legacy flag. (Reading the legacy flag raises
    when the new API set conv and RNN differently, so it is not read when the new one exists.)
    Read through torch._C's getter, which the torch.backends properties wrap: every fp32 launch
    asks (see triton_kernels/_replay.py)."""
    if _FP32_PRECISION is None:
        return bool(torch.backends.cudnn.allow_tf32)
    for backend, op in _FP32_PRECISION_LEVELS:
        precision = _FP32_PRECISION(backend, op)
        if precision != "none":
            return precision == "tf32"
    return False


# torch.backends.cudnn.conv, torch.backends.cudnn and torch.backends, as torch._C names them
_FP32_PRECISION = getattr(torch._C, "_get_fp32_precision_getter", None)
_FP32_PRECISION_LEVELS = (("cuda", "conv"), ("cuda", "all"), ("generic", "all"))


def dot_precision(dtype: torch.dtype) -> str:
    """The dot's input precision: fp32 convs use TF32 exactly where PyTorch lets cuDNN use it
    (docs/architecture.md, Ops), with operands rounded as cuDNN rounds them (:func:`dot`); else IEEE."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if cudnn_conv_allows_tf32() else "ieee"


def operand_class(dtype: torch.dtype, prec: str) -> str:
    """The operand class that decides which tiles fit in registers and shared memory."""
    if dtype != torch.float32:
        return "16bit"
    return prec  # "tf32" or "ieee"


def conv_bn_act_forward(x, bias, bn_weight, bn_bias, running_mean, running_var, residual, out_shape,
                        training: bool, momentum: float, eps: float, activation: str | None,
                        save: bool, select, launch_gemm, normalize: bool = True,
                        running_in_place: bool = False):
    """The forward launcher of a GEMM-shaped conv family: buffers, the conv GEMM, and in training
    the statistics merge and the normalise + activation pass.

    Returns (out, z, mean, invstd, new_running_mean, new_running_var): ``out`` in ``x``'s memory
    format; ``z`` (the conv output incl. bias, channels_last_3d) and the (mean, invstd) the BN
    used, for autograd, when ``save`` is set (else empty); in training with running statistics,
    their values updated with ``momentum`` (the exponential-average factor) as new tensors (else
    empty). Nothing is modified in place, but with ``running_in_place`` (r21d's eager calls, not
    the functional ops): the running statistics are updated in place and returned themselves.

    ``normalize=False`` (training only) stops after the statistics: no normalise pass, and ``out``
    is ``z`` itself (channels_last_3d), for a consumer that applies the BN as it loads it.

    The family gives ``select(x, out, residual, training, heavy) -> (kernel, meta)``, its kernel
    variant (``heavy``: an eval epilogue that also adds a residual or saves z), and
    ``launch_gemm(kernel, meta, x, residual, out, pointers)``, which launches it with
    ``pointers`` = (bias, bn_weight, bn_bias, running_mean, running_var, residual, out, z, mean,
    invstd, part_mean, part_m2) after x and the weight (absent ones stand in by ``x``).
    ``x`` and ``residual`` come with contiguous channels (converted at the boundary).
    """
    assert normalize or (training and save), "normalize=False is the training statistics only"
    M = out_shape[0] * out_shape[2] * out_shape[3] * out_shape[4]
    C_out = out_shape[1]
    dev = x.device
    act = cm.ACTIVATIONS[activation]

    def absent(dtype=torch.float32):  # a distinct empty tensor for each output not produced
        return x.new_empty(0, dtype=dtype)

    z = absent(x.dtype)
    mean, invstd, new_rm, new_rv = absent(), absent(), absent(), absent()
    if M == 0:  # PyTorch leaves the running statistics as they are
        return in_format_of(alloc_channels_last(out_shape, x), x), z, mean, invstd, new_rm, new_rv

    x_in, x, residual = x, channels_contiguous(x), channels_contiguous(residual)
    out = alloc_channels_last(out_shape, x)
    part_mean = part_m2 = None
    if training:
        kernel, meta = select(x, out, residual, True, False)
        block_m = meta.get("BLOCK_M", STATS_BLOCK_M)
        num_tiles = cdiv(M, block_m)
        # normalised in place if not kept; the output itself if not normalised
        z = alloc_channels_last(out.shape, x) if save and normalize else out
        part_mean = alloc((num_tiles, C_out), dtype=torch.float32, device=dev)
        part_m2 = alloc((num_tiles, C_out), dtype=torch.float32, device=dev)
    else:
        kernel, meta = select(x, out, residual, False, residual is not None or save)
        if save:
            z = alloc_channels_last(out.shape, x)
            mean = alloc((C_out,), dtype=torch.float32, device=dev)
            invstd = alloc((C_out,), dtype=torch.float32, device=dev)
    pointers = tuple(t if t is not None and t.numel() else x for t in (
        bias, bn_weight, bn_bias, running_mean, running_var, residual, out, z, mean, invstd, part_mean,
        part_m2))
    launch_gemm(kernel, meta, x, residual, out, pointers)
    if training:
        mean, invstd, rm, rv = bn.finalize_stats(part_mean, part_m2, block_m, M, running_mean,
                                                 running_var, momentum, eps,
                                                 running_in_place=running_in_place)
        if running_mean is not None:
            new_rm, new_rv = rm, rv
        if not normalize:
            return z, z, mean, invstd, new_rm, new_rv
        bn.normalize_act(z, mean, invstd, bn_weight, bn_bias, residual, act, out)
        if not save:
            z, mean, invstd = absent(x.dtype), absent(), absent()
    return in_format_of(out, x_in), z, mean, invstd, new_rm, new_rv


def tile(bm, bn_, bk, warps, stages):
    """An autotuning configuration: BLOCK_M x BLOCK_N x BLOCK_K, warps, pipeline stages."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn_, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Rounding fp32 to TF32 (10 mantissa bits), to nearest with ties away from zero (PTX cvt.rna):
# the tensor cores read a TF32 operand from an fp32 register and ignore its low 13 bits, i.e.
# truncate, which shrinks every product of positive values (post-ReLU activations) and roughly
# triples the error of rounding; tl.dot leaves the rounding to the caller (its documentation
# says so). On the GPU one cvt.rna.tf32.f32 per element (the static report checks the PTX); the
# interpreter, which has no inline assembly, computes the same function on the bits.
if interpreted():
    @triton.jit
    def round_tf32(x):
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)  # +half ulp, cut
        return tl.where(x != x, x, rounded)  # NaN stays NaN (its payload may sit in the low bits)
else:
    @triton.jit
    def round_tf32(x):
        return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation, every GEMM kernel's one matrix product: with PREC
    "tf32" (fp32 operands, TF32 allowed) both operands are first rounded to TF32 as cuDNN does."""
    if PREC == "tf32":
        a = round_tf32(a)
        b = round_tf32(b)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def bn_act_epilogue(
    acc, pid_m, M, n, t, h, w, rmask, cols, cmask, C_out,
    bias_ptr, bn_weight_ptr, bn_bias_ptr, rmean_ptr, rvar_ptr, res_ptr,
    out_ptr, z_ptr, save_mean_ptr, save_invstd_ptr, part_mean_ptr, part_m2_ptr,
    stride_on, stride_ot, stride_oh, stride_ow, stride_rn, stride_rt, stride_rh, stride_rw, eps,
    HAS_BIAS: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, SAVE: tl.constexpr,
    O_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The epilogue of a conv GEMM tile ``acc`` (rows pid_m * BLOCK_M.. of M at (n, t, h, w) x
    output channels ``cols``).

    STATS (training): writes z = acc + bias and, for this tile of rows, each channel's mean and
    M2 (sum of squared deviations from the tile mean) for batchnorm.finalize_stats.
    Otherwise (eval): y = act(acc * scale + shift [+ r]) with BN and the conv bias folded into one
    scale and shift per channel, computed here so that the op is one launch; SAVE also writes z
    and the statistics used, for autograd."""
    bias = tl.zeros(cols.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    mask = rmask[:, None] & cmask[None, :]
    o_off = cm.row_offsets(n, t, h, w, stride_on, stride_ot, stride_oh, stride_ow,
                           O_ALIGN)[:, None] + cols[None, :]

    if STATS:
        acc += bias[None, :]
        tl.store(z_ptr + o_off, acc, mask=mask)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M,
                           propagate_nan=tl.PropagateNan.ALL).to(tl.float32)
        tile_mean = tl.sum(tl.where(mask, acc, 0.0), axis=0) / count
        d = tl.where(mask, acc - tile_mean[None, :], 0.0)
        part = pid_m.to(tl.int64) * C_out + cols
        tl.store(part_mean_ptr + part, tile_mean, mask=cmask)
        tl.store(part_m2_ptr + part, tl.sum(d * d, axis=0), mask=cmask)
    else:
        mean = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        var = tl.load(rvar_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(var + eps)
        scale, shift = bn.fold(mean, invstd, bias, bn_weight_ptr, bn_bias_ptr, cols, cmask,
                               HAS_BN_WEIGHT, HAS_BN_BIAS)
        if SAVE:
            tl.store(z_ptr + o_off, acc + bias[None, :], mask=mask)
            if pid_m == 0:
                tl.store(save_mean_ptr + cols, mean, mask=cmask)
                tl.store(save_invstd_ptr + cols, invstd, mask=cmask)
        v = acc * scale[None, :] + shift[None, :]
        if HAS_RES:
            r_off = cm.row_offsets(n, t, h, w, stride_rn, stride_rt, stride_rh, stride_rw,
                                   R_ALIGN)[:, None] + cols[None, :]
            v = v + tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        v = cm.activation(v, ACT)
        tl.store(out_ptr + o_off, v, mask=mask)


@triton.jit
def dz_tile(dy_ptr, z_ptr, res_ptr, coef_ptr, d_off, z_off, r_off, chans, mask, C,
            HAS_RES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr):
    """The conv-output gradient dz of a (rows x channels) tile, rebuilt from dy and z with the
    coefficient table of batchnorm.py; 0 where ``mask`` is off. The batch statistics' terms
    (k_z, k_0) only in TRAINING: with running statistics they are 0, and 0 * (z - mean) would
    make dz NaN where z is NaN or Inf although PyTorch's gradient there is finite."""
    cmask = chans < C
    mean = tl.load(coef_ptr + bn.COEF_MEAN * C + chans, mask=cmask, other=0.0)
    a = tl.load(coef_ptr + bn.COEF_A * C + chans, mask=cmask, other=0.0)
    bn_bias = tl.load(coef_ptr + bn.COEF_BN_BIAS * C + chans, mask=cmask, other=0.0)
    k_g = tl.load(coef_ptr + bn.COEF_KG * C + chans, mask=cmask, other=0.0)
    dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
    zc = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32) - mean[None, :]
    pre = zc * a[None, :] + bn_bias[None, :]
    if HAS_RES:
        pre = pre + tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    g = cm.activation_grad(pre, dy, ACT)
    dz = k_g[None, :] * g
    if TRAINING:
        k_z = tl.load(coef_ptr + bn.COEF_KZ * C + chans, mask=cmask, other=0.0)
        k_0 = tl.load(coef_ptr + bn.COEF_K0 * C + chans, mask=cmask, other=0.0)
        dz += k_z[None, :] * zc + k_0[None, :]
    return tl.where(mask, dz, 0.0)


@triton.jit
def dz_at_rows(dy_ptr, z_ptr, res_ptr, coef_ptr, n, t, h, w, chans, mask, C,
               stride_dn, stride_dt, stride_dh, stride_dw, stride_zn, stride_zt, stride_zh, stride_zw,
               stride_rn, stride_rt, stride_rh, stride_rw,
               HAS_RES: tl.constexpr, ACT: tl.constexpr, TRAINING: tl.constexpr,
               D_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr):
    """:func:`dz_tile` at output positions (n, t, h, w) x channels ``chans``."""
    d_off = cm.row_offsets(n, t, h, w, stride_dn, stride_dt, stride_dh, stride_dw,
                           D_ALIGN)[:, None] + chans[None, :]
    z_off = cm.row_offsets(n, t, h, w, stride_zn, stride_zt, stride_zh, stride_zw,
                           Z_ALIGN)[:, None] + chans[None, :]
    r_off = cm.row_offsets(n, t, h, w, stride_rn, stride_rt, stride_rh, stride_rw,
                           R_ALIGN)[:, None] + chans[None, :]
    return dz_tile(dy_ptr, z_ptr, res_ptr, coef_ptr, d_off, z_off, r_off, chans, mask, C,
                   HAS_RES, ACT, TRAINING)
