"""First-call compilation within budget: before any check runs, every r21d call of the later stages
is made once under ``triton_kernels._launch.capture()`` (launchers record their launches instead
of running them), each captured launch is specialised exactly as Triton's JIT would
(``r21d.static``'s binder: same signature, constexprs, 16-divisibility attributes and options),
the duplicates are dropped, and the rest compiled for this GPU's arch in a process pool, one job
per kernel specialisation. ``triton.compile`` writes Triton's file cache, which the JIT reads on
the first real launch, so the checks load cubins instead of compiling them one by one. Each
launch runs the configuration its rule picks (triton_kernels/_tiles.py): one compile each, no
timing runs.

On a GPU the workers also build each kernel's launcher (older Tritons compile a C stub per
signature, cached the same way). A kernel that is not in the cache by the stage's deadline is
compiled on first use, as without this stage; the later stages' records count the new cache
entries they made (``triton_cache_new_entries``: 0 means everything was warm).

    python -m r21d.bench.gpu_check --estimate-compiles [--compile]   # on a CPU: what a GPU run
                                                                     # compiles (sm_90), and how long
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from ...triton_kernels import _compile
from ...triton_kernels._compile import job_key
from ..cpu_launch import triton_on_cpu
from .plan import Check, Context, FusedCall

SM90 = 90


def cache_dir() -> Path:
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except Exception:  # older Triton: the environment variable or the default
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def cache_entries() -> int:
    """Entries of Triton's file cache (one per compiled kernel or launcher)."""
    path = cache_dir()
    return sum(1 for _ in path.iterdir()) if path.is_dir() else 0


def later_calls(ctx: Context, after: str = "warm") -> list[FusedCall]:
    """The r21d calls of the stages after ``after``, in the order they will run."""
    names = [s.name for s in ctx.plan]
    later = ctx.plan[names.index(after) + 1:] if after in names else ctx.plan
    return [call for stage in later for check in stage.checks(ctx) for call in check.fused_calls(ctx)]


# ----------------------------------------------------------------------------- capture


def captured_jobs(calls: list[FusedCall], arch: int, errors: list[str]) -> Iterator[list[dict]]:
    """For each call in turn, the compile jobs of the kernel specialisations it launches that no
    earlier call launched (a call that raises is noted in ``errors``: its check fails too)."""
    from ... import static

    seen: set = set()
    for call in calls:
        case = static.Case(family="gpu-check", name=call.label, dtype=call.precision,
                           layout="gpu-check", run=lambda _case, call=call: call.run())
        try:
            # captures under the call's precision; the configuration each launch runs
            found = static.case_jobs([case], (arch,), all_configs=False)
        except Exception as e:
            errors.append(f"{call.label}: {type(e).__name__}: {str(e).strip()[:200]}")
            continue
        new = []
        for job in found:
            if job_key(job) not in seen:
                seen.add(job_key(job))
                new.append(job)
        yield new


# ----------------------------------------------------------------------------- compile


def compile_job(job: dict) -> dict:
    """Compile one job into Triton's cache (a worker process); on a GPU also build its launcher."""
    start = time.perf_counter()
    try:
        import triton

        kernel = _compile.compile_job(job)
    except Exception as e:
        return {"seconds": time.perf_counter() - start,
                "error": f"{job['kernel']}: {type(e).__name__}: {str(e).strip()[:300]}"}
    launcher_error = None
    if job.get("launcher"):  # an optimisation: a failure here costs time on first use, no more
        try:
            triton.runtime.driver.active.launcher_cls(kernel.src, kernel.metadata)
        except Exception as e:
            launcher_error = f"{type(e).__name__}: {str(e).strip()[:200]}"
    return {"seconds": time.perf_counter() - start, "error": None, "launcher_error": launcher_error}


class Compiler:
    """A spawn pool (no forked CUDA state) that compiles jobs as they are submitted, so that
    compiling overlaps capturing; ``finish`` waits until a deadline and cancels the rest (those
    compile on first use instead)."""

    KEYS = ("module", "kernel", "arch", "signature", "constexprs", "attrs", "options")

    def __init__(self, workers: int, launcher: bool):
        import multiprocessing

        self.start = time.perf_counter()
        self.workers, self.launcher = max(1, workers), launcher
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"))
        self.futures: list = []

    def submit(self, jobs: list[dict]) -> None:
        for job in jobs:
            payload = {**{k: job[k] for k in self.KEYS}, "launcher": self.launcher}
            self.futures.append(self.pool.submit(compile_job, payload))

    def finish(self, timeout_s: float) -> dict:
        done, pending = concurrent.futures.wait(self.futures, timeout=max(timeout_s, 1.0))
        self.pool.shutdown(wait=not pending, cancel_futures=True)
        outcomes = [f.result() for f in self.futures if f in done]
        errors = [o["error"] for o in outcomes if o["error"]]
        launcher = sorted({o["launcher_error"] for o in outcomes if o.get("launcher_error")})
        return {"compiled": len(outcomes) - len(errors), "compile_errors": errors,
                "launcher_errors": launcher[:5],
                "not_finished": len(pending), "workers": self.workers,
                "compile_cpu_s": round(sum(o["seconds"] for o in outcomes), 1),
                "warm_wall_s": round(time.perf_counter() - self.start, 1)}


