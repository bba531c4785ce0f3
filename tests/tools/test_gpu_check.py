"""``make gpu-check`` (r21d.bench.gpu_check) on the CPU: the dry run's stages and budgets, the no-GPU
run (which builds and runs every check's inputs on tiny CPU cases, so a renamed function or a
broken case fails here, not in a rare GPU slot), the JSON flushed after every check, deadlines
and failures, the accuracy rule, memcheck's parsing, the chart, the build step's decisions and
the Makefile target. The real run is marked ``gpu``."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from r21d.bench.gpu_check import accuracy, bootstrap, chart, cli, memcheck, schedule
from r21d.bench.gpu_check import plan as P
from r21d.bench.gpu_check.results import Results
from tests.utils import REPO_ROOT

ROOT = REPO_ROOT
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU mode")


@pytest.fixture
def checker_env(monkeypatch):
    """main() sets R21D_STRICT / R21D_AUTOTUNE for the process: restore them after the test."""
    monkeypatch.setenv("R21D_STRICT", "1")
    monkeypatch.setenv("R21D_AUTOTUNE", "0")


# ----------------------------------------------------------------------------- the plan


def test_dry_run_lists_every_stage_and_check_with_budgets_within_8_minutes(checker_env, capsys):
    assert cli.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = P.stages()
    budgets = {}
    for stage in ["build", *(s.name for s in plan), "finish"]:
        m = re.search(rf"^  {re.escape(stage)}\s+(\d+) s", out, re.M)
        assert m, f"stage {stage} missing from the dry run"
        budgets[stage] = int(m.group(1))
    assert sum(budgets.values()) <= P.TOTAL_BUDGET_S == 480
    ctx = P.Context(torch.device("cpu"))
    names = [c.name for s in plan for c in s.checks(ctx)]
    assert len(names) == len(set(names)) > 100
    for name in names:
        assert f"      {name}\n" in out
    # the order of value: environment first, then the warm-up everything later needs
    assert [s.name for s in plan][:3] == ["environment", "warm", "accuracy-bf16"]


def test_accuracy_covers_every_family_in_every_precision_in_eval_and_training():
    checks = accuracy.checks(tuple(accuracy.PRECISIONS))
    families = {"pointwise", "depthwise", "spatial", "temporal", "dense", "grouped", "unit",
                "residual tail", "r2plus1d_18"}
    for precision in accuracy.PRECISIONS:
        mine = [c for c in checks if c.tags["precision"] == precision]
        for family in families - ({"r2plus1d_18"} if precision not in accuracy.MODEL_PRECISIONS else set()):
            for mode in ("eval", "train"):
                assert any(family in c.name and c.name.endswith(mode) for c in mine), (precision, family, mode)
        assert any("/cuda/" in c.name for c in mine)  # the csrc depthwise kernels too


# ----------------------------------------------------------------------------- no GPU


@needs_cpu_only
def test_no_gpu_run_says_so_and_runs_every_check_on_tiny_cpu_cases(tmp_path, capsys, checker_env):
    assert cli.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["mode"].startswith("wiring") and data["status"] == "passed"
    ctx = P.Context(torch.device("cpu"))
    expected = [c.name for s in P.stages() for c in s.checks(ctx)]
    assert [c["name"] for c in data["checks"]] == expected
    assert all(c["status"] == "passed" for c in data["checks"])
    ran = [c for c in data["checks"] if c["numbers"].get("tensors")]
    # every accuracy subject ran once through the whole comparison (reference, eager, fused)
    assert {c["subject"] for c in ran} == {s.key for s in accuracy.subjects()}
    assert (tmp_path / "gpu-check.png").exists() or "matplotlib" not in sys.modules


@needs_cpu_only
def test_warm_stage_turns_a_captured_launch_into_sm90_jobs(tmp_path):
    """Outside the interpreter (a child process): the static report's binder still specialises
    what the launchers capture."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "r21d.bench.gpu_check", "--stages", "warm", "--out",
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (warm,) = json.loads((tmp_path / "gpu-check.json").read_text())["checks"]
    assert warm["status"] == "passed" and warm["numbers"]["jobs"] >= 1, warm
    assert warm["numbers"]["compile_error"] is None and warm["numbers"]["compile_s"] > 0


def test_import_r21d_does_not_import_the_checker():
    code = "import r21d, sys; print(any(m.startswith('r21d.bench') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------- scheduling


