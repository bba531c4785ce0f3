"""The headline timings, measured by the bench's own runner (``r21d.bench.runner.CaseRunner``: CUDA
events, median after a warm-up, inputs rotated beyond L2, eager as the best of NCDHW and
channels_last_3d with and without autocast) with fewer repetitions, after the ceilings (copy
bandwidth, matmul rates) that the roofline floors use. torch.compile only with --with-compile:
its compiles do not fit the 8 minutes."""

from __future__ import annotations

import contextlib

import torch

from .. import cases, report, roofline
from ..providers import workload
from ..runner import EAGER, FUSED_PREFIX, CaseRunner, Options
from ..timing import Timer
from .plan import Check, Context, FusedCall

REPS, WARMUP = 30, 5
CEILING_REPS = 10
# Ids in r21d.bench.cases.CASES, in the order.
HEADLINE = (
    "pointwise-64-256-n8t16s56-eval",
    "depthwise3x3x3-216-n8t16s56-bfloat16-cl3d-eval",
    "depthwise3x3x3-216-n8t16s56-bfloat16-cl3d-train",
    "r2p1d-unit03-64-144-64-s11-t16s56-eval",
    "r2plus1d_18-b16-eval",
    "r2plus1d_18-b16-train",
    "r2plus1d_18-b1-latency",
)


def headline_cases() -> list:
    found = []
    for case_id in HEADLINE:
        matches = [c for c in cases.CASES if c.id == case_id]
        if len(matches) != 1:
            raise LookupError(f"no bench case {case_id!r} (r21d.bench.cases.CASES changed?)")
        found.append(matches[0])
    return found


def fused_backends(case) -> list[str]:
    """Triton everywhere; the csrc kernels where they have a family (depthwise)."""
    return ["triton", "cuda"] if getattr(case, "family", "") == "depthwise" else ["triton"]


class _Runner(CaseRunner):
    """The bench's runner without the float64 reference of whole models at batch 16 (the
    accuracy stages check the models at batch 2); sites and units keep theirs (on the GPU)."""

    def _reference(self, wl) -> None:
        if self.case.kind == "model":
            self.result.check = "not checked here (the accuracy stages check r2plus1d_18)"
            return
        super()._reference(wl)


def _options(case, ctx: Context, timer: Timer) -> Options:
    return Options(
        device=ctx.device, timer=timer, fused_backends=[ctx.backend] if ctx.backend else fused_backends(case),
        compile_modes=[None] if ctx.with_compile else [],
        compile_skipped=None if ctx.with_compile else "torch.compile only with --with-compile",
        case_compile_modes=ctx.with_compile)


