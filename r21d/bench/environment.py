"""What a results file records about where it was measured, and where results files go."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout, for an editable install


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: record that it is missing
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=_PACKAGE_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> Optional[dict]:
    """The checkout's commit and whether it has uncommitted changes (None outside a git repo or
    before the first commit)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _program() -> str:
    name = os.path.basename(sys.argv[0])
    return "python -m r21d.bench" if name == "__main__.py" else name


def _extension_info() -> Optional[object]:
    from .. import _extension

    try:
        return _extension.build_info() if _extension.loaded() else None
    except Exception as e:  # a half-built extension must not stop the benchmark
        return f"build_info failed: {e}"


def describe(device: torch.device) -> dict:
    from .. import __version__, available_backends

    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "r21d": __version__,
        "r21d_backends": available_backends(),
        "r21d_extension": _extension_info(),
        "git": git_commit(),
        "command": " ".join([_program(), *sys.argv[1:]]),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_sms": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 1024 ** 3, 1),
            "gpu_l2_bytes": getattr(props, "L2_cache_size", None),
        })
    return env


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_out_dir() -> Path:
    """benchmarks/results of the checkout r21d runs from, else of the working directory."""
    checkout = _PACKAGE_ROOT / "benchmarks"
    if checkout.is_dir():
        return checkout / "results"
    return Path.cwd() / "benchmarks" / "results"


def result_stem(out_dir: Path, device: torch.device, smoke: bool) -> Path:
    """``<out_dir>/<device-slug>-<YYYY-MM-DD>[-smoke]``, with -2, -3, ... so that no earlier
    result of the same day is overwritten."""
    base = f"{slug(device_name(device))}-{datetime.date.today().isoformat()}{'-smoke' if smoke else ''}"
    stem, n = out_dir / base, 2
    while stem.with_suffix(".json").exists() or stem.with_suffix(".png").exists():
        stem, n = out_dir / f"{base}-{n}", n + 1
    return stem
