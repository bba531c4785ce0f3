"""Static report of the kernels (docs/testing.md, "Speed without a GPU").

Every Triton kernel configuration that r21d can launch is compiled ahead of time for sm_90 and
sm_80 -- no GPU needed -- and its cubin read with the ``cuobjdump`` that ships inside Triton:
registers, spills (STACK / LOCAL), shared memory, and the instructions that matter (HGMMA / HMMA
tensor-core instructions, 128-bit global loads). The CUDA C++ kernels of the built ``r21d._C`` are
read the same way.

What is compiled is what a real launch compiles: each case below calls the real launchers on
small CPU tensors under ``_launch.capture()`` (nothing runs), and each captured launch is
specialised by Triton's own binder (``triton_kernels/_compile.py``), so it gets the same pointer
dtypes, integer == 1 -> constexpr, 16-divisibility attributes and options as
``kernel[grid](...)``; for every tile configuration of the kernel's variant.

    python -m r21d.static                      # table of every kernel x config x arch
    python -m r21d.static --check --json r.json --archs 90

Rules checked by ``--check`` (exit status 1 when one fails): every configuration compiles; no
spills (LOCAL == 0 and STACK == 0); shared memory within the arch's opt-in limit (227 KB sm_90,
163 KB sm_80); on sm_90 every GEMM kernel (one that takes the dot precision ``PREC``) with fp16 /
bf16 / TF32 operands has HGMMA; every TF32 GEMM rounds its operands to TF32 (PTX
``cvt.rna.tf32.f32``: the tensor cores would truncate them) and no other kernel does; every
``*_kernel`` of ``r21d.triton_kernels`` is covered by a case. Reported only:
IEEE-fp32 GEMMs (no tensor cores by design) and whether the memory-bound kernels use 128-bit
loads in channels_last_3d.

The report must run with TRITON_INTERPRET unset: kernels decorated while it is set are interpreter
functions and cannot be compiled (the test runs it in a subprocess for that reason).

Adding a kernel family: add its module to ``KERNEL_MODULES``, write its case function (like
``_pointwise``) and add its cases to ``CASES``. A kernel counts as a GEMM when it takes the dot
precision ``PREC`` (its products go through ``_gemm.dot``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from .triton_kernels import _compile
from .triton_kernels._layout import out_size

# Opt-in shared memory per block (what Triton compares metadata.shared against at launch).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)
KERNEL_MODULES = ("pointwise", "depthwise", "implicit_gemm", "conv2plus1d", "batchnorm", "splitk")  # r21d.triton_kernels.<module>


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One representative call of a family's launchers, run under ``_launch.capture()``."""

    family: str
    name: str  # e.g. "fwd-eval"
    dtype: str  # "bf16", "fp16", "fp32-tf32", "fp32-ieee"
    layout: str  # a key of the family's shape table, e.g. "cl3d" (channels_last_3d), "cl3d-odd"
    run: Callable[[Case], None]

    @property
    def label(self) -> str:
        return f"{self.family}/{self.name}/{self.dtype}/{self.layout}"


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


@contextlib.contextmanager
def _fp32_precision(dtype: str):
    """fp32-tf32 / fp32-ieee: set the cuDNN conv fp32 precision the launchers read, restore after."""
    import torch

    want = {"fp32-tf32": "tf32", "fp32-ieee": "ieee"}.get(dtype)
    if want is None:
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the new API only
        previous = conv.fp32_precision
        conv.fp32_precision = want
        try:
            yield
        finally:
            conv.fp32_precision = previous
    else:
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = want == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = previous


# Shapes: T = 8, H = W = 14 (an R(2+1)D late stage) so that, as in real video shapes, some
# sizes are not multiples of 16 (Triton specialises on that), and M = 3136 rows makes the weight
# gradient split over 4 row ranges (1 would be specialised to a constant). The "cl3d-odd" layout
# has the channel counts of R(2+1)D's intermediate tensors (45, 230): rows not 16-byte aligned.
# NCDHW needs no case of its own: the launchers convert it to channels_last_3d at the boundary.
PW_SHAPES = {
    "cl3d": dict(N=2, C_in=64, C_out=256, T=8, H=14, W=14),
    "cl3d-odd": dict(N=2, C_in=45, C_out=230, T=8, H=14, W=14),
}


