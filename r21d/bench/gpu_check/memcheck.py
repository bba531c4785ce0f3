"""compute-sanitizer memcheck over every kernel family.

A child process runs the payload (``python -m r21d.bench.gpu_check --memcheck-payload``): each
accuracy subject but the whole model, bf16, eval and training, each r21d call once, on its own
backend, at the accuracy checks' batch-2 shapes: their kernels are compiled already (smaller
shapes would be other specialisations to compile), and instrumented kernels, though many times
slower, take milliseconds there. PyTorch's caching allocator is off in the child
(PYTORCH_NO_CUDA_MEMORY_CACHING=1), so every tensor is its own allocation and an access past its
end is an error memcheck sees. API errors are not reported (PyTorch and Triton probe the driver
on purpose); a failing launch raises in the payload instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .plan import Check, Context, FusedCall

PAYLOAD_FLAG = "--memcheck-payload"
DONE = "memcheck payload: done"
ERROR_EXIT = 86  # --error-exitcode: memcheck found errors
PRINT_LIMIT = 20


def sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, beside nvcc, or in $CUDA_HOME / /usr/local/cuda."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.insert(0, str(Path(os.path.realpath(nvcc)).parent.parent))
    for home in filter(None, homes):
        for candidate in (Path(home) / "bin" / "compute-sanitizer",
                          Path(home) / "compute-sanitizer" / "compute-sanitizer"):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def payload_calls(ctx: Context) -> list[FusedCall]:
    """Every accuracy subject but the whole model (its kernels are the others'), bf16, eval and
    training, on its own backend, at the bf16 accuracy checks' shapes (batch 2), whose kernels
    the warm stage has compiled already; tiny on ``ctx.small``."""
    from . import accuracy

    calls = []
    for subject in accuracy.subjects():
        if subject.case.kind == "model":
            continue

        def call(subject=subject):
            from ..providers import workload

            wl = workload(accuracy.sized(subject, "bf16", ctx), ctx.device)
            prepared = wl.fused(ctx.backend or subject.backend, wl.fused_variants()[0])
            return prepared.fn(*prepared.arg_sets[0])
        calls.append(FusedCall(f"memcheck/{subject.key}", "bf16", call))
    return calls


def run_payload() -> int:
    """The child's work: each call once, synchronised, with a line per call."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(device, backend=None if device.type == "cuda" else "torch")
    for call in payload_calls(ctx):
        call.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"memcheck payload: {call.label} ok", flush=True)
    print(DONE, flush=True)
    return 0


def command(tool: str) -> list[str]:
    return [tool, "--tool", "memcheck", "--error-exitcode", str(ERROR_EXIT), "--print-limit",
            str(PRINT_LIMIT), "--report-api-errors", "no",
            sys.executable, "-m", "r21d.bench.gpu_check", PAYLOAD_FLAG]


def child_env() -> dict:
    return {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "R21D_STRICT": "1",
            "R21D_AUTOTUNE": "0"}


def parse(output: str, returncode: Optional[int]) -> dict:
    """What memcheck said: its error count, the first error lines, how far the payload got."""
    summary = re.search(r"ERROR SUMMARY: (\d+) error", output)
    errors = int(summary.group(1)) if summary else None
    lines = [line for line in output.splitlines()
             if line.startswith("=========") and re.search(r"Invalid|Error|error|Address", line)
             and "ERROR SUMMARY" not in line]
    ran = [line.split(": ", 1)[1][:-3] for line in output.splitlines()
           if line.startswith("memcheck payload: ") and line.endswith(" ok")]
    done = DONE in output
    passed = returncode == 0 and errors == 0 and done
    numbers = {"passed": passed, "returncode": returncode, "errors": errors,
               "error_lines": lines[:PRINT_LIMIT], "calls_ran": len(ran), "finished": done}
    if not passed:
        tail = output.strip().splitlines()[-12:]
        numbers["why"] = (f"{errors} memcheck errors: {lines[0] if lines else ''}" if errors
                          else f"exit {returncode}: {' | '.join(tail)[-600:]}")
    return numbers


def run(ctx: Context) -> dict:
    tool = sanitizer()
    if tool is None:
        return {"passed": False, "why": "compute-sanitizer not found (PATH, beside nvcc, CUDA_HOME)"}
    timeout = max(5.0, ctx.state.get("stage_time_left", lambda: 45.0)())
    start = time.perf_counter()
    proc = subprocess.Popen(command(tool), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=child_env(), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        numbers = parse(output, proc.returncode)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the sanitizer and the payload under it
        output, _ = proc.communicate()
        numbers = parse(output or "", None)
        if not numbers["errors"] and not numbers["error_lines"]:
            numbers = {**numbers, "skipped": f"timed out after {timeout:.0f} s; "
                       f"{numbers['calls_ran']} calls ran without a memcheck error", "why": None}
    numbers.update(seconds=round(time.perf_counter() - start, 1), sanitizer=tool,
                   command=" ".join(command(tool)[:-3] + ["python -m r21d.bench.gpu_check", PAYLOAD_FLAG]))
    return numbers


def _plumb(ctx: Context) -> dict:
    """The payload on tiny CPU cases through the torch backend, and the command it would run."""
    calls = payload_calls(ctx)
    for call in calls:
        call.run()
    parsed = parse(f"memcheck payload: x ok\n{DONE}\n========= ERROR SUMMARY: 0 errors\n", 0)
    tool = sanitizer()
    return {"passed": parsed["passed"], "calls": len(calls), "sanitizer": tool,
            "command": " ".join(command(tool or "compute-sanitizer"))}


def checks(ctx: Context) -> list[Check]:
    return [Check("memcheck/sites", run=run, plumb=_plumb)]
