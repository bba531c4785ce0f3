"""The report's rows and the rules ``--check`` applies to them; the csrc kernels' report."""


from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import shutil
import subprocess

from .cases import ARCHS, CASES, SHARED_LIMIT, Case
from .compile import all_kernels, case_jobs, run_jobs
from .sass import read_cubin

# Opt-in shared memory per block (what Triton compares metadata.shared against at launch).

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
    jobs = case_jobs(CASES if cases is None else cases, archs)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cpus, 16)
    results = run_jobs(jobs, workers)
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
    return [k for k in all_kernels() if k not in seen]


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