def _pointwise(case: Case, stride=(1, 1, 1), padding=(0, 0, 0)) -> None:
    import torch

    from r21d.triton_kernels import pointwise

    s = PW_SHAPES[case.layout]
    dt = _torch_dtype(case.dtype)
    gen = torch.Generator().manual_seed(0)

    def act(*shape, dtype=dt):  # an activation tensor, channels_last_3d
        return torch.randn(*shape, generator=gen, dtype=dtype).contiguous(
            memory_format=torch.channels_last_3d)

    def vec(n=s["C_out"], dtype=torch.float32):
        return torch.randn(n, generator=gen, dtype=dtype)

    x = act(s["N"], s["C_in"], s["T"], s["H"], s["W"])
    w = torch.randn(s["C_out"], s["C_in"], 1, 1, 1, generator=gen, dtype=dt)
    bias, gamma, beta = vec(dtype=dt), vec(), vec()
    rmean, rvar = vec(), vec().abs() + 1
    out_shape = (s["N"], s["C_out"]) + tuple(
        out_size(n, 1, st, p) for n, st, p in zip((s["T"], s["H"], s["W"]), stride, padding))
    op = case.name.split("-s2")[0]
    # SiLU everywhere: its epilogue and backward need more registers than ReLU's, so a tile
    # that does not spill with SiLU does not spill with ReLU.
    if op.startswith("fwd"):
        # fwd-eval-res: the heaviest eval epilogue: residual, and z + statistics saved for
        # autograd (eval-mode BN while training, e.g. frozen BN in fine-tuning)
        residual = act(*out_shape) if op == "fwd-eval-res" else None
        training = op == "fwd-train"
        pointwise.conv_bn_act_fwd(x, w, bias, gamma, beta, rmean, rvar, residual, stride, padding,
                                  training=training, momentum=0.1, eps=1e-5, activation="silu",
                                  save=op != "fwd-eval")
    elif op in ("bwd", "bwd-eval"):  # every gradient, with a residual; bwd-eval: running stats
        grad_out, z, residual = act(*out_shape), act(*out_shape), act(*out_shape)
        pointwise.conv_bn_act_bwd(grad_out, x, w, bias, z, vec(), vec().abs(), gamma, beta,
                                  residual, stride, padding, training=op == "bwd",
                                  activation="silu", needs=(True,) * 6)
    else:
        raise ValueError(case.name)


def _pointwise_s2(case: Case) -> None:
    _pointwise(case, stride=(1, 2, 2), padding=(0, 0, 0))


# Depthwise: an X3D stage (216 channels: a multiple of 8, not of 16), its odd-channel variant
# (54: rows 4-byte aligned in 16-bit) and NCDHW, which the kernels address in place.
DW_SHAPES = {
    "dw-cl3d": dict(N=2, C=216, T=4, H=14, W=14, cl=True),
    "dw-cl3d-odd": dict(N=2, C=54, T=4, H=14, W=14, cl=True),
    "dw-ncdhw": dict(N=2, C=216, T=4, H=14, W=14, cl=False),
}
DW_LAYOUTS = tuple(DW_SHAPES)
DW_DTYPES = ("bf16", "fp16", "fp32")
# name -> (kernel, stride, padding)
DW_GEOMETRY = {"k333": ((3, 3, 3), (1, 1, 1), (1, 1, 1)), "k133-s2": ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
               "k511": ((5, 1, 1), (1, 1, 1), (2, 0, 0))}


def _depthwise(case: Case) -> None:
    import torch

    from r21d.triton_kernels import depthwise

    op, geometry = case.name.rsplit("/", 1) if "/" in case.name else (case.name, "k333")
    kernel, stride, padding = DW_GEOMETRY[geometry]
    s = DW_SHAPES[case.layout]
    dt = _torch_dtype(case.dtype)
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last_3d if s["cl"] else torch.contiguous_format

    def act(*shape):
        return torch.randn(*shape, generator=gen, dtype=dt).contiguous(memory_format=fmt)

    def vec(dtype=torch.float32):
        return torch.randn(s["C"], generator=gen, dtype=dtype)

    x = act(s["N"], s["C"], s["T"], s["H"], s["W"])
    w = torch.randn(s["C"], 1, *kernel, generator=gen, dtype=dt)
    bias, gamma, beta, rmean, rvar = vec(dt), vec(), vec(), vec(), vec().abs() + 1
    out_shape = (s["N"], s["C"]) + tuple(
        depthwise.out_size(n, k, st, p, 1) for n, k, st, p in zip(x.shape[2:], kernel, stride, padding))
    dilation = (1, 1, 1)
    # SiLU and a residual everywhere: the costliest epilogue and backward prologue.
    if op.startswith("fwd"):
        depthwise.conv_bn_act_fwd(x, w, bias, gamma, beta, rmean, rvar, act(*out_shape), stride,
                                  padding, dilation, training=op == "fwd-train", momentum=0.1,
                                  eps=1e-5, activation="silu", save=True)
    elif op == "bwd":
        depthwise.conv_bn_act_bwd(act(*out_shape), x, w, bias, act(*out_shape), vec(), vec().abs(),
                                  gamma, beta, act(*out_shape), stride, padding, dilation,
                                  training=True, activation="silu", needs=(True,) * 6)
    else:
        raise ValueError(case.name)


