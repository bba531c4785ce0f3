"""r21d.warmup: captures a model's step without running it, compiles one job per kernel
specialisation (the configuration each launch runs), and leaves the model as it was. Runs in a
process without TRITON_INTERPRET (interpreted kernels cannot be compiled); the compiles
themselves are stubbed here (the static report and make gpu-check compile real ones)."""

import json
import os
import subprocess
import sys
import textwrap

import r21d
from r21d.bench.narrow import narrow_r2plus1d_18

_SCRIPT = textwrap.dedent("""
    import collections, json, torch, r21d
    from r21d.bench.cpu_launch import triton_on_cpu
    from r21d.bench.narrow import narrow_r2plus1d_18
    from r21d.triton_kernels import _compile
    compiled = []
    _compile.compile_job = lambda job: compiled.append(_compile.job_key(job))
    out = {{}}
    for training in (False, True):
        torch.manual_seed(0)
        model = r21d.fuse(narrow_r2plus1d_18().train(training)).to(memory_format=torch.channels_last_3d)
        x = torch.randn(2, 3, 4, 16, 16).to(memory_format=torch.channels_last_3d)
        before = {{k: v.clone() for k, v in model.state_dict().items()}}
        compiled.clear()
        with r21d.use_backend("triton"), triton_on_cpu():
            report = r21d.warmup(model, x, training=training, arch=90, workers=2, progress=True)
        after = model.state_dict()
        out["train" if training else "eval"] = dict(
            kernels=collections.Counter(report.kernels), compiled=report.compiled,
            distinct_compiles=len(set(compiled)), calls=len(compiled), launches=report.launches,
            errors=report.errors, arch=report.arch,
            state_kept=all(torch.equal(before[k], after[k]) for k in before),
            grads_kept=all(p.grad is None for p in model.parameters()))
    print(json.dumps(out))
""")


def test_warmup_compiles_each_specialisation_once_and_keeps_the_model():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT.format()], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for mode in ("eval", "train"):
        r = result[mode]
        assert r["state_kept"] and r["grads_kept"], mode  # running stats, counters, grads
        assert r["errors"] == [] and r["arch"] == 90
        assert r["compiled"] == r["calls"] == r["distinct_compiles"] > 0  # each job once
        assert r["launches"] > r["compiled"]  # launches of one specialisation share a compile
    # eval: the narrow model's 17 (2+1)D units and 3 pointwise shortcuts, one launch each
    assert result["eval"]["launches"] == 20
    assert set(result["eval"]["kernels"]) == {"_unit_eval_kernel", "_pointwise_fwd_kernel"}
    assert {"_igemm_dgrad_kernel", "_igemm_wgrad_kernel"} <= set(result["train"]["kernels"])
    assert "compiled" in done.stderr  # the progress line


def test_warmup_in_the_interpreter_has_nothing_to_compile():
    model = r21d.fuse(narrow_r2plus1d_18().eval())
    report = r21d.warmup(model, __import__("torch").randn(1, 3, 4, 16, 16), progress=False)
    assert report.kernels == [] and report.launches == 0 and report.compiled == 0


_COUNT_SCRIPT = textwrap.dedent("""
    import json, torch, torchvision, r21d
    from r21d.bench.cpu_launch import triton_on_cpu
    from r21d.triton_kernels import _compile
    cl = torch.channels_last_3d

    def jobs(frames, training):
        torch.manual_seed(0)
        model = r21d.fuse(torchvision.models.video.r2plus1d_18().train(training))
        model = model.to(torch.bfloat16).to(memory_format=cl)
        x = torch.randn(16, 3, frames, 112, 112, dtype=torch.bfloat16).to(memory_format=cl)
        with r21d.use_backend("triton"), triton_on_cpu():
            launches = r21d.warmup.__globals__["_capture_step"](model, x, training)
        return {repr(_compile.job_key(j)) for j in _compile.launch_jobs(launches, 90)}

    train16 = jobs(16, True)
    print(json.dumps(dict(eval=len(jobs(16, False)), train=len(train16),
                          new_for_24_frames=len(jobs(24, True) - train16))))
""")


def test_r2plus1d_18_compiles_within_the_issue_targets():
    """What a first fused r2plus1d_18 step compiles (B16 bf16 112x112, sm_90; counted, not
    compiled): the eval forward at most 26 specialisations, a training step at most 80 (103 while
    frame counts and batch strides were specialised on divisibility, docs/kernels.md), and a
    24-frame training step after a 16-frame one at most 2 new ones (24 then)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COUNT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["eval"] <= 26 and counts["train"] <= 80, counts
    assert counts["new_for_24_frames"] <= 2, counts
