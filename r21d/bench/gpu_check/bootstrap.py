"""The build step of ``make gpu-check``: install r21d editable, building r21d._C, when r21d is not
importable or r21d._C is missing, stale (csrc/ or setup.py newer) or built for another torch,
with the interpreter that runs the checks and MAX_JOBS = cores; record what happened in
OUT/build.json for the checker.

Standard library only, and run by path (``python r21d/bench/gpu_check/bootstrap.py OUT``):
importing r21d before it is installed fails (r21d.triton_kernels lives in triton_kernels/).
No network: ``pip install --no-build-isolation --no-deps --no-index -e .``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout
LOG_TAIL = 6000

# Run in a child: what an import of r21d finds (nothing is imported into this process).
PROBE = r"""
import glob, json, os, shutil
state = {}
try:
    import torch
    state.update(torch=torch.__version__, cuda=torch.cuda.is_available())
    import r21d, r21d.triton_kernels
    from r21d import _extension
    state.update(importable=True, loaded=_extension.loaded(), reason=_extension.unavailable_reason(),
                 package=os.path.dirname(r21d.__file__),
                 extension=sorted(glob.glob(os.path.join(os.path.dirname(r21d.__file__), "_C*.so"))))
except Exception as e:
    state.update(importable=False, error=f"{type(e).__name__}: {e}")
state["nvcc"] = shutil.which("nvcc")
print(json.dumps(state))
"""


def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"importable": False, "error": (out.stderr or out.stdout).strip()[-2000:]}


def newest_source() -> float:
    paths = [ROOT / "setup.py", *(p for p in (ROOT / "csrc").rglob("*") if p.is_file())]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def why_build(state: dict) -> str | None:
    """Why to (re)install, or None."""
    if "torch" not in state:
        return None  # no torch: pip cannot build; the checker's import will say so
    if not state.get("importable"):
        return f"r21d is not importable ({state.get('error')})"
    if not state.get("cuda"):
        return None  # no GPU: the checker only checks its wiring, which needs no r21d._C
    if not state.get("nvcc"):
        return None  # cannot build it here; the environment check reports the missing r21d._C
    if not state.get("loaded"):
        return f"r21d._C is not loaded ({state.get('reason')})"
    built = min((os.stat(p).st_mtime for p in state.get("extension", [])), default=0.0)
    if built < newest_source():
        return "r21d._C is older than csrc/ or setup.py"
    return None


def build() -> dict:
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)}
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
           "-e", "."]
    start = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = (out.stdout or "") + (out.stderr or "")
    return {"command": " ".join(cmd), "max_jobs": env["MAX_JOBS"], "returncode": out.returncode,
            "build_s": round(time.time() - start, 1), "log_tail": log[-LOG_TAIL:]}


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "gpu-check-out")
    started = time.time()
    state = probe()
    reason = why_build(state)
    record = {"started_at": started, "python": sys.executable, "before": state, "reason": reason,
              "action": "installed r21d (pip install -e .)" if reason else "nothing to build"}
    if reason:
        print(f"gpu-check build step: {reason}; pip install --no-build-isolation --no-deps -e . "
              f"(MAX_JOBS={os.environ.get('MAX_JOBS') or os.cpu_count()}) ...", flush=True)
        record.update(build())
        record["after"] = probe()
        print(f"gpu-check build step: exit {record['returncode']} after {record['build_s']} s; "
              f"r21d._C loaded: {record['after'].get('loaded')}", flush=True)
        if record["returncode"]:
            print(record["log_tail"][-3000:], file=sys.stderr)
    else:
        print(f"gpu-check build step: nothing to build (r21d._C loaded: {state.get('loaded')})",
              flush=True)
    record["elapsed_s"] = round(time.time() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0  # a failed build is the environment check's failure, with the log in the JSON


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
