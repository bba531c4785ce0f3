"""``R21D_AUTOTUNE=1``: configurations chosen by timing, remembered on disk.

Off by default (``_tiles`` chooses by rule). When on, the first launch of a kernel variant for a
shape bucket times every configuration of its table and keeps the fastest, in memory and in a
JSON file that later processes and other ranks read: keyed by the GPU's name, Triton's version,
the kernel's source (JITFunction.cache_key) and a bucket of the shape (each key argument rounded
up to a power of two, so a new batch size or clip length reuses what was chosen). Never times
under ``torch.use_deterministic_algorithms(True)`` (the rule's choice is reproducible; a timed
one may differ between machines), nor while a CUDA graph is being captured (launching every
configuration would break the capture): there it raises, naming ``r21d.warmup``.

    R21D_AUTOTUNE=1            time on first use, remember
    R21D_AUTOTUNE_CACHE=DIR    where the JSON files live (default ~/.cache/r21d)
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable

import torch

from ._tiles import Choice

_memory: dict[str, dict[str, dict]] = {}  # file -> entry key -> the chosen config's kwargs


def enabled() -> bool:
    return os.environ.get("R21D_AUTOTUNE", "").strip() == "1"


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("R21D_AUTOTUNE_CACHE") or pathlib.Path.home() / ".cache" / "r21d")


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def cache_file() -> pathlib.Path:
    import triton

    slug = re.sub(r"[^A-Za-z0-9]+", "-", _device_name()).strip("-").lower()
    return cache_dir() / f"autotune-{slug}-triton{triton.__version__}.json"


def bucket(value) -> object:
    """A shape argument's bucket: positive ints rounded up to a power of two; others as is."""
    if isinstance(value, bool) or not isinstance(value, int):
        return value if isinstance(value, (bool, str, float)) or value is None else repr(value)
    return value if value <= 0 else 1 << (value - 1).bit_length()


def _source_key(fn) -> str:
    try:
        return str(fn.cache_key)[:16]
    except Exception:  # a stand-in kernel (tests): its name
        return getattr(fn, "__name__", "kernel")


def entry_key(choice: Choice, args: tuple, kwargs: dict) -> str:
    names = list(getattr(choice.fn, "arg_names", ()))
    values = {**dict(zip(names, args)), **kwargs}
    shape = ",".join(f"{k}={bucket(values[k])}" for k in choice.key if k in values)
    name = getattr(choice.fn, "__name__", "kernel")
    return f"{name}|{_source_key(choice.fn)}|{choice.variant}|sm{choice.arch}|{shape}"


def _entries(path: pathlib.Path) -> dict[str, dict]:
    key = str(path)
    if key not in _memory:
        try:
            _memory[key] = json.loads(path.read_text())
        except (OSError, ValueError):
            _memory[key] = {}
    return _memory[key]


def _save(path: pathlib.Path, entry: str, kwargs: dict) -> None:
    """Merge one entry into the file (another process may have written others meanwhile) and
    replace it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        on_disk = json.loads(path.read_text())
    except (OSError, ValueError):
        on_disk = {}
    on_disk[entry] = kwargs
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(on_disk, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _memory[str(path)] = on_disk


def remembered(choice: Choice, args: tuple, kwargs: dict):
    """The configuration timed earlier for this bucket (this or another process), or None."""
    kept = _entries(cache_file()).get(entry_key(choice, args, kwargs))
    if kept is None:
        return None
    for config in choice.configs:
        if config.all_kwargs() == kept:
            return config
    return None  # the table changed since: time again


def _time_ms(run: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return do_bench(run, warmup=5, rep=20)


timer: Callable[[Callable[[], None]], float] = _time_ms  # tests replace it


def tune(choice: Choice, grid, args: tuple, kwargs: dict):
    """Time every configuration of ``choice`` on this launch's arguments and remember the
    fastest. The kernels write only their outputs, so running each configuration is harmless."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"r21d: {getattr(choice.fn, '__name__', 'a kernel')} ({choice.variant}) has no timed "
            "configuration for this shape and R21D_AUTOTUNE=1 cannot time it while a CUDA graph is "
            "captured: run r21d.warmup(model, example_input) (or one eager step) before the "
            "capture, or unset R21D_AUTOTUNE")
    times = [timer(lambda c=c: choice.fn[grid](*args, **kwargs, **c.all_kwargs()))
             for c in choice.configs]
    best = choice.configs[min(range(len(times)), key=times.__getitem__)]
    _save(cache_file(), entry_key(choice, args, kwargs), best.all_kwargs())
    return best
