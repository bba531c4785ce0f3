"""r21d.dispatch on its own: the conv-family classification, what each backend refuses and why
(the family limits of triton_kernels/_limits.py at their boundaries, the device checks, the csrc
ops), how ``resolve`` orders backends and treats a caller's blocker, what ``choose`` does with a
refusal under R21D_STRICT, and the (2+1)D unit's geometry and training checks.

Pure Python: configurations are described, never run, so a "cuda" configuration is checked on a
machine without a GPU. Covered elsewhere, not repeated here: backend names and precedence, the
once-per-configuration warning and the families of r2plus1d's convs (tests/ops/test_backends.py),
one grouped configuration past the groups limit (tests/kernels/test_implicit_gemm.py), the unit's
fallback at run time (tests/kernels/test_conv2plus1d.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import r21d
from r21d import auto_choices, dispatch
from r21d.triton_kernels._limits import (
    DEPTHWISE_MAX_DILATION,
    DEPTHWISE_MAX_KERNEL,
    GRID_YZ_MAX,
    UNIT_MAX_OPEN_FRAMES,
)

# A configuration every fused backend's checks pass on a GPU (the triton backend also on the CPU,
# in the interpreter the tests run under).
DEPTHWISE = dispatch.FusedConfig(
    family="depthwise", kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1),
    dilation=(1, 1, 1), groups=8, dtype=torch.float32, device_type="cuda", training=False,
    activation="relu", residual=False)


def cfg(**changes) -> dispatch.FusedConfig:
    return dataclasses.replace(DEPTHWISE, **changes)


def dense(**changes) -> dispatch.FusedConfig:
    return cfg(**{"family": "dense", "groups": 1, **changes})


def spatial(**changes) -> dispatch.FusedConfig:
    """The spatial half of a (2+1)D unit: 1x3x3, padded in space only."""
    return cfg(**{"family": "spatial", "kernel_size": (1, 3, 3), "padding": (0, 1, 1), "groups": 1,
                  **changes})


def temporal(**changes) -> dispatch.FusedConfig:
    """The temporal half of a (2+1)D unit: 3x1x1, padded in time only."""
    return cfg(**{"family": "temporal", "kernel_size": (3, 1, 1), "padding": (1, 0, 0),
                  "groups": 1, **changes})


# ---------------------------------------------------------------------------- conv_family
@pytest.mark.parametrize("kernel,groups,cin,cout,family", [
    # r2plus1d's, r3d's and X3D's convs
    ((1, 1, 1), 1, 64, 256, "pointwise"),
    ((3, 3, 3), 64, 64, 64, "depthwise"),
    ((1, 1, 1), 64, 64, 64, "depthwise"),
    ((3, 3, 3), 4, 64, 64, "grouped"),
    ((1, 3, 3), 1, 64, 144, "spatial"),
    ((3, 1, 1), 1, 144, 64, "temporal"),
    ((3, 7, 7), 1, 3, 64, "dense"),
    # edges
    ((3, 3, 3), 4, 4, 8, "grouped"),  # a depthwise multiplier is no depthwise kernel's problem
    ((3, 3, 3), 4, 8, 4, "grouped"),
    ((1, 1, 1), 2, 8, 8, "grouped"),  # grouped 1x1x1 is not pointwise
    ((1, 1, 1), 1, 1, 1, "pointwise"),  # one channel, one group: not depthwise
    ((3, 3, 3), 1, 1, 1, "dense"),
    ((1, 3, 1), 1, 4, 6, "spatial"),
    ((1, 1, 5), 1, 4, 6, "spatial"),
    ((2, 1, 1), 1, 4, 6, "temporal"),
    ((3, 1, 3), 1, 4, 6, "dense"),
    ((3, 3, 1), 1, 4, 6, "dense"),
])
def test_conv_family(kernel, groups, cin, cout, family):
    """Groups decide first, then the kernel's shape; depthwise needs groups == C_in == C_out."""
    assert dispatch.conv_family(kernel, groups, cin, cout) == family


