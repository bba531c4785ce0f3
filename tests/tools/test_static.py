"""The static report (docs/testing.md, "Speed without a GPU"): every Triton kernel configuration
compiled ahead of time for sm_90, without a GPU, and read with cuobjdump: no spills anywhere,
shared memory within the limit, and Hopper tensor cores (HGMMA) in every GEMM with fp16 / bf16 /
TF32 operands.

The report runs in a subprocess with TRITON_INTERPRET removed: this process has it set (conftest),
and kernels decorated under the interpreter cannot be compiled. sm_90 only, to keep CI time down
(2 cores: about 4 minutes with a cold Triton cache when no kernel spills -- ptxas is several
times slower on spilling kernels -- and seconds with a warm one); ``make static`` reports sm_80 too.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

POINTWISE_GEMMS = {"_pointwise_fwd_kernel", "_pointwise_dgrad_kernel", "_pointwise_wgrad_kernel"}
POINTWISE_MEMORY_BOUND = {"_bn_act_normalize_kernel", "_bn_act_bwd_reduce_kernel",
                          "_bn_stats_finalize_kernel", "_bn_bwd_finalize_kernel",
                          "_sum_splits_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static")
    path = tmp / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd outside the repository: r21d is imported as installed (r21d.triton_kernels included)
    proc = subprocess.run(
        [sys.executable, "-m", "r21d.static", "--check", "--archs", "90", "--json", str(path)],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=1800,
    )
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    return proc, (json.loads(path.read_text()) if path.exists() else None), failures


def test_report_passes(report):
    proc, data, failures = report
    assert data is not None, f"no JSON written:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, "static rules failed:\n" + "\n".join(failures[:60]) + \
        f"\n({len(failures)} failures)\n{proc.stderr[-2000:]}"


def test_no_spills(report):
    _, data, _ = report
    assert data is not None
    spilling = [f"{r['kernel']} {r['config']} w{r['num_warps']} s{r['num_stages']} {r['dtypes']} "
                f"{r['layouts']} {r['cases']}: LOCAL={r['local']} STACK={r['stack']}"
                for r in data["rows"] if r["local"] or r["stack"] or r["error"]]
    assert not spilling, f"{len(spilling)} configs spill or fail to compile:\n" + "\n".join(spilling)


def test_hopper_tensor_cores(report):
    _, data, _ = report
    assert data is not None
    rows = [r for r in data["rows"] if r["arch"] == 90 and r["gemm"]]
    assert rows
    tc = [r for r in rows if r["tensor_core_operands"]]
    # fp16, bf16 and TF32 operands all reach the tensor-core rule
    assert {"bf16", "fp16", "fp32-tf32"} <= {d for r in tc for d in r["dtypes"]}
    missing = [f"{r['kernel']} {r['config']} {r['dtypes']} {r['layouts']}" for r in tc if r["hgmma"] < 1]
    assert not missing, "no HGMMA in:\n" + "\n".join(missing)
    # IEEE fp32 dots are reported, not required to use tensor cores
    assert all(not r["tensor_core_operands"] for r in rows if r["dtypes"] == ["fp32-ieee"])


def test_pointwise_family_covered(report):
    _, data, _ = report
    assert data is not None
    pointwise = [r for r in data["rows"] if "pointwise" in r["family"].split(",")]
    gemms = {r["kernel"] for r in pointwise if r["gemm"]}
    assert gemms == POINTWISE_GEMMS
    assert POINTWISE_MEMORY_BOUND <= {r["kernel"] for r in pointwise if not r["gemm"]}
    assert data["uncovered"] == [], "kernels no static case launches"
    for kernel in POINTWISE_GEMMS:  # every dtype and layout compiled
        rows = [r for r in pointwise if r["kernel"] == kernel]
        assert {d for r in rows for d in r["dtypes"]} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee"}
        assert {lay for r in rows for lay in r["layouts"]} == {"cl3d", "cl3d-odd"}


def test_depthwise_family_covered_and_vectorised(report):
    _, data, _ = report
    assert data is not None
    rows = [r for r in data["rows"] if "depthwise" in r["family"].split(",")]
    assert {"_depthwise_fwd_kernel", "_depthwise_bwd_kernel"} <= {r["kernel"] for r in rows}
    for kernel in ("_depthwise_fwd_kernel", "_depthwise_bwd_kernel"):
        mine = [r for r in rows if r["kernel"] == kernel]
        assert {d for r in mine for d in r["dtypes"]} == {"bf16", "fp16", "fp32"}
        assert {lay for r in mine for lay in r["layouts"]} == {"dw-cl3d", "dw-cl3d-odd", "dw-ncdhw"}
        # 16-byte aligned channels_last_3d rows: every configuration moves 128-bit vectors
        aligned = [r for r in mine if r["layouts"] == ["dw-cl3d"]]
        assert aligned and all(r["ldg128"] > 0 for r in aligned), kernel


IMPLICIT_GEMMS = {"_igemm_fwd_kernel", "_igemm_dgrad_kernel", "_igemm_wgrad_kernel"}


def test_implicit_gemm_family_covered(report):
    """Every implicit-GEMM kernel in every dtype, both channel classes and the flat (3-channel)
    K loop, with HGMMA on sm_90 (test_hopper_tensor_cores) and no spills (test_no_spills)."""
    _, data, _ = report
    assert data is not None
    rows = [r for r in data["rows"] if "implicit_gemm" in r["family"].split(",")]
    assert {r["kernel"] for r in rows if r["gemm"]} == IMPLICIT_GEMMS
    for kernel in IMPLICIT_GEMMS:
        mine = [r for r in rows if r["kernel"] == kernel]
        assert {d for r in mine for d in r["dtypes"]} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee"}
        assert {lay for r in mine for lay in r["layouts"]} == {"ig-cl3d", "ig-cl3d-odd", "ig-stem"}
        flat = {r["constexprs"].get("FLAT_K") for r in mine}
        assert kernel == "_igemm_dgrad_kernel" or flat == {True, False}
        assert {r["constexprs"]["GROUPED"] for r in mine} == {True, False}


def test_conv2plus1d_unit_covered_with_both_gemm_stages_on_hgmma(report):
    """The eval-mode (2+1)D unit in every dtype, aligned and unaligned rows, one and two frames
    per step (temporal stride 1 and 2). On sm_90 both GEMM stages are wgmma: one HGMMA per
    k-step of the spatial dot (BLOCK_K; unrolled once per frame of a step, ST) and of each of the
    3 temporal taps' dots (BLOCK_MID), k-steps of 16 (16-bit) or 8 (TF32) elements; a stage left
    on HMMA or FMA would lower the count."""
    _, data, _ = report
    assert data is not None
    rows = [r for r in data["rows"] if r["family"] == "conv2plus1d" and r["kernel"] == "_unit_eval_kernel"]
    assert rows
    assert {d for r in rows for d in r["dtypes"]} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee"}
    assert {lay for r in rows for lay in r["layouts"]} == {"unit-cl3d", "unit-cl3d-s2", "unit-stem"}
    assert {r["constexprs"]["ST"] for r in rows} == {1, 2}
    assert {r["constexprs"]["HAS_RES"] for r in rows} == {True, False}
    for r in rows:
        if r["arch"] != 90 or r["dtypes"] == ["fp32-ieee"]:
            continue
        k_step = 8 if r["dtypes"] == ["fp32-tf32"] else 16
        cx = r["constexprs"]
        want = (cx["ST"] * cx["BLOCK_K"] + 3 * cx["BLOCK_MID"]) // k_step
        assert r["hgmma"] == want, (r["dtypes"], r["layouts"], r["config"], r["hgmma"], want)


def test_training_unit_prologue_kernels_covered_on_hgmma(report):
    """The training (2+1)D unit: the temporal conv's forward and wgrad with the BN1 + ReLU
    prologue (PRE) compile, in every dtype, and stay on wgmma on sm_90 (the rules check spills)."""
    _, data, _ = report
    rows = [r for r in data["rows"] if r["family"] == "conv2plus1d" and r["constexprs"].get("PRE")]
    assert {r["kernel"] for r in rows} == {"_igemm_fwd_kernel", "_igemm_wgrad_kernel"}
    assert {d for r in rows for d in r["dtypes"]} == {"bf16", "fp16", "fp32-tf32", "fp32-ieee"}
    for r in rows:
        if r["arch"] == 90 and r["dtypes"] != ["fp32-ieee"]:
            assert r["hgmma"] > 0, (r["kernel"], r["dtypes"], r["layouts"], r["config"])


def test_tf32_kernels_round_their_operands(report):
    """Every GEMM with TF32 operands rounds them to TF32 (PTX cvt.rna.tf32.f32) before the tensor
    cores read them, which would truncate instead (cuDNN rounds); no other kernel rounds."""
    _, data, _ = report
    assert data is not None
    tf32 = [r for r in data["rows"] if r["gemm"] and r["dtypes"] == ["fp32-tf32"]]
    assert {r["kernel"] for r in tf32} >= IMPLICIT_GEMMS | POINTWISE_GEMMS | {"_unit_eval_kernel"}
    unrounded = [f"{r['kernel']} {r['config']} {r['layouts']}" for r in tf32 if r["tf32_round"] == 0]
    assert not unrounded, "TF32 operands truncated by the tensor cores in:\n" + "\n".join(unrounded)
    others = [f"{r['kernel']} {r['dtypes']}" for r in data["rows"]
              if r["tf32_round"] and r["dtypes"] != ["fp32-tf32"]]
    assert not others, others
