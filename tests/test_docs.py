"""docs/ describes the code as it is: every dotted name ``r21d.<...>`` that docs/architecture.md
cites in code spans resolves (a module, then attributes), and every op it names is registered."""

import importlib
import pathlib
import re

import torch

import r21d

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


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


def test_architecture_cites_names_that_exist():
    text = (DOCS / "architecture.md").read_text()
    names = {n for n in re.findall(r"`(r21d(?:\.\w+)+)", text)
             if not n.endswith((".h", ".py", ".md"))}  # file names (csrc/r21d.h)
    assert len(names) > 30, names
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


def test_every_doc_link_resolves():
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([\w./-]+\.md)\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)
