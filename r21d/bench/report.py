"""Output: the results table, the roofline predictions (CPU mode), the JSON file and the PNG chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from . import roofline
from .runner import COMPILE, CONV, EAGER, FUSED_PREFIX, MATMUL, CaseResult, Measurement


def _table(rows: list[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r):
        return "  ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in zip(r, widths, right)).rstrip()
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _ratio(m: Measurement, ref: Optional[Measurement]) -> str:
    if ref is None or m.timing is None:
        return "-"
    return f"{m.median_ms / ref.median_ms:.2f}x"


# ----------------------------------------------------------------------------- targets


FLOOR = "floor"  # a Target reference: the case's roofline floor, not a provider


def target_status(result: CaseResult) -> Optional[str]:
    """Whether the case's target (docs/benchmarks.md) is met in this run, in words."""
    target = result.case.target
    if target is None:
        return None
    fused = result.best_fused()
    if fused is None:
        return f"target {target.describe()}: not measured (no r21d time)"
    if target.reference == FLOOR:  # the roofline floor of this run's measured ceilings
        ref_ms = result.floor_ms
    else:
        ref = result.best(target.reference)
        ref_ms = ref.median_ms if ref is not None else None
    if not ref_ms:
        hint = " (run with --max-autotune)" if "max-autotune" in target.reference else ""
        return f"target {target.describe()}: not measured (no {target.reference} time{hint})"
    ratio = fused.median_ms / ref_ms
    met = ratio <= target.max_ratio
    text = f"{fused.provider} {fused.median_ms:.4f} ms = {ratio:.2f}x {target.reference}"
    if target.max_peak_gib is not None and fused.timing.peak_bytes is not None:
        peak = fused.timing.peak_bytes / roofline.GIB
        met = met and peak <= target.max_peak_gib
        text += f", peak {peak:.2f} GiB"
    return f"target {target.describe()}: {'met' if met else 'MISSED'} ({text})"


# ----------------------------------------------------------------------------- measured table


def results_table(results: Sequence[CaseResult]) -> str:
    """One block per case: a header (floor, check, target), then the best variant of each
    provider with its ratios to eager, torch.compile, the conv alone and (pointwise) matmul."""
    blocks = []
    header = ("provider", "variant (best)", "median ms", "vs eager", "vs compile", "vs conv",
              "vs matmul", "% floor", "floor ms", "1st call s", "peak GiB", "rel err", "check", "note")
    right = (False, False, True, True, True, True, True, True, True, True, True, True, False, False)
    for r in results:
        head = [f"{r.case.id}: {r.case.description}"]
        if r.floor_ms is not None:
            head.append(f"  floor (predicted) {_ms(r.floor_ms)} ms, {r.bound}-bound; check: {r.check}; "
                        f"{r.seconds:.0f} s")
        if r.error:
            head.append(f"  not run: {r.error}")
        status = target_status(r)
        if status:
            head.append(f"  {status}")
        eager, compiled, conv, matmul = r.best(EAGER), r.best(COMPILE), r.best(CONV), r.best(MATMUL)
        rows = [header]
        for provider in r.providers():
            m = r.best(provider) or next(x for x in r.measurements if x.provider == provider)
            if m.timing is None:
                why = m.skipped or m.error or "not timed"
                rows.append((provider, m.label, "-", "", "", "", "", "", "", "", "", "", "", why))
                continue
            peak = m.timing.peak_bytes
            rows.append((
                provider, m.label, _ms(m.median_ms), _ratio(m, eager), _ratio(m, compiled),
                _ratio(m, conv) if conv is not None else "",
                _ratio(m, matmul) if matmul is not None else "",
                f"{100 * r.floor_ms / m.median_ms:.3g}%" if r.floor_ms else "-", _ms(r.floor_ms),
                f"{m.first_call_s:.1f}" if m.first_call_s is not None else "-",
                f"{peak / roofline.GIB:.2f}" if peak is not None and r.case.kind == "model" else "",
                f"{m.rel_error:.1e}" if m.rel_error is not None else "-",
                m.check, m.note,
            ))
        blocks.append("\n".join(head) + "\n" + _table(rows, right))
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------- predictions


