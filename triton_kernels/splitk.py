"""Deterministic reduction of split-K partial results: out = sum over splits, in a fixed order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as cm
from ._launch import alloc, interpreted, launch
from ._layout import cdiv


# not on divisibility: what varies with clip length and batch (docs/kernels.md)
@triton.jit(do_not_specialize_on_alignment=['splits'])
def _sum_splits_kernel(part_ptr, out_ptr, splits, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + cm.as_int64(s) * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


# Rows per split are a multiple of this: Triton then specialises every split length alike (divisible
# by 16), so a new batch size or clip length does not compile the weight gradient again.
SPLIT_ROWS_QUANTUM = 16


def row_splits(M: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of a weight gradient of ``tiles`` output tiles (of about 128 x
    128) over M rows: enough programs for the GPU (a few per SM), each with at least 1024 rows;
    every split but the last has rows_per_split rows, a multiple of SPLIT_ROWS_QUANTUM."""
    if interpreted():
        splits = 2 if M >= 64 else 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        splits = max(1, min(cdiv(4 * sms, tiles), cdiv(M, 1024), 256))
    rows = cdiv(cdiv(M, splits), SPLIT_ROWS_QUANTUM) * SPLIT_ROWS_QUANTUM
    return cdiv(M, rows), rows


def sum_splits(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(splits, *shape) fp32 partials -> contiguous (*shape) tensor of ``dtype``."""
    splits = partial.shape[0]
    out = alloc(partial.shape[1:], dtype=dtype, device=partial.device)
    numel = out.numel()
    block = 256 if interpreted() else 1024
    launch(_sum_splits_kernel, (cdiv(numel, block),), partial, out, splits, numel, BLOCK=block)
    return out
