"""What r21d checks of the installed Triton / NumPy pair at import (README: Platforms).

Triton's interpreter (``TRITON_INTERPRET=1``) before Triton 3.8 converts each scalar kernel
argument with ``int()`` of a one-element NumPy array (``range(C)`` over a runtime size, in every
kernel's loops), which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
scalars"): every interpreted launch fails. pyproject's markers cannot test Triton's version, so
the pair is declared in the README, pinned in CI's oldest environment (``make test-oldest``), and
refused here at import with what to do, instead of as an error inside the first kernel.
"""

from __future__ import annotations

import os
import re


def _version(text: str | None) -> tuple[int, ...] | None:
    """(major, minor) of a version string such as "3.6.0" or "3.8.0+git1234"; None if unknown."""
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _triton_version() -> str | None:
    """The installed Triton's version, without importing Triton."""
    from importlib import metadata

    for dist in ("triton", "pytorch-triton"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def interpreter_problem(triton_version: str | None, numpy_version: str | None,
                        interpreted: bool) -> str | None:
    """Why this Triton / NumPy pair cannot run r21d's kernels in the interpreter, or None."""
    if not interpreted:
        return None
    tv, nv = _version(triton_version), _version(numpy_version)
    if tv is None or nv is None:
        return None
    if tv < (3, 8) and nv >= (2, 4):
        return (f"TRITON_INTERPRET is set, and Triton {triton_version}'s interpreter cannot run with "
                f"NumPy {numpy_version}: before Triton 3.8 it converts scalar kernel arguments "
                "with int() of a one-element array, an error since NumPy 2.4. Install "
                "'numpy<2.4' (or Triton >= 3.8), or unset TRITON_INTERPRET.")
    return None


def check_interpreter() -> None:
    """Raise ImportError when TRITON_INTERPRET is set and the installed pair cannot run it."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")
    if not interpreted:
        return
    import numpy

    problem = interpreter_problem(_triton_version(), numpy.__version__, interpreted)
    if problem is not None:
        raise ImportError(f"r21d: {problem}")