def _stage(name, checks, budget=10.0, in_process=True):
    return P.Stage(name, budget, name, lambda ctx: checks, in_process=in_process)


def _check(name, run):
    return P.Check(name, run=run, plumb=run)


def test_json_is_flushed_after_every_check_and_a_raising_check_fails_the_run(tmp_path):
    path = tmp_path / "gpu-check.json"
    seen = {}

    def boom(ctx):
        raise RuntimeError("kernel exploded")

    def look(ctx):  # what a kill at this moment would leave behind
        seen.update({c["name"]: c["status"] for c in json.loads(path.read_text())["checks"]})
        return {"passed": True}

    plan = [_stage("one", [_check("a", lambda ctx: {"passed": True, "x": 1.5}), _check("b", boom),
                           _check("c", look)]),
            _stage("two", [_check("d", lambda ctx: {"passed": False, "why": "too slow"})])]
    results = Results(path, {})
    schedule.run(plan, P.Context(torch.device("cpu")), results, schedule.Clock(0.0, 1e9, now=lambda: 1.0))
    assert seen == {"a": "passed", "b": "failed", "c": "running"}
    data = json.loads(path.read_text())
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["b"]["error"] == "RuntimeError: kernel exploded"
    assert by_name["d"]["status"] == "failed" and by_name["d"]["error"] == "too slow"
    assert [s["status"] for s in data["stages"]] == ["failed", "failed"]
    assert results.outcome() == ("failed", 1)


def test_deadline_skips_checks_and_stages_and_the_run_is_incomplete(tmp_path):
    clock = schedule.Clock(0.0, 480, now=lambda: now[0])
    now = [0.0]

    def slow(ctx):  # spends the stage's budget and nearly all of the deadline
        now[0] += 460
        return {"passed": True}

    plan = [_stage("one", [_check("a", slow), _check("b", lambda ctx: {"passed": True})]),
            _stage("two", [_check("c", lambda ctx: {"passed": True})])]
    results = Results(tmp_path / "r.json", {})
    schedule.run(plan, P.Context(torch.device("cpu")), results, clock)
    status = {c["name"]: (c["status"], c["numbers"].get("skipped")) for c in results.data["checks"]}
    assert status["a"][0] == "passed"
    assert status["b"][0] == "skipped" and "spent" in status["b"][1]
    assert status["c"][0] == "skipped" and "deadline" in status["c"][1]
    assert results.outcome() == ("incomplete", 3)


