"""The R(2+1)D unit in training (batch statistics): spatial conv -> BN1 -> ReLU -> temporal conv
-> BN2 [+ residual] -> activation, with the normalised intermediate never written.

Forward, two implicit GEMMs (implicit_gemm.py):
  1. the spatial conv writes its output z1 and, from its epilogue, the batch statistics of the
     intermediate (no normalise pass: ``normalize=False``);
  2. the temporal conv loads z1 and applies BN1 + ReLU in its prologue (``pre``: per-channel
     scale and shift from those statistics), then produces its own statistics and the
     normalise + activation pass writes the output.
So the intermediate goes through memory once as z1 (written, read) where the two separate sites
write z1, read it, write relu(bn1(z1)) and read that again; and only z1 is kept for backward.

Backward recomputes relu(bn1(z1)) where it is needed instead of storing it: the temporal
conv's wgrad applies the same prologue as it loads z1; its dgrad gives the gradient of the
normalised intermediate, which the spatial conv's backward turns into dz1 (BN1 + ReLU backward in
its dgrad/wgrad prologues, as for any fused site).
"""

from __future__ import annotations

import torch

from . import implicit_gemm as ig
from . import implicit_gemm_bwd as ig_bwd
from ._layout import in_format_of
from ._replay import planned


def bn_relu_prologue(mean: torch.Tensor, invstd: torch.Tensor, bn_weight: torch.Tensor | None,
                     bn_bias: torch.Tensor | None) -> torch.Tensor:
    """[scale; shift] (float32, 2 * C) with relu(z * scale + shift) = relu(bn(z)) for the batch
    statistics (mean, invstd) and the affine parameters (None: 1 and 0)."""
    scale = invstd if bn_weight is None else invstd * bn_weight.float()
    shift = -mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias.float()
    return torch.cat([scale, shift]).contiguous()


@planned
def unit_train_fwd(x, w1, bias1, bn1_weight, bn1_bias, rmean1, rvar1, momentum1, eps1,
                   w2, bias2, bn2_weight, bn2_bias, rmean2, rvar2, momentum2, eps2, residual,
                   stride1, padding1, dilation1, stride2, padding2, dilation2,
                   activation: str | None, save: bool, running_in_place: bool = False):
    """The unit's training forward. Returns (out, z1, mean1, invstd1, z2, mean2, invstd2,
    new_rmean1, new_rvar1, new_rmean2, new_rvar2): z1 and its statistics always (the temporal
    conv's input); z2 and its statistics when ``save`` (else empty); the running statistics
    updated as new tensors where given (else empty), or with ``running_in_place`` written over
    the given ones and returned themselves (batchnorm.finalize_stats). ``out`` follows x's
    memory format."""
    z1, _, mean1, invstd1, new_rm1, new_rv1 = ig.conv_bn_act_fwd(
        x, w1, bias1, bn1_weight, bn1_bias, rmean1, rvar1, None, stride1, padding1, dilation1, True,
        momentum1, eps1, "relu", True, running_in_place, normalize=False)
    pre = bn_relu_prologue(mean1, invstd1, bn1_weight, bn1_bias)
    out, z2, mean2, invstd2, new_rm2, new_rv2 = ig.conv_bn_act_fwd(
        z1, w2, bias2, bn2_weight, bn2_bias, rmean2, rvar2, residual, stride2, padding2, dilation2, True,
        momentum2, eps2, activation, save, running_in_place, pre=pre)
    # the temporal conv's input is z1 (channels-last): the unit's output follows x instead
    return in_format_of(out, x), z1, mean1, invstd1, z2, mean2, invstd2, new_rm1, new_rv1, new_rm2, new_rv2


@planned
def unit_train_bwd(grad_out, x, w1, bias1, bn1_weight, bn1_bias, z1, mean1, invstd1,
                   w2, bias2, bn2_weight, bn2_bias, z2, mean2, invstd2, residual,
                   stride1, padding1, dilation1, stride2, padding2, dilation2,
                   activation: str | None, needs):
    """Gradients (dx, dw1, dbias1, dbn1_weight, dbn1_bias, dw2, dbias2, dbn2_weight, dbn2_bias, dresidual) of
    :func:`unit_train_fwd` from what it saved; ``needs`` says which are wanted (others None)."""
    need_x, need_w1, need_b1, need_g1, need_be1, need_w2, need_b2, need_g2, need_be2, need_res = needs
    first = (need_x, need_w1, need_b1, need_g1, need_be1)
    pre = bn_relu_prologue(mean1, invstd1, bn1_weight, bn1_bias)
    d_mid, dw2, db2, dg2, dbe2, dres = ig_bwd.conv_bn_act_bwd(
        grad_out, z1, w2, bias2, z2, mean2, invstd2, bn2_weight, bn2_bias, residual, stride2, padding2,
        dilation2, True, activation, (any(first), need_w2, need_b2, need_g2, need_be2, need_res),
        pre=pre)
    dx = dw1 = db1 = dg1 = dbe1 = None
    if any(first):
        dx, dw1, db1, dg1, dbe1, _ = ig_bwd.conv_bn_act_bwd(
            d_mid, x, w1, bias1, z1, mean1, invstd1, bn1_weight, bn1_bias, None, stride1, padding1,
            dilation1, True, "relu", (*first, False))
    return dx, dw1, db1, dg1, dbe1, dw2, db2, dg2, dbe2, dres
