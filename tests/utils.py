"""Shared test helpers: the tolerance table, the float64 oracle and input makers (docs/testing.md,
Accuracy)."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.utils._python_dispatch

from r21d.problem import ConvProblem
from r21d.reference import conv_bn_act3d_reference

# the repository checkout the tests run from (files they read: docs, Makefile, kernel sources)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- tolerances
# A fused result passes when its error against the float64 oracle, ||out - ref|| / ||ref||, is at
# most twice the error of PyTorch's own (cuDNN on a GPU) result in the same dtype on the same
# inputs, or at most REL_FLOOR (a few units of rounding) when that is larger. ELEMENTWISE is a
# second, elementwise check (rtol, atol relative to the largest |ref|) that catches a few wild
# elements hidden in the norm; an element may also be off by up to twice PyTorch's worst element
# (rounding the conv output, for instance, flips ReLU masks and moves gradient elements in both).
REL_FLOOR = {
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
ELEMENTWISE = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (8e-2, 2e-2),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_oracle_close(name: str, out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                        baseline: torch.Tensor | None = None, floor: float | None = None) -> None:
    """``out`` (computed in ``dtype``) against the float64 ``ref64``; see the table above.
    ``floor`` replaces REL_FLOOR[dtype] (and bounds each element's error by ``floor`` x max|ref|)
    where a test says why PyTorch's own error is no yardstick."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflow)"
    err = rel_err(out, ref64)
    bound = REL_FLOOR[dtype] if floor is None else floor
    if baseline is not None:
        bound = max(bound, 2 * rel_err(baseline, ref64))
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e}"
    rtol, atol = ELEMENTWISE[dtype]
    out, ref64 = out.detach().double().cpu(), ref64.detach().double().cpu()
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    tol = atol * max(scale, 1.0) + rtol * ref64.abs()
    if baseline is not None:
        tol = torch.clamp(tol, min=2 * (baseline.detach().double().cpu() - ref64).abs().max().item())
    if floor is not None:
        tol = torch.clamp(tol, min=floor * scale)
    diff = (out - ref64).abs()
    bad = diff > tol
    if bad.any():
        worst = (diff - tol).argmax()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off; worst {diff.flatten()[worst]:.3e} "
            f"> allowed {tol.flatten()[worst]:.3e} (ref {ref64.flatten()[worst]:.4g})")


# ---------------------------------------------------------------------------- devices
def gpu(*values, id=None):
    """A parametrize value that needs CUDA: marked ``gpu`` (skipped without a GPU)."""
    return pytest.param(*values, marks=pytest.mark.gpu, id=id)


# (device, dtype) pairs for fused-kernel tests: the interpreter has no bf16 arithmetic.
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    gpu("cuda", torch.float32, id="cuda-fp32"),
    gpu("cuda", torch.float16, id="cuda-fp16"),
    gpu("cuda", torch.bfloat16, id="cuda-bf16"),
]


