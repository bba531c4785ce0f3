"""The composite reference: conv3d -> batch_norm -> (+ residual) -> activation in plain PyTorch.

It is the ``torch`` backend (cuDNN on a GPU) and, run in float64 on the CPU, the oracle every
fused kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "silu": F.silu, None: lambda v: v}


def conv_bn_act3d_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                            stride, padding, dilation, groups, training, momentum, eps,
                            activation, residual=None) -> torch.Tensor:
    z = F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return ACTIVATIONS[activation](y)
