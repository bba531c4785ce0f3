"""docs/ describes the code as it is: every dotted name ``r21d.<...>`` (or ``triton_kernels.<...>``,
installed as ``r21d.triton_kernels``) that docs/architecture.md and docs/kernels.md cite in code
spans resolves (a module, then attributes), every op architecture.md names is registered, every
``*_kernel`` kernels.md cites is defined in the file its table row gives, and every link between
the pages (and every anchor benchmarks/NOTES.md points to) resolves."""

import ast
import importlib
import pathlib
import re

import pytest
import torch

import r21d
from tests.utils import REPO_ROOT

ROOT = REPO_ROOT
DOCS = ROOT / "docs"


def _resolve(dotted: str):
    """The object ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _dotted_names(text: str) -> set[str]:
    """The dotted names cited in code spans, ``triton_kernels.x`` read as ``r21d.triton_kernels.x``."""
    names = re.findall(r"`((?:r21d\.)?triton_kernels(?:\.\w+)+|r21d(?:\.\w+)+)", text)
    return {n if n.startswith("r21d.") else "r21d." + n for n in names
            if not n.endswith((".h", ".py", ".md"))}  # file names (csrc/r21d.h)


@pytest.mark.parametrize("page, at_least", [("architecture.md", 30), ("kernels.md", 60)])
def test_docs_cite_names_that_exist(page, at_least):
    names = _dotted_names((DOCS / page).read_text())
    assert len(names) > at_least, names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, missing


def test_architecture_names_registered_ops():
    text = (DOCS / "architecture.md").read_text()
    ops = set(re.findall(r"`r21d::(\w+)`", text))
    assert len(ops) >= 5, ops
    for op in ops:
        assert hasattr(torch.ops.r21d, op), op
    assert r21d  # the ops register when r21d is imported


def _defines(path: str, name: str) -> bool:
    """Whether the file at ``path`` (from the repository root) defines a function ``name``: a
    Python function (a ``@triton.jit`` kernel), or a CUDA ``__global__`` kernel."""
    text = (ROOT / path).read_text()
    if path.endswith(".py"):
        return any(isinstance(node, ast.FunctionDef) and node.name == name
                   for node in ast.walk(ast.parse(text)))
    return re.search(rf"__global__\s+void\s+{name}\b", text) is not None


def _all_kernels() -> set[tuple[str, str]]:
    """(name, file) of every kernel of triton_kernels/ and csrc/cuda/."""
    found = set()
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                found.add((node.name, path.relative_to(ROOT).as_posix()))
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for name in re.findall(r"__global__\s+void\s+(\w+_kernel)\b", path.read_text()):
            found.add((name, path.relative_to(ROOT).as_posix()))
    return found


def test_kernels_cites_each_kernel_in_its_file():
    text = (DOCS / "kernels.md").read_text()
    rows = set(re.findall(r"^\| `(\w+_kernel)` \| `([\w./]+)` \|", text, re.M))
    wrong = sorted((name, path) for name, path in rows if not _defines(path, name))
    assert not wrong, wrong
    # a kernel cited anywhere on the page has its row, and every kernel has one
    assert set(re.findall(r"`(\w+_kernel)`", text)) <= {name for name, _ in rows}
    assert _all_kernels() <= rows, sorted(_all_kernels() - rows)


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_doc_link_resolves():
    for page in DOCS.glob("*.md"):
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", page.read_text()):
            if not target and not anchor:
                continue
            linked = page.parent / target if target else page
            assert linked.exists(), (page.name, target)
            if anchor:
                assert anchor in _anchors(linked), (page.name, target, anchor)
    # benchmarks/NOTES.md points into kernels.md for the algorithms it used to describe
    notes = (ROOT / "benchmarks" / "NOTES.md").read_text()
    for anchor in re.findall(r"docs/kernels\.md#([\w-]+)", notes):
        assert anchor in _anchors(DOCS / "kernels.md"), anchor


def test_every_file_path_the_docs_cite_exists():
    """Paths to the repository's files in docs/, README.md and NOTES.md's pointers (``tests/...py``,
    ``r21d/...``, ``csrc/...``): moving a file means updating what points at it."""
    pattern = r"(?<![\w/.])((?:tests|r21d|triton_kernels|csrc|benchmarks|docs|examples)/[\w/.{},*<>-]*[\w*])"
    missing = []
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for path in set(re.findall(pattern, page.read_text())):
            if "{" in path or "<" in path or "*" in path:  # a pattern, not a file
                continue
            if not (ROOT / path).exists():
                missing.append((page.name, path))
    assert not missing, sorted(missing)
