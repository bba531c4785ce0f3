"""CPU tests of r21d-bench: the no-GPU mode, the smoke mode end to end (JSON + PNG), the roofline
arithmetic against hand-computed numbers, and the report logic. No test asserts a time."""

from __future__ import annotations

import json
import math

import pytest
import torch

from r21d.bench import cases, correctness, main, report, roofline, runner, timing
from r21d.bench.workload_common import Variant

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU mode")


# ----------------------------------------------------------------------------- roofline by hand


def test_pointwise_eval_work_matches_hand_computation():
    (case,) = cases.select("pointwise-64-256-n8t16s56-eval")
    (work,) = case.work()
    rows = 8 * 16 * 56 * 56  # M = 401,408 output positions
    assert case.output_rows == rows == 401_408
    # bf16: read x (M x 64), write y (M x 256), read W (256 x 64)
    assert work.bytes == 2 * (rows * 64 + rows * 256 + 256 * 64) == 256_933_888
    assert work.flops == 2 * rows * 64 * 256 == 13_153_337_344
    # H100 ceilings of docs/benchmarks.md: 256.9 MB / 2.97 TB/s = 0.0865 ms > 13.15 GFLOP / 688 TFLOP/s
    h100 = roofline.H100_BASELINES
    assert work.memory_s(h100) == pytest.approx(256_933_888 / 2.97e12)
    assert work.compute_s(h100) == pytest.approx(13_153_337_344 / 688e12)
    assert roofline.floor_ms([work], h100) == pytest.approx(0.086510, abs=1e-6)  # BASELINES: 0.087
    assert roofline.bound_by([work], h100) == "memory"


def test_pointwise_train_work_matches_hand_computation():
    (case,) = cases.select("pointwise-64-256-n8t16s56-train")
    (work,) = case.work()
    rows = 401_408
    # x read twice + dx written (3 x M x 64); y, z written, z, dy read (4 x M x 256); W, W, dW
    assert work.bytes == 2 * (3 * rows * 64 + 4 * rows * 256 + 3 * 256 * 64) == 976_322_560
    assert work.flops == 3 * 13_153_337_344


def test_depthwise_train_floor_matches_baselines():
    """docs/benchmarks.md: depthwise 3x3x3 C216 N8 T16 56x56 train floor ~0.41 ms (eval 0.117 ms)."""
    kwargs = dict(batch=8, in_channels=216, out_channels=216, frames=16, height=56, width=56,
                  kernel_size=(3, 3, 3), padding=(1, 1, 1), groups=216)
    evals = cases.ConvBNActCase("dw-eval", "depthwise", **kwargs)
    train = cases.ConvBNActCase("dw-train", "depthwise", training=True, **kwargs)
    assert evals.family == "depthwise"
    h100 = roofline.H100_BASELINES
    assert roofline.floor_ms(evals.work(), h100) == pytest.approx(0.117, abs=5e-4)
    assert roofline.floor_ms(train.work(), h100) == pytest.approx(0.41, abs=5e-3)


def test_r2plus1d_18_flops_match_torchvision():
    """torchvision documents R2Plus1D_18 at 40.52 GFLOPS (multiply-adds) per 16x112x112 clip."""
    (case,) = cases.select("r2plus1d_18-b16-eval")
    work = case.work()
    assert len(work) == 37  # docs/benchmarks.md: 37 Conv3d
    macs_per_clip = sum(w.flops for w in work) / 2 / 16
    assert macs_per_clip / 1e9 == pytest.approx(40.52, abs=0.01)
    (train,) = cases.select("r2plus1d_18-b16-train")
    assert sum(w.flops for w in train.work()) == 3 * sum(w.flops for w in work)


