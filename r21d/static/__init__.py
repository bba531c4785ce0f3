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

The package: ``cases`` (what is launched, per family), ``compile`` (specialising and compiling
the captured launches), ``sass`` (reading a cubin), ``rules`` (the rows and the checks),
``report`` (the table), ``__main__`` (the command line).

Adding a kernel family: add its module to ``cases.KERNEL_MODULES``, write its case function
(like ``cases._pointwise``) and add its cases to ``cases.CASES``. A kernel counts as a GEMM when it takes the dot
precision ``PREC`` (its products go through ``_gemm.dot``).
"""

from .cases import ARCHS, CASES, KERNEL_MODULES, SHARED_LIMIT, Case, fp32_precision
from .compile import all_kernels, case_jobs, compile_job, run_jobs
from .report import format_table, vector_load_summary
from .rules import Row, collect, coverage, csrc_report
from .sass import cuobjdump, read_cubin

__all__ = ["ARCHS", "CASES", "KERNEL_MODULES", "SHARED_LIMIT", "Case", "Row", "all_kernels",
           "case_jobs", "collect", "compile_job", "coverage", "csrc_report", "cuobjdump",
           "format_table", "fp32_precision", "read_cubin", "run_jobs", "vector_load_summary"]
