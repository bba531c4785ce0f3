"""Whole fused torchvision video models on a GPU (all marked ``gpu``): bf16 logits as accurate as
cuDNN's against a float64 model, in eval and in an autocast training step; every gradient of an
fp32 step; CUDA graph capture of the eval forward and of a whole training step; torch.compile's
reduce-overhead mode; and the bench's latency case end to end."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import r21d
from r21d.bench.workload_common import cuda_graphed, randomize_batchnorm
from r21d.triton_kernels import _launch
from tests.utils import assert_oracle_close

pytestmark = pytest.mark.gpu
MODELS = ["r2plus1d_18", "r3d_18", "mc3_18"]
CL3D = torch.channels_last_3d


def _model(name: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    video = pytest.importorskip("torchvision.models.video")
    torch.manual_seed(seed)
    model = getattr(video, name)(num_classes=num_classes)
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    return model


def _clip(batch=2, frames=8, size=64, seed=1) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "autocast"])
@pytest.mark.parametrize("name", MODELS)
def test_bf16_eval_logits_as_accurate_as_cudnn(name, autocast, strict):
    plain, x = _model(name).eval(), _clip()
    with torch.no_grad():
        ref = copy.deepcopy(plain).double().cuda()(x.double().cuda())
    model = plain.cuda().to(memory_format=CL3D)
    xin = x.cuda().contiguous(memory_format=CL3D)
    if not autocast:
        model, xin = model.to(torch.bfloat16), xin.to(torch.bfloat16)
    fused = r21d.fuse(model)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        with r21d.use_backend("torch"):
            cudnn = model(xin)
        with r21d.use_backend("triton"), _launch.count() as counter:
            out = fused(xin)
    assert counter.launches > 0 and "relayout" not in counter.kernels
    assert_oracle_close("logits", out.float(), ref, torch.bfloat16, baseline=cudnn.float())


@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_training_forward_and_running_stats(name, strict):
    """Training mode under bf16 autocast: logits and every BN's running statistics against
    float64, within twice cuDNN's error (parameter gradients of a deep bf16 network are too noisy
    to judge: the fp32 test below checks them)."""
    plain, x = _model(name).train(), _clip()
    ref_model = copy.deepcopy(plain).double().cuda()
    ref = ref_model(x.double().cuda())
    model = plain.cuda().to(memory_format=CL3D)
    fused = r21d.fuse(copy.deepcopy(model))
    xin = x.cuda().contiguous(memory_format=CL3D)
    with torch.autocast("cuda", torch.bfloat16):
        with r21d.use_backend("torch"):
            cudnn = model(xin)
        with r21d.use_backend("triton"):
            out = fused(xin)
    assert_oracle_close("logits", out.float(), ref, torch.bfloat16, baseline=cudnn.float())
    eager_buffers = dict(model.named_buffers())
    fused_buffers = dict(fused.named_buffers())
    for key, b in ref_model.named_buffers():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(fused_buffers[key].cpu(), b.cpu()), key
        else:
            assert_oracle_close(key, fused_buffers[key], b, torch.bfloat16, baseline=eager_buffers[key])


def test_fp32_training_step_gradients_match_float64(strict, monkeypatch):
    """Every parameter gradient of a fused r2plus1d_18 training step in IEEE fp32 (TF32 off for
    cuDNN, and so for the kernels, which follow its setting) against float64."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    plain, x = _model("r2plus1d_18", num_classes=4).train(), _clip(frames=4, size=32)
    labels = torch.tensor([1, 3])
    results = {}
    for key, backend, dtype in (("ref", "torch", torch.float64), ("cudnn", "torch", torch.float32),
                                ("fused", "triton", torch.float32)):
        model = copy.deepcopy(plain).to("cuda", dtype).to(memory_format=CL3D)
        if key == "fused":
            model = r21d.fuse(model)
        with r21d.use_backend(backend):
            loss = F.cross_entropy(model(x.to("cuda", dtype).contiguous(memory_format=CL3D)),
                                   labels.cuda())
            loss.backward()
        results[key] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in results["ref"].items():
        assert_oracle_close(f"grad {name}", results["fused"][name], g, torch.float32,
                            baseline=results["cudnn"][name])


