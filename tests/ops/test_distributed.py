"""Fused models across processes, on the CPU: two ranks on gloo, the Triton kernels in the
interpreter (strict, so nothing falls back).

* nn.SyncBatchNorm inside fused sites and (2+1)D units: every rank normalises with the statistics
  of the global batch, so each rank's output, input gradient and running statistics, and the sum
  over ranks of its parameter gradients, equal one process's float64 model run on the whole batch
  with plain BatchNorm. The ranks hold batches of different sizes (the statistics are merged
  weighted by count). PyTorch itself runs SyncBatchNorm only on GPUs; r21d's reduction is a
  collective on any backend, so it is checked here.
* DistributedDataParallel over a fused model: two SGD steps change the parameters and running
  statistics as a float64 DDP run of the plain model does (within twice a float32 plain run's
  error).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import r21d
from tests.utils import assert_oracle_close, gpu, perturb_batchnorm

pytestmark = pytest.mark.usefixtures("strict")

WORLD = 2
BATCH_PER_RANK = (2, 1)  # unequal: the global statistics weight each rank by its count
SHAPE = (3, 4, 6, 6)  # C, T, H, W of a clip


def _model(sync: bool) -> nn.Module:
    """Every fused kind: an implicit-GEMM spatial site, a depthwise site with a conv bias, a
    pointwise site with a bias, and torchvision's Conv2Plus1D + BN + ReLU (the training unit)."""
    from torchvision.models.video.resnet import Conv2Plus1D

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(8), nn.ReLU(),
        nn.Conv3d(8, 8, 3, padding=1, groups=8), nn.BatchNorm3d(8), nn.SiLU(),
        nn.Conv3d(8, 6, 1), nn.BatchNorm3d(6), nn.ReLU(),
        Conv2Plus1D(6, 5, 4), nn.BatchNorm3d(5), nn.ReLU(),
    )
    perturb_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def _batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(BATCH_PER_RANK), *SHAPE, generator=g)
    grad_out = torch.randn(sum(BATCH_PER_RANK), 5, *SHAPE[1:], generator=g)
    return x.split(BATCH_PER_RANK), grad_out.split(BATCH_PER_RANK)


