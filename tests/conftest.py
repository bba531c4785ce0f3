"""Test setup: without a GPU, Triton kernels run in the interpreter (set before Triton is
imported); GPU tests (marked ``gpu``) are skipped unless CUDA is present."""

import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import r21d  # noqa: E402
from tests import strict_interpreter  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
    # load / store masks must be bool arrays, as Triton 3.9's interpreter requires, on any Triton
    strict_interpreter.install()


# Kernel families as markers (``pytest -m depthwise`` runs the family's interpreter, csrc, op,
# module, fuse and static tests from every file): a test belongs to each family whose words its
# id (file, test name, parameters) contains. pyproject.toml registers the markers.
FAMILY_WORDS = {
    "depthwise": re.compile(r"depthwise|dw_|_dw\b"),
    "pointwise": re.compile(r"pointwise"),
    # spatial (1 x k x k) and temporal (k x 1 x 1) convs and r3d_18's 3x3x3 ones are implicit GEMMs
    "implicit_gemm": re.compile(r"implicit_gemm|igemm|dense|grouped|(?<![a-z])(spatial|temporal)|r3d"),
    "conv2plus1d": re.compile(r"conv2plus1d|r2plus1d|2plus1d|spatiotemporal|_unit|unit_"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        words = item.nodeid.lower()
        for family, pattern in FAMILY_WORDS.items():
            if pattern.search(words):
                item.add_marker(getattr(pytest.mark, family))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_backend_state(monkeypatch):
    """Each test starts from R21D_BACKEND=auto with no process-wide override."""
    monkeypatch.setattr(r21d.backends, "_global_choice", None)
    monkeypatch.delenv("R21D_BACKEND", raising=False)
    monkeypatch.setattr(r21d.backends, "_warned", set())
    yield


@pytest.fixture
def strict(monkeypatch):
    """R21D_STRICT=1: a configuration the fused backend cannot run raises instead of falling back."""
    monkeypatch.setenv("R21D_STRICT", "1")