def test_fused_eval_forward_replays_in_a_cuda_graph(strict):
    """Captured as the bench captures it (warm-up on a side stream, so that Triton autotunes
    outside the capture; then static inputs), replays equal eager calls bit for bit."""
    fused = r21d.fuse(_model("r2plus1d_18").eval().cuda().to(torch.bfloat16).to(memory_format=CL3D))

    def clip(seed):
        return _clip(seed=seed).cuda().to(torch.bfloat16).contiguous(memory_format=CL3D)

    with torch.no_grad(), r21d.use_backend("triton"):
        replay = cuda_graphed(fused, (clip(0),))
        for seed in (1, 2):
            x = clip(seed)
            assert torch.equal(replay(x), fused(x))  # the same kernels on the same data


def test_fused_training_step_replays_in_a_cuda_graph(strict):
    """A whole training step (forward, backward, SGD) captured once and replayed gives the same
    parameters and running statistics as the same steps run eagerly (the kernels are
    deterministic), so the fused ops neither sync with the host nor allocate outside the graph."""
    base = _model("r2plus1d_18", num_classes=4).train().cuda().to(memory_format=CL3D)
    clips = [_clip(seed=s).cuda().contiguous(memory_format=CL3D) for s in range(6)]
    labels = [torch.tensor([s % 4, (s + 1) % 4], device="cuda") for s in range(6)]
    models = {}
    for mode in ("eager", "graph"):
        model = r21d.fuse(copy.deepcopy(base))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(x, y, model=model, optimizer=optimizer):
            with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            optimizer.step()
            return loss

        with r21d.use_backend("triton"):
            if mode == "eager":
                for x, y in zip(clips, labels):
                    optimizer.zero_grad(set_to_none=True)
                    step(x, y)
            else:  # 3 warm-up steps on clips 0-2, then the graph replayed on clips 3-5
                static_x, static_y = clips[0].clone(), labels[0].clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for x, y in zip(clips[:3], labels[:3]):
                        static_x.copy_(x), static_y.copy_(y)
                        optimizer.zero_grad(set_to_none=True)
                        step(static_x, static_y)
                torch.cuda.current_stream().wait_stream(stream)
                optimizer.zero_grad(set_to_none=True)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step(static_x, static_y)
                for x, y in zip(clips[3:], labels[3:]):
                    static_x.copy_(x), static_y.copy_(y)
                    graph.replay()
        torch.cuda.synchronize()
        models[mode] = model
    eager_state, graph_state = models["eager"].state_dict(), models["graph"].state_dict()
    for key, value in eager_state.items():
        assert torch.equal(graph_state[key], value), key


def test_reduce_overhead_compile_of_a_fused_model(strict):
    fused = r21d.fuse(_model("r2plus1d_18").eval().cuda().to(torch.bfloat16).to(memory_format=CL3D))
    x = _clip(batch=1).cuda().to(torch.bfloat16).contiguous(memory_format=CL3D)
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad(), r21d.use_backend("triton"):
        expected = fused(x)
        for _ in range(4):  # cudagraph trees record after warm-up runs, then replay
            out = compiled(x).clone()
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_latency_case_times_a_cuda_graph_of_the_fused_model(tmp_path):
    from r21d.bench import main

    assert main(["--smoke", "--no-compile", "--cases", "r2plus1d_18-b1-latency", "--out",
                 str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-smoke.json")
    (case,) = json.loads(path.read_text())["cases"]
    graphed = [m for m in case["measurements"]
               if m["provider"] == "r21d/triton" and "CUDA graph" in (m["variant"] or "")]
    assert graphed and all(m["check"] == "ok" and m["median_ms"] > 0 for m in graphed)
