"""Runs the measured modes (a GPU, or ``--smoke`` anywhere): for each case, check every provider
against the float64 reference, then time it; a failure marks the measurement and the case, and
the run goes on."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, Optional

import torch

from . import correctness, roofline
from .providers import workload
from .timing import Timer, Timing
from .workload_common import Prepared, Variant

EAGER = "eager"
COMPILE = "torch.compile"
MATMUL = "matmul"
CONV = "conv"
FUSED_PREFIX = "r21d/"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_provider(mode: Optional[str]) -> str:
    return COMPILE if mode is None else f"{COMPILE}/{mode}"


@dataclasses.dataclass
class Measurement:
    provider: str
    variant: Optional[Variant] = None
    timing: Optional[Timing] = None
    first_call_s: Optional[float] = None  # torch.compile: the compile; Triton: autotuning
    rel_error: Optional[float] = None
    check: str = ""  # "ok", "FAILED ...", or "" where nothing was checked
    note: str = ""
    error: Optional[str] = None  # what it raised
    skipped: Optional[str] = None  # why it was not run

    @property
    def median_ms(self) -> Optional[float]:
        return self.timing.median_ms if self.timing is not None else None

    @property
    def label(self) -> str:
        return self.variant.label if self.variant is not None else ""


@dataclasses.dataclass
class CaseResult:
    case: Any
    work: list[roofline.Work]
    floor_ms: Optional[float]
    bound: Optional[str]
    measurements: list[Measurement] = dataclasses.field(default_factory=list)
    check: str = "not checked"
    error: Optional[str] = None
    details: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def best(self, provider: str) -> Optional[Measurement]:
        """The fastest timed variant of ``provider``."""
        timed = [m for m in self.measurements if m.provider == provider and m.timing is not None]
        return min(timed, key=lambda m: m.median_ms) if timed else None

    def best_fused(self) -> Optional[Measurement]:
        timed = [m for m in self.measurements if m.provider.startswith(FUSED_PREFIX) and m.timing]
        return min(timed, key=lambda m: m.median_ms) if timed else None

    def providers(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.measurements:
            seen.setdefault(m.provider)
        return list(seen)


@dataclasses.dataclass
class Options:
    device: torch.device
    timer: Timer
    fused_backends: list[str]
    compile_modes: list[Optional[str]]  # torch.compile modes for every case; None: the default
    compile_skipped: Optional[str] = None  # why torch.compile is not measured at all
    model_compile_modes: list[Optional[str]] = dataclasses.field(default_factory=list)  # models only
    case_compile_modes: bool = True  # also each case's own modes (case.compile_modes); off: --no-compile
    printed_details: set[str] = dataclasses.field(default_factory=set)  # shown once per run


def _error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _release(device: torch.device) -> None:
    """Free what the last provider held, so the next one's peak memory is its own (a full
    garbage collection takes ~0.1 s: only worth it on a GPU)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _launch_counter(provider: str):
    """Counts the Triton launches of an r21d/triton call (a counter with .launches), else None."""
    if provider != FUSED_PREFIX + "triton":
        yield None
        return
    from ..triton_kernels import _launch

    with _launch.count() as counter:
        yield counter


