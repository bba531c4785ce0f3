"""``python -m r21d.static``: the command line."""


from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
import time

from .cases import ARCHS, CASES
from .compile import all_kernels
from .report import format_table, short, vector_load_summary
from .rules import collect, coverage, csrc_report

# Opt-in shared memory per block (what Triton compares metadata.shared against at launch).

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r21d.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a rule fails")
    parser.add_argument("--json", metavar="PATH", help="write every row (and the csrc report) as JSON")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)),
                        help="comma-separated compute capabilities (default 90,80)")
    parser.add_argument("--family", action="append", help="only the cases of this family (repeatable)")
    parser.add_argument("--cases", action="append", metavar="GLOB",
                        help="only the cases whose label (family/name/dtype/layout, e.g. "
                             "'pointwise/*/bf16/cl3d') matches (repeatable)")
    parser.add_argument("--list-cases", action="store_true", help="print the case labels and exit")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    args = parser.parse_args(argv)

    from r21d.triton_kernels import _launch

    if _launch.interpreted():
        print("r21d.static: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)",
              file=sys.stderr)
        return 2
    import triton

    archs = tuple(int(a) for a in args.archs.split(",") if a.strip())
    cases = [c for c in CASES if (not args.family or c.family in args.family)
             and (not args.cases or any(fnmatch.fnmatchcase(c.label, g) for g in args.cases))]
    if args.list_cases:
        print("\n".join(c.label for c in cases))
        return 0
    if not cases:
        print("r21d.static: no case matches", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = collect(archs, cases, args.jobs)
    elapsed = time.perf_counter() - start
    uncovered = coverage(rows) if not (args.family or args.cases) else []
    csrc = csrc_report(archs)

    print(f"r21d static report: triton {triton.__version__}, archs {archs}, {len(cases)} cases, "
          f"{len(rows)} compiled kernel configs in {elapsed:.0f} s")
    print(format_table(rows))
    print("\n== memory-bound kernels, 128-bit global loads (reported, not checked)")
    print("\n".join(vector_load_summary(rows)) or "(none)")
    print("\n== csrc (r21d._C)")
    if csrc["status"] != "ok":
        print(f"r21d._C: {csrc['status']}" + (f" ({csrc['path']})" if csrc["path"] else ""))
    for f in csrc["functions"]:
        print(f"{f['arch']:<7}{f['function']:<60} regs {f['regs']:>3} stack {f['stack']} local "
              f"{f['local']} shared {f['shared_static']} HGMMA {f['hgmma']} HMMA {f['hmma']} "
              f"LDG128 {f['ldg128']}" + (f"  FAIL: {'; '.join(f['failures'])}" if f["failures"] else ""))

    failures = [f"{r.family} {r.kernel} sm{r.arch} {r.config} w{r.num_warps} s{r.num_stages} "
                f"{short(r.dtypes)} {short(r.layouts)} [{short(r.cases)}]: {'; '.join(r.failures)}"
                for r in rows if r.failures]
    failures += [f"csrc {f['function']} {f['arch']}: {'; '.join(f['failures'])}"
                 for f in csrc["functions"] if f["failures"]]
    failures += [f"coverage: no case launches {k}" for k in uncovered]
    print(f"\n== rules: {'all pass' if not failures else f'{len(failures)} failure(s)'}")
    by_kernel: dict[str, int] = {}
    for r in rows:
        if r.failures:
            key = f"{r.kernel} sm{r.arch}"
            by_kernel[key] = by_kernel.get(key, 0) + 1
    for key, n in sorted(by_kernel.items()):
        print(f"  {n:>4} failing configs: {key}")
    for line in failures:
        print("FAIL", line)
    n_gemm = sum(r.gemm for r in rows)
    print(f"{len(rows)} rows ({n_gemm} GEMM, {len(rows) - n_gemm} memory-bound), "
          f"{elapsed:.0f} s, compile time {sum(r.compile_s for r in rows):.0f} s total")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, archs=list(archs), elapsed_s=round(elapsed, 1),
                           cases=[c.label for c in cases], kernels=all_kernels(),
                           uncovered=uncovered, failures=failures,
                           rows=[dataclasses.asdict(r) | {"tensor_core_operands": r.tensor_core_operands}
                                 for r in rows],
                           csrc=csrc), f, indent=1)
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
