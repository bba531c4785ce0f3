"""Runs the stages against the clock: a stage starts only while the deadline leaves it time, gets at
most its budget, and starts no check once that is spent; whatever is not started is recorded as
skipped, with why. A check that raises is recorded as failed and the next one runs; after a
sticky CUDA error (the context is lost) the in-process stages skip their remaining checks and
the child-process stages still run."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable

from ..runner import log
from . import results as R
from .plan import FINISH_RESERVE_S, Check, Context, Stage

MIN_STAGE_S = 15  # a stage with less time left than this is not started
STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "illegal instruction",
                      "unspecified launch failure", "device-side assert", "an illegal",
                      "CUDA error: uncorrectable")


@dataclasses.dataclass
class Clock:
    """Seconds since the start of ``make gpu-check`` (``started_at``, wall clock) against the
    deadline."""

    started_at: float
    total_s: float
    now: Callable[[], float] = time.time

    def elapsed(self) -> float:
        return self.now() - self.started_at

    def remaining(self) -> float:
        return self.total_s - self.elapsed()


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def _sticky(e: BaseException) -> bool:
    text = str(e)
    return any(s in text for s in STICKY_CUDA_ERRORS)


def _run_check(check: Check, stage: Stage, ctx: Context, results: R.Results, plumbing: bool) -> None:
    record = results.check(check.name, stage.name, check.tags)
    _run_into(record, check, stage, ctx, results, plumbing)
    n = record["numbers"]
    detail = record["error"] or n.get("skipped") or ""
    if "ratio" in n and isinstance(n["ratio"], float):
        detail = f"error {n['error']:.2e} = {n['ratio']:.2f}x cuDNN's ({n['worst']}) {detail}"
    elif n.get("speedup"):
        detail = f"{n['speedup']:.2f}x eager {detail}"
    log(f"  {check.name}: {record['status']} in {record['elapsed_s'] or 0:.1f} s {detail}".rstrip())


def _run_into(record: dict, check: Check, stage: Stage, ctx: Context, results: R.Results,
              plumbing: bool) -> None:
    start = time.perf_counter()
    try:
        numbers = (check.plumb if plumbing else check.run)(ctx) or {}
    except Exception as e:
        results.finish(record, R.FAILED, error=error_text(e), elapsed_s=time.perf_counter() - start,
                       traceback=traceback.format_exc(limit=8)[-3000:])
        if stage.in_process and _sticky(e):
            ctx.state["cuda_broken"] = f"{check.name}: {error_text(e)}"
        return
    elapsed = time.perf_counter() - start
    if numbers.get("skipped"):
        results.finish(record, R.SKIPPED, numbers=numbers, elapsed_s=elapsed, error=None)
        return
    status = R.PASSED if numbers.get("passed", True) else R.FAILED
    results.finish(record, status, numbers=numbers, elapsed_s=elapsed,
                   error=None if status == R.PASSED else numbers.get("why"))


def _skip_all(checks: list[Check], stage: Stage, results: R.Results, why: str) -> None:
    for check in checks:
        results.finish(results.check(check.name, stage.name, check.tags), R.SKIPPED,
                       numbers={"skipped": why})


def run(plan: list[Stage], ctx: Context, results: R.Results, clock: Clock, plumbing: bool = False) -> None:
    """Every stage of ``plan`` in order (``plumbing``: each check's ``plumb`` instead of ``run``,
    no deadlines)."""
    ctx.plan = plan
    for stage in plan:
        record = results.stage(stage.name, stage.budget_s)
        started = time.perf_counter()
        probe = ctx.state.get("stage_probe")  # e.g. Triton cache entries: compiles in this stage
        before = probe() if probe else None
        try:
            checks = stage.checks(ctx)
        except Exception as e:  # the stage cannot even list its checks: a failed check of its own
            check = results.check(f"{stage.name}/setup", stage.name)
            results.finish(check, R.FAILED, error=error_text(e))
            results.finish(record, R.FAILED, elapsed_s=time.perf_counter() - started)
            continue
        available = clock.remaining() - FINISH_RESERVE_S
        log(f"[{clock.elapsed():.0f} s] stage {stage.name}: {len(checks)} checks, budget "
            f"{stage.budget_s:.0f} s" + ("" if plumbing else f", {available:.0f} s left"))
        if not plumbing and available < MIN_STAGE_S:
            _skip_all(checks, stage, results, "the overall deadline was near")
            results.finish(record, R.SKIPPED, note=f"{available:.0f} s left", elapsed_s=0.0)
            continue
        budget = stage.budget_s if plumbing else min(stage.budget_s, available)
        stage_end = clock.now() + budget
        ctx.state["stage_time_left"] = lambda end=stage_end: end - clock.now()  # warm, memcheck
        for i, check in enumerate(checks):
            broken = ctx.state.get("cuda_broken") if stage.in_process and not plumbing else None
            if broken:
                _skip_all(checks[i:], stage, results, f"CUDA context lost after {broken}")
                break
            if not plumbing and clock.now() >= stage_end:
                _skip_all(checks[i:], stage, results, f"the stage's {budget:.0f} s were spent")
                break
            _run_check(check, stage, ctx, results, plumbing)
        mine = [c for c in results.data["checks"] if c["stage"] == stage.name]
        status = (R.FAILED if any(c["status"] == R.FAILED for c in mine)
                  else R.SKIPPED if any(c["status"] == R.SKIPPED for c in mine) else R.PASSED)
        extra = {"triton_cache_new_entries": probe() - before} if probe else {}
        results.finish(record, status, elapsed_s=time.perf_counter() - started, **extra)