def test_a_lost_cuda_context_skips_in_process_checks_but_not_a_child_process_stage(tmp_path):
    def sticky(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    plan = [_stage("one", [_check("a", sticky), _check("b", lambda ctx: {"passed": True})]),
            _stage("two", [_check("c", lambda ctx: {"passed": True})]),
            _stage("child", [_check("d", lambda ctx: {"passed": True})], in_process=False)]
    results = Results(None, {})
    schedule.run(plan, P.Context(torch.device("cpu")), results, schedule.Clock(0.0, 1e9, now=lambda: 1.0))
    status = {c["name"]: c["status"] for c in results.data["checks"]}
    assert status == {"a": "failed", "b": "skipped", "c": "skipped", "d": "passed"}


# ----------------------------------------------------------------------------- pieces


def test_accuracy_rule_is_twice_cudnn_tensor_by_tensor():
    ref = [torch.ones(100, dtype=torch.float64), torch.full((10,), 1e-20, dtype=torch.float64)]
    eager = [ref[0] + 1e-3, torch.full((10,), 1e-6)]
    ok = accuracy.compare([ref[0] + 1.9e-3, torch.full((10,), 1e-4)], eager, ref, ["y", "db"], "bf16")
    assert ok["passed"] and ok["worst"] == "y" and ok["ratio"] == pytest.approx(1.9)
    assert ok["tensors"][1]["judged"] is False  # zero in exact arithmetic: noise over noise
    bad = accuracy.compare([ref[0] + 2.5e-3, eager[1]], eager, ref, ["y", "db"], "fp32-ieee")
    assert not bad["passed"] and bad["why"].startswith("y: error")
    nan = accuracy.compare([ref[0], torch.full((10,), math.nan)], eager, ref, ["y", "db"], "bf16")
    assert not nan["passed"]
    # TF32: cuDNN may have run in IEEE fp32, so TF32's epsilon is the floor
    assert accuracy.error_bound(1e-7, "fp32-tf32") > 9e-4 > accuracy.error_bound(1e-7, "fp32-ieee")


def test_speed_check_summarises_the_bench_runner(monkeypatch):
    """run_case on a tiny pointwise case on the CPU (torch backend, one repetition)."""
    from r21d.bench.gpu_check import speed

    monkeypatch.setattr(speed, "REPS", 1)
    monkeypatch.setattr(speed, "WARMUP", 0)
    (case,) = [c for c in speed.headline_cases() if c.family == "pointwise"]
    ctx = P.Context(torch.device("cpu"), backend="torch")
    numbers = speed.run_case(case.smoke(ctx.device), ctx)
    assert numbers["passed"] and numbers["check"] == "ok", numbers
    assert numbers["r21d_best"]["provider"] == "r21d/torch" and numbers["eager_ms"] > 0
    assert numbers["speedup"] > 0 and numbers["bench"]["measurements"]


def test_memcheck_output_is_parsed():
    clean = "memcheck payload: a ok\nmemcheck payload: done\n========= ERROR SUMMARY: 0 errors\n"
    assert memcheck.parse(clean, 0)["passed"]
    dirty = ("========= Invalid __global__ read of size 16 bytes\n=========     at _depthwise_fwd_kernel\n"
             "memcheck payload: done\n========= ERROR SUMMARY: 3 errors\n")
    found = memcheck.parse(dirty, memcheck.ERROR_EXIT)
    assert not found["passed"] and found["errors"] == 3 and "Invalid __global__ read" in found["why"]
    cut = memcheck.parse("memcheck payload: a ok\n", None)  # killed at its time limit
    assert not cut["passed"] and cut["calls_ran"] == 1 and not cut["finished"]
    assert memcheck.command("cs")[:3] == ["cs", "--tool", "memcheck"]


def test_chart_draws_accuracy_and_speed_from_the_json(tmp_path):
    pytest.importorskip("matplotlib")
    data = {"status": "failed", "environment": {"device": "NVIDIA H100", "date": "2026-12-01"}, "checks": [
        {"name": "bf16/x", "stage": "s", "subject": "pointwise [triton] eval", "precision": "bf16",
         "status": "passed", "numbers": {"ratio": 0.8}},
        {"name": "fp16/x", "stage": "s", "subject": "pointwise [triton] eval", "precision": "fp16",
         "status": "failed", "numbers": {"ratio": 3.1}},
        {"name": "speed/y", "stage": "speed", "status": "passed",
         "numbers": {"case": "y", "eager_ms": 2.0, "r21d": {"r21d/triton bf16": 0.5, "r21d/cuda bf16": 1.0}}},
    ]}
    assert chart.write(tmp_path / "c.png", data) is None
    assert (tmp_path / "c.png").stat().st_size > 1000
    from r21d.bench.gpu_check.results import summary_table

    table = summary_table({**data, "stages": []})
    assert "3.10 x" in table and "0.80" in table


def test_build_step_builds_only_when_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(bootstrap, "newest_source", lambda: 100.0)
    so = tmp_path / "_C.so"
    so.write_text("")
    os.utime(so, (200.0, 200.0))
    fresh = {"torch": "2.11", "importable": True, "cuda": True, "nvcc": "/bin/nvcc", "loaded": True,
             "extension": [str(so)]}
    assert bootstrap.why_build(fresh) is None
    assert "not importable" in bootstrap.why_build({**fresh, "importable": False})
    assert "not loaded" in bootstrap.why_build({**fresh, "loaded": False, "extension": []})
    assert bootstrap.why_build({**fresh, "cuda": False, "loaded": False}) is None  # wiring only
    os.utime(so, (50.0, 50.0))
    assert "older" in bootstrap.why_build(fresh)


def test_makefile_target_runs_the_build_step_then_the_checker_with_out():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bgpu-check\b", text, re.M)
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/somewhere", "PYTHON=python9"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "python9 r21d/bench/gpu_check/bootstrap.py '/tmp/somewhere'" in out
    assert "python9 -m r21d.bench.gpu_check --out '/tmp/somewhere' --started-at" in out
    assert "venv" not in out  # no venv, no network on the GPU machine


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_check_environment_warm_and_bf16_accuracy(tmp_path, checker_env):
    code = cli.main(["--out", str(tmp_path), "--stages", "environment,warm,accuracy-bf16"])
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    failed = [(c["name"], c["error"]) for c in data["checks"] if c["status"] != "passed"]
    assert code == 0 and not failed, failed
