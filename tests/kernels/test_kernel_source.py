"""Rules every Triton kernel's source obeys, checked by reading it (what the interpreter cannot
show: the GPU's max.f32 drops NaN where the interpreter's numpy does not always; the tensor cores
truncate TF32 operands where the interpreter multiplies in fp32).

- Every ``tl.maximum`` / ``tl.minimum`` says ``propagate_nan=tl.PropagateNan.ALL``: a plain one
  compiles to PTX max.f32 / min.f32, which return the other operand when one is NaN, so an
  activation would turn NaN into 0 and hide a divergence. On integers (index clamps) the argument
  changes nothing; the rule has no exceptions so that no float clamp can slip through as one.
- Every matrix product goes through ``_gemm.dot``, which rounds TF32 operands as cuDNN does.
"""

import ast

from tests.utils import jit_functions, kernel_sources


def _calls(fn: ast.FunctionDef, names: tuple[str, ...]):
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in names:
            yield node


def _propagates_nan(call: ast.Call) -> bool:
    return any(k.arg == "propagate_nan" and ast.unparse(k.value) == "tl.PropagateNan.ALL"
               for k in call.keywords)


def _plain_min_max(tree: ast.Module, where: str) -> list[str]:
    return [f"{where}:{call.lineno} {ast.unparse(call)}"
            for fn in jit_functions(tree)
            for call in _calls(fn, ("tl.maximum", "tl.minimum")) if not _propagates_nan(call)]


def test_every_min_and_max_propagates_nan():
    calls, plain = 0, []
    for path, tree in kernel_sources():
        calls += sum(1 for fn in jit_functions(tree) for _ in _calls(fn, ("tl.maximum", "tl.minimum")))
        plain += _plain_min_max(tree, path.name)
    assert calls >= 5, f"found only {calls} tl.maximum / tl.minimum calls"
    assert not plain, "tl.maximum / tl.minimum without propagate_nan=tl.PropagateNan.ALL:\n" + \
        "\n".join(plain)


def test_the_nan_scan_sees_a_plain_maximum():
    src = ("@triton.jit\ndef k(v):\n    a = tl.maximum(v, 0.0)\n"
           "    return tl.minimum(a, 6.0, propagate_nan=tl.PropagateNan.ALL)\n")
    assert _plain_min_max(ast.parse(src), "k") == ["k:3 tl.maximum(v, 0.0)"]


def test_every_matrix_product_goes_through_gemm_dot():
    direct = []
    for path, tree in kernel_sources():
        for fn in jit_functions(tree):
            if (path.name, fn.name) == ("_gemm.py", "dot"):
                continue
            direct += [f"{path.name}:{c.lineno} {fn.name}" for c in _calls(fn, ("tl.dot",))]
    assert not direct, "tl.dot outside _gemm.dot (TF32 operands would be truncated):\n" + \
        "\n".join(direct)