# ---------------------------------------------------------------------------- inputs
def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "cl3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def make_inputs(case: ConvProblem, dtype, device, seed: int = 0) -> dict:
    """Fresh random inputs (never zeros) for ``case``; BN parameters in float32 like a module's."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    k = case.kernel[0] * case.kernel[1] * case.kernel[2] * case.C_in // case.groups
    args = {
        "x": _layout(randn(case.N, case.C_in, case.T, case.H, case.W).to(device, dtype), case.layout),
        "weight": (randn(case.C_out, case.C_in // case.groups, *case.kernel, scale=k ** -0.5)).to(device, dtype),
        "bias": randn(case.C_out).to(device, dtype) if case.bias else None,
        "bn_weight": (torch.rand(case.C_out, generator=g) + 0.5).to(device) if case.affine else None,
        "bn_bias": randn(case.C_out, scale=0.5).to(device) if case.affine else None,
        "running_mean": randn(case.C_out, scale=0.3).to(device) if case.running else None,
        "running_var": (torch.rand(case.C_out, generator=g) + 0.5).to(device) if case.running else None,
        "residual": _layout(randn(*case.output_shape()).to(device, dtype), case.layout) if case.residual else None,
    }
    return args


def conv_kwargs(case: ConvProblem, training: bool, momentum: float = 0.1, eps: float = 1e-5) -> dict:
    return dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups,
                training=training, momentum=momentum, eps=eps, activation=case.activation)


GRAD_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias", "residual")


def clone_inputs(args: dict, dtype=None, device=None, requires_grad: bool = False) -> dict:
    """Copies of ``args`` (cast to ``dtype``/``device`` if given); differentiable ones require grad."""
    out = {}
    for name, t in args.items():
        if t is None:
            out[name] = None
            continue
        c = t.detach().to(device=device or t.device, dtype=dtype or t.dtype).clone(
            memory_format=torch.preserve_format)
        if requires_grad and name in GRAD_NAMES:
            c.requires_grad_(True)
        out[name] = c
    return out


def oracle(args: dict, case: ConvProblem, training: bool, grad_out=None, momentum=0.1, eps=1e-5):
    """The float64 CPU reference: (output, {name: grad}, (running_mean, running_var))."""
    a = clone_inputs(args, dtype=torch.float64, device="cpu", requires_grad=grad_out is not None)
    y = conv_bn_act3d_reference(
        a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["running_mean"],
        a["running_var"], residual=a["residual"], **conv_kwargs(case, training, momentum, eps))
    grads = {}
    if grad_out is not None:
        y.backward(grad_out.detach().double().cpu())
        grads = {n: a[n].grad for n in GRAD_NAMES if a[n] is not None}
    return y.detach(), grads, (a["running_mean"], a["running_var"])


def run_backend(backend: str, args: dict, case: ConvProblem, training: bool, grad_out=None,
                momentum=0.1, eps=1e-5):
    """r21d.functional.conv_bn_act3d on ``backend`` with copies of ``args``:
    (output, {name: grad}, (running_mean, running_var))."""
    import r21d

    a = clone_inputs(args, requires_grad=grad_out is not None)
    with r21d.use_backend(backend):
        y = r21d.functional.conv_bn_act3d(
            a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"], a["running_mean"],
            a["running_var"], residual=a["residual"], **conv_kwargs(case, training, momentum, eps))
        grads = {}
        if grad_out is not None:
            y.backward(grad_out)
            grads = {n: a[n].grad for n in GRAD_NAMES if a[n] is not None}
    return y.detach(), grads, (a["running_mean"], a["running_var"])


def check_backend(backend: str, case: ConvProblem, dtype, device, training: bool, momentum=0.1,
                  floor: float | None = None):
    """Run ``backend`` on fresh inputs of ``case`` with every buffer the launchers allocate
    poisoned (NaN), and compare the output, every gradient and the running statistics with the
    float64 oracle (at most twice the torch path's error, or ``floor``: see
    :func:`assert_oracle_close`). Returns (output, launch counter)."""
    from r21d.triton_kernels import _launch

    args = make_inputs(case, dtype, device)
    # seeded like the inputs: the global RNG's state here depends on which tests ran before
    grad_out = torch.randn(case.output_shape(), generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with _launch.count() as counter, _launch.poisoned():
        y, grads, (rm, rv) = run_backend(backend, args, case, training, grad_out, momentum)
    ref, ref_grads, (ref_rm, ref_rv) = oracle(args, case, training, grad_out, momentum)
    base, base_grads, _ = run_backend("torch", args, case, training, grad_out, momentum)
    assert_oracle_close("out", y, ref, dtype, base, floor)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert_oracle_close(f"grad {name}", grads[name], g, dtype, base_grads[name], floor)
    if case.running:
        # Running statistics stay in their own (float32) dtype, computed in fp32.
        assert_oracle_close("running_mean", rm, ref_rm, torch.float32)
        assert_oracle_close("running_var", rv, ref_rv, torch.float32)
    return y, counter


def assert_module_matches_float64(fused: torch.nn.Module, plain: torch.nn.Module, x: torch.Tensor,
                                  floor: float | None = None):
    """One forward + backward of ``fused`` (float32, triton backend) against a float64 copy of
    ``plain`` on the torch path: the output, the input gradient, every parameter gradient and
    every buffer (running statistics, batch counts), each within twice the error of ``plain`` run
    in float32 on the torch path (errors grow with depth: a whole model's too), or ``floor`` (see
    :func:`assert_oracle_close`). Returns the launch counter of ``fused``."""
    import copy

    import r21d
    from r21d.triton_kernels import _launch

    g = torch.Generator().manual_seed(2)
    results = []
    for backend, m, dtype in (("triton", fused, torch.float32),
                              ("torch", copy.deepcopy(plain).double(), torch.float64),
                              ("torch", copy.deepcopy(plain), torch.float32)):
        xi = x.to(dtype).detach().requires_grad_()
        with r21d.use_backend(backend), _launch.count() as counter:
            y = m(xi)
        if backend == "triton":
            grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64)
        y.backward(torch.empty_like(y).copy_(grad_out))  # in y's memory format
        results.append((y, xi.grad, dict(m.named_parameters()), dict(m.named_buffers()), counter))
    (y, gx, params, buffers, counter), (ry, rgx, rparams, rbuffers, _), \
        (by, bgx, bparams, bbuffers, _) = results
    assert_oracle_close("out", y, ry, torch.float32, by, floor=floor)
    assert_oracle_close("grad x", gx, rgx, torch.float32, bgx, floor=floor)
    assert params.keys() == rparams.keys()
    for name, p in rparams.items():
        assert_oracle_close(f"grad {name}", params[name].grad, p.grad, torch.float32,
                            bparams[name].grad, floor=floor)
    for name, b in rbuffers.items():
        if b.is_floating_point():
            assert_oracle_close(name, buffers[name], b, torch.float32, bbuffers[name], floor=floor)
        else:
            assert torch.equal(buffers[name], b), name
    return counter


def small_video_net() -> torch.nn.Module:
    """Every kind of fused site on a clip of (N, 3, 4, 8, 8): a conv site, (2+1)D units, residual
    tails, a strided pointwise shortcut and a depthwise site; BN away from its defaults."""
    from torch import nn
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(3, 6, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(6), nn.ReLU(inplace=True),
        BasicBlock(6, 6, Conv2Plus1D),
        BasicBlock(6, 8, Conv2Plus1D, stride=2, downsample=nn.Sequential(
            nn.Conv3d(6, 8, 1, stride=2, bias=False), nn.BatchNorm3d(8))),
        nn.Conv3d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm3d(8), nn.SiLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    return perturb_batchnorm(net)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every BatchNorm's weight, bias and running statistics drawn from a generator
    seeded with ``seed`` (the same values whatever else used the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def perturb_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every BatchNorm3d's parameters and running statistics moved away from their
    defaults (1, 0, 0, 1), which would hide mistakes in bn_weight, bn_bias, mean or var; from the global
    RNG, after the caller's seed."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                torch.nn.init.uniform_(m.weight, 0.5, 1.5)
                torch.nn.init.uniform_(m.bias, -0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------- kernel source scans
KERNELS_DIR = REPO_ROOT / "triton_kernels"


def kernel_sources() -> list[tuple[pathlib.Path, ast.Module]]:
    """(path, parsed module) of every file of triton_kernels/."""
    return [(path, ast.parse(path.read_text())) for path in sorted(KERNELS_DIR.glob("*.py"))]


def jit_functions(tree: ast.Module):
    """The @triton.jit (or autotuned) functions of a parsed module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
                "jit" in ast.unparse(d) or "autotune" in ast.unparse(d) for d in node.decorator_list):
            yield node


class OpsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that records the name of every op it sees (and changes nothing)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))
