"""Accuracy of every kernel family on a GPU (docs/testing.md, Accuracy): r21d's error against float64 at most
twice cuDNN's error on the same inputs (plus a tiny floor), tensor by tensor (the output and, in
training, every gradient).

The subjects are bench cases (``r21d.bench.cases``) at the real geometry of r2plus1d_18, X3D-M,
CSN-R101 and the sign-language classifier, at batch 2 so that the float64 reference stays cheap
(r2plus1d_18 itself at batch 16, the speed stage's shape: the same kernel specialisations, compiled
once, and a float64 forward of about 1.3 TFLOP, a second or less on the GPU); each runs through the bench's workloads (``r21d.bench.providers``): the float64 reference, eager
PyTorch (cuDNN) and r21d on one backend, in the same memory format and precision, with
R21D_STRICT=1 (a fallback to torch raises) and every buffer r21d allocates poisoned with NaN
(an unwritten element fails).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .. import cases, correctness
from ..providers import workload
from ..timing import Timer
from .plan import Check, Context, FusedCall

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16,
              "fp32-tf32": torch.float32, "fp32-ieee": torch.float32}
# cuDNN may run an fp32 conv without tensor cores even where TF32 is allowed, so its error is no
# yardstick for a TF32 GEMM: the floor in TF32 mode is TF32's epsilon (a TF32 dot product's
# relative error is about half of it).
TF32_EPS = 2.0 ** -10
BATCH = 2
MODEL_BATCH = 16


def precision_context(precision: str):
    """cuDNN's fp32 conv precision (TF32 or IEEE), which r21d's kernels follow; nothing for 16-bit."""
    from ... import static

    return static.fp32_precision(precision)


def error_bound(cudnn_error: float, precision: str) -> float:
    if precision == "fp32-tf32":
        return 2 * cudnn_error + TF32_EPS
    return correctness.error_bound(cudnn_error, PRECISIONS[precision])


# ----------------------------------------------------------------------------- subjects


@dataclasses.dataclass(frozen=True)
class Subject:
    label: str  # e.g. "depthwise X3D-M C108 s122"
    backend: str
    training: bool
    case: object  # a bench case in bf16; each check replaces its dtype

    @property
    def key(self) -> str:
        return f"{self.label} [{self.backend}] {'train' if self.training else 'eval'}"


def _r2p1d_conv(row: int, training: bool, activation: Optional[str] = "relu"):
    """Row ``row`` (1-based) of r2plus1d_18's conv table at batch 2."""
    cin, cout, k, s, t, size = cases.R2PLUS1D_18_CONVS[row - 1]
    case = cases.conv_layer("r2p1d", row, cin, cout, k, s, tuple(n // 2 for n in k), t, size,
                            training, batch=BATCH)
    return dataclasses.replace(case, activation=activation)


def _grouped(training: bool):
    mode = "train" if training else "eval"
    return cases.ConvBNActCase(
        id=f"grouped3x3x3-g32-128-n{BATCH}t8s28-{mode}",
        description=f"grouped 3x3x3 conv+BN+ReLU 128->128, 32 groups (ResNeXt-101 3D layer2), "
                    f"N{BATCH} T8 28x28, channels_last_3d, {mode}",
        batch=BATCH, in_channels=128, out_channels=128, frames=8, height=28, width=28,
        kernel_size=(3, 3, 3), padding=(1, 1, 1), groups=32, training=training)


def subjects() -> list[Subject]:
    """Every family in eval and training: pointwise, depthwise (Triton and CUDA), spatial,
    temporal, dense, grouped, the (2+1)D unit, the residual tail and r2plus1d_18."""
    def both(label, make, backend="triton"):  # eval, then training
        return [Subject(label, backend, training, make(training)) for training in (False, True)]

    model, cin, cout, k, s, p, t, size, bias = cases.DENSE_CONVS[3]
    return [
        # the strided 1x1x1 shortcut: conv -> BN, no activation
        *both("pointwise r2p1d shortcut 64->128 s222", lambda tr: _r2p1d_conv(9, tr, activation=None)),
        *(subject for backend in ("triton", "cuda") for subject in [
            *both("depthwise X3D-M C108 56^2 s122 SiLU", lambda tr: cases.depthwise(
                108, BATCH, 16, 56, tr, stride=(1, 2, 2), activation="silu", model="X3D-M"), backend),
            *both("depthwise CSN-R101 C256 16x28^2", lambda tr: cases.depthwise(
                256, BATCH, 16, 28, tr, model="CSN-R101"), backend)]),
        *both("spatial r2p1d stem 3->45 1x7x7 s122", lambda tr: _r2p1d_conv(1, tr)),
        *both("spatial r2p1d 64->230 1x3x3 s122", lambda tr: _r2p1d_conv(5, tr)),
        *both("temporal r2p1d 230->128 3x1x1 s211", lambda tr: _r2p1d_conv(6, tr)),
        *both("dense sign 32->64 3x5x5 s222 +bias", lambda tr: cases.conv_layer(
            model, 2, cin, cout, k, s, p, t, size, tr, batch=BATCH, bias=bias)),
        *both("grouped 128->128 g32 3x3x3", _grouped),
        *both("unit r2p1d 64->144->64", lambda tr: cases.conv2plus1d_unit(3, 4, tr, batch=BATCH)),
        *both("residual tail r2p1d layer1 block", lambda tr: cases.r2plus1d_block(tr, batch=BATCH)),
        Subject("r2plus1d_18 B16", "triton", False, cases.r2plus1d_18(False, batch=MODEL_BATCH)),
        Subject("r2plus1d_18 B16 training step", "triton", True, cases.r2plus1d_18(True, batch=MODEL_BATCH)),
    ]


# ----------------------------------------------------------------------------- one check


def sized(subject: Subject, precision: str, ctx: Context):
    """The subject's case in ``precision``, tiny on ``ctx.small`` (the case's smoke version)."""
    case = dataclasses.replace(subject.case, dtype=PRECISIONS[precision])
    if not ctx.small:
        return case
    case = case.smoke(ctx.device)
    if case.kind == "model" and ctx.device.type == "cpu":  # the wiring check: a 1x3x2x32x32 clip
        case = dataclasses.replace(case, frames=2)
    return case


def _outputs(prepared, timer: Timer) -> tuple[list[torch.Tensor], float]:
    out, seconds = timer.first_call(prepared.fn, prepared.arg_sets[0])
    return [t.detach() for t in prepared.checked(out)], seconds


def output_names(wl, count: int) -> list[str]:
    case = wl.case
    if case.kind == "model":
        names = ["logits", "loss"][:count]
    elif not case.training:
        names = ["output"]
    else:
        names = ["output", "grad input"] + [f"grad {n}" for n, p in wl.base.named_parameters()
                                            if p.requires_grad]
    return names if len(names) == count else [f"output {i}" for i in range(count)]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = correctness.rel_error(out, ref)
    return err if math.isfinite(err) else math.inf


def _rms(t: torch.Tensor) -> float:
    t = t.detach().double()
    return t.norm().item() / math.sqrt(t.numel()) if t.numel() else 0.0


# A reference tensor this far below the check's largest is zero in exact arithmetic (e.g. the
# conv bias's gradient under training-mode BN, which removes the mean): its relative error is
# rounding noise over rounding noise, so it is recorded but not judged (only required finite).
ZERO_IN_EXACT_ARITHMETIC = 1e-8


def compare(fused, eager, reference, names, precision: str) -> dict:
    """Tensor by tensor: r21d's error, cuDNN's, the bound and their ratio; the worst tensor is the
    one closest to (or furthest past) its bound."""
    scale = max((_rms(r) for r in reference), default=0.0)
    tensors = []
    for name, f, e, r in zip(names, fused, eager, reference):
        if _rms(r) <= ZERO_IN_EXACT_ARITHMETIC * scale:
            err, base = _rms(f) / scale, _rms(e) / scale
            tensors.append({"name": name, "error": err, "cudnn_error": base, "judged": False,
                            "note": "zero in exact arithmetic: RMS / the largest tensor's RMS",
                            "passed": math.isfinite(err)})
            continue
        err, base = _rel(f, r), _rel(e, r)
        bound = error_bound(base, precision)
        tensors.append({"name": name, "error": err, "cudnn_error": base, "bound": bound,
                        "ratio": err / base if base > 0 else (0.0 if err == 0 else math.inf),
                        "passed": err <= bound})
    judged = [t for t in tensors if "bound" in t]
    worst = max(judged, key=lambda t: t["error"] / t["bound"] if t["bound"] > 0 else math.inf)
    passed = all(t["passed"] for t in tensors) and len(tensors) == len(reference)
    failing = next((t for t in tensors if not t["passed"]), worst)
    return {"passed": passed, "worst": worst["name"], "error": worst["error"],
            "cudnn_error": worst["cudnn_error"], "bound": worst["bound"], "ratio": worst["ratio"],
            "tensors": tensors,
            "why": None if passed else (f"{failing['name']}: error {failing['error']:.3g} > bound "
                                        f"{failing.get('bound', 0):.3g} (cuDNN {failing['cudnn_error']:.3g})")}


def run_check(subject: Subject, precision: str, ctx: Context) -> dict:
    from ...triton_kernels import _launch

    case = sized(subject, precision, ctx)
    backend = ctx.backend or subject.backend
    timer = Timer(ctx.device)
    with precision_context(precision):
        wl = workload(case, ctx.device)
        reference = wl.reference()
        variant = wl.fused_variants()[0]  # the case's layout; 16-bit training: under autocast
        eager, _ = _outputs(wl.eager(variant), timer)
        with _launch.count() as counter, _launch.poisoned():
            fused, first_call_s = _outputs(wl.fused(backend, variant), timer)
    numbers = compare(fused, eager, reference, output_names(wl, len(reference)), precision)
    numbers.update(backend=backend, case=case.id,
                   description=case.description, variant=variant.label,
                   triton_launches=counter.launches, first_call_s=first_call_s)
    if backend == "triton" and counter.launches == 0:
        numbers.update(passed=False, why="no Triton kernel ran")
    return numbers


def _plumb(subject: Subject, precision: str, ctx: Context) -> dict:
    """Builds the case in ``precision``; runs it (tiny, on the CPU) once per subject: the precision
    changes only the dtype, which the CPU's smoke versions set to fp32 anyway."""
    case = sized(subject, precision, dataclasses.replace(ctx, small=False))  # the real case builds
    done = ctx.state.setdefault("accuracy_plumbed", set())
    if subject.key in done:
        return {"passed": True, "case": case.id, "note": "run under an earlier precision"}
    done.add(subject.key)
    return run_check(subject, precision, ctx)


def _fused_calls(subject: Subject, precision: str, ctx: Context) -> list[FusedCall]:
    if subject.backend != "triton":
        return []  # the csrc kernels are compiled already

    def call():
        with precision_context(precision):
            wl = workload(sized(subject, precision, ctx), ctx.device)
            prepared = wl.fused(ctx.backend or subject.backend, wl.fused_variants()[0])
            return prepared.fn(*prepared.arg_sets[0])
    return [FusedCall(f"{precision}/{subject.key}", precision, call, heavy=subject.case.kind == "model")]


def check_name(subject: Subject, precision: str) -> str:
    mode = "train" if subject.training else "eval"
    return f"{precision}/{subject.label}/{subject.backend}/{mode}"


# r2plus1d_18 itself runs in bf16 and IEEE fp32 only: its kernels are the families' above, and each
# precision adds ~100 kernel specialisations to compile (a deep TF32 model has no cuDNN yardstick
# either: cuDNN may run some layers without tensor cores).
MODEL_PRECISIONS = ("bf16", "fp32-ieee")


def checks(precisions) -> list[Check]:
    out = []
    for precision in precisions:
        for s in subjects():
            if s.case.kind == "model" and precision not in MODEL_PRECISIONS:
                continue
            out.append(Check(
                check_name(s, precision),
                run=lambda ctx, s=s, p=precision: run_check(s, p, ctx),
                plumb=lambda ctx, s=s, p=precision: _plumb(s, p, ctx),
                fused_calls=lambda ctx, s=s, p=precision: _fused_calls(s, p, ctx),
                tags={"subject": s.key, "precision": precision}))
    return out


def stage_checks(precisions):
    """The ``checks`` callable of an accuracy stage."""
    return lambda ctx: checks(precisions)