def _init(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _sync_bn_rank(rank: int, init_file: str, out_dir: str, device: str) -> None:
    _init(rank, init_file)
    torch.backends.cudnn.allow_tf32 = False  # IEEE fp32 (r21d follows cuDNN's TF32 switch)
    try:
        model = r21d.fuse(_model(sync=True)).to(device).train()
        xs, grads = _batches()
        x = xs[rank].to(device).requires_grad_()
        with r21d.use_backend("triton"):
            backends = [(s.kernel, s.backend) for s in r21d.fusion_sites(model)]
            y = model(x)
            y.backward(grads[rank].to(device))
        local_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        param_grads = {name: g.clone() for name, g in local_grads.items()}
        for g in param_grads.values():
            dist.all_reduce(g)  # the gradient of the whole batch's loss
        result = {"out": y.detach(), "grad_x": x.grad, "param_grads": param_grads,
                  "local_grads": local_grads, "buffers": dict(model.named_buffers())}
        torch.save({**_to_cpu(result), "backends": backends}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _to_cpu(value):
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value.detach().cpu()


def _spawn(fn, tmp_path, *args) -> list[dict]:
    mp.spawn(fn, args=(str(tmp_path / "init"), str(tmp_path), *args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _whole_batch_reference(dtype):
    """The plain model (BatchNorm3d) on the concatenated batch, in one process; and, for the
    parameters whose gradient is a sum over rows (BN's weight and bias, a conv's bias), each
    rank's share of it: what nn.SyncBatchNorm leaves on each rank for DDP to reduce."""
    model = _model(sync=False).to(dtype).train()
    kept = {}

    def keep(module, inputs, output):
        output.retain_grad()
        kept[module] = (inputs[0], output)

    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # keep each BN's output (torchvision's Conv2Plus1D overwrites it)
        if isinstance(m, nn.BatchNorm3d) or (isinstance(m, nn.Conv3d) and m.bias is not None):
            m.register_forward_hook(keep)
    xs, grads = _batches()
    x = torch.cat(xs).to(dtype).requires_grad_()
    with r21d.use_backend("torch"):
        y = model(x)
        y.backward(torch.cat(grads).to(dtype))

    def rank_share(rows: slice) -> dict:
        share = {}
        for name, m in model.named_modules():
            if m not in kept:
                continue
            z, out = kept[m]
            g = out.grad[rows]
            share[f"{name}.bias"] = g.sum((0, 2, 3, 4))
            if isinstance(m, nn.BatchNorm3d):
                xhat = (out[rows] - m.bias.view(-1, 1, 1, 1)) / m.weight.view(-1, 1, 1, 1)
                share[f"{name}.weight"] = (g * xhat).sum((0, 2, 3, 4)).detach()
        return share

    return y.detach(), x.grad, model, rank_share


@pytest.mark.parametrize("device", ["cpu", gpu("cuda")])
def test_sync_batchnorm_statistics_span_every_rank(tmp_path, device):
    """On a GPU: both ranks on the one visible GPU, gloo over CUDA tensors (NCCL wants a GPU per
    rank); with several GPUs, torchrun --nproc_per_node=N runs the same code on NCCL."""
    pytest.importorskip("torchvision")
    ranks = _spawn(_sync_bn_rank, tmp_path, device)
    ref_y, ref_gx, ref, ref_share = _whole_batch_reference(torch.float64)
    base_y, base_gx, base, base_share = _whole_batch_reference(torch.float32)
    assert ranks[0]["backends"] == [("spatial", "triton"), ("depthwise", "triton"),
                                    ("pointwise", "triton"), ("conv2plus1d-train", "triton")]
    offsets = [0, BATCH_PER_RANK[0]]
    for rank, result in enumerate(ranks):
        rows = slice(offsets[rank], offsets[rank] + BATCH_PER_RANK[rank])
        assert_oracle_close(f"rank {rank} out", result["out"], ref_y[rows], torch.float32, base_y[rows])
        assert_oracle_close(f"rank {rank} grad x", result["grad_x"], ref_gx[rows], torch.float32,
                            base_gx[rows])
        ref_params, base_params = dict(ref.named_parameters()), dict(base.named_parameters())
        assert result["param_grads"].keys() == ref_params.keys()
        for name, g in result["param_grads"].items():
            assert_oracle_close(f"rank {rank} grad {name}", g, ref_params[name].grad, torch.float32,
                                base_params[name].grad)
        share, base_rank_share = ref_share(rows), base_share(rows)
        assert len(share) == 2 * 5 + 2  # five BNs' weight and bias, two conv biases
        for name, expected in share.items():
            assert_oracle_close(f"rank {rank} local grad {name}", result["local_grads"][name],
                                expected, torch.float32, base_rank_share[name])
        base_buffers = dict(base.named_buffers())
        for name, b in ref.named_buffers():
            if b.is_floating_point():
                assert_oracle_close(f"rank {rank} {name}", result["buffers"][name], b, torch.float32,
                                    base_buffers[name])
            else:
                assert torch.equal(result["buffers"][name], b), name


STEPS, LR = 2, 0.1


def _ddp_steps(model: nn.Module, rank: int, dtype) -> dict:
    """STEPS of SGD on DDP(model); each rank trains on its own half of a fixed batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model.to(dtype))
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        x = torch.randn(2 * WORLD, *SHAPE, generator=g).to(dtype).chunk(WORLD)[rank]
        target = torch.randn(2 * WORLD, 5, *SHAPE[1:], generator=g).to(dtype).chunk(WORLD)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), target).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_rank(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    try:
        with r21d.use_backend("torch"):
            reference = _ddp_steps(_model(sync=False), rank, torch.float64)
            baseline = _ddp_steps(_model(sync=False), rank, torch.float32)
        fused = r21d.fuse(_model(sync=False)).train()
        with r21d.use_backend("triton"):
            state = _ddp_steps(fused, rank, torch.float32)
        torch.save({"reference": reference, "baseline": baseline, "fused": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_training_steps_of_a_fused_model_match_the_plain_model(tmp_path):
    pytest.importorskip("torchvision")
    ranks = _spawn(_ddp_rank, tmp_path)
    initial = _model(sync=False).state_dict()
    for rank, result in enumerate(ranks):
        reference, fused = result["reference"], result["fused"]
        assert fused.keys() == reference.keys()
        for name, ref in reference.items():
            if ref.is_floating_point():
                # what the steps changed (the values themselves would hide the gradients' errors)
                start = initial[name].double()
                assert_oracle_close(f"rank {rank} {name} change", fused[name].double() - start,
                                    ref - start, torch.float32, result["baseline"][name].double() - start)
            else:
                assert torch.equal(fused[name], ref), name
    # DDP keeps the parameters identical (each rank's last forward updated its own statistics)
    for name, _ in _model(sync=False).named_parameters():
        assert torch.equal(ranks[0]["fused"][name], ranks[1]["fused"][name]), name


def test_sync_batchnorm_without_a_process_group_is_plain_batchnorm():
    """Outside torch.distributed (or in eval) a SyncBatchNorm site fuses like BatchNorm3d."""
    model = r21d.fuse(_model(sync=True)).train()
    plain = r21d.fuse(_model(sync=False)).train()
    xs, _ = _batches()
    with r21d.use_backend("triton"):
        y, ref = model(xs[0]), plain(xs[0])
        assert {s.backend for s in r21d.fusion_sites(model)} == {"triton"}
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
