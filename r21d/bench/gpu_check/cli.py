"""``python -m r21d.bench.gpu_check``: the checker ``make gpu-check`` runs after its build step."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from . import plan as P
from .memcheck import PAYLOAD_FLAG

DEFAULT_OUT = "gpu-check-out"
JSON_NAME, PNG_NAME = "gpu-check.json", "gpu-check.png"
HANG_GRACE_S = 30  # past the deadline, a hung check ends the process (the JSON says which)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m r21d.bench.gpu_check",
        description="Check and time r21d on a GPU in at most 8 minutes (make gpu-check). Without "
                    "a GPU: check that the stages are wired, on tiny CPU cases.")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for {JSON_NAME} and {PNG_NAME} (default {DEFAULT_OUT})")
    p.add_argument("--dry-run", action="store_true", help="list the stages, checks and budgets")
    p.add_argument("--stages", metavar="A,B", help="run only these stages (see --dry-run)")
    p.add_argument("--with-compile", action="store_true",
                   help=f"also time torch.compile (adds {P.COMPILE_EXTRA_S} s: beyond the 8 minutes)")
    p.add_argument("--started-at", type=float, metavar="EPOCH",
                   help="when make gpu-check started (its build step counts against the deadline)")
    p.add_argument("--budget", type=float, metavar="S", help=f"the deadline (default {P.TOTAL_BUDGET_S} s)")
    p.add_argument("--estimate-compiles", action="store_true",
                   help="on a CPU: count the Triton kernel specialisations a GPU run compiles (sm_90)")
    p.add_argument("--compile", action="store_true", help="with --estimate-compiles: also compile them")
    p.add_argument("--replot", metavar="JSON", help=f"redraw the PNG of a {JSON_NAME} beside it")
    p.add_argument(PAYLOAD_FLAG, action="store_true", help=argparse.SUPPRESS)
    return p


def select(plan: list[P.Stage], names: Optional[str]) -> list[P.Stage]:
    if not names:
        return plan
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {s.name for s in plan})
    if unknown:
        raise SystemExit(f"gpu-check: no stage {', '.join(unknown)}; see --dry-run")
    return [s for s in plan if s.name in wanted]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # Configurations by rule (no timing runs, even where the user opted in) and no silent fallback.
    os.environ["R21D_AUTOTUNE"] = "0"
    os.environ["R21D_STRICT"] = "1"
    if args.memcheck_payload:
        from .memcheck import run_payload

        return run_payload()
    if args.replot:
        return _replot(Path(args.replot))
    plan = select(P.stages(args.with_compile), args.stages)

    import torch

    if args.dry_run:
        print(P.describe(plan, P.Context(torch.device("cpu"), with_compile=args.with_compile)))
        return 0
    if args.estimate_compiles:
        return _estimate(plan, args.compile)
    if torch.cuda.is_available():
        return _gpu_run(plan, args)
    return _wiring_run(plan, args)


def _now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _gpu_run(plan: list[P.Stage], args) -> int:
    import torch

    from . import chart, machine, schedule, warm
    from .results import Results, summary_table

    started = args.started_at or time.time()
    budget = args.budget or P.total_budget_s(args.with_compile)
    clock = schedule.Clock(started, budget)
    faulthandler.dump_traceback_later(max(clock.remaining(), 0) + HANG_GRACE_S, exit=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = P.Context(torch.device("cuda"), with_compile=args.with_compile, out_dir=out)
    ctx.state["build"] = machine.read_build(out, started)
    ctx.state["stage_probe"] = warm.cache_entries
    env = machine.describe(ctx.device)
    results = Results(out / JSON_NAME, {
        "mode": "gpu", "started_at": datetime.datetime.fromtimestamp(started).astimezone().isoformat(
            timespec="seconds"), "deadline_s": budget, "with_compile": args.with_compile,
        "environment": env, "build": ctx.state["build"]})
    print(f"make gpu-check on {env['device']} (sm_{env.get('gpu_capability', '?').replace('.', '')}, "
          f"driver {env.get('driver')}): torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
          f"Triton {env['triton']}; r21d._C {env['r21d_extension']}", flush=True)
    print(f"{clock.elapsed():.0f} s since make started; deadline {budget:.0f} s; progress on stderr; "
          f"{out / JSON_NAME} is rewritten after every check", flush=True)
    try:
        schedule.run(plan, ctx, results, clock)
        status, code = results.outcome()
    except BaseException as e:  # a bug of the checker itself (or ^C): keep what was recorded
        results.update(crash=traceback.format_exc(limit=10)[-4000:])
        status, code = f"crashed: {schedule.error_text(e)}", 1
    results.update(status=status, elapsed_s=round(clock.elapsed(), 1), counts=results.counts(),
                   finished_at=_now_iso())
    faulthandler.cancel_dump_traceback_later()
    print("\n" + summary_table(results.data))
    why_not = chart.write(out / PNG_NAME, results.data)
    print(f"\n{status} after {clock.elapsed():.0f} s: wrote {out / JSON_NAME}"
          + (f" (no chart: {why_not})" if why_not else f" and {out / PNG_NAME}"))
    from .. import environment

    stem = environment.result_stem(environment.default_out_dir(), ctx.device, smoke=False)
    print(f"commit them as {stem}.json / .png and write the outcome in benchmarks/NOTES.md")
    return code


def _wiring_run(plan: list[P.Stage], args) -> int:
    import torch

    from . import chart, schedule
    from .results import Results, stage_table

    print("make gpu-check: no CUDA GPU on this machine -- nothing is checked or timed.")
    print("Checking the wiring instead: every stage's checks built and run on tiny CPU cases "
          "through the torch backend.", flush=True)
    out = Path(args.out)
    ctx = P.Context(torch.device("cpu"), small=True, backend="torch", out_dir=out)
    from .. import environment

    results = Results(out / JSON_NAME, {"mode": "wiring (no GPU): tiny CPU cases, not measurements",
                                        "started_at": _now_iso(),
                                        "environment": environment.describe(ctx.device)})
    start = time.perf_counter()
    with _quick_cpu():
        schedule.run(plan, ctx, results, schedule.Clock(time.time(), math.inf), plumbing=True)
    status, code = results.outcome()
    results.update(status=status, elapsed_s=round(time.perf_counter() - start, 1), counts=results.counts())
    print(stage_table(results.data))
    why_not = chart.write(out / PNG_NAME, results.data)
    print(f"\nwiring {'ok' if code == 0 else 'BROKEN'} ({time.perf_counter() - start:.1f} s); wrote "
          f"{out / JSON_NAME}" + (f" (no chart: {why_not})" if why_not else f" and {out / PNG_NAME}"))
    return 0 if code == 0 else 1


@contextlib.contextmanager
def _quick_cpu():
    """One thread with denormals flushed: the tiny models' training steps make denormals, which
    slow the CPU kernels (and threads without the flush) down five- to tenfold."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _estimate(plan: list[P.Stage], compile_them: bool) -> int:
    from . import warm

    numbers = warm.estimate(plan, compile_them)
    print(json.dumps(numbers, indent=1))
    return 1 if numbers["capture_errors"] or numbers.get("compile_errors") else 0


def _replot(path: Path) -> int:
    from . import chart

    why_not = chart.write(path.with_suffix(".png"), json.loads(path.read_text()))
    print(why_not or f"wrote {path.with_suffix('.png')}", file=sys.stderr if why_not else sys.stdout)
    return 1 if why_not else 0