# Implicit GEMM: an R(2+1)D layer1 unit (64 -> 144 channels: rows 16-byte aligned), its odd-channel
# variant (45 -> 230, R(2+1)D's stem and layer2 intermediates), and the 3-channel stem, whose
# K loop runs flat over (tap, channel). Geometries (kernel, stride, padding, groups) are the
# classes that specialise differently: Triton turns sizes and strides equal to 1 into constants.
IG_SHAPES = {
    "ig-cl3d": dict(N=2, C_in=64, C_out=144, T=8, H=14, W=14),
    "ig-cl3d-odd": dict(N=2, C_in=45, C_out=230, T=8, H=14, W=14),
    "ig-stem": dict(N=2, C_in=3, C_out=45, T=8, H=28, W=28),
}
IG_GEOMETRY = {
    "k133": ((1, 3, 3), (1, 1, 1), (0, 1, 1), 1),
    "k311": ((3, 1, 1), (1, 1, 1), (1, 0, 0), 1),
    "k133-s2": ((1, 3, 3), (1, 2, 2), (0, 1, 1), 1),
    "k311-s2": ((3, 1, 1), (2, 1, 1), (1, 0, 0), 1),
    "k333": ((3, 3, 3), (1, 1, 1), (1, 1, 1), 1),
    "k333-g4": ((3, 3, 3), (1, 1, 1), (1, 1, 1), 4),
    "k177-s2": ((1, 7, 7), (1, 2, 2), (0, 3, 3), 1),
}


