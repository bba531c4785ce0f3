"""The correctness check run before a provider is timed.

Every provider's outputs are compared with a float64 reference computed from the same inputs:
relative error ||out - ref|| / ||ref|| per output tensor, the worst one counting. r21d (and
torch.compile) pass when their error is at most twice eager PyTorch's error in the same
precision (docs/testing.md, Accuracy: as accurate as cuDNN), plus a tiny floor (1/16 of the dtype's epsilon)
so that two near-exact results do not fail on rounding noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor


def rel_error(out: Tensor, ref: Tensor) -> float:
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    out = out.detach().to(device=ref.device, dtype=torch.float64)
    ref = ref.detach().to(torch.float64)
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def max_rel_error(outputs: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    """The worst relative error over corresponding output tensors (NaN anywhere -> inf)."""
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs, but the reference has {len(reference)}")
    worst = 0.0
    for out, ref in zip(outputs, reference):
        err = rel_error(out, ref)
        worst = max(worst, err if err == err else float("inf"))
    return worst


def error_bound(eager_error: Optional[float], dtype: torch.dtype) -> Optional[float]:
    """The largest error a checked provider may have, or None without an eager error to scale."""
    if eager_error is None:
        return None
    return 2 * eager_error + torch.finfo(dtype).eps / 16
