"""The index and launch limits the kernels are written to; r21d.functional refuses (falls back to
``torch`` with the reason) any call beyond them, and every launch checks its grid, so a call
past them is never launched.

Rows (output or input positions n, t, h, w) are int32 inside the kernels: decomposing a 64-bit
row index into (n, t, h, w) would cost 64-bit divisions per element in every kernel. A tile, or a
step of a loop over a range of rows, reaches up to ROW_OVERSHOOT rows past the last valid row
before its mask cuts them off, so a call may have at most MAX_ROWS rows for that to stay below
2^31. Element offsets are 64-bit (_common.row_offsets), so tensor sizes are not limited here.

CUDA's grid: at most 2^31 - 1 programs along x, 65535 along y and z. Channel blocks go on y (as
few as MIN_CHANNEL_BLOCK channels per program, the NCDHW depthwise statistics tile), so a call
may have at most MAX_CHANNELS channels; groups and stride residue classes go on y or z.
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1
ROW_OVERSHOOT = 8192  # >= every BLOCK_M, BLOCK_K (rows) and BLOCK_P of every kernel configuration
MAX_ROWS = INT32_MAX + 1 - ROW_OVERSHOOT

GRID_X_MAX = INT32_MAX
GRID_YZ_MAX = 65535
MIN_CHANNEL_BLOCK = 2
MAX_CHANNELS = GRID_YZ_MAX * MIN_CHANNEL_BLOCK


class GridLimitError(ValueError):
    """A launch grid beyond CUDA's limits (r21d.functional's guards should have refused the call)."""


def check_grid(kernel: str, grid) -> None:
    """Raise GridLimitError unless ``grid`` (1 to 3 program counts) fits CUDA's limits."""
    dims = tuple(grid) + (1,) * (3 - len(grid))
    x, y, z = dims
    if not (0 <= x <= GRID_X_MAX and 0 <= y <= GRID_YZ_MAX and 0 <= z <= GRID_YZ_MAX):
        raise GridLimitError(
            f"{kernel}: launch grid {tuple(grid)} exceeds CUDA's limits (x <= {GRID_X_MAX}, y and "
            f"z <= {GRID_YZ_MAX}); r21d.functional should have sent this call to the torch path")


def positions_reason(positions: int) -> str | None:
    """Why a call with ``positions`` rows (N*T*H*W, input or output) cannot run fused, or None."""
    if positions > MAX_ROWS:
        return (f"{positions} positions (N*T*H*W) exceed the kernels' 32-bit row index "
                f"(at most {MAX_ROWS}: 2^31 less one tile's margin)")
    return None


def channels_reason(channels: int) -> str | None:
    """Why a call with ``channels`` input or output channels cannot run fused, or None."""
    if channels > MAX_CHANNELS:
        return (f"{channels} channels exceed the kernels' launch grid (at most {MAX_CHANNELS}: "
                f"{GRID_YZ_MAX} programs of {MIN_CHANNEL_BLOCK} channels along grid y)")
    return None


# Family limits (r21d.dispatch sends calls beyond them to another path, with the reason).
# The eval-mode (2+1)D unit kernel keeps one fp32 accumulator per open output frame,
# ceil(kt / st): at most this many (other units run as their two sites).
UNIT_MAX_OPEN_FRAMES = 3
# The geometry the depthwise kernels of both backends are built and tested for (the csrc ops
# TORCH_CHECK the kernel size too: csrc/cuda/depthwise3d_common.cuh).
DEPTHWISE_MAX_KERNEL = 7
DEPTHWISE_STRIDES = (1, 2)
DEPTHWISE_MAX_DILATION = 3