def _implicit_gemm(case: Case) -> None:
    import torch

    from r21d.triton_kernels import implicit_gemm

    op, geometry = case.name.split("/")
    kernel, stride, padding, groups = IG_GEOMETRY[geometry]
    s = IG_SHAPES[case.layout]
    dt = _torch_dtype(case.dtype)
    gen = torch.Generator().manual_seed(0)

    def act(*shape):  # channels_last_3d activations and weights, as a converted model has
        return torch.randn(*shape, generator=gen, dtype=dt).contiguous(
            memory_format=torch.channels_last_3d)

    def vec(dtype=torch.float32):
        return torch.randn(s["C_out"], generator=gen, dtype=dtype)

    x = act(s["N"], s["C_in"], s["T"], s["H"], s["W"])
    w = act(s["C_out"], s["C_in"] // groups, *kernel)
    bias, gamma, beta, rmean, rvar = vec(dt), vec(), vec(), vec(), vec().abs() + 1
    dilation = (1, 1, 1)
    out_shape = (s["N"], s["C_out"]) + tuple(implicit_gemm.out_size(n, k, st, p, 1) for n, k, st, p
                                             in zip(x.shape[2:], kernel, stride, padding))
    # SiLU everywhere (the costlier epilogue and backward); a residual where it makes the
    # epilogue heavier (fwd-eval-res also saves z and the statistics for autograd)
    if op.startswith("fwd"):
        residual = act(*out_shape) if op == "fwd-eval-res" else None
        implicit_gemm.conv_bn_act_fwd(x, w, bias, gamma, beta, rmean, rvar, residual, stride,
                                      padding, dilation, training=op == "fwd-train", momentum=0.1,
                                      eps=1e-5, activation="silu", save=op != "fwd-eval")
    elif op in ("bwd", "bwd-eval"):
        implicit_gemm.conv_bn_act_bwd(act(*out_shape), x, w, bias, act(*out_shape), vec(),
                                      vec().abs(), gamma, beta, act(*out_shape), stride, padding,
                                      dilation, training=op == "bwd", activation="silu",
                                      needs=(True,) * 6)
    else:
        raise ValueError(case.name)


# The (2+1)D unit: r2plus1d_18's layer1 unit (64 -> 144 -> 64, rows 16-byte aligned),
# a downsampling unit with odd intermediate channels (64 -> 230 -> 128, spatial and temporal
# stride 2: two frames per step) and the stem (3 -> 45 -> 64, 1x7x7 stride 2: unaligned rows).
UNIT_SHAPES = {
    "unit-cl3d": dict(C_in=64, C_mid=144, C_out=64, H=14, k=3, s=1, st=1),
    "unit-cl3d-s2": dict(C_in=64, C_mid=230, C_out=128, H=14, k=3, s=2, st=2),
    "unit-stem": dict(C_in=3, C_mid=45, C_out=64, H=28, k=7, s=2, st=1),
}


def _conv2plus1d(case: Case) -> None:
    import torch

    from r21d.triton_kernels import conv2plus1d

    s = UNIT_SHAPES[case.layout]
    dt = _torch_dtype(case.dtype)
    gen = torch.Generator().manual_seed(0)

    def act(*shape):
        return torch.randn(*shape, generator=gen, dtype=dt).contiguous(
            memory_format=torch.channels_last_3d)

    def bn(c):  # weight, bias, running mean, running var
        return (torch.randn(c, generator=gen), torch.randn(c, generator=gen),
                torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 1)

    k, sp, st = s["k"], s["s"], s["st"]
    x = act(2, s["C_in"], 8, s["H"], s["H"])
    w1 = act(s["C_mid"], s["C_in"], 1, k, k)
    w2 = act(s["C_out"], s["C_mid"], 3, 1, 1)
    h_out = out_size(s["H"], k, sp, k // 2)
    residual = act(2, s["C_out"], out_size(8, 3, st, 1), h_out, h_out) if case.name == "eval-res" else None
    if case.name == "train":  # the two chained implicit GEMMs (BN1 + ReLU prologue) and backward
        from r21d.triton_kernels import conv2plus1d_train

        geometry = ((1, sp, sp), (0, k // 2, k // 2), (1, 1, 1), (st, 1, 1), (1, 0, 0), (1, 1, 1))
        g1, b1, rm1, rv1 = bn(s["C_mid"])
        g2, b2, rm2, rv2 = bn(s["C_out"])
        out, z1, m1, i1, z2, m2, i2, *_ = conv2plus1d_train.unit_train_fwd(
            x, w1, None, g1, b1, rm1, rv1, 0.1, 1e-5, w2, None, g2, b2, rm2, rv2, 0.1, 1e-5, None,
            *geometry, "relu", True)
        conv2plus1d_train.unit_train_bwd(act(*out.shape), x, w1, None, g1, b1, z1, m1, i1, w2,
                                         None, g2, b2, z2, m2, i2, None, *geometry, "relu",
                                         (True,) * 9 + (False,))
        return
    conv2plus1d.unit_eval(x, w1, None, *bn(s["C_mid"]), 1e-5, w2, None, *bn(s["C_out"]), 1e-5,
                          residual, (sp, sp), (k // 2, k // 2), st, 1,
                          "silu" if residual is not None else "relu")


def _grid(family, names, dtypes, layouts, run) -> list[Case]:
    return [Case(family, n, d, lay, run) for n in names for d in dtypes for lay in layouts]


ALL_DTYPES = ("bf16", "fp16", "fp32-tf32", "fp32-ieee")
IG_OPS = ("fwd-eval", "fwd-eval-res", "fwd-train", "bwd", "bwd-eval")
ALL_LAYOUTS = tuple(PW_SHAPES)

CASES: list[Case] = [
    # pointwise (1x1x1) conv + BN + act: eval (one launch), eval with residual and saving for
    # autograd, training forward (conv with statistics epilogue, finalize, normalise), training
    # and eval backward (BN reduce and finalize, dgrad, split-K wgrad and its sum).
    *_grid("pointwise", ("fwd-eval", "fwd-eval-res", "fwd-train", "bwd", "bwd-eval"),
           ALL_DTYPES, ALL_LAYOUTS, _pointwise),
    # a spatially strided (downsampling) pointwise conv: stride is then not a constant 1
    Case("pointwise", "fwd-eval-s2", "bf16", "cl3d", _pointwise_s2),
    Case("pointwise", "bwd-s2", "bf16", "cl3d", _pointwise_s2),
    # depthwise conv + BN + act: eval (one launch, with residual and saving for autograd),
    # training forward (statistics pass, finalize, normalising pass), backward; 3x3x3 in every
    # dtype and layout, the other geometry classes in bf16 channels_last_3d
    *_grid("depthwise", ("fwd-eval", "fwd-train", "bwd"), DW_DTYPES, DW_LAYOUTS, _depthwise),
    *_grid("depthwise", [f"{op}/{g}" for op in ("fwd-eval", "bwd") for g in ("k133-s2", "k511")],
           ("bf16",), ("dw-cl3d",), _depthwise),
    # implicit-GEMM conv + BN + act: the spatial unit in every dtype and both channel classes;
    # the other geometry classes in bf16; the 3-channel stem (flat K loop) in every dtype
    *_grid("implicit_gemm", [f"{op}/k133" for op in IG_OPS], ALL_DTYPES, ("ig-cl3d", "ig-cl3d-odd"),
           _implicit_gemm),
    *_grid("implicit_gemm", [f"{op}/{g}" for op in IG_OPS for g in ("k311", "k133-s2", "k311-s2", "k333", "k333-g4")],
           ("bf16",), ("ig-cl3d",), _implicit_gemm),
    *_grid("implicit_gemm", [f"{op}/k177-s2" for op in IG_OPS], ALL_DTYPES, ("ig-stem",), _implicit_gemm),
    # the eval-mode (2+1)D unit (one kernel), with ReLU, and with a residual and SiLU; the
    # training unit's forward and backward (implicit GEMMs with the BN1 + ReLU prologue)
    *_grid("conv2plus1d", ("eval", "eval-res", "train"), ALL_DTYPES, tuple(UNIT_SHAPES), _conv2plus1d),
]


# ----------------------------------------------------------------------------- specialisation


def _jobs(cases: list[Case], archs, all_configs: bool = True) -> list[dict]:
    """Captured launches of every case x configuration x arch, deduplicated into compile jobs
    (plain data a worker process can compile); ``all_configs=False``: only the configuration each
    launch would run (what a first call compiles)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from r21d.triton_kernels import _launch

    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    jobs: dict[tuple, dict] = {}
    for case, (arch, backend) in ((c, a) for c in cases for a in backends.items()):
        # each arch's launches: the launchers pick that arch's tile tables
        with _launch.tile_arch(arch), _fp32_precision(case.dtype), _launch.capture() as launches:
            case.run(case)
        for launch in launches:
            prec = launch.kwargs.get("PREC")
            if case.dtype.startswith("fp32-") and prec is not None and prec != case.dtype[5:]:
                raise RuntimeError(f"{case.label}: the launcher chose PREC={prec!r}")
        for found in _compile.launch_jobs(launches, arch, backend, all_configs):
            job = jobs.setdefault(_compile.job_key(found),
                                  {**found, "families": [], "cases": [], "dtypes": [], "layouts": []})
            for field, value in (("families", case.family), ("cases", case.name),
                                 ("dtypes", case.dtype), ("layouts", case.layout)):
                if value not in job[field]:
                    job[field].append(value)
    return list(jobs.values())


def _all_kernels() -> list[str]:
    """Every ``*_kernel`` JITFunction of the kernel modules (the cases must cover them all)."""
    from triton.runtime.jit import JITFunction

    found = []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"r21d.triton_kernels.{mod_name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == mod.__name__:
                found.append(name)
    return sorted(found)


# ----------------------------------------------------------------------------- cubin reading


def cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(path):
        return path
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("no cuobjdump (neither in Triton's package nor on PATH)")
    return found


_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_RESOURCE = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def _classify(opcodes: dict[str, int]) -> dict[str, int]:
    def count(pred):
        return sum(n for op, n in opcodes.items() if pred(op, op.split(".")))

    return dict(
        hgmma=count(lambda op, p: p[0] == "HGMMA"),
        hmma=count(lambda op, p: p[0] == "HMMA"),
        ldg128=count(lambda op, p: p[0] == "LDG" and "128" in p),
        ldg64=count(lambda op, p: p[0] == "LDG" and "64" in p),
        ldg=count(lambda op, p: p[0] == "LDG"),
        ldgsts128=count(lambda op, p: p[0] == "LDGSTS" and "128" in p),
        tma=count(lambda op, p: p[0] == "UTMALDG"),
        stg128=count(lambda op, p: p[0] == "STG" and "128" in p),
        ldl=count(lambda op, p: p[0] == "LDL"),
        stl=count(lambda op, p: p[0] == "STL"),
    )


def read_cubin(path: str) -> dict[tuple[str, str], dict]:
    """{(arch, function): stats} of a cubin or a fat binary / shared library."""
    tool = cuobjdump()
    res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {path}: {res.stderr.strip()}")
    out: dict[tuple[str, str], dict] = {}
    arch, fn = "", None
    for line in res.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+?):\s*$", line)
        if m:
            fn = m.group(1)
            continue
        if fn is not None and "REG:" in line:
            vals = {k.lower(): int(v) for k, v in _RESOURCE.findall(line)}
            out[(arch, fn)] = dict(regs=vals.get("reg", 0), stack=vals.get("stack", 0),
                                   shared_static=vals.get("shared", 0), local=vals.get("local", 0),
                                   opcodes={})
            fn = None
    arch, fn = "", None
    for line in sass.stdout.splitlines():
        m = re.match(r"\s*code for (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        m = _SASS_LINE.match(line)
        if m and fn is not None:
            key = next((k for k in ((arch, fn), (arch.rstrip("a"), fn)) if k in out), None)
            if key is None:  # resource usage keyed without an arch (plain cubin)
                key = next((k for k in out if k[1] == fn), (arch, fn))
                out.setdefault(key, dict(regs=0, stack=0, shared_static=0, local=0, opcodes={}))
            ops = out[key]["opcodes"]
            ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    for stats in out.values():
        stats.update(_classify(stats.pop("opcodes")))
    return out


# ----------------------------------------------------------------------------- compiling


def _compile_job(job: dict) -> dict:
    """Compile one job (in a worker process) and read its cubin."""
    start = time.perf_counter()
    result = dict(error=None)
    try:
        k = _compile.compile_job(job)
        with tempfile.TemporaryDirectory(prefix="r21d-static-") as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            stats = read_cubin(path)
        if len(stats) != 1:
            raise RuntimeError(f"expected one function in the cubin, got {sorted(stats)}")
        result.update(next(iter(stats.values())))
        result["shared"] = int(k.metadata.shared)
        result["tf32_round"] = k.asm["ptx"].count("cvt.rna.tf32.f32")
    except Exception as e:  # reported as a failing row
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    result["compile_s"] = round(time.perf_counter() - start, 2)
    return result


def _run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    payload = [{k: j[k] for k in ("module", "kernel", "arch", "signature", "constexprs", "attrs",
                                  "options")} for j in jobs]
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_job(p) for p in payload]
    import multiprocessing

    # GEMMs first: they take longest (ptxas), so the pool does not end on one long compile.
    order = sorted(range(len(jobs)), key=lambda i: not jobs[i]["gemm"])
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        done = pool.map(_compile_job, [payload[i] for i in order], chunksize=1)
        results: list = [None] * len(jobs)
        for i, result in zip(order, done):
            results[i] = result
    return results


# ----------------------------------------------------------------------------- rows and rules


@dataclasses.dataclass
class Row:
    family: str  # families whose cases launched it, comma-separated
    module: str
    kernel: str
    arch: int
    gemm: bool
    config: str  # "128x128x64" (BLOCK_M x BLOCK_N x BLOCK_K) or the memory-bound blocks
    num_warps: int
    num_stages: int
    dtypes: list
    layouts: list
    cases: list
    precision: str | None  # dot input precision (GEMMs): "ieee" / "tf32"
    constexprs: dict
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0  # dynamic shared memory bytes (Triton's metadata.shared)
    shared_static: int = 0
    hgmma: int = 0
    hmma: int = 0
    ldg128: int = 0
    ldg64: int = 0
    ldg: int = 0
    ldgsts128: int = 0
    tma: int = 0
    stg128: int = 0
    ldl: int = 0
    stl: int = 0
    tf32_round: int = 0  # PTX cvt.rna.tf32.f32: fp32 operands rounded to TF32 before the MMA
    compile_s: float = 0.0
    error: str | None = None
    failures: list = dataclasses.field(default_factory=list)

    @property
    def tensor_core_operands(self) -> bool:
        """fp16 / bf16 operands, or fp32 with TF32 allowed: the dot should use tensor cores."""
        if not self.gemm:
            return False
        return any(d in ("bf16", "fp16") for d in self.dtypes) or self.precision not in (None, "ieee")


def _config_name(cx: dict) -> str:
    blocks = [k for k in cx if k.startswith("BLOCK")]
    order = {"BLOCK_M": 0, "BLOCK_N": 1, "BLOCK_K": 2}
    blocks.sort(key=lambda k: (order.get(k, 3), k))
    if set(blocks) >= {"BLOCK_M", "BLOCK_N", "BLOCK_K"}:
        return "x".join(str(cx[k]) for k in blocks[:3]) + "".join(f" {k[6:]}={cx[k]}" for k in blocks[3:])
    return " ".join(f"{k[6:] or k}={cx[k]}" for k in blocks)


# Memory-bound kernels that must move 16-byte channel vectors in channels_last_3d with 16-byte
# aligned rows (docs/testing.md, Speed without a GPU): the depthwise stencils.
VECTOR_KERNELS = {"_depthwise_fwd_kernel", "_depthwise_bwd_kernel"}
VECTOR_LAYOUTS = {"dw-cl3d"}


def _apply_rules(row: Row) -> None:
    f = row.failures
    if row.error:
        f.append(f"compile: {row.error}")
        return
    if row.local or row.stack:
        f.append(f"spills: LOCAL={row.local} STACK={row.stack} (LDL={row.ldl} STL={row.stl})")
    limit = SHARED_LIMIT.get(row.arch)
    if limit is not None and row.shared > limit:
        f.append(f"shared memory {row.shared} B > {limit} B")
    if row.arch == 90 and row.tensor_core_operands and row.hgmma == 0:
        f.append(f"no HGMMA ({'/'.join(row.dtypes)}, HMMA={row.hmma})")
    tf32 = row.gemm and row.precision == "tf32" and any(d.startswith("fp32") for d in row.dtypes)
    if tf32 and row.tf32_round == 0:
        f.append("TF32 operands not rounded (no cvt.rna.tf32.f32: the tensor cores truncate)")
    if not tf32 and row.tf32_round:
        f.append(f"{row.tf32_round} TF32 roundings in a kernel without TF32 operands")
    if row.kernel in VECTOR_KERNELS and set(row.layouts) <= VECTOR_LAYOUTS and row.ldg128 == 0:
        f.append(f"no 128-bit global loads ({row.ldg} LDG) in a channels_last_3d kernel")


def collect(archs=ARCHS, cases: list[Case] | None = None, workers: int | None = None) -> list[Row]:
    """Compile every case's launches for ``archs`` and return one Row per kernel x config x arch,
    with ``row.failures`` filled by the rules."""
    jobs = _jobs(CASES if cases is None else cases, archs)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cpus, 16)
    results = _run_jobs(jobs, workers)
    rows = []
    for job, res in zip(jobs, results):
        cx = job["constexpr_values"]
        row = Row(
            family=",".join(job["families"]), module=job["module"].rsplit(".", 1)[-1],
            kernel=job["kernel"], arch=job["arch"], gemm=job["gemm"], config=_config_name(cx),
            num_warps=job["num_warps"], num_stages=job["num_stages"], dtypes=job["dtypes"],
            layouts=job["layouts"], cases=job["cases"],
            precision=(cx.get("PREC") or job["options"].get("default_dot_input_precision"))
            if job["gemm"] else None,
            constexprs=cx,
        )
        for k, v in res.items():
            if hasattr(row, k):
                setattr(row, k, v)
        _apply_rules(row)
        rows.append(row)
    rows.sort(key=lambda r: (r.family, r.module, r.kernel, -r.arch, r.dtypes, r.layouts, r.config,
                             r.num_warps, r.num_stages, r.cases))
    return rows


def coverage(rows: list[Row]) -> list[str]:
    """Kernels of r21d.triton_kernels that no case launched."""
    seen = {r.kernel for r in rows}
    return [k for k in _all_kernels() if k not in seen]


def _demangle(symbols: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not symbols:
        return symbols
    proc = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if proc.returncode == 0 and len(out) == len(symbols) else symbols


def csrc_report(archs=None) -> dict:
    """Per (arch, function) stats of the CUDA kernels in the built r21d._C (only the cubins for
    ``archs`` when given: 90 matches sm_90 and sm_90a)."""
    try:
        spec = importlib.util.find_spec("r21d._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return dict(path=None, status="not built", functions=[])
    stats = read_cubin(spec.origin)
    symbols = sorted({fn for _, fn in stats})
    names = dict(zip(symbols, _demangle(symbols)))
    functions = []
    for (arch, fn), s in sorted(stats.items()):
        number = re.sub(r"\D", "", arch)
        if archs is not None and number and int(number) not in archs:
            continue
        failures = []
        if s["local"] or s["stack"]:
            failures.append(f"spills: LOCAL={s['local']} STACK={s['stack']}")
        functions.append(dict(arch=arch, function=names[fn], symbol=fn, failures=failures, **s))
    return dict(path=spec.origin, status="ok" if functions else "no CUDA kernels",
                functions=functions)


# ----------------------------------------------------------------------------- output


def _short(values: list) -> str:
    return ",".join(values)


def format_table(rows: list[Row]) -> str:
    head = (f"{'arch':<5}{'dtype':<16}{'layout':<11}{'cases':<22}{'config':<13}{'w':>2}{'s':>2}"
            f"{'regs':>5}{'stack':>6}{'local':>6}{'smemKB':>7}{'HGMMA':>6}{'HMMA':>5}{'LDG128':>7}"
            f"{'LDG64':>6}{'LDGSTS':>7}{'LDL/STL':>12}  status")
    lines = []
    current = None
    for r in rows:
        group = (r.family, r.module, r.kernel)
        if group != current:
            current = group
            kind = "GEMM" if r.gemm else "memory-bound"
            lines.append("")
            lines.append(f"== [{r.family}] {r.module}.{r.kernel}  ({kind})")
            lines.append(head)
        status = "FAIL: " + "; ".join(r.failures) if r.failures else "ok"
        if not r.failures and r.gemm and not r.tensor_core_operands:
            status = "ok (IEEE fp32: no tensor cores by design)"
        elif not r.failures and r.arch == 80 and r.tensor_core_operands and not r.hmma:
            status = "ok (note: no HMMA on sm_80)"
        dtype = _short(r.dtypes)
        if r.gemm and r.precision and r.precision != "ieee" and any(d.startswith("fp32") for d in r.dtypes):
            dtype += f"[{r.precision}]"
        lines.append(
            f"sm{r.arch:<3}{dtype:<16.16}{_short(r.layouts):<11}{_short(r.cases):<22.22}"
            f"{r.config:<13}{r.num_warps:>2}{r.num_stages:>2}{r.regs:>5}{r.stack:>6}{r.local:>6}"
            f"{r.shared / 1024:>7.1f}{r.hgmma:>6}{r.hmma:>5}{r.ldg128:>7}{r.ldg64:>6}"
            f"{r.ldgsts128:>7}{f'{r.ldl}/{r.stl}':>12}  {status}")
    return "\n".join(lines)


def vector_load_summary(rows: list[Row], layouts=ALL_LAYOUTS + DW_LAYOUTS) -> list[str]:
    """Whether each memory-bound kernel uses 128-bit global loads, per layout (reported, not
    checked; channels_last_3d is the layout where they are expected)."""
    out = []
    for layout in layouts:
        for arch in sorted({r.arch for r in rows}, reverse=True):
            kernels = sorted({r.kernel for r in rows
                              if not r.gemm and r.arch == arch and layout in r.layouts})
            for k in kernels:
                rs = [r for r in rows if r.kernel == k and r.arch == arch and layout in r.layouts]
                vec = [r for r in rs if r.ldg128]
                verdict = "yes" if len(vec) == len(rs) else ("no" if not vec else "partly")
                detail = ", ".join(f"{_short(r.dtypes)} [{_short(r.cases)}]: {r.ldg128}/{r.ldg} LDG 128-bit"
                                   for r in rs)
                out.append(f"{layout:<6} sm{arch} {k:<27} 128-bit loads: {verdict:<6} ({detail})")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r21d.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a rule fails")
    parser.add_argument("--json", metavar="PATH", help="write every row (and the csrc report) as JSON")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)),
                        help="comma-separated compute capabilities (default 90,80)")
    parser.add_argument("--family", action="append", help="only the cases of this family (repeatable)")
    parser.add_argument("--cases", action="append", metavar="GLOB",
                        help="only the cases whose label (family/name/dtype/layout, e.g. "
                             "'pointwise/*/bf16/cl3d') matches (repeatable)")
    parser.add_argument("--list-cases", action="store_true", help="print the case labels and exit")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    args = parser.parse_args(argv)

    from r21d.triton_kernels import _launch

    if _launch.interpreted():
        print("r21d.static: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)",
              file=sys.stderr)
        return 2
    import triton

    archs = tuple(int(a) for a in args.archs.split(",") if a.strip())
    cases = [c for c in CASES if (not args.family or c.family in args.family)
             and (not args.cases or any(fnmatch.fnmatchcase(c.label, g) for g in args.cases))]
    if args.list_cases:
        print("\n".join(c.label for c in cases))
        return 0
    if not cases:
        print("r21d.static: no case matches", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = collect(archs, cases, args.jobs)
    elapsed = time.perf_counter() - start
    uncovered = coverage(rows) if not (args.family or args.cases) else []
    csrc = csrc_report(archs)

    print(f"r21d static report: triton {triton.__version__}, archs {archs}, {len(cases)} cases, "
          f"{len(rows)} compiled kernel configs in {elapsed:.0f} s")
    print(format_table(rows))
    print("\n== memory-bound kernels, 128-bit global loads (reported, not checked)")
    print("\n".join(vector_load_summary(rows)) or "(none)")
    print("\n== csrc (r21d._C)")
    if csrc["status"] != "ok":
        print(f"r21d._C: {csrc['status']}" + (f" ({csrc['path']})" if csrc["path"] else ""))
    for f in csrc["functions"]:
        print(f"{f['arch']:<7}{f['function']:<60} regs {f['regs']:>3} stack {f['stack']} local "
              f"{f['local']} shared {f['shared_static']} HGMMA {f['hgmma']} HMMA {f['hmma']} "
              f"LDG128 {f['ldg128']}" + (f"  FAIL: {'; '.join(f['failures'])}" if f["failures"] else ""))

    failures = [f"{r.family} {r.kernel} sm{r.arch} {r.config} w{r.num_warps} s{r.num_stages} "
                f"{_short(r.dtypes)} {_short(r.layouts)} [{_short(r.cases)}]: {'; '.join(r.failures)}"
                for r in rows if r.failures]
    failures += [f"csrc {f['function']} {f['arch']}: {'; '.join(f['failures'])}"
                 for f in csrc["functions"] if f["failures"]]
    failures += [f"coverage: no case launches {k}" for k in uncovered]
    print(f"\n== rules: {'all pass' if not failures else f'{len(failures)} failure(s)'}")
    by_kernel: dict[str, int] = {}
    for r in rows:
        if r.failures:
            key = f"{r.kernel} sm{r.arch}"
            by_kernel[key] = by_kernel.get(key, 0) + 1
    for key, n in sorted(by_kernel.items()):
        print(f"  {n:>4} failing configs: {key}")
    for line in failures:
        print("FAIL", line)
    n_gemm = sum(r.gemm for r in rows)
    print(f"{len(rows)} rows ({n_gemm} GEMM, {len(rows) - n_gemm} memory-bound), "
          f"{elapsed:.0f} s, compile time {sum(r.compile_s for r in rows):.0f} s total")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, archs=list(archs), elapsed_s=round(elapsed, 1),
                           cases=[c.label for c in cases], kernels=_all_kernels(),
                           uncovered=uncovered, failures=failures,
                           rows=[dataclasses.asdict(r) | {"tensor_core_operands": r.tensor_core_operands}
                                 for r in rows],
                           csrc=csrc), f, indent=1)
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
