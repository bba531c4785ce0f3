"""r21d-bench without a GPU: nothing is timed.

Prints the roofline prediction of every case (from docs/benchmarks.md's H100 ceilings), shows that a
fused r2plus1d_18 computes exactly what the original does (on the ``torch`` backend, eval and
train, outputs, gradients and running statistics), and prints its fusion report.
"""

from __future__ import annotations

import time

import torch

from . import report, roofline

EQUIVALENCE_CLIP = (1, 3, 4, 32, 32)


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b) if x.numel()),
               default=0.0)


def fused_model_equivalence(model_name: str = "r2plus1d_18", clip=EQUIVALENCE_CLIP):
    """Run ``clip`` through r21d.fuse(model) and the original on the torch backend.

    Returns (lines of text, whether every difference is within float rounding, the fused model).
    """
    import torchvision

    import r21d

    from .workload_common import randomize_batchnorm

    torch.manual_seed(0)
    original = getattr(torchvision.models.video, model_name)()
    randomize_batchnorm(original, torch.Generator().manual_seed(0))
    fused = r21d.fuse(original)  # a fused copy; `original` stays plain PyTorch
    x = torch.randn(clip)
    lines = [f"r21d.fuse({model_name}) vs the unfused model, torch backend, clip "
             f"{'x'.join(map(str, clip))} float32 on the CPU:"]
    worst = 0.0
    with r21d.use_backend("torch"):
        original.eval()
        fused.eval()
        with torch.no_grad():
            y0, y1 = original(x), fused(x)
        diff = _max_abs_diff([y0], [y1])
        worst = max(worst, diff / max(y0.abs().max().item(), 1.0))
        lines.append(f"  eval   logits max |diff| {diff:.3e} (max |logit| {y0.abs().max().item():.3g})")

        original.train()
        fused.train()
        y0, y1 = original(x), fused(x)
        grad = torch.randn_like(y0)
        y0.backward(grad)
        y1.backward(grad)
        out_diff = _max_abs_diff([y0], [y1])
        grad_diff = _max_abs_diff([p.grad for p in original.parameters()],
                                  [p.grad for p in fused.parameters()])
        stats_diff = _max_abs_diff(list(original.buffers()), list(fused.buffers()))
        worst = max(worst, out_diff / max(y0.abs().max().item(), 1.0), grad_diff, stats_diff)
        lines.append(f"  train  logits max |diff| {out_diff:.3e}, parameter gradients {grad_diff:.3e} "
                     f"({len(list(original.parameters()))} tensors), running statistics {stats_diff:.3e}")
    equal = worst <= 1e-5
    lines.append("  -> equal" if equal else f"  -> DIFFERENT (worst relative difference {worst:.3e})")
    return lines, equal, fused


def run(cases) -> int:
    import r21d

    start = time.perf_counter()
    print("r21d-bench: no CUDA GPU on this machine -- nothing is timed.")
    print(f"torch {torch.__version__}, r21d {r21d.__version__}, backends here: "
          f"{', '.join(r21d.available_backends())}")
    print("Run on a GPU for measurements (eager, torch.compile, r21d, matmul, with measured "
          "ceilings); `r21d-bench --smoke` runs the timing path end to end on tiny shapes here.\n")
    ceilings = roofline.H100_BASELINES
    print(f"Roofline predictions on an H100: {ceilings.describe()}.")
    print("floor = max(bytes moved once / copy bandwidth, FLOPs / matmul rate), summed over a "
          "model's convolutions.\n")
    print(report.predictions_table(cases, ceilings))

    equal = True
    if any(c.kind == "model" for c in cases):
        print()
        try:
            lines, equal, fused = fused_model_equivalence()
        except ImportError as e:
            print(f"(fused-model equivalence skipped: {e})")
        else:
            print("\n".join(lines))
            print("\nr21d.fusion_report(fused model), here (CPU, float32):")
            print(r21d.fusion_report(fused))
            print("\nThe same on a GPU with the triton backend, bfloat16 "
                  "(r21d.fusion_report(fused, dtype=torch.bfloat16, device='cuda')):")
            with r21d.use_backend("triton"):
                print(r21d.fusion_report(fused, dtype=torch.bfloat16, device="cuda"))
    print(f"\n(CPU mode took {time.perf_counter() - start:.1f} s)")
    return 0 if equal else 1