def predictions_table(cases, ceilings: roofline.Ceilings) -> str:
    """The roofline prediction of every case, for a machine where nothing is measured."""
    rows = [("case", "MB moved", "GFLOP", "memory ms", "compute ms", "floor ms", "bound", "target",
             "measured")]
    for case in cases:
        try:
            work = case.work()
        except Exception as e:  # e.g. torchvision missing for a model case
            rows.append((case.id, "-", "-", "-", "-", "-", "-", f"({type(e).__name__}: {e})", "not measured"))
            continue
        memory = 1e3 * sum(w.memory_s(ceilings) for w in work)
        compute = 1e3 * sum(w.compute_s(ceilings) for w in work)
        rows.append((
            case.id, f"{sum(w.bytes for w in work) / 1e6:.1f}", f"{sum(w.flops for w in work) / 1e9:.1f}",
            _ms(memory), _ms(compute), _ms(roofline.floor_ms(work, ceilings)),
            roofline.bound_by(work, ceilings), case.target.describe() if case.target else "",
            "not measured",
        ))
    right = (False, True, True, True, True, True, False, False, False)
    return _table(rows, right)


# ----------------------------------------------------------------------------- JSON


def _measurement_json(m: Measurement, result: CaseResult) -> dict:
    timing = m.timing
    return {
        "provider": m.provider,
        "variant": m.label or None,
        "median_ms": timing.median_ms if timing else None,
        "min_ms": timing.min_ms if timing else None,
        "p20_ms": timing.p20_ms if timing else None,
        "p80_ms": timing.p80_ms if timing else None,
        "reps": timing.reps if timing else None,
        "input_copies": timing.copies if timing else None,
        "peak_memory_bytes": timing.peak_bytes if timing else None,
        "first_call_s": m.first_call_s,
        "percent_of_floor": (100 * result.floor_ms / timing.median_ms) if timing and result.floor_ms else None,
        "rel_error": m.rel_error,
        "check": m.check or None,
        "note": m.note or None,
        "error": m.error,
        "skipped": m.skipped,
    }


def _case_json(case) -> dict:
    fields = {}
    for name, value in vars(case).items():
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        elif hasattr(value, "describe"):
            value = value.describe()
        fields[name] = value
    return {"kind": case.kind, "family": case.family, **fields}


def results_json(results: Sequence[CaseResult], environment: dict, ceilings: roofline.Ceilings,
                 settings: dict) -> dict:
    return {
        "schema": "r21d-bench/1",
        "environment": environment,
        "ceilings": {
            "copy_bytes_per_s": ceilings.copy_bytes_per_s,
            "bf16_flops_per_s": ceilings.bf16_flops_per_s,
            "fp32_flops_per_s": ceilings.fp32_flops_per_s,
            "source": ceilings.source,
        },
        "settings": settings,
        "cases": [
            {
                "case": _case_json(r.case),
                "bytes": sum(w.bytes for w in r.work),
                "flops": sum(w.flops for w in r.work),
                "floor_ms": r.floor_ms,
                "bound": r.bound,
                "check": r.check,
                "target": target_status(r),
                "error": r.error,
                "seconds": r.seconds,
                "details": r.details,
                "measurements": [_measurement_json(m, r) for m in r.measurements],
            }
            for r in results
        ],
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- PNG


def write_png(path: Path, results: Sequence[CaseResult], title: str) -> Optional[str]:
    """One panel per case: each provider's best median time, the floor as a dashed line.
    Returns why no chart was written (matplotlib missing, nothing timed), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not available ({e})"
    timed = [r for r in results if any(m.timing for m in r.measurements)]
    if not timed:
        return "nothing was timed"
    cols = 2 if len(timed) > 1 else 1
    rows = (len(timed) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 2.6 * rows), squeeze=False)
    palette = {EAGER: "tab:gray", COMPILE: "tab:blue", MATMUL: "tab:green", CONV: "tab:olive"}
    for ax, r in zip(axes.flat, timed):
        best = [r.best(p) for p in r.providers()]
        best = [m for m in best if m is not None]
        names = [f"{m.provider}\n{m.label}" if m.label else m.provider for m in best]
        colors = [palette.get(m.provider.split("/")[0] if m.provider.startswith(COMPILE) else m.provider,
                              "tab:red" if m.provider.startswith(FUSED_PREFIX) else "tab:purple")
                  for m in best]
        ax.barh(range(len(best)), [m.median_ms for m in best], color=colors)
        ax.set_yticks(range(len(best)), names, fontsize=7)
        ax.invert_yaxis()
        if r.floor_ms:
            ax.axvline(r.floor_ms, color="black", linestyle="--", linewidth=1, label="roofline floor")
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("median ms (lower is better)", fontsize=8)
        ax.set_title(f"{r.case.id}  [check: {r.check.split(':')[0]}]", fontsize=9)
        for i, m in enumerate(best):
            ax.text(m.median_ms, i, f" {m.median_ms:.3g}", va="center", fontsize=7)
    for ax in list(axes.flat)[len(timed):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
