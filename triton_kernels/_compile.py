"""Compiling captured launches ahead of their first real call.

A launch recorded under ``_launch.capture()`` is specialised exactly as Triton's JIT would
(``create_function_from_signature`` + ``JITFunction._pack_args``, the same code in Triton
3.6-3.9): the same pointer dtypes, integer == 1 -> constexpr, 16-divisibility attributes and
options as ``kernel[grid](...)``. The result is a compile job (plain data a worker can compile);
``triton.compile`` of a job writes Triton's file cache under the key the JIT computes, so the
first real launch loads the cubin instead of compiling it. Used by ``r21d.warmup``, ``make
gpu-check``'s warm stage and the static report.
"""

from __future__ import annotations

_binders: dict = {}


def jit_function(kernel):
    """The JITFunction behind a captured kernel (a _tiles.Choice keeps it in ``.fn``)."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction) or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError(
            f"{kernel!r} is not a compilable JITFunction: compile with TRITON_INTERPRET unset "
            "(kernels decorated under the interpreter cannot be compiled)")
    return fn


def specialize(fn, backend, args, kwargs):
    """((options, signature, constexprs, attrs), bound arguments) exactly as ``JITFunction.run``
    computes them: what it compiles, and every parameter's value as it launches."""
    try:
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:  # pragma: no cover - older Triton
        raise RuntimeError("compiling ahead needs triton's JIT binder API (triton 3.6-3.9)") from e
    if not hasattr(fn, "_pack_args"):  # pragma: no cover - older Triton
        raise RuntimeError("compiling ahead needs JITFunction._pack_args (triton 3.6-3.9)")
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    key = (id(fn), id(backend))
    if key not in _binders:
        _binders[key] = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = _binders[key](*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options), bound_args


def _plain(value):
    """A JSON-friendly constexpr value."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def launch_configs(launch, all_configs: bool = True) -> list[dict]:
    """Keyword arguments of each configuration a captured launch may run with: every one of its
    Choice (another shape may pick any), or only the one it would run now; a plain kernel's
    launch: its own kwargs."""
    configs = getattr(launch.kernel, "configs", None)
    if not configs:
        return [dict(launch.kwargs)]
    if not all_configs and launch.config is not None:
        return [{**launch.kwargs, **launch.config}]
    return [{**launch.kwargs, **c.all_kwargs()} for c in configs]


def job_key(job: dict) -> tuple:
    return (job["module"], job["kernel"], job["arch"],
            *(repr(sorted(job[k].items())) for k in ("signature", "constexprs", "attrs", "options")))


def launch_jobs(launches, arch: int, backend=None, all_configs: bool = False) -> list[dict]:
    """The compile jobs of captured ``launches`` for compute capability ``arch`` (90, 80, ...),
    one per kernel specialisation, in first-launch order."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = backend or make_backend(GPUTarget("cuda", arch, 32))
    jobs: dict[tuple, dict] = {}
    for launch in launches:
        fn = jit_function(launch.kernel)
        names = [p.name for p in fn.params]
        for kw in launch_configs(launch, all_configs):
            (options, signature, constexprs, attrs), _ = specialize(fn, backend, launch.args, kw)
            opts = options.__dict__
            job = dict(module=fn.__module__, kernel=fn.__name__, arch=arch, signature=signature,
                       constexprs=constexprs, attrs=attrs, options=opts)
            key = job_key(job)
            if key not in jobs:
                job.update(constexpr_values={names[p[0]]: _plain(v) for p, v in constexprs.items()
                                             if len(p) == 1},
                           num_warps=opts["num_warps"], num_stages=opts["num_stages"],
                           gemm="PREC" in names)
                jobs[key] = job
    return list(jobs.values())


def compile_job(job: dict):
    """``triton.compile`` of one job into Triton's cache; returns the CompiledKernel."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(getattr(importlib.import_module(job["module"]), job["kernel"]))
    src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"],
                    attrs=job["attrs"])
    return triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
