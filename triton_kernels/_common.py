"""Device helpers shared by the kernel families: activations and row addressing.

Every activation tensor is addressed as rows x channels: a row is one (n, t, h, w) position,
flattened in that order, at ``n*sN + t*sT + h*sH + w*sW``; channels are contiguous (the
launchers guarantee it, see _layout.py), so a channel adds ``c``.
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
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = v * tl.sigmoid(v)
    return v


@triton.jit
def activation_grad(pre, dy, ACT: tl.constexpr):
    """d act(pre) / d pre * dy, with ReLU's gradient 0 at pre == 0 as in PyTorch."""
    if ACT == 1:
        dy = tl.where(pre > 0.0, dy, 0.0)
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
def row_offsets(n, t, h, w, sN, sT, sH, sW, ALIGN: tl.constexpr):
    """64-bit element offsets of rows; every offset is a multiple of ALIGN elements (the launcher
    checks the strides), which lets channel vectors of ALIGN elements move at once."""
    off = n.to(tl.int64) * sN + t.to(tl.int64) * sT + h.to(tl.int64) * sH + w.to(tl.int64) * sW
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return off
