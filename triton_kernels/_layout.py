"""Host-side layout helpers.

The kernels address activations as rows x channels with contiguous channels (channel stride 1):
a row is one (n, t, h, w) position at ``n*sN + t*sT + h*sH + w*sW``, any such strides. That is
channels_last_3d and its views; other layouts (NCDHW) are converted at the op's boundary by
:func:`channels_contiguous` / :func:`relayout`, so every load and store moves whole channel
vectors and no kernel holds uncoalesced gathers in registers.
"""

from __future__ import annotations

import torch

from ._launch import alloc, relayout


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints (triton.cdiv is a constexpr function: a JIT call from Python)."""
    return -(-a // b)


def out_size(size: int, k: int, stride: int, pad: int, dil: int = 1) -> int:
    """A conv's output size along one axis."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def channels_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` if its channels are contiguous, else a channels_last_3d copy (counted launch)."""
    if t is None or t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return relayout(t, torch.channels_last_3d)


def rows_strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(sN, sT, sH, sW) of an (N, C, T, H, W) tensor, in elements; zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    s = t.stride()
    return (s[0], s[2], s[3], s[4])


def pc_strides(t: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """(sN, sC, sT, sH, sW) of an (N, C, T, H, W) tensor, in elements; zeros for None."""
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0, 0)


def channels_last(t: torch.Tensor) -> bool:
    """Whether kernels should tile ``t`` channels-innermost (its channels are contiguous)."""
    return t.stride(1) == 1 and t.shape[1] > 1


def rows_alignment(t: torch.Tensor | None) -> int:
    """The largest vector (in elements, at most 16 bytes) that every row's start is aligned to, so
    channel vectors of that width can be moved at once (the kernels assert it with tl.multiple_of).
    8 for 16-bit channels_last tensors with C % 8 == 0; 1 for odd C."""
    if t is None:
        return 1
    vec = 16 // t.element_size()
    while vec > 1 and not (all(s % vec == 0 for s in rows_strides(t))
                           and t.data_ptr() % (vec * t.element_size()) == 0):
        vec //= 2
    return vec


def channel_vector(C: int, *tensors) -> int:
    """The widest channel vector (elements, at most 16 bytes) that divides C and that every row of
    every given tensor is aligned to: the C_VEC of _common.channel_mask."""
    vec = min((rows_alignment(t) for t in tensors if t is not None), default=1)
    while vec > 1 and C % vec:
        vec //= 2
    return vec


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output follows the input: channels_last_3d when the input is in it, else NCDHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    if not x.is_contiguous() and x.dim() == 5 and x.stride(1) == 1:
        return torch.channels_last_3d  # channel-innermost strides of a sliced channels_last tensor
    return torch.contiguous_format


def alloc_like(shape, like: torch.Tensor) -> torch.Tensor:
    """An (N, C, T, H, W) tensor of ``like``'s dtype and device in its memory format (see
    :func:`output_memory_format`)."""
    return alloc(shape, dtype=like.dtype, device=like.device, memory_format=output_memory_format(like))


def alloc_channels_last(shape, like: torch.Tensor) -> torch.Tensor:
    """An (N, C, T, H, W) channels_last_3d tensor of ``like``'s dtype and device."""
    return alloc(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last_3d)


def in_format_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (channels_last_3d) in the memory format ``like`` implies (a counted copy if not)."""
    fmt = output_memory_format(like)
    return t if t.is_contiguous(memory_format=fmt) else relayout(t, fmt)
