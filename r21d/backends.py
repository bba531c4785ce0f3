"""Backend selection: which implementation runs a fused op (docs/architecture.md, Backends).

``torch``  the composite reference (``F.conv3d`` -> ``F.batch_norm`` -> activation); runs anywhere.
``triton`` the kernels in ``r21d.triton_kernels``; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``.
``cuda``   the csrc kernels in ``r21d._C``; CUDA tensors, when the extension is built.
``auto``   per op and device: the fastest implementation the committed benchmark results justify
           (``r21d/auto_choices.py``); with no result for an op, Triton on a GPU; ``torch`` on CPU
           and for conv families no fused backend has a kernel for (silently: that is auto's
           choice, not a fallback).

A configuration the requested backend does not cover falls back to ``torch`` with one warning per
configuration; with ``R21D_STRICT=1`` it raises :class:`FusedKernelUnavailable` instead, so tests can
prove that the fused kernel really ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from collections.abc import Iterator

from .triton_kernels._launch import interpreted

BACKENDS = ("auto", "torch", "triton", "cuda")

# The process-wide choice (set_backend) and a per-context override (use_backend).
_global_choice: str | None = None
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("r21d_backend", default=None)
_warned: set[str] = set()


class FusedKernelUnavailable(RuntimeError):
    """Raised in strict mode when a fused backend cannot run the requested configuration."""


class FallbackWarning(UserWarning):
    """Issued once per configuration that falls back to the ``torch`` backend."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"unknown r21d backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.strip().lower()


def set_backend(name: str) -> None:
    """Select the backend for the whole process (overrides ``R21D_BACKEND``)."""
    global _global_choice
    _global_choice = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select the backend inside a ``with`` block (per thread / async context)."""
    token = _context_choice.set(_check_name(name))
    try:
        yield
    finally:
        _context_choice.reset(token)


def get_backend() -> str:
    """The backend currently requested: ``use_backend`` > ``set_backend`` > ``R21D_BACKEND``."""
    choice = _context_choice.get() or _global_choice
    if choice is None:
        choice = _check_name(os.environ.get("R21D_BACKEND", "").strip() or "auto")
    return choice


def strict() -> bool:
    """True when ``R21D_STRICT=1``: unsupported configurations raise instead of falling back."""
    return os.environ.get("R21D_STRICT", "0").strip().lower() not in ("", "0", "false", "no")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def available_backends() -> list[str]:
    """Backends that can run on this machine now (``torch`` always)."""
    from . import _extension

    names = ["torch"]
    if triton_installed() and (_cuda_available() or interpreted()):
        names.append("triton")
    if _extension.loaded() and _cuda_available():
        names.append("cuda")
    return names


def fallback(key: str, reason: str, instead: str = "the torch backend") -> str:
    """Record that ``key`` (one configuration) runs on ``instead`` (by default ``torch``) because
    of ``reason``.

    Raises in strict mode; otherwise warns once per configuration and returns ``"torch"``.
    """
    message = f"r21d: {key} runs on {instead}: {reason}"
    if strict():
        raise FusedKernelUnavailable(message + " (R21D_STRICT=1)")
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=3)
    return "torch"