@contextlib.contextmanager
def _cudnn_benchmark():
    """Eager gets cuDNN's best algorithm, as in r21d-bench; restored after (the accuracy stages
    would otherwise search algorithms for every new shape)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def summary(result, ceilings: roofline.Ceilings) -> dict:
    """The numbers of one case: eager's and r21d's best, speed-up, % of the floor, the target,
    and every measurement as r21d-bench writes it."""
    eager = result.best(EAGER)
    fused = [m for m in result.measurements if m.provider.startswith(FUSED_PREFIX) and m.timing]
    best = min(fused, key=lambda m: m.median_ms) if fused else None
    by_variant = {f"{m.provider} {m.label}": m.median_ms for m in fused}
    numbers = {
        "case": result.case.id, "description": result.case.description,
        "floor_ms": result.floor_ms, "bound": result.bound, "check": result.check,
        "eager_ms": eager.median_ms if eager else None, "eager_variant": eager.label if eager else None,
        "r21d_best": {"provider": best.provider, "variant": best.label, "median_ms": best.median_ms}
        if best else None,
        "r21d": by_variant,
        "speedup": eager.median_ms / best.median_ms if eager and best else None,
        "percent_of_floor": 100 * result.floor_ms / best.median_ms if best and result.floor_ms else None,
        "target": report.target_status(result),
        "bench": report.results_json([result], {}, ceilings, {})["cases"][0],
    }
    graphed = [m for m in fused if m.variant is not None and m.variant.cuda_graph]
    if graphed:
        plain = [m for m in fused if m not in graphed]
        numbers["cuda_graph_ms"] = min(m.median_ms for m in graphed)
        numbers["no_graph_ms"] = min(m.median_ms for m in plain) if plain else None
    failed = result.error or result.check.startswith("FAILED") or best is None
    numbers["passed"] = not failed
    if failed:
        numbers["why"] = result.error or (result.check if result.check.startswith("FAILED")
                                          else "no r21d provider was timed")
    return numbers


def run_case(case, ctx: Context) -> dict:
    ceilings = ctx.state.get("ceilings") or roofline.H100_BASELINES
    timer = Timer(ctx.device, reps=REPS, warmup=WARMUP)
    with _cudnn_benchmark():
        result = _Runner(case, _options(case, ctx, timer), "speed", ceilings).run()
    numbers = summary(result, ceilings)
    numbers["ceilings"] = ceilings.source
    return numbers


def measure_ceilings(ctx: Context) -> dict:
    timer = Timer(ctx.device, reps=CEILING_REPS, warmup=3)
    ceilings = roofline.measure_ceilings(timer, ctx.device)
    ctx.state["ceilings"] = ceilings
    return {"passed": True, "copy_bytes_per_s": ceilings.copy_bytes_per_s,
            "bf16_flops_per_s": ceilings.bf16_flops_per_s, "fp32_flops_per_s": ceilings.fp32_flops_per_s,
            "describe": ceilings.describe()}


# ----------------------------------------------------------------------------- wiring


def _plumb_case(case, ctx: Context) -> dict:
    """Builds the runner and the case's workload (tiny, on the CPU) with every provider it would
    time, and calls the fused provider once; a whole model only gets its runner (the accuracy
    stage's wiring runs the same workload class)."""
    _Runner(case, _options(case, ctx, Timer(ctx.device, reps=1, warmup=0)), case.id,
            roofline.H100_BASELINES)
    small = case.smoke(ctx.device)
    if small.kind == "model":
        return {"passed": True, "case": small.id, "note": "runner only"}
    wl = workload(small, ctx.device)
    eager = [wl.eager(v) for v in wl.eager_variants()]
    variants = [v for v in wl.fused_variants() if not v.cuda_graph]
    backend = ctx.backend or "triton"
    fused = wl.fused(backend, variants[0])
    fused.fn(*fused.arg_sets[0])
    return {"passed": True, "case": case.id, "eager_variants": len(eager), "fused_variants": len(variants)}


def _plumb_ceilings(ctx: Context) -> dict:
    return {"passed": callable(roofline.measure_ceilings), "note": "measured on a GPU only"}


def _fused_calls(case, ctx: Context) -> list[FusedCall]:
    """The Triton provider's calls, one per variant the runner times (its CUDA-graph variants
    replay the same kernels)."""
    if "triton" not in fused_backends(case):
        return []

    def call():
        wl = workload(case.smoke(ctx.device) if ctx.small else case, ctx.device)
        for variant in wl.fused_variants():
            if not variant.cuda_graph:
                prepared = wl.fused(ctx.backend or "triton", variant)
                prepared.fn(*prepared.arg_sets[0])
    return [FusedCall(f"speed/{case.id}", "bf16", call, heavy=case.kind == "model")]


def checks(ctx: Context) -> list[Check]:
    out = [Check("speed/ceilings", run=measure_ceilings, plumb=_plumb_ceilings)]
    for case in headline_cases():
        out.append(Check(f"speed/{case.id}", run=lambda ctx, c=case: run_case(c, ctx),
                         plumb=lambda ctx, c=case: _plumb_case(c, ctx),
                         fused_calls=lambda ctx, c=case: _fused_calls(c, ctx)))
    return out
