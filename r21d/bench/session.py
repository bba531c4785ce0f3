"""One measured run (a GPU, or ``--smoke`` on any device): environment and ceilings, every case,
then the table on stdout and the JSON + PNG files."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from . import environment, report, roofline
from .runner import Options, log, run_cases
from .timing import Timer

FULL_REPS, FULL_WARMUP = 50, 10
SMOKE_REPS, SMOKE_WARMUP = 3, 0  # the checked first call warms up
CEILING_REPS = 20


def _options(device: torch.device, timer: Timer, args: argparse.Namespace, smoke: bool) -> Options:
    from .. import available_backends

    # On a GPU the torch backend is eager itself; the smoke mode keeps it to exercise r21d's path.
    backends = [b for b in available_backends() if smoke or b != "torch"]
    skipped = None
    if device.type != "cuda":
        skipped = "Inductor's C++ build takes minutes on a CPU"
    return Options(
        device=device, timer=timer, fused_backends=backends,
        compile_modes=[] if args.no_compile else [None], compile_skipped=skipped,
        model_compile_modes=["max-autotune"] if args.max_autotune else [],
        case_compile_modes=not args.no_compile,
    )


def measured_run(cases, args: argparse.Namespace, smoke: bool) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if smoke:
        cases = [c.smoke(device) for c in cases]
    if cuda:
        torch.backends.cudnn.benchmark = True  # eager gets cuDNN's best algorithm (found in warm-up)
    timer = Timer(device,
                  reps=args.reps or (SMOKE_REPS if smoke else FULL_REPS),
                  warmup=args.warmup if args.warmup is not None else (SMOKE_WARMUP if smoke else FULL_WARMUP))
    env = environment.describe(device)
    print(f"r21d-bench{' --smoke (tiny shapes: checks the bench, not performance)' if smoke else ''} "
          f"on {env['device']}: torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
          f"r21d backends {', '.join(env['r21d_backends'])}")
    if not cuda:
        print("No CUDA GPU: timings use time.perf_counter on CPU tensors; floors use the H100 "
              "ceilings of docs/benchmarks.md.")
    options = _options(device, timer, args, smoke)
    if "triton" not in options.fused_backends and not cuda:
        log("r21d/triton not run: set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")

    if cuda:
        log("measuring ceilings: 1 GiB device copy, bf16 and fp32 matmuls ...")
        ceilings = roofline.measure_ceilings(Timer(device, reps=max(CEILING_REPS, timer.reps), warmup=3),
                                             device)
    else:
        ceilings = roofline.H100_BASELINES
    print(f"ceilings: {ceilings.describe()}")
    print(f"{len(cases)} cases, median of {timer.reps} reps after {timer.warmup} warm-up calls; "
          f"progress on stderr\n", flush=True)

    results = run_cases(cases, options, ceilings)
    print(report.results_table(results))

    out_dir = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "r21d-bench-smoke" if smoke else environment.default_out_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = environment.result_stem(out_dir, device, smoke)
    settings = {"smoke": smoke, "reps": timer.reps, "warmup": timer.warmup,
                "cases": args.cases, "max_autotune": args.max_autotune,
                "compile": options.compile_skipped is None,
                "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
    report.write_json(stem.with_suffix(".json"), report.results_json(results, env, ceilings, settings))
    print(f"\nwrote {stem.with_suffix('.json')}")
    why_no_png = report.write_png(stem.with_suffix(".png"), results,
                                  f"r21d-bench on {env['device']}, {env['date'][:10]}"
                                  f"{' (smoke)' if smoke else ''}")
    print(f"no chart: {why_no_png}" if why_no_png else f"wrote {stem.with_suffix('.png')}")
    return 1 if any(r.check.startswith("FAILED") for r in results) else 0
