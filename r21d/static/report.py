"""The report as a table and summaries."""


from __future__ import annotations

from .cases import ALL_LAYOUTS, DW_LAYOUTS
from .rules import Row

# Opt-in shared memory per block (what Triton compares metadata.shared against at launch).

# ----------------------------------------------------------------------------- output


def short(values: list) -> str:
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
        dtype = short(r.dtypes)
        if r.gemm and r.precision and r.precision != "ieee" and any(d.startswith("fp32") for d in r.dtypes):
            dtype += f"[{r.precision}]"
        lines.append(
            f"sm{r.arch:<3}{dtype:<16.16}{short(r.layouts):<11}{short(r.cases):<22.22}"
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
                detail = ", ".join(f"{short(r.dtypes)} [{short(r.cases)}]: {r.ldg128}/{r.ldg} LDG 128-bit"
                                   for r in rs)
                out.append(f"{layout:<6} sm{arch} {k:<27} 128-bit loads: {verdict:<6} ({detail})")
    return out
