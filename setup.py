"""Build script of r21d (metadata lives in pyproject.toml).

One build: the CUDA C++ extension ``r21d._C`` from csrc/ when nvcc and a CUDA build of
torch are present, otherwise a pure-Python package (Triton + torch). nvcc is the one in
$CUDA_HOME/bin (or $CUDA_PATH/bin) when set, else the one on PATH. torch is imported
here, so build without isolation, in an environment that already has torch:

    pip install --no-build-isolation -e .          # editable (dev), or -e '.[test,bench]'
    pip install --no-build-isolation --no-deps -e . # offline GPU machine
    python -m build --wheel --no-isolation          # wheel with r21d/_C*.so

Environment:
    TORCH_CUDA_ARCH_LIST    archs to compile for (torch's own mechanism, e.g. "8.0;9.0",
                            "9.0a"); unset and no GPU visible -> "8.0;9.0". With a GPU
                            visible and unset, torch builds for the visible GPU(s).
    MAX_JOBS                parallel compile jobs (torch's ninja build honours it)
    R21D_SKIP_CUDA_BUILD=1  pure Python, even where the extension could be built
    R21D_FORCE_CUDA_BUILD=1 fail (non-zero exit) when the extension cannot be built
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

DEFAULT_ARCH_LIST = "8.0;9.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"r21d setup: {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def packages():
    """r21d (+ subpackages) from r21d/, r21d.triton_kernels (+ subpackages) from
    triton_kernels/ -- never a top-level ``triton_kernels``. An editable install made before
    a root's __init__.py existed sees it as a namespace package: reinstall (make does)."""
    pkgs, package_dir = [], {}
    for name, folder in (("r21d", "r21d"), ("r21d.triton_kernels", "triton_kernels")):
        path = os.path.join(ROOT, folder)
        if os.path.isdir(path):
            pkgs += [name] + [f"{name}.{p}" for p in find_packages(where=path)]
            if folder != name:
                package_dir[name] = folder
    return pkgs, package_dir


def ensure_ninja() -> None:
    """torch's BuildExtension uses ninja only when `ninja` is on PATH; a venv's own bin/
    is not on PATH when pip is called as .venv/bin/pip without activating the venv."""
    if shutil.which("ninja"):
        return
    dirs = []
    try:
        import ninja  # the PyPI package ships the binary

        dirs.append(getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    dirs.append(os.path.dirname(sys.executable))
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            log(f"using ninja from {d}")
            return
    log("ninja not found: torch falls back to the slow, serial setuptools build (pip install ninja)")


def has_cuda_headers(home: str) -> bool:
    return os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def find_cuda_home():
    """The CUDA toolkit to build with: $CUDA_HOME / $CUDA_PATH when set, else the toolkit of
    the `nvcc` on PATH. Raises RuntimeError when there is none. (torch's own guess takes
    dirname(dirname(which nvcc)), which is wrong when nvcc is a wrapper script such as
    /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc, so nvcc is asked instead.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var, "").strip()
        if home:
            if not os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
                raise RuntimeError(f"nvcc not found: ${var}={home!r} has no bin/nvcc")
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        hint = ""
        for d in ("/usr/local/cuda", "/opt/cuda"):
            if os.access(os.path.join(d, "bin", "nvcc"), os.X_OK):
                hint = f"; {d}/bin/nvcc exists: add {d}/bin to PATH or set CUDA_HOME={d}"
        raise RuntimeError(f"nvcc not found on PATH and CUDA_HOME unset{hint}")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-E", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            candidates.insert(0, os.path.dirname(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    for home in candidates:
        if os.access(os.path.join(home, "bin", "nvcc"), os.X_OK) and has_cuda_headers(home):
            return os.path.realpath(home)
    raise RuntimeError(f"found {nvcc} but no CUDA toolkit with headers at {candidates}; set CUDA_HOME")


def cuda_extension():
    """Returns (ext_modules, cmdclass) or raises RuntimeError(why it cannot be built)."""
    if env_flag("R21D_SKIP_CUDA_BUILD"):
        raise RuntimeError("R21D_SKIP_CUDA_BUILD=1 is set")
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            f"torch is not importable ({e}); build with --no-build-isolation in an environment that has torch"
        ) from None
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)")
    cuda_home = find_cuda_home()
    # torch.utils.cpp_extension reads CUDA_HOME when first imported; set it and the module
    # attribute, so that torch's nvcc, include and library paths all use this toolkit.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    nvcc = os.path.join(cuda_home, "bin", "nvcc")

    if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        try:
            gpu_visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        except Exception:  # no driver, broken driver: treat as no GPU
            gpu_visible = False
        if not gpu_visible:
            # torch's own arch-flag logic reads this variable (never hard-code -gencode).
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
            log(f"TORCH_CUDA_ARCH_LIST unset and no GPU visible: using {DEFAULT_ARCH_LIST!r}")
        else:
            log("TORCH_CUDA_ARCH_LIST unset: torch compiles for the visible GPU(s)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()

    # Record the requested arch list in the binary (build_info in csrc/ops.cpp, compiled by
    # the host compiler only: nvcc would split a -D value at its commas). Separators become
    # commas so the -D value is shell- and ninja-safe.
    defines = []
    arch_token = ",".join(p for p in re.split(r"[;\s,]+", arch_list) if p)
    if arch_token and re.fullmatch(r"[A-Za-z0-9.+,]+", arch_token):
        defines.append(f"-DR21D_TORCH_CUDA_ARCH_LIST={arch_token}")

    sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT) + glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    if not sources:
        raise RuntimeError("no sources under csrc/")

    ensure_ninja()
    ext = cpp_extension.CUDAExtension(
        name="r21d._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # No -std: torch's cpp_extension adds the standard its headers need (-std=c++20 for
        # torch 2.14, whose headers use concepts and <compare>; C++17 for older torch). r21d's
        # own code stays valid C++17 so it also builds against older torch.
        extra_compile_args={
            "cxx": ["-O3", *defines],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
    log(
        f"building r21d._C from {len(sources)} sources with {nvcc} "
        f"(torch {torch.__version__}, CUDA {torch.version.cuda}, TORCH_CUDA_ARCH_LIST={arch_list!r}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')})"
    )
    return [ext], {"build_ext": build_ext_class(cpp_extension.BuildExtension)}


def build_ext_class(base):
    class BuildExt(base):
        """torch's BuildExtension; editable builds compile in build/ (not a fresh temp dir)
        so that ninja recompiles only the csrc files that changed."""

        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                tag = f"{sys.implementation.cache_tag}-{sys.platform}"
                self.build_temp = os.path.join(ROOT, "build", f"temp-editable-{tag}")

    return BuildExt


def main() -> None:
    force = env_flag("R21D_FORCE_CUDA_BUILD")
    if force and env_flag("R21D_SKIP_CUDA_BUILD"):
        sys.exit("r21d setup: error: R21D_FORCE_CUDA_BUILD=1 and R21D_SKIP_CUDA_BUILD=1 contradict each other")
    try:
        ext_modules, cmdclass = cuda_extension()
    except RuntimeError as why:
        if force:
            sys.exit(f"r21d setup: error: R21D_FORCE_CUDA_BUILD=1 but r21d._C cannot be built: {why}")
        log(f"building pure Python (no r21d._C): {why}")
        ext_modules, cmdclass = [], {}

    pkgs, package_dir = packages()
    setup(packages=pkgs, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)


main()
