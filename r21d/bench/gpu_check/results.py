"""The record of a run: ``gpu-check.json``, rewritten (atomically) after every change, so that a run
killed at its time limit leaves a valid file that says which check was running; and the short
table printed at the end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

SCHEMA = "r21d-gpu-check/1"
PASSED, FAILED, SKIPPED, RUNNING = "passed", "failed", "skipped", "running"
EXIT_FAILED, EXIT_INCOMPLETE = 1, 3


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as strings (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None or isinstance(value, float):
        return value
    return str(value)


class Results:
    """Stages and checks as they start and end; ``path`` None keeps it in memory."""

    def __init__(self, path: Optional[Path], header: dict):
        self.path = path
        self.data = {"schema": SCHEMA, "status": RUNNING, **header, "stages": [], "checks": []}
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(jsonable(self.data), indent=1) + "\n")
        os.replace(tmp, self.path)  # a reader (or a kill) never sees half a file

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.flush()

    def stage(self, name: str, budget_s: float) -> dict:
        record = {"name": name, "budget_s": budget_s, "status": RUNNING, "elapsed_s": None, "note": None}
        self.data["stages"].append(record)
        self.flush()
        return record

    def check(self, name: str, stage: str, tags: Optional[dict] = None) -> dict:
        record = {"name": name, "stage": stage, **(tags or {}), "status": RUNNING,
                  "elapsed_s": None, "error": None, "numbers": {}}
        self.data["checks"].append(record)
        self.flush()
        return record

    def finish(self, record: dict, status: str, **fields) -> None:
        record.update(status=status, **fields)
        self.flush()

    def counts(self) -> dict:
        counts = {PASSED: 0, FAILED: 0, SKIPPED: 0, RUNNING: 0}
        for c in self.data["checks"]:
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        return counts

    def outcome(self) -> tuple[str, int]:
        """(status, exit code): failed (1) before incomplete (3) before passed (0)."""
        counts = self.counts()
        if counts[FAILED] or counts[RUNNING]:
            return FAILED, EXIT_FAILED
        if counts[SKIPPED]:
            return "incomplete", EXIT_INCOMPLETE
        return PASSED, 0


# ----------------------------------------------------------------------------- the table


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _ms(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def accuracy_rows(data: dict) -> tuple[list[str], dict]:
    """The accuracy checks as {subject: {precision: numbers}} and the precisions in order."""
    precisions: list[str] = []
    table: dict[str, dict[str, dict]] = {}
    for c in data["checks"]:
        if "subject" not in c or "precision" not in c:
            continue
        if c["precision"] not in precisions:
            precisions.append(c["precision"])
        table.setdefault(c["subject"], {})[c["precision"]] = {**(c.get("numbers") or {}),
                                                              "status": c["status"]}
    return precisions, table


def summary_table(data: dict) -> str:
    """Stages, failures, the accuracy matrix (fused error / cuDNN error) and the timings."""
    return "\n".join(filter(None, (stage_table(data), accuracy_table(data), speed_table(data))))


def stage_table(data: dict) -> str:
    """One row per stage; then the checks that failed, with why."""
    out = []
    stage_rows = [["stage", "budget s", "took s", "status", "passed", "failed", "skipped"]]
    for s in data["stages"]:
        mine = [c for c in data["checks"] if c["stage"] == s["name"]]
        stage_rows.append([s["name"], _ms(s["budget_s"]), _ms(s["elapsed_s"]), s["status"],
                           *(str(sum(c["status"] == k for c in mine)) for k in (PASSED, FAILED, SKIPPED))])
    out.append(_grid(stage_rows))

    failed = [c for c in data["checks"] if c["status"] in (FAILED, RUNNING)]
    if failed:
        out.append("\nfailed:")
        out += [f"  {c['name']}: {c.get('error') or c['numbers'].get('why') or c['status']}" for c in failed]

    return "\n".join(out)


def accuracy_table(data: dict) -> str:
    out = []
    precisions, table = accuracy_rows(data)
    if table:
        out.append("\naccuracy: r21d's error / cuDNN's error against float64 (pass: <= 2, plus a "
                   "floor); x = failed, ! = raised")
        rows = [["subject", *precisions]]
        for subject, by_precision in table.items():
            cells = []
            for p in precisions:
                n = by_precision.get(p)
                if n is None:
                    cells.append("")
                elif n["status"] in (SKIPPED, RUNNING):
                    cells.append(n["status"])
                elif n.get("ratio") is None:
                    cells.append("!" if n["status"] == FAILED else "ok")
                else:
                    ratio = n["ratio"]
                    text = f"{ratio:.2f}" if isinstance(ratio, float) else str(ratio)
                    cells.append(text + ("" if n["status"] == PASSED else " x"))
            rows.append([subject, *cells])
        out.append(_grid(rows))
    return "\n".join(out)


def speed_table(data: dict) -> str:
    out = []
    timed = [c for c in data["checks"] if "eager_ms" in (c.get("numbers") or {})]
    if timed:
        out.append("\nspeed (median ms, CUDA events):")
        rows = [["case", "eager", "r21d", "speed-up", "% floor", "target"]]
        for c in timed:
            n = c["numbers"]
            best = n.get("r21d_best") or {}
            graph = " graph" if "CUDA graph" in (best.get("variant") or "") else ""
            rows.append([n["case"], _ms(n["eager_ms"]), f"{_ms(best.get('median_ms'))} {best.get('provider', '')}{graph}".strip(),
                         f"{n['speedup']:.2f}x" if isinstance(n.get("speedup"), float) else "-",
                         f"{n['percent_of_floor']:.0f}%" if isinstance(n.get("percent_of_floor"), float) else "-",
                         (n.get("target") or "").split(":")[-1].strip()[:60]])
        out.append(_grid(rows))
    return "\n".join(out)
