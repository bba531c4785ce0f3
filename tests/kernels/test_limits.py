"""The kernels' index and launch limits (r21d.triton_kernels._limits), checked without a GPU and
without allocating 2^31 elements: int32 row arithmetic at the boundary in the interpreter, the
guard in r21d.functional on shape-only (expanded) tensors, and every launcher's grid at the
boundary sizes with every GPU configuration (captured, not run).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import r21d
from r21d import functional
from r21d.backends import FusedKernelUnavailable
from r21d.triton_kernels import _launch
from r21d.triton_kernels import _limits as limits

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from r21d.triton_kernels import _common as cm  # noqa: E402  (imports Triton)


def test_check_grid_takes_cudas_limits():
    limits.check_grid("k", (limits.GRID_X_MAX, limits.GRID_YZ_MAX, limits.GRID_YZ_MAX))
    limits.check_grid("k", (1,))
    for grid in ((limits.GRID_X_MAX + 1,), (1, limits.GRID_YZ_MAX + 1), (1, 1, limits.GRID_YZ_MAX + 1)):
        with pytest.raises(limits.GridLimitError, match="exceeds CUDA's limits"):
            limits.check_grid("k", grid)


def test_launch_refuses_a_grid_past_the_limits_before_launching():
    launched = []

    class Kernel:
        __name__ = "_fake_kernel"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    with pytest.raises(limits.GridLimitError, match="_fake_kernel"):
        _launch.launch(Kernel(), lambda meta: (1, meta["N"]), N=limits.GRID_YZ_MAX + 1)
    assert launched == []
    _launch.launch(Kernel(), (1, limits.GRID_YZ_MAX), N=limits.GRID_YZ_MAX)
    assert launched == [(1, limits.GRID_YZ_MAX)]


def _block_sizes(tuned: _launch.Tuned):
    tables = [tuned.configs, *tuned.arch_configs.values()]
    configs = [c.all_kwargs() for table in tables for variant in table.values() for c in variant]
    interpret = tuned.interpret.values() if all(isinstance(v, dict) for v in tuned.interpret.values()) \
        else [tuned.interpret]
    return [v for cfg in (*configs, *interpret) for k, v in cfg.items() if k.startswith("BLOCK")]


def test_row_overshoot_covers_every_tile():
    """A tile or a loop step reaches at most ROW_OVERSHOOT rows past a valid row: no block size of
    any kernel configuration (nor the memory-bound passes' row blocks) is larger."""
    import importlib

    from r21d.static import KERNEL_MODULES
    from r21d.triton_kernels import batchnorm

    tuned = [v for name in KERNEL_MODULES
             for v in vars(importlib.import_module(f"r21d.triton_kernels.{name}")).values()
             if isinstance(v, _launch.Tuned)]
    assert len(tuned) >= 9
    blocks = [b for t in tuned for b in _block_sizes(t)]
    blocks += [batchnorm._elementwise_blocks(c, cl)[0] for c in (1, 3, 64, 4096) for cl in (True, False)]
    assert max(blocks) <= limits.ROW_OVERSHOOT


@triton.jit
def _split_end_kernel(out_ptr, start, length, total):
    tl.store(out_ptr, cm.split_end(start, length, total))


def test_split_end_stays_below_2_31():
    """The end of a weight-gradient split near 2^31 rows: start + length would wrap negative in
    int32 (and let no row, or every row, through the loop's ``rows < end`` mask)."""
    out = torch.empty(1, dtype=torch.int32)
    start, length = limits.MAX_ROWS - 100, 2**30
    _split_end_kernel[(1,)](out, start, length, limits.MAX_ROWS)
    assert int(out) == limits.MAX_ROWS
    assert (start + length) > limits.INT32_MAX  # what the old ``min(start + length, total)`` wrapped
    _split_end_kernel[(1,)](out, 0, 1000, limits.MAX_ROWS)
    assert int(out) == 1000


def _shape_only(*shape):
    """A float32 tensor of ``shape`` that allocates one element (the guard reads only shapes)."""
    return torch.zeros((1,) * len(shape)).expand(*shape)


def test_functional_refuses_more_rows_than_the_int32_guard(strict):
    weight = torch.randn(4, 2, 1, 1, 1)
    rm, rv = torch.zeros(4), torch.ones(4)
    fits = _shape_only(limits.MAX_ROWS // 2, 2, 2, 1, 1)  # MAX_ROWS is even: exactly MAX_ROWS rows
    with r21d.use_backend("triton"):
        assert functional.plan(fits, weight, running_mean=rm, running_var=rv).backend == "triton"
        too_many = _shape_only(limits.MAX_ROWS // 2 + 1, 2, 2, 1, 1)
        with pytest.raises(FusedKernelUnavailable, match="32-bit row index"):
            functional.plan(too_many, weight, running_mean=rm, running_var=rv)


def test_functional_refuses_more_channels_than_the_grid(strict):
    x = torch.randn(1, 1, 2, 2, 2)
    rm, rv = torch.zeros(limits.MAX_CHANNELS + 1), torch.ones(limits.MAX_CHANNELS + 1)
    with r21d.use_backend("triton"):
        ok = functional.plan(x, torch.randn(limits.MAX_CHANNELS, 1, 1, 1, 1),
                             running_mean=rm[1:], running_var=rv[1:])
        assert ok.backend == "triton"
        with pytest.raises(FusedKernelUnavailable, match="launch grid"):
            functional.plan(x, torch.randn(limits.MAX_CHANNELS + 1, 1, 1, 1, 1), running_mean=rm,
                            running_var=rv)


# Every launcher at the sizes that reach the grid limits, with Triton's real (GPU) kernels and
# every autotuning configuration: _launch.launch checks each grid, also when captured.
BOUNDARY_LAUNCHES = textwrap.dedent("""
    import torch
    from r21d.triton_kernels import (_launch, _limits, conv2plus1d, depthwise, depthwise_bwd,
                                     implicit_gemm, implicit_gemm_bwd, pointwise)

    def randn(*shape, cl=False):
        t = torch.randn(*shape)
        return t.contiguous(memory_format=torch.channels_last_3d) if cl else t

    def bn(c):
        return torch.rand(c) + 0.5, torch.randn(c), torch.randn(c), torch.rand(c) + 0.5

    C = _limits.MAX_CHANNELS
    NEEDS = (True, True, False, True, True, False)  # dx, dw, dbn_weight, dbn_bias (no bias, no residual)
    with _launch.capture() as launches:
        # the eval unit with more images than grid y or z could hold
        n = _limits.GRID_YZ_MAX + 10
        conv2plus1d.unit_eval(randn(n, 2, 1, 1, 1, cl=True), randn(2, 2, 1, 1, 1), None, *bn(2),
                              1e-5, randn(2, 2, 1, 1, 1), None, *bn(2), 1e-5, None, (1, 1),
                              (0, 0), 1, 0, "relu")
        # depthwise with the most channels, NCDHW (the narrowest channel blocks) and cl3d
        for cl in (False, True):
            x = randn(1, C, 1, 2, 2, cl=cl)
            out = depthwise.conv_bn_act_fwd(x, randn(C, 1, 1, 1, 1), None, *bn(C), None, (1, 1, 1),
                                            (0, 0, 0), (1, 1, 1), True, 0.1, 1e-5, "relu", True)
            depthwise_bwd.conv_bn_act_bwd(randn(*x.shape, cl=cl), x, randn(C, 1, 1, 1, 1), None,
                                          out[1], out[2], out[3], *bn(C)[:2], None, (1, 1, 1),
                                          (0, 0, 0), (1, 1, 1), True, "relu", NEEDS)
        # the most groups, and a pointwise conv with the most output channels, in training
        g = _limits.GRID_YZ_MAX
        x = randn(1, g, 3, 1, 1, cl=True)
        w = randn(2 * g, 1, 3, 1, 1, cl=True)
        out = implicit_gemm.conv_bn_act_fwd(x, w, None, *bn(2 * g), None, (1, 1, 1), (1, 0, 0),
                                            (1, 1, 1), True, 0.1, 1e-5, "relu", True)
        implicit_gemm_bwd.conv_bn_act_bwd(randn(*out[0].shape, cl=True), x, w, None, out[1],
                                          out[2], out[3], *bn(2 * g)[:2], None, (1, 1, 1),
                                          (1, 0, 0), (1, 1, 1), True, "relu", NEEDS)
        x = randn(2, 1, 1, 2, 2, cl=True)
        out = pointwise.conv_bn_act_fwd(x, randn(C, 1, 1, 1, 1), None, *bn(C), None, (1, 1, 1),
                                        (0, 0, 0), True, 0.1, 1e-5, "relu", True)
        pointwise.conv_bn_act_bwd(randn(*out[0].shape, cl=True), x, randn(C, 1, 1, 1, 1), None,
                                  out[1], out[2], out[3], *bn(C)[:2], None, (1, 1, 1), (0, 0, 0),
                                  True, "relu", NEEDS)
    kernels = sorted({_launch.kernel_name(launch.kernel) for launch in launches})
    print(len(launches), " ".join(kernels))
""")


def test_every_launch_grid_fits_at_the_limits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "R21D_AUTOTUNE")}
    script = tmp_path / "boundary.py"
    script.write_text(BOUNDARY_LAUNCHES)
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    count, *kernels = done.stdout.split()
    assert int(count) >= 20
    assert {"_unit_eval_kernel", "_depthwise_fwd_kernel", "_depthwise_bwd_kernel",
            "_igemm_fwd_kernel", "_igemm_dgrad_kernel", "_igemm_wgrad_kernel",
            "_pointwise_fwd_kernel", "_pointwise_dgrad_kernel", "_pointwise_wgrad_kernel",
            "_bn_act_normalize_kernel", "_bn_act_bwd_reduce_kernel",
            "_bn_stats_finalize_kernel", "_bn_bwd_finalize_kernel"} <= set(kernels)
