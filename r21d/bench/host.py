"""``r21d-bench --host``: what a fused call costs the host before its kernel launches, against the
plain model's eager call, on any machine (a CPU included).

The fused model runs with the Triton backend on CPU tensors and every kernel launch stubbed at
its last call (``_launch.stubbed()``): what is timed is r21d's Python, torch's custom-op dispatch,
the allocations and, after a site's first call, its launch plans' replay up to
``CompiledKernel[grid](...)`` (as on a GPU; see triton_kernels/_replay.py). The first call
(plans made, launches recorded) is reported apart. The plain model runs for real on the same
narrow models (width / 16, a tiny clip, channels_last_3d as both run best), so its convolutions
cost little beyond their own dispatch. Both run alternately in one process; the figure is the
best of several rounds (the least disturbed).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .cpu_launch import triton_on_cpu
from .narrow import conv_bn_pairs, narrow_video_resnet

CLIP = (2, 3, 4, 16, 16)
ROUNDS = 7


def _per_call_us(fn: Callable[[], object], calls: int, rounds: int = ROUNDS) -> float:
    """Microseconds per call: the best round's mean (each round: ``calls`` calls)."""
    fn()  # first call: plans, caches
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _step(model: nn.Module, x: torch.Tensor, training: bool) -> Callable[[], object]:
    if not training:
        def forward():
            with torch.no_grad():
                return model(x)
        return forward

    def train_step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return train_step


def _fused_context():
    import contextlib

    import r21d

    from ..triton_kernels import _launch

    stack = contextlib.ExitStack()
    stack.enter_context(r21d.use_backend("triton"))
    stack.enter_context(triton_on_cpu())
    stack.enter_context(_launch.stubbed())
    return stack


def measure_model(name: str, training: bool, calls: int = 10) -> dict:
    """Host time of one forward (eval) or training step of the narrow ``name``, fused vs plain."""
    import r21d

    from ..triton_kernels import _launch, _replay

    torch.manual_seed(0)
    cl = torch.channels_last_3d  # the layout the kernels address (see _layout.py); cuDNN's best
    plain = narrow_video_resnet(name).train(training).to(memory_format=cl)
    fused = r21d.fuse(copy.deepcopy(plain))
    sites = len(r21d.fusion_sites(fused))
    x = torch.randn(CLIP).to(memory_format=cl)
    plain_us = _per_call_us(_step(plain, x, training), calls)
    with _fused_context():
        with _launch.count() as counter:
            start = time.perf_counter()
            _step(fused, x, training)()  # the first call: plans each site and records its launches
            first_ms = (time.perf_counter() - start) * 1e3
        recorded = _replay.stats["recorded"] + _replay.stats["unplanned"]
        fused_us = _per_call_us(_step(fused, x, training), calls)
        # every timed call replayed the plans the first call recorded
        replanned = _replay.stats["recorded"] + _replay.stats["unplanned"] - recorded
    pairs = conv_bn_pairs(plain)
    return {
        "case": f"{name}-{'train-step' if training else 'eval-forward'}",
        "plain_us": round(plain_us, 1), "fused_us": round(fused_us, 1),
        "ratio": round(fused_us / plain_us, 2),
        "conv_bn_pairs": pairs, "fused_sites": sites, "launches": counter.launches,
        "plain_us_per_pair": round(plain_us / pairs, 1),
        "fused_us_per_site": round(fused_us / max(sites, 1), 1),
        "fused_first_call_ms": round(first_ms, 1), "launchers_rerun_while_timed": replanned,
    }


def measure_site(training: bool, calls: int = 50) -> dict:
    """Host time of one site alone: a 1x3x3 ConvBNReLU3d vs Conv3d -> BatchNorm3d -> ReLU."""
    import r21d

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1), bias=False),
                          nn.BatchNorm3d(8), nn.ReLU()).train(training)
    plain = plain.to(memory_format=torch.channels_last_3d)
    fused = r21d.fuse(copy.deepcopy(plain))
    x = torch.randn(1, 8, 2, 8, 8).to(memory_format=torch.channels_last_3d).requires_grad_(training)
    plain_us = _per_call_us(_step(plain, x, training), calls)
    with _fused_context():
        fused_us = _per_call_us(_step(fused, x, training), calls)
    return {"case": f"site-1x3x3-{'train-step' if training else 'eval-forward'}",
            "plain_us": round(plain_us, 1), "fused_us": round(fused_us, 1),
            "ratio": round(fused_us / plain_us, 2)}


def run_all(smoke: bool = False) -> list[dict]:
    calls = 2 if smoke else 10
    # one intra-op thread: the plain model's small convolutions then cost their dispatch and a
    # little arithmetic, not a thread pool's wake-ups (which a busy machine makes erratic)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [measure_site(False, 5 if smoke else 50), measure_site(True, 5 if smoke else 50)]
        for name, training in (("r2plus1d_18", False), ("r3d_18", False), ("r2plus1d_18", True)):
            rows.append(measure_model(name, training, calls))
    finally:
        torch.set_num_threads(threads)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':28s} {'plain us':>10s} {'fused us':>10s} {'fused/plain':>11s}  notes"]
    for r in rows:
        notes = ""
        if "fused_sites" in r:
            notes = (f"{r['conv_bn_pairs']} conv+BN, {r['fused_sites']} fused sites, "
                     f"{r['launches']} launches; per pair {r['plain_us_per_pair']} us, "
                     f"per site {r['fused_us_per_site']} us; first call {r['fused_first_call_ms']} ms")
        lines.append(f"{r['case']:28s} {r['plain_us']:10.1f} {r['fused_us']:10.1f} "
                     f"{r['ratio']:11.2f}  {notes}")
    return "\n".join(lines)


def main(out: str | None, smoke: bool = False) -> int:
    import json
    import pathlib

    from . import environment

    if torch.cuda.is_available():
        print("r21d-bench --host: measuring with CPU tensors (the launch path is what is timed)")
    rows = run_all(smoke)
    print(format_table(rows))
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"kind": "host-time", "smoke": smoke, "rows": rows,
                  "median_ratio": statistics.median(r["ratio"] for r in rows),
                  "environment": environment.describe(torch.device("cpu"))}
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
