"""Loading the compiled extension ``r21d._C`` (csrc/), when it was built.

Importing it registers its TORCH_LIBRARY ops under ``torch.ops.r21d``. A missing extension is
normal (pure-Python install, R21D_SKIP_CUDA_BUILD=1); one that fails to load, typically because it
was built against another torch, is reported once with what to do.
"""

from __future__ import annotations

import functools
import importlib
import warnings


@functools.cache
def _load():
    try:
        return importlib.import_module("r21d._C"), None
    except ModuleNotFoundError as e:
        if e.name != "r21d._C":
            raise
        return None, "r21d was installed without its CUDA extension"
    except (ImportError, OSError) as e:  # e.g. undefined symbols: built for another torch
        import torch

        message = (
            f"r21d._C failed to load ({e}); it was probably built against another torch than "
            f"the installed {torch.__version__}. Rebuild it: pip install --no-build-isolation -e . "
            "(the 'cuda' backend is unavailable until then)"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None, message


def loaded() -> bool:
    """True when r21d._C is built and loaded."""
    return _load()[0] is not None


def build_info() -> dict | None:
    """What the extension was compiled with (torch, CUDA, archs), or None without it."""
    module, _ = _load()
    return module.build_info() if module is not None else None


def unavailable_reason() -> str | None:
    return _load()[1]
