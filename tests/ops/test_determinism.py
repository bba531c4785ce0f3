"""torch.use_deterministic_algorithms(True): every r21d op runs a deterministic path.

The Triton kernels are deterministic by construction: every reduction (BN statistics, BN
backward sums, weight gradients, split-K) writes per-tile partials that a second pass sums in a
fixed order; none uses atomics. That is checked on the kernels' source here, and on a GPU a whole
training step of a fused model is run twice and compared bit for bit. The csrc depthwise backward
has an atomic weight-gradient path, which the deterministic flag replaces with per-block
partials (tests/csrc/test_depthwise3d_cuda.py and the depthwise tests check both backends).
"""

import ast
import copy

import pytest
import torch

import r21d
from tests.utils import gpu, jit_functions, kernel_sources, small_video_net


def test_no_triton_kernel_uses_atomics():
    kernels, atomic = 0, []
    for path, tree in kernel_sources():
        for fn in jit_functions(tree):
            kernels += 1
            atomic += [f"{path.name}:{fn.name}:{n.lineno} {n.attr}" for n in ast.walk(fn)
                       if isinstance(n, ast.Attribute) and n.attr.startswith("atomic")]
    assert kernels >= 20, f"found only {kernels} @triton.jit functions"
    assert not atomic, "atomics make reductions order-dependent: " + ", ".join(atomic)


def test_the_scan_sees_atomics():
    """The scan above is not vacuous: it finds an atomic in a kernel written like ours."""
    src = "@triton.jit\ndef k(p):\n    tl.atomic_add(p, 1.0)\n"
    (fn,) = jit_functions(ast.parse(src))
    assert any(isinstance(n, ast.Attribute) and n.attr == "atomic_add" for n in ast.walk(fn))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("device", [gpu("cuda")])
def test_training_step_is_bitwise_reproducible(device, autocast, strict):
    pytest.importorskip("torchvision")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = r21d.fuse(small_video_net()).to(device).train()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, 4, 8, 8, generator=g).to(device, memory_format=torch.channels_last_3d)
        runs = []
        for _ in range(2):
            m = copy.deepcopy(model)
            with r21d.use_backend("triton"), torch.autocast(device, torch.bfloat16, enabled=autocast):
                y = m(x)
            y.float().square().sum().backward()
            runs.append((y, {n: p.grad for n, p in m.named_parameters()}, dict(m.named_buffers())))
    finally:
        torch.use_deterministic_algorithms(previous)
    (y1, g1, b1), (y2, g2, b2) = runs
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
    for name in b1:
        assert torch.equal(b1[name], b2[name]), name
