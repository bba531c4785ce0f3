"""Packaging: the sdist installs and runs without nvcc (pure Python: Triton + torch); the wheel
carries r21d._C compiled for this torch and CUDA; the binary holds exactly the archs
TORCH_CUDA_ARCH_LIST asked for; an extension built for another torch is refused with a message
that says what to do.

The sdist and wheel builds run ``python -m build --no-isolation`` in temporary directories and
install into a ``--target`` folder that a subprocess imports first (cwd outside the repository).
"""

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

from r21d import _extension
from tests.utils import REPO_ROOT

ROOT = str(REPO_ROOT)


def _run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _build(kind: str, out, env=None) -> str:
    _run([sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", str(out), ROOT],
         env=env, cwd=out)
    (artifact,) = glob.glob(str(out / ("*.tar.gz" if kind == "sdist" else "*.whl")))
    return artifact


def _without_nvcc() -> dict:
    """This environment with no CUDA toolkit in sight: no nvcc on PATH, no CUDA_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TRITON_INTERPRET")}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and not os.path.exists(os.path.join(d, "nvcc")))
    return env


def _import_from(target, code: str, env=None) -> str:
    """Run ``code`` in a fresh interpreter that imports r21d from ``target``, never from the
    checkout: ``-S`` skips the .pth files, among them the editable install's import hook, and
    torch comes from this environment's site-packages, after ``target``."""
    import sysconfig

    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    prelude = f"import r21d; assert r21d.__file__.startswith({str(target)!r}), r21d.__file__\n"
    return _run([sys.executable, "-S", "-c", prelude + code], env=env, cwd=str(target)).stdout


FUSED_CALL_IN_THE_INTERPRETER = """
import torch, r21d
from r21d import _extension
assert not _extension.loaded() and "without its CUDA extension" in _extension.unavailable_reason()
torch.backends.cudnn.allow_tf32 = False  # IEEE fp32, as the CPU reference computes (tests/__init__.py)
x, w = torch.randn(2, 4, 3, 5, 5), torch.randn(6, 4, 1, 1, 1)
with r21d.use_backend("triton"):
    y = r21d.functional.conv_bn_act3d(x, w, None, None, None, torch.zeros(6), torch.ones(6))
ref = torch.relu(torch.nn.functional.conv3d(x, w) / (1 + 1e-5) ** 0.5)
torch.testing.assert_close(y, ref)
print("fused ok")
"""


def test_sdist_installs_without_nvcc_and_runs_the_triton_kernels(tmp_path):
    pytest.importorskip("build")
    env = _without_nvcc()
    assert shutil.which("nvcc", path=env["PATH"]) is None
    sdist = _build("sdist", tmp_path, env)
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "setup.py", "csrc/ops.cpp", "csrc/cuda/depthwise3d_fwd.cu",
                   "triton_kernels/pointwise.py", "r21d/__init__.py", "README.md"):
        assert needed in names, f"the sdist lacks {needed}"
    assert not any(n.endswith(".so") for n in names)
    target = tmp_path / "site"
    done = _run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                 "--no-index", "--target", str(target), sdist], env=env)
    assert not glob.glob(str(target / "r21d" / "_C*.so"))
    assert os.path.isfile(target / "r21d" / "triton_kernels" / "pointwise.py")
    out = _import_from(target, FUSED_CALL_IN_THE_INTERPRETER, {**env, "TRITON_INTERPRET": "1"})
    assert "fused ok" in out, done.stderr


@pytest.mark.skipif(not _extension.loaded(), reason="no r21d._C here: nvcc or a CUDA build of torch is missing")
def test_wheel_carries_the_extension_for_this_torch(tmp_path):
    pytest.importorskip("build")
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1)),
           "TORCH_CUDA_ARCH_LIST": "9.0"}  # one arch: half the compile time
    wheel = _build("wheel", tmp_path, env)
    assert "-cp{}{}-".format(*sys.version_info[:2]) in os.path.basename(wheel), wheel
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(n.startswith("r21d/_C") and n.endswith(".so") for n in names), names
    assert "r21d/triton_kernels/implicit_gemm.py" in names
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), wheel])
    out = _import_from(target, "from r21d import _extension; i = _extension.build_info(); "
                               "print(i['torch_version'], i['torch_cuda_arch_list'], i['cuda_archs'])")
    assert out.split() == [torch.__version__.split("+")[0], "9.0", "['sm_90']"]


@pytest.mark.skipif(not _extension.loaded(), reason="no r21d._C here: nvcc or a CUDA build of torch is missing")
def test_binary_holds_the_archs_torch_cuda_arch_list_asked_for():
    from r21d import static

    info = _extension.build_info()
    (so,) = glob.glob(os.path.join(os.path.dirname(_extension.__file__), "_C*.so"))
    listing = _run([static.cuobjdump(), "--list-elf", so]).stdout
    in_binary = {line.rsplit(".", 2)[-2] for line in listing.splitlines() if line.endswith(".cubin")}
    requested = {"sm_" + a.replace(".", "").replace("+PTX", "")
                 for a in info["torch_cuda_arch_list"].replace(",", ";").split(";") if a}
    assert in_binary == requested == set(info["cuda_archs"]), (in_binary, requested, info)


class _FakeExtension:
    def __init__(self, torch_version):
        self.info = {"torch_version": torch_version}

    def build_info(self):
        return self.info


@pytest.fixture
def fresh_load():
    _extension._load.cache_clear()
    yield
    _extension._load.cache_clear()


@pytest.mark.parametrize("found,why", [
    (_FakeExtension("2.0.0"), "built for torch 2.0.0 but torch"),
    (ImportError("r21d/_C.so: undefined symbol: _ZN3c10..."), "probably built against another torch"),
], ids=["version", "undefined-symbol"])
def test_an_extension_for_another_torch_is_refused_with_what_to_do(monkeypatch, fresh_load, found, why):
    def import_module(name):
        if isinstance(found, Exception):
            raise found
        return found

    monkeypatch.setattr(_extension.importlib, "import_module", import_module)
    with pytest.warns(RuntimeWarning, match=why):
        assert not _extension.loaded()
    reason = _extension.unavailable_reason()
    assert why in reason and "pip install --no-build-isolation -e ." in reason
    assert _extension.build_info() is None