def test_r2plus1d_18_conv_table_matches_torchvision():
    """The 25 distinct convolution configurations of docs/benchmarks.md are those of torchvision's model."""
    video = pytest.importorskip("torchvision.models.video")
    distinct = []
    for conv, i, _ in roofline.model_convs(video.r2plus1d_18, (16, 3, 16, 112, 112)):
        row = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, i[2], i[3])
        assert conv.padding == tuple(k // 2 for k in conv.kernel_size) and i[3] == i[4]
        if row not in distinct:
            distinct.append(row)
    assert len(distinct) == 25
    assert sorted(distinct) == sorted(cases.R2PLUS1D_18_CONVS)
    layers = cases.select(r"^r2p1d-conv\d+-.*-eval$")
    assert len(layers) == 25 and all(c.target.reference == "conv" and c.batch == 16 for c in layers)
    assert {c.family for c in layers} == {"spatial", "temporal", "pointwise"}


# ----------------------------------------------------------------------------- helpers


def test_case_table_and_selection():
    ids = [c.id for c in cases.CASES]
    assert len(ids) == len(set(ids))
    assert len(cases.select("pointwise")) == 6
    assert [c.id for c in cases.select("r2plus1d_18")] == [
        "r2plus1d_18-b16-eval", "r2plus1d_18-b16-train", "r2plus1d_18-b1-latency",
        "r2plus1d_18-b4-latency"]
    assert [c.id for c in cases.select("r3d_18-b")] == ["r3d_18-b16-eval", "r3d_18-b16-train"]
    latency = cases.select("latency")
    assert [(c.batch, c.training, c.cuda_graph, c.compile_modes) for c in latency] == [
        (1, False, True, ("reduce-overhead",)), (4, False, True, ("reduce-overhead",))]
    assert all(c.target.reference == "torch.compile/reduce-overhead" and c.target.max_ratio == 0.75
               for c in latency)
    assert all(c.family == "pointwise" and c.dtype == torch.bfloat16 and c.channels_last
               for c in cases.select("pointwise"))
    smoke = cases.select("pointwise-64-256-n8t16s56-eval")[0].smoke(torch.device("cpu"))
    assert (smoke.in_channels, smoke.out_channels, smoke.dtype, smoke.target) == (4, 16, torch.float32, None)


def test_list_and_unknown_pattern(capsys):
    assert main(["--list"]) == 0
    assert "pointwise-512-512-n8t8s14-train" in capsys.readouterr().out
    assert main(["--cases", "no-such-case"]) == 2


def test_timer_on_cpu_rotates_inputs():
    seen = []
    timer = timing.Timer(torch.device("cpu"), reps=5, warmup=2)
    result = timer.time(lambda x: seen.append(x), [(0,), (1,), (2,)])
    assert seen == [0, 1, 0, 1, 2, 0, 1]  # 2 warm-up calls, then 5 timed, cycling the copies
    assert result.reps == 5 and result.copies == 3 and result.min_ms <= result.median_ms
    assert timing.rotation_copies(10**9, torch.device("cpu")) == timing.MIN_COPIES


def test_error_bound_is_twice_eager_plus_rounding():
    ref = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    assert correctness.max_rel_error([torch.tensor([3.0, 4.0])], ref) == 0.0
    assert correctness.max_rel_error([torch.tensor([3.0, 4.5])], ref) == pytest.approx(0.1)
    assert correctness.max_rel_error([torch.tensor([float("nan"), 4.0])], ref) == math.inf
    assert correctness.error_bound(1e-3, torch.bfloat16) == pytest.approx(2e-3 + 2 ** -7 / 16)
    assert correctness.error_bound(None, torch.float32) is None


def _measured(provider: str, ms: float, peak: int | None = None) -> runner.Measurement:
    t = timing.Timing(median_ms=ms, min_ms=ms, p20_ms=ms, p80_ms=ms, reps=1, copies=3, peak_bytes=peak)
    return runner.Measurement(provider, Variant(True, False, torch.bfloat16), timing=t)


def test_target_status_compares_best_fused_with_reference():
    (case,) = cases.select("pointwise-64-256-n8t16s56-eval")
    result = runner.CaseResult(case, case.work(), 0.0865, "memory")
    result.measurements = [_measured("matmul", 0.100), _measured("r21d/triton", 0.105),
                           _measured("eager", 1.0)]
    assert report.target_status(result).startswith("target r21d <= 1.1x matmul: met (r21d/triton")
    result.measurements[1] = _measured("r21d/triton", 0.2)
    assert "MISSED" in report.target_status(result)
    (model,) = cases.select("r2plus1d_18-b16-eval")
    empty = runner.CaseResult(model, [], None, None, measurements=[_measured("r21d/triton", 5.0)])
    assert "run with --max-autotune" in report.target_status(empty)


# ----------------------------------------------------------------------------- the two modes


@needs_cpu_only
def test_cpu_mode_prints_predictions_equivalence_and_fusion_report(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for case in cases.CASES:  # every case predicted, none measured
        assert case.id in lines and lines[case.id].rstrip().endswith("not measured")
    assert "0.0865" in lines["pointwise-64-256-n8t16s56-eval"]  # the hand-computed floor
    assert "-> equal" in out
    assert "max |diff| 0.000e+00" in out  # the torch backend runs the very same modules
    assert "layer2.0.downsample[0:2]" in out and "pointwise" in out  # r21d.fusion_report
    assert "requested backend: triton" in out  # the GPU preview of the report


@needs_cpu_only
def test_smoke_runs_end_to_end_on_cpu(tmp_path, capsys):
    # conftest sets TRITON_INTERPRET=1 without a GPU: the triton provider runs interpreted.
    pattern = "pointwise-64-256-n8t16s56-(eval|train)|r2plus1d_18-b16-eval|r2p1d-conv05-.*-eval"
    assert main(["--smoke", "--out", str(tmp_path), "--cases", pattern, "--reps", "1"]) == 0
    captured = capsys.readouterr()
    assert "median ms" in captured.out and "vs eager" in captured.out
    assert "r21d/triton" in captured.err and "check: ok" in captured.err  # progress on stderr

    (json_path,) = tmp_path.glob("cpu-*-smoke.json")
    (png_path,) = tmp_path.glob("cpu-*-smoke.png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json_path.read_text())
    assert data["environment"]["device"] == "cpu" and data["settings"]["smoke"] is True
    assert data["ceilings"]["source"].startswith("H100")
    by_id = {c["case"]["id"]: c for c in data["cases"]}
    spatial = "r2p1d-conv05-64-230-k1x3x3-s122-t16s56-eval-smoke"
    assert set(by_id) == {"pointwise-64-256-n8t16s56-eval-smoke", "pointwise-64-256-n8t16s56-train-smoke",
                          "r2plus1d_18-b16-eval-smoke", spatial}
    for case_id, entry in by_id.items():
        assert entry["check"] == "ok"
        timed = {m["provider"]: m for m in entry["measurements"] if m["median_ms"] is not None}
        assert {"eager", "r21d/torch"} <= set(timed)
        assert all(m["reps"] == 1 and m["median_ms"] > 0 for m in timed.values())
        if case_id.startswith("r2plus1d_18"):  # too slow in the interpreter: skipped, with why
            triton = next(m for m in entry["measurements"] if m["provider"] == "r21d/triton")
            assert "Triton interpreter" in triton["skipped"]
        else:
            assert timed["r21d/triton"]["check"] == "ok"
        compile_entry = next(m for m in entry["measurements"] if m["provider"] == "torch.compile")
        assert compile_entry["skipped"]  # not timed on the CPU
    pointwise = by_id["pointwise-64-256-n8t16s56-eval-smoke"]
    assert any(m["provider"] == "matmul" and m["median_ms"] for m in pointwise["measurements"])
    triton = next(m for m in pointwise["measurements"] if m["provider"] == "r21d/triton")
    assert triton["note"] == "1 Triton launches per call"  # eval: one fused launch
    # the convolution alone (what a fused site must match), timed beside the spatial site
    conv = next(m for m in by_id[spatial]["measurements"] if m["provider"] == "conv")
    assert conv["median_ms"] and conv["note"] == "the convolution alone"
    triton = next(m for m in by_id[spatial]["measurements"] if m["provider"] == "r21d/triton")
    assert triton["check"] == "ok" and triton["note"] == "1 Triton launches per call"


def test_ceiling_measurement_runs(monkeypatch):
    """The GPU's ceiling measurement, on small CPU tensors (only its arithmetic is checked)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test device")
    timer = timing.Timer(torch.device("cpu"), reps=3, warmup=1)
    ceilings = roofline.measure_ceilings(timer, torch.device("cpu"), copy_bytes=1 << 20,
                                         bf16_size=64, fp32_size=64)
    assert ceilings.copy_bytes_per_s > 0 and ceilings.bf16_flops_per_s > 0 and ceilings.fp32_flops_per_s > 0
    assert ceilings.source.startswith("measured in this run on test device")


def test_host_view_runs_without_a_gpu(tmp_path):
    """``r21d-bench --host --smoke``: every case measured (launches stubbed, nothing runs on a
    GPU), a JSON record written; a process of its own, since it needs TRITON_INTERPRET unset."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "r21d.bench", "--host", "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "host-time.json").read_text())
    rows = {r["case"]: r for r in record["rows"]}
    assert set(rows) == {"site-1x3x3-eval-forward", "site-1x3x3-train-step", "r2plus1d_18-eval-forward",
                         "r3d_18-eval-forward", "r2plus1d_18-train-step"}
    assert all(r["plain_us"] > 0 and r["fused_us"] > 0 for r in rows.values())
    # every site of the eval models launches exactly once (channels_last_3d in and out)
    assert rows["r2plus1d_18-eval-forward"]["launches"] == rows["r2plus1d_18-eval-forward"]["fused_sites"] == 20
    assert rows["r3d_18-eval-forward"]["conv_bn_pairs"] == 20
    for case in ("r2plus1d_18-eval-forward", "r3d_18-eval-forward", "r2plus1d_18-train-step"):
        assert rows[case]["launchers_rerun_while_timed"] == 0  # the timed calls replay plans
        assert 0 < rows[case]["fused_first_call_ms"] < 1000
    assert "r2plus1d_18-eval-forward" in done.stdout


def test_pytest_benchmark_suite_is_a_view_of_the_bench_table():
    """benchmarks/test_bench_sites.py times r21d-bench's own site cases with its provider names:
    one benchmark system, no second case list."""
    import importlib.util

    from tests.utils import REPO_ROOT

    pytest.importorskip("pytest_benchmark")
    spec = importlib.util.spec_from_file_location("bench_sites", REPO_ROOT / "benchmarks" / "test_bench_sites.py")
    view = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(view)
    assert [c.id for c in view.SITES] == [c.id for c in cases.CASES if c.kind != "model"]
    assert {"conv_bn_act", "conv2plus1d"} <= {c.kind for c in view.SITES}
    assert set(view.PROVIDERS) == {runner.EAGER, runner.COMPILE, runner.CONV, runner.MATMUL,
                                   runner.FUSED_PREFIX + "triton", runner.FUSED_PREFIX + "cuda"}
