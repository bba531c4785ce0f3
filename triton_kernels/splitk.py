"""Deterministic reduction of split-K partial results: out = sum over splits, in a fixed order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm
from ._launch import alloc, interpreted, launch
from ._layout import cdiv


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, splits, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + cm.as_int64(s) * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


def row_splits(M: int, tiles: int, device: torch.device) -> int:
    """How many row ranges a weight gradient of ``tiles`` output tiles (of about 128 x 128) is split
    into: enough programs for the GPU (a few per SM), each with at least 1024 rows."""
    if interpreted():
        return 2 if M >= 64 else 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(cdiv(4 * sms, tiles), cdiv(M, 1024), 256))


def sum_splits(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(splits, *shape) fp32 partials -> contiguous (*shape) tensor of ``dtype``."""
    splits = partial.shape[0]
    out = alloc(partial.shape[1:], dtype=dtype, device=partial.device)
    numel = out.numel()
    block = 256 if interpreted() else 1024
    launch(_sum_splits_kernel, (cdiv(numel, block),), partial, out, splits, numel, BLOCK=block)
    return out
