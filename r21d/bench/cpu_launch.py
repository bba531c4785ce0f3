"""Triton launchers fed CPU tensors, without the interpreter: how a machine without a GPU counts
what a GPU run compiles (with ``_launch.capture()``) and what a call costs the host before its
kernel launches (with ``_launch.stubbed()``). No kernel ever runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Let the dispatcher send CPU tensors to the Triton launchers; pair it with
    ``_launch.capture()`` or ``_launch.stubbed()``, which stop every launch before it runs."""
    from .. import dispatch
    from ..triton_kernels import _launch

    if _launch.interpreted():
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    previous = dispatch._DEVICE_CHECKS["triton"]
    dispatch._DEVICE_CHECKS["triton"] = lambda cfg: None
    try:
        yield
    finally:
        dispatch._DEVICE_CHECKS["triton"] = previous