def test_config_is_frozen_and_describes_itself():
    c = cfg(dtype=torch.float16, training=True, residual=True, sync_stats=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.family = "dense"
    assert hash(c) == hash(cfg(dtype=torch.float16, training=True, residual=True, sync_stats=True))
    text = c.describe()
    for part in ("depthwise 3x3x3", "groups=8", "float16 cuda train", "act=relu",
                 "residual=True", "sync-bn"):
        assert part in text, text
    assert "eval" in DEPTHWISE.describe() and "sync-bn" not in DEPTHWISE.describe()


# ---------------------------------------------------------------------------- unsupported_reason
def test_supported_configurations_have_no_reason():
    for c in (DEPTHWISE, dense(kernel_size=(3, 3, 3)), spatial(), temporal(),
              cfg(family="pointwise", kernel_size=(1, 1, 1), padding=(0, 0, 0), groups=1),
              cfg(family="grouped", groups=2, dtype=torch.bfloat16, training=True)):
        assert dispatch.unsupported_reason("triton", c) is None, c.describe()


def test_a_family_the_backend_has_no_kernel_for():
    assert dispatch.unsupported_reason("cuda", dense()) == "the cuda backend has no dense kernel yet"
    assert dispatch.unsupported_reason("triton", cfg(family="conv7d")) == \
        "the triton backend has no conv7d kernel yet"


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.complex64])
def test_dtypes_other_than_the_16_bit_and_fp32_floats(dtype):
    assert dispatch.unsupported_reason("triton", cfg(dtype=dtype)) == \
        f"fused kernels take float16, bfloat16 or float32, not {dtype}"


def test_depthwise_limits_at_their_boundaries():
    """The limits come from _limits.py: the largest value passes, one more is refused with it."""
    k = DEPTHWISE_MAX_KERNEL
    assert dispatch.unsupported_reason("triton", cfg(kernel_size=(1, k, k))) is None
    assert f"kernel sizes up to {k}" in dispatch.unsupported_reason("triton", cfg(kernel_size=(1, 1, k + 1)))
    d = DEPTHWISE_MAX_DILATION
    assert dispatch.unsupported_reason("triton", cfg(dilation=(d, 1, d))) is None
    assert f"dilations up to {d}" in dispatch.unsupported_reason("triton", cfg(dilation=(1, d + 1, 1)))
    assert dispatch.unsupported_reason("triton", cfg(stride=(2, 1, 2))) is None
    assert "strides 1 or 2" in dispatch.unsupported_reason("triton", cfg(stride=(1, 3, 1)))
    # the csrc depthwise kernels are held to the same geometry
    assert f"kernel sizes up to {k}" in dispatch.unsupported_reason("cuda", cfg(kernel_size=(k + 1, 1, 1)))


