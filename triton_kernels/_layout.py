"""Host-side layout helpers: strides in (n, t, h, w, c) order and output allocation."""

from __future__ import annotations

import torch

from ._launch import alloc


def rows_strides(t: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """(sN, sT, sH, sW, sC) of an (N, C, T, H, W) tensor, in elements; zeros for None."""
    if t is None:
        return (0, 0, 0, 0, 0)
    s = t.stride()
    return (s[0], s[2], s[3], s[4], s[1])


def rows_aligned(t: torch.Tensor | None) -> bool:
    """True when every row starts on a 16-byte boundary and channels are contiguous, so channel
    vectors can be loaded 16 bytes at a time (the kernels then assert it with tl.multiple_of)."""
    if t is None:
        return False
    sn, st, sh, sw, sc = rows_strides(t)
    vec = 16 // t.element_size()
    return (
        sc == 1
        and all(s % vec == 0 for s in (sn, st, sh, sw))
        and t.data_ptr() % 16 == 0
    )


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output follows the input: channels_last_3d when the input is in it, else NCDHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    if not x.is_contiguous() and x.dim() == 5 and x.stride(1) == 1:
        return torch.channels_last_3d  # channel-innermost strides of a sliced channels_last tensor
    return torch.contiguous_format


def alloc_activation(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An (N, C, T, H, W) tensor in the memory format that ``like`` implies."""
    return alloc(
        shape,
        dtype=dtype or like.dtype,
        device=like.device,
        memory_format=output_memory_format(like),
    )
