"""r21d-bench: correctness and speed of r21d against eager PyTorch, torch.compile and the plain
GEMM, with roofline floors (docs/benchmarks.md).

    r21d-bench                    on a GPU: every case, results in benchmarks/results/
    r21d-bench                    without a GPU: roofline predictions + fused-model equivalence
    r21d-bench --smoke            tiny shapes, few reps, any device: checks the bench end to end
    r21d-bench --cases pointwise  only cases whose id matches a regular expression (--list)
    r21d-bench --host             host time per call, fused vs plain, launches stubbed (any machine)

Modules: ``cases`` (the case table), ``providers`` (what is timed), ``timing`` (CUDA events),
``roofline`` (floors and ceilings), ``correctness``, ``runner`` (one case), ``session`` (one
measured run), ``cpu_mode`` (no GPU), ``report`` (table, JSON, PNG), ``environment``, ``host``
(host time per call, ``--host``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="r21d-bench",
        description="Check and time r21d's fused kernels against eager PyTorch, torch.compile "
                    "and matmul; print roofline floors; write JSON + PNG results.")
    p.add_argument("--cases", metavar="PATTERN",
                   help="only cases whose id matches this regular expression (see --list)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--out", metavar="DIR",
                   help="directory for <gpu>-<date>.json/.png (default: benchmarks/results; "
                        "smoke: a temporary directory)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and few reps on whatever device there is (CPU included)")
    p.add_argument("--reps", type=int, metavar="N",
                   help="timed repetitions per measurement (default 50; smoke 3)")
    p.add_argument("--warmup", type=int, metavar="N",
                   help="untimed calls before timing, after the checked first call (default 10; smoke 0)")
    p.add_argument("--max-autotune", action="store_true",
                   help="also time torch.compile(mode='max-autotune') of whole models (minutes)")
    p.add_argument("--host", action="store_true",
                   help="measure the host time of fused vs plain calls (r2plus1d_18, r3d_18, a "
                        "training step, one site) with the kernel launches stubbed; no GPU needed")
    p.add_argument("--no-compile", action="store_true",
                   help="do not time torch.compile: neither its default mode nor a case's own (the "
                        "latency cases' reduce-overhead); --max-autotune still adds its own")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.reps is not None and args.reps < 1:
        print("r21d-bench: --reps must be at least 1", file=sys.stderr)
        return 2

    if args.host:
        from . import host

        return host.main(args.out and f"{args.out}/host-time.json", smoke=args.smoke)

    import torch

    from . import cases as case_table

    selected = case_table.select(args.cases)
    if args.list:
        for case in selected:
            print(f"{case.id:40s} {case.description}")
        return 0
    if not selected:
        print(f"r21d-bench: no case matches {args.cases!r}; see r21d-bench --list", file=sys.stderr)
        return 2
    if args.smoke or torch.cuda.is_available():
        from .session import measured_run

        return measured_run(selected, args, smoke=args.smoke)
    from . import cpu_mode

    return cpu_mode.run(selected)