@pytest.mark.parametrize("family", dispatch.IMPLICIT_GEMM_FAMILIES)
def test_implicit_gemm_grid_limits_at_their_boundaries(family):
    """Groups and stride residue classes go on grid axes of at most GRID_YZ_MAX programs."""
    assert dispatch.IMPLICIT_GEMM_MAX_GRID == GRID_YZ_MAX
    assert dispatch.unsupported_reason("triton", dense(family=family, groups=GRID_YZ_MAX)) is None
    assert f"at most {GRID_YZ_MAX} groups, got {GRID_YZ_MAX + 1}" in dispatch.unsupported_reason(
        "triton", dense(family=family, groups=GRID_YZ_MAX + 1))
    assert dispatch.unsupported_reason("triton", dense(family=family, stride=(1, 1, GRID_YZ_MAX))) is None
    assert "strides whose product" in dispatch.unsupported_reason(
        "triton", dense(family=family, stride=(2, 1, (GRID_YZ_MAX + 1) // 2)))


def test_geometry_is_refused_before_the_device():
    """A configuration wrong twice names its geometry, whatever the device could do."""
    bad = cfg(kernel_size=(9, 9, 9), device_type="mps")
    assert "kernel sizes up to" in dispatch.unsupported_reason("triton", bad)


def test_triton_device_checks(monkeypatch):
    assert dispatch.unsupported_reason("triton", cfg(device_type="cpu")) is None  # interpreter
    assert dispatch.unsupported_reason("triton", cfg(device_type="cpu", dtype=torch.float16)) is None
    assert "no bf16 arithmetic" in dispatch.unsupported_reason(
        "triton", cfg(device_type="cpu", dtype=torch.bfloat16))
    assert dispatch.unsupported_reason("triton", cfg(dtype=torch.bfloat16)) is None  # on a GPU
    assert dispatch.unsupported_reason("triton", cfg(device_type="mps")) == \
        "Triton kernels do not run on mps tensors"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "need a CUDA device (or TRITON_INTERPRET=1" in dispatch.unsupported_reason(
        "triton", cfg(device_type="cpu"))
    assert dispatch.unsupported_reason("triton", DEPTHWISE) is None
    monkeypatch.setattr(dispatch.backends, "triton_installed", lambda: False)
    assert dispatch.unsupported_reason("triton", DEPTHWISE) == "Triton is not installed"


def test_cuda_device_checks(monkeypatch):
    """Whatever this machine built: the extension's absence, its missing ops, CPU tensors and
    SyncBatchNorm statistics each give their reason."""
    monkeypatch.setattr(dispatch._extension, "loaded", lambda: True)
    monkeypatch.setattr(dispatch, "csrc_ops_available", lambda names: True)
    assert dispatch.unsupported_reason("cuda", DEPTHWISE) is None
    assert dispatch.unsupported_reason("cuda", cfg(device_type="cpu")) == "the csrc kernels need CUDA tensors"
    assert "do not reduce SyncBatchNorm statistics" in dispatch.unsupported_reason(
        "cuda", cfg(training=True, sync_stats=True))
    monkeypatch.setattr(dispatch, "csrc_ops_available", lambda names: False)
    assert "built without the depthwise ops" in dispatch.unsupported_reason("cuda", DEPTHWISE)
    monkeypatch.setattr(dispatch._extension, "loaded", lambda: False)
    monkeypatch.setattr(dispatch._extension, "unavailable_reason", lambda: "r21d._C is not built")
    assert dispatch.unsupported_reason("cuda", DEPTHWISE) == "r21d._C is not built"


def test_csrc_ops_available_needs_the_extension_and_every_op(monkeypatch):
    monkeypatch.setattr(dispatch._extension, "loaded", lambda: False)
    assert not dispatch.csrc_ops_available(dispatch.CSRC_OPS["depthwise"])
    monkeypatch.setattr(dispatch._extension, "loaded", lambda: True)
    assert not dispatch.csrc_ops_available(["r21d::no_such_op"])


# ---------------------------------------------------------------------------- resolve and choose
def test_resolve_on_the_torch_backend_never_gives_a_reason():
    with r21d.use_backend("torch"):
        assert dispatch.resolve(cfg(dtype=torch.float64), "hooks") == ("torch", None)


def test_resolve_auto_on_the_cpu_is_torch_by_choice_even_with_a_blocker():
    assert dispatch.resolve(cfg(device_type="cpu"), "hooks") == ("torch", None)


def test_resolve_gives_the_callers_blocker_before_any_backend_check():
    with r21d.use_backend("triton"):
        assert dispatch.resolve(cfg(dtype=torch.float64), "a residual of another dtype") == \
            ("torch", "a residual of another dtype")
    assert dispatch.resolve(DEPTHWISE, "hooks") == ("torch", "hooks")  # auto on a GPU


def test_resolve_tries_auto_s_order_and_joins_every_reason(monkeypatch):
    """auto takes the first backend of the family's order that can run it; where none can, the
    reason names each refusal in order."""
    monkeypatch.setitem(auto_choices.AUTO_ORDER, "depthwise", ("cuda", "triton"))
    monkeypatch.setitem(dispatch._DEVICE_CHECKS, "cuda", lambda c: "no csrc today")
    assert dispatch.resolve(DEPTHWISE) == ("triton", None)
    monkeypatch.setitem(dispatch._DEVICE_CHECKS, "cuda", lambda c: None)
    assert dispatch.resolve(DEPTHWISE) == ("cuda", None)
    backend, reason = dispatch.resolve(cfg(dtype=torch.float64))
    assert backend == "torch"
    assert reason == "; ".join(["fused kernels take float16, bfloat16 or float32, not torch.float64"] * 2)
    # a backend auto prefers but that has no kernel of the family is left out of the order
    monkeypatch.delitem(dispatch.FUSED_CALLS, ("cuda", "depthwise"))
    monkeypatch.setitem(dispatch._DEVICE_CHECKS, "triton", lambda c: "no triton today")
    assert dispatch.resolve(DEPTHWISE) == ("torch", "no triton today")


def test_resolve_has_no_side_effects(strict, recwarn):
    with r21d.use_backend("triton"):
        assert dispatch.resolve(cfg(dtype=torch.float64))[0] == "torch"
        assert dispatch.resolve(cfg(), "hooks") == ("torch", "hooks")
    assert not recwarn.list and r21d.backends._warned == set()


def test_choose_strict_names_the_configuration_backend_and_reason(strict):
    c = cfg(family="grouped", groups=GRID_YZ_MAX + 1)
    with r21d.use_backend("triton"), pytest.raises(r21d.FusedKernelUnavailable) as info:
        dispatch.choose(c)
    message = str(info.value)
    assert c.describe() in message and "on triton" in message
    assert f"at most {GRID_YZ_MAX} groups" in message and "R21D_STRICT=1" in message
    with r21d.use_backend("triton"), pytest.raises(r21d.FusedKernelUnavailable, match="hooks are registered"):
        dispatch.choose(cfg(device_type="cpu"), "hooks are registered")
    with r21d.use_backend("triton"):
        assert dispatch.choose(cfg(device_type="cpu")) == "triton"  # strict refuses only refusals


@pytest.mark.parametrize("value,raises", [
    ("1", True), ("true", True), ("yes", True), (" TRUE ", True),
    ("0", False), ("false", False), ("No", False), ("", False),
])
def test_r21d_strict_values(monkeypatch, value, raises):
    monkeypatch.setenv("R21D_STRICT", value)
    with r21d.use_backend("triton"):
        if raises:
            with pytest.raises(r21d.FusedKernelUnavailable):
                dispatch.choose(cfg(dtype=torch.float64))
        else:
            with pytest.warns(r21d.FallbackWarning, match="float64"):
                assert dispatch.choose(cfg(dtype=torch.float64)) == "torch"


# ---------------------------------------------------------------------------- the (2+1)D unit
def test_unit_geometry_accepts_the_factorised_pair():
    assert dispatch.unit_geometry_reason(spatial(), temporal()) is None
    assert dispatch.unit_geometry_reason(spatial(stride=(1, 2, 2)), temporal(stride=(2, 1, 1))) is None


@pytest.mark.parametrize("s,t,match", [
    (dict(kernel_size=(3, 3, 3)), {}, "needs a 1xkxk then a kx1x1 conv"),
    ({}, dict(kernel_size=(3, 3, 1)), "needs a 1xkxk then a kx1x1 conv"),
    (dict(groups=2), {}, "no groups"),
    ({}, dict(groups=2), "no groups"),
    (dict(stride=(2, 1, 1)), {}, "must not stride or pad in time"),
    (dict(padding=(1, 1, 1)), {}, "must not stride or pad in time"),
    ({}, dict(stride=(1, 2, 1)), "nor the temporal conv in space"),
    ({}, dict(padding=(1, 0, 1)), "nor the temporal conv in space"),
    (dict(dilation=(1, 2, 2)), {}, "no dilation"),
    ({}, dict(dilation=(2, 1, 1)), "no dilation"),
])
def test_unit_geometry_refusals(s, t, match):
    assert match in dispatch.unit_geometry_reason(spatial(**s), temporal(**t))


@pytest.mark.parametrize("kt,st,refused", [
    (UNIT_MAX_OPEN_FRAMES, 1, False),
    (UNIT_MAX_OPEN_FRAMES + 1, 1, True),
    (2 * UNIT_MAX_OPEN_FRAMES, 2, False),
    (2 * UNIT_MAX_OPEN_FRAMES + 1, 2, True),
])
def test_unit_open_output_frames_limit(kt, st, refused):
    """The eval unit keeps ceil(kt / st) output frames open, at most UNIT_MAX_OPEN_FRAMES."""
    reason = dispatch.unit_geometry_reason(spatial(), temporal(kernel_size=(kt, 1, 1), stride=(st, 1, 1)))
    if refused:
        assert f"at most {UNIT_MAX_OPEN_FRAMES} output frames open, ceil(kt / st) = {-(-kt // st)}" in reason
    else:
        assert reason is None


def test_unit_training_runs_two_implicit_gemms_with_their_limits():
    """The training unit has no open-frame, dilation or spatial-groups limit of its own: only the
    temporal prologue's groups and the implicit-GEMM grid."""
    assert dispatch.unit_train_reason(
        spatial(groups=2, dilation=(1, 2, 2)), temporal(kernel_size=(7, 1, 1))) is None
    assert "BN prologue has no groups" in dispatch.unit_train_reason(spatial(), temporal(groups=2))
    assert f"at most {GRID_YZ_MAX} groups" in dispatch.unit_train_reason(
        spatial(groups=GRID_YZ_MAX + 1), temporal())
    assert "strides whose product" in dispatch.unit_train_reason(
        spatial(), temporal(stride=(GRID_YZ_MAX + 1, 1, 1)))
