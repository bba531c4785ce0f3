"""Which tile configuration a launch runs: by rule, the same in every process.

A kernel variant has a table of configurations (``_launch.Tuned``), every one of them spill-free
in the static report. By default the launch picks one by a rule of the problem's shape alone:
the largest tile whose grid still fills one wave of the arch's SMs (at least :data:`WAVE`
programs), or, where no tile fills a wave, the one that launches the most programs (of those,
the smallest); remaining ties go to the table's order. The same inputs therefore pick the same configuration, and so the same
summation order and the same bits, in every process, rank and machine of an arch, with no timing
and one compile per kernel specialisation. ``R21D_AUTOTUNE=1`` opts into timing instead
(``_autotune``).
"""

from __future__ import annotations

import dataclasses
import math

# Streaming multiprocessors of the arch a table serves (H100 SXM, A100): one wave of programs.
# A fixed number per table arch, not the device's count, so that every machine of an arch
# picks alike.
WAVE = {90: 132, 80: 108}


@dataclasses.dataclass(frozen=True, eq=False)
class Choice:
    """A variant's candidate configurations; :func:`r21d.triton_kernels._launch.launch` picks
    one when it knows the grid. ``fn`` is the JITFunction, ``key`` the argument names the
    configuration depends on (what ``R21D_AUTOTUNE=1`` buckets and remembers)."""

    fn: object
    configs: tuple
    variant: str
    arch: int
    key: tuple


def tile_size(config) -> int:
    """Elements of one program's tile: the product of the configuration's meta-parameters (the
    tables' configurations hold only block sizes: BLOCK_M/N/K, BLOCK_P/C, BH/BW)."""
    return math.prod(v for v in config.kwargs.values() if isinstance(v, int) and not isinstance(v, bool))


def programs(grid, kwargs: dict, config) -> int:
    g = grid({**kwargs, **config.all_kwargs()}) if callable(grid) else grid
    return math.prod(g)


def by_rule(choice: Choice, grid, kwargs: dict):
    """The configuration the rule picks for a launch of ``choice`` with ``grid``."""
    sizes = [programs(grid, kwargs, c) for c in choice.configs]
    wave = WAVE.get(choice.arch, WAVE[90])
    filling = [i for i, n in enumerate(sizes) if n >= wave]
    if filling:  # max() keeps the first of equals: the table's order breaks ties
        return choice.configs[max(filling, key=lambda i: tile_size(choice.configs[i]))]
    # equal counts: the smallest tile wastes the least on masked elements
    return choice.configs[max(range(len(sizes)), key=lambda i: (sizes[i], -tile_size(choice.configs[i])))]
