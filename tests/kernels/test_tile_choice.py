"""How a launch picks its tile configuration (triton_kernels/_tiles.py, _autotune.py): by a rule
of the shape alone by default, the same in every process; by timing only with R21D_AUTOTUNE=1,
remembered on disk and reused by later processes; never timed under deterministic algorithms
or during a CUDA-graph capture."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

from r21d.triton_kernels import _autotune, _launch, _tiles
from tests.utils import REPO_ROOT


def _config(m, n, warps=4):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=2)


CONFIGS = (_config(128, 128, 8), _config(128, 64), _config(64, 64), _config(64, 32))


def _grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


class FakeKernel:
    """Stands in for a JITFunction: records the meta-parameters each launch ran with."""

    __name__ = "fake_kernel"
    arg_names = ["x", "M", "N"]
    cache_key = "fake-source"

    def __init__(self):
        self.ran = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.ran.append(kwargs["BLOCK_M"] * 1000 + kwargs["BLOCK_N"])


def _choice(fn=None, arch=90):
    return _tiles.Choice(fn or FakeKernel(), CONFIGS, "16bit", arch, ("M", "N"))


def test_rule_takes_the_largest_tile_that_fills_a_wave():
    choice = _choice()
    # 4096 x 512: 128x128 gives 128 programs (< 132), 128x64 gives 256: the largest filling one
    assert _tiles.by_rule(choice, _grid(4096, 512), {}) is CONFIGS[1]
    assert _tiles.by_rule(choice, _grid(8192, 512), {}) is CONFIGS[0]  # 256 programs of 128x128
    # nothing fills a wave: the most programs; of equal counts the smallest tile
    assert _tiles.by_rule(choice, _grid(256, 64), {}) is CONFIGS[3]
    assert _tiles.by_rule(choice, _grid(64, 64), {}) is CONFIGS[3]
    # sm_80's wave is 108 programs: 128x128 on 4096 x 448 gives 32 x 4 = 128
    assert _tiles.by_rule(_choice(arch=80), _grid(4096, 448), {}) is CONFIGS[0]
    assert _tiles.by_rule(_choice(arch=90), _grid(4096, 448), {}) is CONFIGS[1]


def test_launch_runs_the_rules_choice_without_timing(monkeypatch):
    monkeypatch.delenv("R21D_AUTOTUNE", raising=False)
    monkeypatch.setattr(_autotune, "timer", lambda run: pytest.fail("timed by default"))
    fn = FakeKernel()
    _launch.launch(_choice(fn), _grid(8192, 512), None, 8192, 512)
    assert fn.ran == [128128]
    with _launch.capture() as launches:  # what a capture (warm-up, static report) records
        _launch.launch(_choice(fn), _grid(4096, 512), None, 4096, 512)
    assert launches[0].config == CONFIGS[1].all_kwargs() and fn.ran == [128128]


_SCRIPT = textwrap.dedent("""
    import json, sys, triton
    sys.path.insert(0, {root!r})
    from tests.kernels.test_tile_choice import FakeKernel, _choice, _grid
    from r21d.triton_kernels import _autotune, _launch
    timed = []
    def timer(run):  # 64x64 is the "fastest"
        run(); timed.append(1)
        return 1.0 if fn.ran[-1] == 64064 else 2.0
    _autotune.timer = timer
    fn = FakeKernel()
    _launch.launch(_choice(fn), _grid({M}, 512), None, {M}, 512)
    print(json.dumps({{"timed": len(timed), "ran": fn.ran[-1]}}))
""")


def _process(tmp_path, M, autotune):
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "R21D_AUTOTUNE": autotune, "R21D_AUTOTUNE_CACHE": str(tmp_path)}
    root = str(REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=root, M=M)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_choice_is_the_same_in_every_process(tmp_path):
    first, second = _process(tmp_path, 4096, "0"), _process(tmp_path, 4096, "")
    assert first == second == {"timed": 0, "ran": 128064}
    assert not list(tmp_path.iterdir())  # nothing remembered: nothing was timed


def test_autotune_is_remembered_on_disk_and_reused_by_another_process(tmp_path):
    assert _process(tmp_path, 4096, "1") == {"timed": 4, "ran": 64064}
    (path,) = tmp_path.glob("autotune-*.json")
    (entry,) = json.loads(path.read_text()).items()
    assert entry[0].startswith("fake_kernel|fake-source|16bit|sm90|M=4096,N=512")
    assert entry[1]["BLOCK_M"] == 64 and entry[1]["BLOCK_N"] == 64
    # a second process, another M of the same bucket (3000 -> 4096): reused, never timed
    assert _process(tmp_path, 3000, "1") == {"timed": 0, "ran": 64064}
    # another bucket is timed afresh and kept beside the first
    assert _process(tmp_path, 5000, "1")["timed"] == 4
    assert len(json.loads(path.read_text())) == 2


def test_deterministic_algorithms_never_time(monkeypatch, tmp_path):
    monkeypatch.setenv("R21D_AUTOTUNE", "1")
    monkeypatch.setenv("R21D_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(_autotune, "timer", lambda run: pytest.fail("timed under determinism"))
    fn = FakeKernel()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _launch.launch(_choice(fn), _grid(4096, 512), None, 4096, 512)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert fn.ran == [128064]  # the rule's


def test_tuning_during_cuda_graph_capture_names_warmup(monkeypatch, tmp_path):
    monkeypatch.setenv("R21D_AUTOTUNE", "1")
    monkeypatch.setenv("R21D_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(_autotune, "_device_name", lambda: "NVIDIA H100")
    fn = FakeKernel()
    with pytest.raises(RuntimeError, match=r"r21d\.warmup"):
        _launch.launch(_choice(fn), _grid(4096, 512), None, 4096, 512)
    assert fn.ran == []  # nothing launched into the capture


def test_buckets_round_up_to_powers_of_two():
    assert [_autotune.bucket(v) for v in (1, 2, 3, 100, 128, 129)] == [1, 2, 4, 128, 128, 256]
    assert _autotune.bucket(True) is True and _autotune.bucket(0) == 0


def test_remembered_choice_follows_every_size_the_grid_reads(monkeypatch):
    """Two launches with equal scalar arguments whose grids differ (a size only a tensor's shape
    carries, like the batch) each get the rule's own choice, whatever ran first."""
    monkeypatch.delenv("R21D_AUTOTUNE", raising=False)
    choice = _choice()

    def grid_of(x):  # the batch comes from x's shape, as in the (2+1)D unit's launcher
        return lambda meta: (x.shape[0] * triton.cdiv(512, meta["BLOCK_M"]) * triton.cdiv(512, meta["BLOCK_N"]),)

    small, large = torch.empty(1, 0), torch.empty(64, 0)
    for x in (small, large, small):
        _launch.launch(choice, grid_of(x), x, 512, 512)
    assert choice.fn.ran == [64032, 128128, 64032]
