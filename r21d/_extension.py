"""Loading the compiled extension ``r21d._C`` (csrc/), when it was built.

Importing it registers its TORCH_LIBRARY ops under ``torch.ops.r21d``. A missing extension is
normal (pure-Python install, R21D_SKIP_CUDA_BUILD=1); one that fails to load, typically because it
was built against another torch, or that loads but says it was built for another torch version
(its ABI may differ silently), is reported once with what to do, and the ``cuda`` backend stays
unavailable.
"""

from __future__ import annotations

import functools
import importlib
import warnings

_REBUILD = "Rebuild it: pip install --no-build-isolation -e . (the 'cuda' backend is unavailable until then)"


def _torch_mismatch(module) -> str | None:
    """Why an extension that loaded must not be used: built for another torch version."""
    import torch

    built = module.build_info().get("torch_version")
    running = torch.__version__.split("+")[0]
    if built != running:
        return f"r21d._C was built for torch {built} but torch {running} is installed. {_REBUILD}"
    return None


@functools.cache
def _load():
    try:
        module = importlib.import_module("r21d._C")
    except ModuleNotFoundError as e:
        if e.name != "r21d._C":
            raise
        return None, "r21d was installed without its CUDA extension"
    except (ImportError, OSError) as e:  # e.g. undefined symbols: built for another torch
        import torch

        message = (
            f"r21d._C failed to load ({e}); it was probably built against another torch than "
            f"the installed {torch.__version__}. {_REBUILD}"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None, message
    message = _torch_mismatch(module)
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None, message
    return module, None


def loaded() -> bool:
    """True when r21d._C is built and loaded."""
    return _load()[0] is not None


def build_info() -> dict | None:
    """What the extension was compiled with (torch, CUDA, archs), or None without it."""
    module, _ = _load()
    return module.build_info() if module is not None else None


def unavailable_reason() -> str | None:
    return _load()[1]
