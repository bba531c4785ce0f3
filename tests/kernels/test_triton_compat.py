"""What keeps the kernels running on every supported Triton (3.6-3.9) and NumPy (README:
Platforms): masks the 3.9 interpreter takes, the Triton 3.6 + NumPy 2.4 interpreter pair refused
at import with what to do, and FP fusion set on every launch instead of left to Triton's default
(which 3.10 turns off). ``make test-oldest`` runs these, the static report and an interpreter
subset of every family under the oldest supported pair (torch 2.11 + Triton 3.6)."""

import numpy
import pytest
import torch

from r21d import _compat
from r21d.triton_kernels import _launch

interpreted = pytest.mark.skipif(not _launch.interpreted(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.6", True),
    ("3.7.1", "2.4.0", True),
    ("3.6.0", "2.3.5", False),
    ("3.6.0", "1.26.4", False),
    ("3.8.0", "2.4.6", False),
    ("3.9.0+git1a2b3c", "2.5.0", False),
    (None, "2.4.6", False),  # Triton's version unknown: nothing to say
])
def test_interpreter_pairs(triton_version, numpy_version, refused):
    problem = _compat.interpreter_problem(triton_version, numpy_version, interpreted=True)
    assert (problem is not None) == refused
    if refused:
        assert "numpy<2.4" in problem and triton_version in problem
    # compiled kernels (no TRITON_INTERPRET) run with any NumPy
    assert _compat.interpreter_problem(triton_version, numpy_version, interpreted=False) is None


def test_import_refuses_triton_36_interpreter_with_numpy_24(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_compat, "_triton_version", lambda: "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    with pytest.raises(ImportError, match=r"numpy<2\.4"):
        _compat.check_interpreter()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _compat.check_interpreter()  # not interpreting: fine


def test_this_environment_is_a_supported_pair():
    assert _compat.interpreter_problem(_compat._triton_version(), numpy.__version__, True) is None


def test_every_launch_sets_fp_fusion():
    """enable_fp_fusion is a launch option, so the static report (which compiles the captured
    launches) compiles with the setting the GPU runs."""
    from r21d.triton_kernels import pointwise

    x = torch.randn(1, 8, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(16, 8, 1, 1, 1)
    vec = torch.randn(16)
    with _launch.capture() as launches:
        pointwise.conv_bn_act_fwd(x, w, None, vec, vec, vec, vec.abs() + 1, None, (1, 1, 1),
                                  (0, 0, 0), training=True, momentum=0.1, eps=1e-5,
                                  activation="relu", save=True)
    assert launches
    assert all(launch.kwargs["enable_fp_fusion"] is _launch.FP_FUSION is True for launch in launches)


if _launch.interpreted():
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_copy_kernel(x_ptr, y_ptr, n, t, T, SELECT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        pmask = offs < n
        ok_t = (t >= 0) & (t < T)  # a scalar condition
        if SELECT:
            ok = tl.where(ok_t, pmask, False)  # what the kernels do
        else:
            ok = pmask & ok_t  # an int32 mask in the interpreter; 3.9 refuses it
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=ok, other=0.0), mask=pmask)


@interpreted
def test_interpreter_refuses_a_scalar_condition_anded_into_a_block_mask():
    """tests/strict_interpreter.py (installed by conftest) makes every Triton's interpreter refuse
    a non-bool mask as 3.9's does, so the pattern fails the interpreter tests on 3.6 and 3.8 too."""
    x = torch.randn(16)
    y = torch.zeros(16)
    with pytest.raises(Exception, match="mask has unsupported dtype"):
        _masked_copy_kernel[(1,)](x, y, 10, 1, 4, SELECT=False, BLOCK=16)
    _masked_copy_kernel[(1,)](x, y, 10, 1, 4, SELECT=True, BLOCK=16)
    assert torch.equal(y[:10], x[:10]) and not y[10:].any()
    _masked_copy_kernel[(1,)](x, y, 10, 5, 4, SELECT=True, BLOCK=16)  # t outside: nothing read
    assert not y.any()
