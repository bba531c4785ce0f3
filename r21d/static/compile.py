"""Captured launches specialised as Triton's binder would (``triton_kernels/_compile.py``), then
compiled for an arch without a GPU, in worker processes."""


from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import os
import tempfile
import time

from ..triton_kernels import _compile
from .cases import KERNEL_MODULES, Case, fp32_precision
from .sass import read_cubin

# Opt-in shared memory per block (what Triton compares metadata.shared against at launch).

# ----------------------------------------------------------------------------- specialisation


def case_jobs(cases: list[Case], archs, all_configs: bool = True) -> list[dict]:
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
        with _launch.tile_arch(arch), fp32_precision(case.dtype), _launch.capture() as launches:
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


def all_kernels() -> list[str]:
    """Every ``*_kernel`` JITFunction of the kernel modules (the cases must cover them all)."""
    from triton.runtime.jit import JITFunction

    found = []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"r21d.triton_kernels.{mod_name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == mod.__name__:
                found.append(name)
    return sorted(found)



# ----------------------------------------------------------------------------- compiling


def compile_job(job: dict) -> dict:
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


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    payload = [{k: j[k] for k in ("module", "kernel", "arch", "signature", "constexprs", "attrs",
                                  "options")} for j in jobs]
    if workers <= 1 or len(jobs) <= 1:
        return [compile_job(p) for p in payload]
    import multiprocessing

    # GEMMs first: they take longest (ptxas), so the pool does not end on one long compile.
    order = sorted(range(len(jobs)), key=lambda i: not jobs[i]["gemm"])
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        done = pool.map(compile_job, [payload[i] for i in order], chunksize=1)
        results: list = [None] * len(jobs)
        for i, result in zip(order, done):
            results[i] = result
    return results
