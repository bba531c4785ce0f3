"""Device helpers shared by the kernel families: activations and row addressing.

Every activation tensor is addressed as rows x channels: a row is one (n, t, h, w) position,
flattened in that order, at ``n*stride_n + t*stride_t + h*stride_h + w*stride_w``; channels are
contiguous (the launchers guarantee it, see _layout.py), so a channel adds ``c``.
"""

import triton
import triton.language as tl

# Activation codes (constexpr ACT): the launchers map "relu" / "silu" / None onto these.
ACT_NONE = 0
ACT_RELU = 1
ACT_SILU = 2
ACTIVATIONS = {None: ACT_NONE, "none": ACT_NONE, "relu": ACT_RELU, "silu": ACT_SILU}


@triton.jit
def activation(v, ACT: tl.constexpr):
    if ACT == 1:
        # NaN stays NaN as in torch.relu (a plain max, PTX max.f32, would return 0)
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        v = v * tl.sigmoid(v)
    return v


@triton.jit
def activation_grad(pre, dy, ACT: tl.constexpr):
    """d act(pre) / d pre * dy, with ReLU's gradient 0 at pre == 0 as in PyTorch."""
    if ACT == 1:
        # threshold_backward's select: 0 where pre <= 0, else dy (also where pre is NaN)
        dy = tl.where(pre <= 0.0, 0.0, dy)
    elif ACT == 2:
        s = tl.sigmoid(pre)
        dy = dy * (s * (1.0 + pre * (1.0 - s)))
    return dy


@triton.jit
def split_rows(rows, T, H, W):
    """(n, t, h, w) of flattened row indices."""
    w = rows % W
    r = rows // W
    h = r % H
    r = r // H
    t = r % T
    n = r // T
    return n, t, h, w


@triton.jit
def row_offsets(n, t, h, w, stride_n, stride_t, stride_h, stride_w, ALIGN: tl.constexpr):
    """64-bit element offsets of rows; every offset is a multiple of ALIGN elements (the launcher
    checks the strides), which lets channel vectors of ALIGN elements move at once."""
    off = (n.to(tl.int64) * stride_n + t.to(tl.int64) * stride_t
           + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w)
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return off


# Tiles of positions x channels in either orientation (constexpr CL): [P, C] when channels are
# contiguous (channels_last_3d: threads run along channels and move channel vectors), else [C, P]
# (NCDHW: threads run along positions, whose W is contiguous, so accesses still coalesce).
@triton.jit
def pc_tile(p, c, CL: tl.constexpr):
    """The 2-D sum of a per-position vector and a per-channel vector (offsets)."""
    if CL:
        return p[:, None] + c[None, :]
    else:
        return c[:, None] + p[None, :]


@triton.jit
def pc_mask(pmask, cmask, CL: tl.constexpr):
    if CL:
        return pmask[:, None] & cmask[None, :]
    else:
        return cmask[:, None] & pmask[None, :]


@triton.jit
def per_channel(v, CL: tl.constexpr):
    """A per-channel vector broadcast against a tile."""
    if CL:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def sum_positions(v, CL: tl.constexpr):
    """Per-channel sums of a tile over its positions."""
    if CL:
        return tl.sum(v, axis=0)
    else:
        return tl.sum(v, axis=1)


@triton.jit
def position_offsets(n, t, h, w, stride_n, stride_t, stride_h, stride_w):
    """64-bit element offsets of positions (n, t, h, w) under the given strides."""
    return (n.to(tl.int64) * stride_n + t.to(tl.int64) * stride_t
            + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w)


@triton.jit
def channel_mask(cols, C, C_VEC: tl.constexpr):
    """``cols < C`` written so that Triton sees it constant over groups of C_VEC channels (the
    launcher guarantees C % C_VEC == 0): masked channel vectors then still move at once. (Triton
    knows a runtime C only as a multiple of 16 or not, so plain ``cols < C`` with C = 216 would
    split every vector into scalar loads.)"""
    if C_VEC > 1:
        return (cols // C_VEC) < (C // C_VEC)
    else:
        return cols < C


@triton.jit
def split_end(start, length, total):
    """The end of the range of ``length`` items from ``start`` (< total), cut at ``total``:
    computed as start + min(length, total - start), which stays below ``total`` where
    start + length could pass 2^31 and wrap."""
    return start + tl.minimum(length, total - start, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def as_int64(v):
    """A scalar index (a loop variable, a plain int under the interpreter) as an int64 tensor, so
    products with strides cannot overflow 32 bits."""
    return tl.full((), 0, tl.int64) + v
