"""gpu-check.png, drawn from the JSON alone (so ``--replot`` can redraw it anywhere, e.g. when the GPU
machine had no matplotlib): the accuracy matrix (r21d's error / cuDNN's per subject and
precision, failures marked) and the speed-ups over eager of the headline cases."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .results import FAILED, PASSED, accuracy_rows


def _number(value) -> Optional[float]:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write(path: Path, data: dict) -> Optional[str]:
    """Writes the chart; returns why none was written (matplotlib missing, nothing to show)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not available ({e}); redraw with --replot {path.with_suffix('.json')}"
    precisions, table = accuracy_rows(data)
    speed = [c["numbers"] for c in data["checks"]
             if c["status"] != "skipped" and "eager_ms" in (c.get("numbers") or {})]
    if not table and not speed:
        return "no accuracy or speed check ran"
    panels = []
    if table:
        panels.append((_accuracy, (precisions, table), max(3.0, 0.28 * len(table) + 1.5)))
    if speed:
        panels.append((_speed, (speed,), max(2.5, 0.45 * sum(len(n.get("r21d") or {}) for n in speed) + 1.5)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(h for _, _, h in panels)), squeeze=False,
                             gridspec_kw={"height_ratios": [h for _, _, h in panels]})
    for ax, (draw, args, _) in zip(axes[:, 0], panels):
        draw(ax, *args)
    env = data.get("environment") or {}
    fig.suptitle(f"make gpu-check on {env.get('device', '?')}, {str(env.get('date', ''))[:10]}: "
                 f"{data.get('status', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _accuracy(ax, precisions: list[str], table: dict) -> None:
    subjects = list(table)
    ax.set_xlim(-0.5, len(precisions) - 0.5)
    ax.set_ylim(len(subjects) - 0.5, -0.5)
    for y, subject in enumerate(subjects):
        for x, precision in enumerate(precisions):
            n = table[subject].get(precision)
            if n is None:
                continue
            ratio = _number(n.get("ratio"))
            color = {PASSED: "#cfe8cf", FAILED: "#f4b6b6"}.get(n["status"], "#e6e6e6")
            ax.add_patch(_rect(x, y, color))
            text = n["status"] if ratio is None else f"{ratio:.2f}"
            ax.text(x, y, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(precisions)), precisions, fontsize=8)
    ax.set_yticks(range(len(subjects)), subjects, fontsize=7)
    ax.set_title("accuracy: r21d error / cuDNN error vs float64 (pass <= 2 + floor; red: failed)",
                 fontsize=9)


def _rect(x: float, y: float, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=color, edgecolor="white")


def _speed(ax, speed: list[dict]) -> None:
    labels, values, colors = [], [], []
    for n in speed:
        eager = _number(n.get("eager_ms"))
        for name, ms in (n.get("r21d") or {}).items():
            ms = _number(ms)
            if eager and ms:
                labels.append(f"{n['case']}\n{name}")
                values.append(eager / ms)
                colors.append("tab:red" if "cuda" not in name.split()[0] else "tab:orange")
    ax.barh(range(len(values)), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_yticks(range(len(values)), labels, fontsize=6)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("speed-up over eager's best layout (higher is better)", fontsize=8)
    ax.set_title("speed: eager median / r21d median, CUDA events", fontsize=9)
