"""What ``make gpu-check`` runs: its stages in order, each with a time budget, and their checks.

The order is the order of value, so that a run cut short keeps the most useful part: the
environment, then the compile warm-up everything after it needs, the bf16 accuracy of every
kernel family, the headline timings, fp16 and fp32 accuracy, and last compute-sanitizer (a
separate process, so it still runs after a CUDA error has broken this one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

TOTAL_BUDGET_S = 480  # the 8 minutes, build included
BUILD_BUDGET_S = 110  # make's build step (bootstrap.py) before the checker starts
FINISH_RESERVE_S = 10  # the table, the PNG and the last JSON write
COMPILE_EXTRA_S = 300  # --with-compile: torch.compile's timings, beyond the 8 minutes


@dataclasses.dataclass
class Context:
    """Where and how checks run."""

    device: torch.device
    small: bool = False  # tiny shapes: the wiring check on the CPU, the sanitizer's payload
    backend: Optional[str] = None  # run every fused call on this backend (the CPU: "torch")
    with_compile: bool = False
    out_dir: Optional[Path] = None
    plan: list = dataclasses.field(default_factory=list)  # this run's stages (warm reads them)
    state: dict = dataclasses.field(default_factory=dict)  # shared by checks (ceilings, deadlines)


@dataclasses.dataclass(frozen=True)
class FusedCall:
    """One r21d call a check will make, for the warm stage to capture and compile ahead:
    ``run()`` under ``precision`` ("bf16", "fp16", "fp32-tf32" or "fp32-ieee")."""

    label: str
    precision: str
    run: Callable[[], Any]
    heavy: bool = False  # a whole model: the CPU wiring check runs one per mode, in accuracy


def _no_calls(ctx: Context) -> list[FusedCall]:
    return []


@dataclasses.dataclass(frozen=True)
class Check:
    """``run(ctx)`` returns the check's numbers, with ``passed`` (raising counts as failed; a
    ``skipped`` reason instead of ``passed`` leaves it unrun). ``plumb(ctx)`` builds what ``run``
    would, on tiny CPU inputs, to prove the wiring without a GPU. ``fused_calls(ctx)``: the
    r21d calls ``run`` will make (the warm stage compiles their kernels first)."""

    name: str
    run: Callable[[Context], dict]
    plumb: Callable[[Context], dict]
    fused_calls: Callable[[Context], list[FusedCall]] = _no_calls
    tags: dict = dataclasses.field(default_factory=dict)  # recorded with the check (e.g. subject)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    what: str
    checks: Callable[[Context], list[Check]]
    in_process: bool = True  # False: runs in a child process, so a broken CUDA context spares it


def stages(with_compile: bool = False) -> list[Stage]:
    from . import accuracy, machine, memcheck, speed, warm

    return [
        Stage("environment", 10, "GPU, driver, torch / Triton / cuDNN / CUDA versions, r21d._C "
              "build_info() and the build step's record", machine.checks),
        Stage("warm", 60, "capture every r21d call of the later stages without running it and "
              "compile each Triton kernel specialisation once, in parallel (configurations by "
              "rule: one per launch)", warm.checks),
        Stage("accuracy-bf16", 60, "every kernel family in eval and training, the (2+1)D unit, "
              "the residual tail and r2plus1d_18 (forward, training step) in bf16 against "
              "float64: error <= 2x cuDNN's", accuracy.stage_checks(("bf16",))),
        Stage("speed", 90 + (COMPILE_EXTRA_S if with_compile else 0),
              "headline cases timed with CUDA events against eager in the same run"
              + (" and torch.compile" if with_compile else ""), speed.checks),
        Stage("accuracy-fp16", 35, "the accuracy checks in fp16", accuracy.stage_checks(("fp16",))),
        Stage("accuracy-fp32", 50, "the accuracy checks in fp32, TF32 and IEEE (cuDNN and r21d "
              "under the same precision flags)", accuracy.stage_checks(("fp32-tf32", "fp32-ieee"))),
        Stage("memcheck", 45, "compute-sanitizer memcheck over every family's bf16 accuracy calls "
              "(a child process)", memcheck.checks, in_process=False),
    ]


def total_budget_s(with_compile: bool = False) -> float:
    return TOTAL_BUDGET_S + (COMPILE_EXTRA_S if with_compile else 0)


def describe(plan: list[Stage], ctx: Context) -> str:
    """The dry run: every stage with its budget and checks, and the sum against the deadline."""
    total = total_budget_s(ctx.with_compile)
    used = BUILD_BUDGET_S + sum(s.budget_s for s in plan) + FINISH_RESERVE_S
    lines = [f"make gpu-check: {len(plan)} stages after the build, {used:.0f} s of budgets "
             f"(deadline {total:.0f} s from the start of make, build included)", "",
             f"  {'build':15s} {BUILD_BUDGET_S:4.0f} s  make: pip install --no-build-isolation "
             "--no-deps -e . when r21d._C is missing or stale (MAX_JOBS = cores)"]
    for stage in plan:
        checks = stage.checks(ctx)
        lines.append(f"  {stage.name:15s} {stage.budget_s:4.0f} s  {stage.what} [{len(checks)} checks]")
        lines += [f"      {c.name}" for c in checks]
    lines.append(f"  {'finish':15s} {FINISH_RESERVE_S:4.0f} s  the table, gpu-check.png, the last JSON write")
    return "\n".join(lines)
