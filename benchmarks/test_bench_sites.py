"""pytest-benchmark timings of r21d-bench's site cases (every conv + BN + activation site and (2+1)D
unit; whole models are r21d-bench's alone) (GPU only).

    pytest benchmarks -m gpu                                  # table of all site timings
    pytest benchmarks -m gpu -k depthwise                     # one family (or a case id)
    pytest benchmarks -m gpu --benchmark-autosave             # keep them in .benchmarks/
    pytest benchmarks -m gpu --benchmark-compare              # against the last saved run

The cases, the provider names and the timed callables are r21d.bench's own (``cases.CASES``,
``runner``, ``providers``): this file holds no case list. Each provider runs in the case's layout and dtype without autocast;
``r21d-bench`` additionally tries the other layout and autocast for eager and reports the best,
checks correctness and prints roofline floors. Timing: pedantic mode, one call per round with
torch.cuda.synchronize() after it (so a round's wall time covers the GPU work), inputs rotated
among the workload's copies by the setup function, after untimed warm-up rounds (which also
absorb Triton autotuning and torch.compile).
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from r21d.bench import cases, providers, runner  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest benchmarks -m gpu)"),
]

SITES = [c for c in cases.CASES if c.kind != "model"]  # whole models: r21d-bench itself
PROVIDERS = [runner.EAGER, runner.FUSED_PREFIX + "triton", runner.FUSED_PREFIX + "cuda", runner.COMPILE,
             runner.CONV, runner.MATMUL]
ROUNDS, WARMUP_ROUNDS = 50, 10


@pytest.fixture(scope="module")
def workload_for():
    """One workload (inputs on the GPU) per case, shared by its providers."""
    built: dict[str, object] = {}

    def get(case):
        if case.id not in built:
            built.clear()  # one case's tensors on the GPU at a time
            torch.cuda.empty_cache()
            built[case.id] = providers.workload(case, torch.device("cuda"))
        return built[case.id]

    yield get
    built.clear()


def _prepare(workload, case, provider: str, variant: providers.Variant) -> providers.Prepared:
    import r21d

    if provider == runner.EAGER:
        return workload.eager(variant)
    if provider == runner.CONV:  # as r21d-bench: the convolution alone, of a single site
        if case.kind != "conv_bn_act":
            pytest.skip(f"no single convolution in a {case.kind} case")
        return workload.conv_alone()
    if provider == runner.MATMUL:
        prepared = workload.matmul() if case.family == "pointwise" else None
        if prepared is None:
            pytest.skip(f"no matmul equivalent of a {case.family} conv")
        return prepared
    if provider == runner.COMPILE:
        torch._dynamo.reset()
        return workload.compiled(variant, None)
    backend = provider.split("/", 1)[1]
    if backend not in r21d.available_backends():
        pytest.skip(f"the {backend} backend is not available here")
    why_not = workload.fused_unavailable(backend)
    if why_not:
        pytest.skip(why_not)
    return workload.fused(backend, variant)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", SITES, ids=lambda c: c.id)
def test_site(benchmark, workload_for, case, provider):
    workload = workload_for(case)
    variant = providers.Variant(case.channels_last, False, case.dtype)
    prepared = _prepare(workload, case, provider, variant)
    prepared.fn(*prepared.arg_sets[0])  # compile / autotune before any round
    copies = itertools.cycle(prepared.arg_sets)

    def next_inputs():
        torch.cuda.synchronize()  # nothing from the previous round runs into this one
        return next(copies), {}

    def call(*args):
        prepared.fn(*args)
        torch.cuda.synchronize()

    benchmark.group = case.id
    benchmark.extra_info.update(case=case.id, provider=provider, variant=variant.label,
                                input_copies=len(prepared.arg_sets), note=prepared.note)
    benchmark.pedantic(call, setup=next_inputs, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
