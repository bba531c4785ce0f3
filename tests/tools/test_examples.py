"""examples/finetune_r2plus1d.py runs: in this process, and with torchrun as two
DistributedDataParallel processes on gloo (CPU, the torch backend: tiny clips)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.utils import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "finetune_r2plus1d.py"
TINY = ["--frames", "4", "--size", "32", "--clips", "8", "--batch-size", "2", "--classes", "3",
        "--device", "cpu"]


def _example():
    spec = importlib.util.spec_from_file_location("finetune_r2plus1d", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_clips_are_learnable_and_reproducible():
    clips = _example().SyntheticClips(num_clips=6, num_classes=2, frames=2, size=4, seed=1)
    (a, la), (b, lb) = clips[0], clips[0]
    assert torch.equal(a, b) and la == lb and a.shape == (3, 2, 4, 4)
    assert not torch.equal(clips[0][0], clips[1][0])  # fresh noise per clip
    # a clip is nearer its own class's pattern than the other's
    for clip, label in (clips[i] for i in range(len(clips))):
        d = [(clip - p).norm() for p in clips.patterns]
        assert d[label] < d[1 - label]


def test_finetune_one_process_saves_a_torchvision_checkpoint(tmp_path, capsys):
    video = pytest.importorskip("torchvision.models.video")
    ckpt = tmp_path / "ft.pt"
    loss = _example().main(TINY + ["--epochs", "2", "--backend", "torch", "--save", str(ckpt)])
    assert loss == loss and loss > 0  # finite
    out, err = capsys.readouterr()
    assert "fused sites" in out and "1 process(es) on cpu" in out
    assert "epoch 2: mean loss" in out
    assert "epoch 1/2 [" in err and "4/4" in err  # the progress bar: 8 clips / batch 2
    plain = video.r2plus1d_18(num_classes=3)
    plain.load_state_dict(torch.load(ckpt))  # torchvision's keys, strict


def test_finetune_under_torchrun_with_ddp_on_gloo(tmp_path):
    pytest.importorskip("torchvision")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R21D_BACKEND": "torch"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(EXAMPLE), *TINY, "--epochs", "1", "--backend", "torch",
           "--save", str(tmp_path / "ddp.pt")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 process(es) on cpu" in done.stdout and "epoch 1: mean loss" in done.stdout
    assert "2/2" in done.stderr  # each process: 4 of the 8 clips, batch 2
    assert (tmp_path / "ddp.pt").exists()
