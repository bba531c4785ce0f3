"""Triton 3.9's interpreter refuses a load or store mask that is not a bool array
(``ValueError: mask has unsupported dtype``); 3.6-3.8 accept it. Their interpreters all build such
a mask from the same kernel code: a scalar condition (``t >= 0`` with ``t`` a scalar) combined
with a block mask (``rmask & (t >= 0)``) splats the scalar as int32, and the ``&`` stays int32.
:func:`install` makes any Triton's interpreter as strict as 3.9's, so that pattern fails the
tests on every supported Triton, not only where 3.9 runs. The kernels apply such a scalar
condition as a select instead, ``tl.where(cond, mask, False)`` (compiled, the same predicate).
"""

from __future__ import annotations

import numpy as np


class _StrictMasks:
    """Wraps Triton's C++ interpreter helpers: load / store check their mask's dtype first."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @staticmethod
    def _check(mask) -> None:
        if isinstance(mask, np.ndarray) and mask.dtype != np.bool_:
            raise ValueError(f"mask has unsupported dtype ({mask.dtype}; Triton 3.9's interpreter "
                             "takes bool only: broadcast a scalar condition before combining it "
                             "with a block mask)")

    def load(self, ptrs, mask, *args, **kwargs):
        self._check(mask)
        return self._inner.load(ptrs, mask, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        self._check(mask)
        return self._inner.store(ptrs, value, mask, *args, **kwargs)


def install() -> bool:
    """Make the interpreter's masked load / store refuse non-bool masks; False when this Triton
    has no such hook (then the tests run without the extra check)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - no Triton
        return False
    inner = getattr(interpreter, "_interpreter", None)
    if inner is None or not all(hasattr(inner, f) for f in ("load", "store")):
        return False
    if not isinstance(inner, _StrictMasks):
        interpreter._interpreter = _StrictMasks(inner)
    return True
