"""Where the run happens: the GPU, its driver, torch / Triton / cuDNN / CUDA, nvcc and
compute-sanitizer versions, r21d._C's build_info() and the build step's record; and the
environment check (a GPU is there, r21d._C is built for this torch and loaded, the build step
succeeded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .. import environment
from .plan import Check, Context

SETTINGS = ("R21D_AUTOTUNE", "R21D_STRICT", "R21D_BACKEND", "TRITON_CACHE_DIR", "TRITON_INTERPRET",
            "TORCH_CUDA_ARCH_LIST", "CUDA_VISIBLE_DEVICES", "MAX_JOBS")


def _first_line(cmd: list[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None and not os.path.isabs(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (out.stdout or out.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else None


def describe(device: torch.device) -> dict:
    """r21d-bench's environment record plus the tools and settings this command depends on."""
    from .memcheck import sanitizer

    env = environment.describe(device)
    tool = sanitizer()
    env.update(
        nvcc=_first_line(["nvcc", "--version"]),
        compute_sanitizer=_first_line([tool, "--version"]) if tool else None,
        driver=_first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if device.type == "cuda" else None,
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        settings={k: os.environ[k] for k in SETTINGS if k in os.environ},
    )
    return env


def read_build(out_dir: Optional[Path], started_at: float) -> Optional[dict]:
    """The build step's record (bootstrap.py) of this run: OUT/build.json written after
    ``started_at``."""
    if out_dir is None:
        return None
    path = out_dir / "build.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("started_at", 0) >= started_at - 1 else None


def run(ctx: Context) -> dict:
    from ... import _extension, available_backends

    build = ctx.state.get("build")
    problems = []
    if ctx.device.type != "cuda":
        problems.append("no CUDA GPU")
    if not _extension.loaded():
        problems.append(f"r21d._C is not loaded: {_extension.unavailable_reason()}")
    if build is None:
        note = "no build record of this run (not started by make gpu-check)"
    else:
        note = f"build step: {build.get('action')}"
        if build.get("returncode") not in (None, 0):
            problems.append(f"the build step failed (exit {build.get('returncode')}): see build.log_tail")
    return {"passed": not problems, "why": "; ".join(problems) or None, "note": note,
            "build_info": _extension.build_info() if _extension.loaded() else None,
            "backends": available_backends(), "build": build}


def _plumb(ctx: Context) -> dict:
    env = describe(ctx.device)
    return {"passed": bool(env.get("torch")), "device": env["device"]}


def checks(ctx: Context) -> list[Check]:
    return [Check("environment", run=run, plumb=_plumb)]
