"""Reading a cubin with the ``cuobjdump`` inside Triton's package: resource usage and SASS
instruction classes per kernel."""


from __future__ import annotations

import os
import re
import shutil
import subprocess

# Opt-in shared memory per block (what Triton compares metadata.shared against at launch).

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
