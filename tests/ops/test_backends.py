"""Backend selection (docs/architecture.md, Backends): names, precedence, fallback warning, strict mode."""

import warnings

import pytest
import torch

import r21d
from r21d import dispatch

POINTWISE_CPU = dispatch.FusedConfig(
    family="pointwise", kernel_size=(1, 1, 1), stride=(1, 1, 1), padding=(0, 0, 0),
    dilation=(1, 1, 1), groups=1, dtype=torch.float32, device_type="cpu", training=False,
    activation="relu", residual=False)


def test_default_is_auto_and_torch_always_available():
    assert r21d.get_backend() == "auto"
    assert "torch" in r21d.available_backends()


def test_triton_available_in_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA
    assert "triton" in r21d.available_backends()


@pytest.mark.parametrize("bad", ["cudnn", "", "Torchx", None, 3])
def test_unknown_backend_is_rejected(bad):
    with pytest.raises(ValueError, match="unknown r21d backend"):
        r21d.set_backend(bad)
    with pytest.raises(ValueError, match="unknown r21d backend"):
        with r21d.use_backend(bad):
            pass


def test_precedence_context_over_process_over_env(monkeypatch):
    monkeypatch.setenv("R21D_BACKEND", "triton")
    assert r21d.get_backend() == "triton"
    r21d.set_backend("torch")
    assert r21d.get_backend() == "torch"
    with r21d.use_backend("cuda"):
        assert r21d.get_backend() == "cuda"
        with r21d.use_backend("auto"):
            assert r21d.get_backend() == "auto"
        assert r21d.get_backend() == "cuda"
    assert r21d.get_backend() == "torch"


def test_env_variable_is_validated(monkeypatch):
    monkeypatch.setenv("R21D_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="unknown r21d backend 'tritonn'"):
        r21d.get_backend()


def test_auto_on_cpu_is_torch():
    assert dispatch.choose(POINTWISE_CPU) == "torch"


def test_auto_on_gpu_uses_triton_where_it_has_a_kernel_and_torch_silently_elsewhere(strict, monkeypatch):
    gpu = POINTWISE_CPU.__class__(**{**POINTWISE_CPU.__dict__, "device_type": "cuda"})
    assert dispatch.resolve(gpu) == ("triton", None)
    dense = gpu.__class__(**{**gpu.__dict__, "family": "dense", "kernel_size": (3, 3, 3)})
    assert dispatch.resolve(dense) == ("triton", None)
    # a family no fused backend has a kernel for
    monkeypatch.delitem(r21d.ops.FUSED_CALLS, ("triton", "dense"))
    assert dispatch.choose(dense) == "torch"  # no warning, and no error even in strict mode
    fp64 = gpu.__class__(**{**gpu.__dict__, "dtype": torch.float64})
    with pytest.raises(r21d.FusedKernelUnavailable, match="not torch.float64"):
        dispatch.choose(fp64)  # a pointwise configuration the kernel cannot run: a fallback


def test_explicit_triton_runs_supported_config():
    with r21d.use_backend("triton"):
        assert dispatch.choose(POINTWISE_CPU) == "triton"


def test_fallback_warns_once_per_configuration():
    dense = POINTWISE_CPU.__class__(**{**POINTWISE_CPU.__dict__, "family": "dense", "kernel_size": (3, 3, 3),
                                       "dtype": torch.float64})
    with r21d.use_backend("triton"):
        with pytest.warns(r21d.FallbackWarning, match="not torch.float64"):
            assert dispatch.choose(dense) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dispatch.choose(dense) == "torch"  # same configuration: silent
        other = dense.__class__(**{**dense.__dict__, "training": True})
        with pytest.warns(r21d.FallbackWarning):
            dispatch.choose(other)


def test_strict_mode_raises_instead_of_falling_back(strict):
    bf16 = POINTWISE_CPU.__class__(**{**POINTWISE_CPU.__dict__, "dtype": torch.bfloat16})
    with r21d.use_backend("triton"):
        with pytest.raises(r21d.FusedKernelUnavailable, match="no bf16 arithmetic"):
            dispatch.choose(bf16)


def test_cuda_backend_without_kernels_falls_back(strict):
    with r21d.use_backend("cuda"):
        with pytest.raises(r21d.FusedKernelUnavailable, match="cuda backend has no pointwise kernel"):
            dispatch.choose(POINTWISE_CPU)


def test_torch_backend_never_warns(strict):
    dense = POINTWISE_CPU.__class__(**{**POINTWISE_CPU.__dict__, "family": "dense"})
    with r21d.use_backend("torch"):
        assert dispatch.choose(dense) == "torch"