def _workers() -> int:
    """One core for the capturing process, the rest compile."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


def warm_up(calls: list[FusedCall], arch: int, deadline: float, launcher: bool, workers: int) -> dict:
    """Capture ``calls`` and compile their kernels for ``arch`` until ``deadline``
    (time.perf_counter()); returns what it did."""
    errors: list[str] = []
    compiler = Compiler(workers, launcher)
    jobs: list[dict] = []
    for new in captured_jobs(calls, arch, errors):
        compiler.submit(new)
        jobs += new
    capture_s = time.perf_counter() - compiler.start
    numbers = {"calls": len(calls), "capture_errors": errors, "capture_s": round(capture_s, 1),
               "jobs": len(jobs), "arch": arch, "kernels": _kernel_counts(jobs)}
    numbers.update(compiler.finish(deadline - time.perf_counter()))
    return numbers


def run(ctx: Context) -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability(ctx.device)
    before = cache_entries()
    deadline = time.perf_counter() + ctx.state.get("stage_time_left", lambda: 60.0)()
    numbers = warm_up(later_calls(ctx), 10 * major + minor, deadline, launcher=True, workers=_workers())
    torch.cuda.synchronize(ctx.device)
    torch.cuda.empty_cache()  # the captured calls' tensors
    numbers.update(cache_dir=str(cache_dir()), cache_entries_before=before,
                   cache_entries_after=cache_entries())
    failures = numbers["capture_errors"] + numbers["compile_errors"]
    numbers["passed"] = not failures
    if failures:
        numbers["why"] = failures[0]
    return numbers


def _kernel_counts(jobs: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["kernel"]] = counts.get(job["kernel"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- without a GPU


def _plumb(ctx: Context) -> dict:
    """Every later bf16 call runs (tiny, torch backend: the other precisions' calls differ in
    dtype only; whole models are run once per mode by the accuracy stage's wiring); outside the
    interpreter, one tiny Triton call is also captured, turned into sm_90 jobs (the static
    report's binder still fits) and its first job compiled as a worker would."""
    calls = later_calls(ctx)
    ran = [call for call in calls if call.precision == "bf16" and not call.heavy]
    for call in ran:
        call.run()
    numbers = {"passed": True, "calls": len(calls), "ran": len(ran)}
    from ...triton_kernels import _launch

    if _launch.interpreted():
        numbers["note"] = "TRITON_INTERPRET is set: the capture of real launches is not checked"
        return numbers
    from . import accuracy

    subject = accuracy.subjects()[0]  # the pointwise site
    cpu = Context(ctx.device, small=True, backend="triton")
    errors: list[str] = []
    with triton_on_cpu():
        jobs = [j for new in captured_jobs(accuracy._fused_calls(subject, "bf16", cpu), SM90, errors)
                for j in new]
    numbers.update(jobs=len(jobs), capture_errors=errors)
    compiled = compile_job({**{k: jobs[0][k] for k in Compiler.KEYS}, "launcher": False}) if jobs else {}
    numbers.update(compile_error=compiled.get("error"), compile_s=compiled.get("seconds"))
    numbers["passed"] = bool(jobs) and not errors and not compiled.get("error")
    return numbers


def checks(ctx: Context) -> list[Check]:
    return [Check("warm/compile", run=run, plumb=_plumb)]


def estimate(plan, compile_them: bool, workers: Optional[int] = None) -> dict:
    """On a CPU: capture every call a GPU run makes (real shapes, CPU tensors, nothing runs),
    build its sm_90 jobs and, with ``compile_them``, compile them here (as the GPU run does,
    overlapping capture) into Triton's cache."""
    import torch

    ctx = Context(torch.device("cpu"), backend="triton")
    ctx.plan = plan
    calls = later_calls(ctx)
    with triton_on_cpu():
        if compile_them:
            return warm_up(calls, SM90, time.perf_counter() + 3600, launcher=False,
                           workers=workers or _workers())
        errors: list[str] = []
        jobs = [j for new in captured_jobs(calls, SM90, errors) for j in new]
    return {"calls": len(calls), "capture_errors": errors, "jobs": len(jobs),
            "kernels": _kernel_counts(jobs)}