class CaseRunner:
    """Measures one case: reference first, then eager, r21d, torch.compile, the conv alone and
    matmul."""

    def __init__(self, case, options: Options, index: str, ceilings: roofline.Ceilings):
        self.case, self.options, self.index = case, options, index
        self.device = options.device
        self.reference: Optional[list] = None
        try:
            work = case.work()
        except Exception as e:  # e.g. torchvision missing for a model case
            self.result = CaseResult(case, [], None, None, error=_error_text(e), check="not run")
            return
        self.result = CaseResult(case, work, roofline.floor_ms(work, ceilings),
                                 roofline.bound_by(work, ceilings))

    def log(self, message: str) -> None:
        log(f"[{self.index}] {self.case.id} | {message}")

    def run(self) -> CaseResult:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # Sites without a fused kernel run on torch; notes and fusion reports say so.
                from ..backends import FallbackWarning

                warnings.simplefilter("ignore", FallbackWarning)
                self._run()
        except Exception as e:  # a bug of the bench itself: keep the other cases
            self.result.error = f"the bench failed on this case: {_error_text(e)}"
            self.log(self.result.error)
        finally:
            self.reference = None
            _release(self.device)
            self.result.seconds = time.perf_counter() - start
        return self.result

    def _run(self) -> None:
        if self.result.error:
            self.log(f"not run: {self.result.error}")
            return
        self.log(f"{self.case.description}; floor {self.result.floor_ms:.4g} ms ({self.result.bound}-bound)")
        try:
            wl = workload(self.case, self.device)
        except Exception as e:  # e.g. torchvision missing, or out of memory
            self.result.error = _error_text(e)
            self.result.check = "not run"
            self.log(f"could not build the case: {self.result.error}")
            return
        self._reference(wl)

        eager = [self._measure(EAGER, v, lambda v=v: wl.eager(v)) for v in wl.eager_variants()]
        for backend in self.options.fused_backends:
            provider = FUSED_PREFIX + backend
            try:
                why_not = wl.fused_unavailable(backend)
            except Exception as e:  # r21d rejected the call: a bug to see, not a crash
                why_not = f"r21d rejected the call: {_error_text(e)}"
            if why_not:
                self._skip(provider, why_not)
                continue
            for v in wl.fused_variants():
                self._measure(provider, v, lambda v=v, b=backend: wl.fused(b, v))

        modes = self.options.compile_modes + (
            self.options.model_compile_modes if self.case.kind == "model" else [])
        if self.options.case_compile_modes:
            modes += [m for m in getattr(self.case, "compile_modes", ()) if m not in modes]
        if self.options.compile_skipped or not modes:
            self._skip(COMPILE, self.options.compile_skipped or "--no-compile")
        else:
            timed = [m for m in eager if m.timing is not None]
            variant = min(timed, key=lambda m: m.median_ms).variant if timed else wl.fused_variants()[0]
            for mode in modes:
                torch._dynamo.reset()  # fresh caches: no recompile limits carried across cases
                self._measure(compile_provider(mode), variant,
                              lambda m=mode: wl.compiled(variant, m), compiles=True)

        if self.case.kind == "conv_bn_act":  # the convolution alone: BN and ReLU should be free
            self._measure(CONV, None, wl.conv_alone)
        if self.case.family == "pointwise":  # the GEMM a pointwise conv is
            self._measure(MATMUL, None, wl.matmul)
        self._judge()

    def _reference(self, wl) -> None:
        try:
            reference = wl.reference()
            if wl.reference_on_cpu:
                reference = [t.detach().cpu() for t in reference]
            self.reference = reference
        except Exception as e:
            self.result.check = f"not checked: the float64 reference failed ({_error_text(e)})"
            self.log(self.result.check)
        _release(self.device)

    def _skip(self, provider: str, why: str) -> None:
        self.result.measurements.append(Measurement(provider, skipped=why))
        self.log(f"{provider}: not timed ({why})")

    def _measure(self, provider: str, variant: Optional[Variant],
                 prepare: Callable[[], Optional[Prepared]], compiles: bool = False) -> Measurement:
        m = Measurement(provider, variant)
        self.result.measurements.append(m)
        prepared = None
        try:
            prepared = prepare()
            with _launch_counter(provider) as counter:
                outputs, m.first_call_s = self.options.timer.first_call(prepared.fn, prepared.arg_sets[0])
            if counter is not None:
                m.note = f"{counter.launches} Triton launches per call"
            if prepared.note:
                m.note = f"{prepared.note}; {m.note}" if m.note else prepared.note
            if prepared.details and prepared.details not in self.result.details:
                self.result.details.append(prepared.details)
                if prepared.details not in self.options.printed_details:
                    self.options.printed_details.add(prepared.details)
                    self.log(f"{provider} {m.label}:\n{prepared.details}")
            if prepared.checked is not None and self.reference is not None:
                m.rel_error = correctness.max_rel_error(prepared.checked(outputs), self.reference)
            del outputs
            m.timing = self.options.timer.time(prepared.fn, prepared.arg_sets)
        except Exception as e:
            m.error = _error_text(e)
        finally:
            del prepared
            _release(self.device)
        self.log(self._progress(m, compiles))
        return m

    def _progress(self, m: Measurement, compiles: bool) -> str:
        head = f"{m.provider} {m.label}".strip()
        if m.error:
            return f"{head}: ERROR {m.error}"
        parts = [f"{m.median_ms:.4f} ms (median of {m.timing.reps}, {m.timing.copies} input copies)"]
        if compiles:
            parts.append(f"compile {m.first_call_s:.1f} s")
        if m.rel_error is not None:
            parts.append(f"rel err {m.rel_error:.2e}")
        if m.timing.peak_bytes is not None and self.case.kind == "model":
            parts.append(f"peak {m.timing.peak_bytes / roofline.GIB:.2f} GiB")
        if m.note:
            parts.append(m.note)
        return f"{head}: " + ", ".join(parts)

    def _judge(self) -> None:
        """Each checked provider against 2x eager's error in the same precision; the case fails
        when an r21d provider fails or raises."""
        eager_error: dict[bool, float] = {}
        for m in self.result.measurements:
            if m.provider == EAGER and m.rel_error is not None:
                key = m.variant.autocast
                eager_error[key] = max(eager_error.get(key, 0.0), m.rel_error)
        failures = []
        for m in self.result.measurements:
            fused = m.provider.startswith(FUSED_PREFIX)
            if m.error and fused:
                failures.append(f"{m.provider} raised {m.error}")
            if m.rel_error is None or m.provider == EAGER:
                continue
            bound = correctness.error_bound(eager_error.get(m.variant.autocast), self.case.dtype)
            if bound is None:
                m.check = "no eager error to compare"
            elif m.rel_error <= bound:
                m.check = "ok"
            else:
                m.check = f"FAILED (> {bound:.1e})"
                if fused:
                    failures.append(f"{m.provider} {m.label} rel err {m.rel_error:.2e} > {bound:.2e}")
        if self.reference is None:
            if failures:
                self.result.check = "FAILED: " + "; ".join(failures)
            return  # keeps "not checked: ..." from _reference
        checked = any(m.provider.startswith(FUSED_PREFIX) and m.rel_error is not None
                      for m in self.result.measurements)
        if failures:
            self.result.check = "FAILED: " + "; ".join(failures)
        elif checked:
            self.result.check = "ok"
        else:
            self.result.check = "no fused provider checked"
        self.log(f"check: {self.result.check}")


def run_cases(cases, options: Options, ceilings: roofline.Ceilings) -> list[CaseResult]:
    results = []
    for i, case in enumerate(cases, 1):
        results.append(CaseRunner(case, options, f"{i}/{len(cases)}", ceilings).run())
    return results
