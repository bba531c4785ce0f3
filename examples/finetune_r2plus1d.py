"""Fine-tune a fused R(2+1)D-18 on a synthetic clip dataset.

One line makes the model run r21d's fused kernels: ``model = r21d.fuse(model)``. The state dict
keeps torchvision's keys, so pretrained weights load before fusing and the checkpoint this script
writes loads back into a plain ``torchvision.models.video.r2plus1d_18``.

    python examples/finetune_r2plus1d.py                      # one process (GPU if there is one)
    torchrun --nproc_per_node=2 examples/finetune_r2plus1d.py # DistributedDataParallel
    python examples/finetune_r2plus1d.py --help

With torchrun each process trains on its share of the clips (DistributedSampler) and DDP
averages the gradients: NCCL on GPUs (one per process), gloo on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import r21d


class SyntheticClips(Dataset):
    """Clips of ``num_classes`` classes that a video network can learn: each class is a fixed
    random spatio-temporal pattern; a clip is its class's pattern plus fresh noise."""

    def __init__(self, num_clips: int, num_classes: int, frames: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, frames, size, size, generator=g)
        self.labels = torch.randint(0, num_classes, (num_clips,), generator=g)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = self.labels[i]
        clip = self.patterns[label] + 0.5 * torch.randn(self.patterns.shape[1:], generator=g)
        return clip, label


class Progress:
    """A one-line progress bar on stderr (only the first process draws it)."""

    def __init__(self, total: int, title: str, enabled: bool = True, width: int = 30):
        self.total, self.title, self.enabled, self.width = total, title, enabled, width
        self.done, self.start = 0, time.perf_counter()

    def update(self, **stats: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        text = " ".join(f"{k} {v:.4f}" for k, v in stats.items())
        sys.stderr.write(f"\r{self.title} [{'#' * filled}{'.' * (self.width - filled)}] "
                         f"{self.done}/{self.total} {rate:.2f} it/s {text}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--clips", type=int, default=64, help="clips in the synthetic dataset")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=112, help="frame height and width")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weights", help="a torchvision r2plus1d_18 state dict to start from "
                                     "(its classifier is replaced)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="r21d backend (auto: Triton kernels on a GPU, torch on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-autocast", action="store_true", help="on a GPU: train in fp32, not bf16 autocast")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: SyncBatchNorm, statistics over every process's clips (fused; "
                        "PyTorch's own SyncBatchNorm, the torch backend, runs on GPUs only)")
    p.add_argument("--save", help="write the fine-tuned state dict here (torchvision's keys)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); under torchrun, joins the process group."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    on_gpu = torch.device(device).type == "cuda"
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def build_model(num_classes: int, weights: str | None, device: torch.device,
                memory_format: torch.memory_format, sync_bn: bool = False) -> nn.Module:
    """torchvision's r2plus1d_18 (optionally with weights), a new classifier, SyncBatchNorm if
    asked, then fused."""
    from torchvision.models.video import r2plus1d_18

    model = r2plus1d_18()
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = r21d.fuse(model)  # the one line: every conv + BN + ReLU site runs fused
    return model.to(device, memory_format=memory_format)


def main(argv: list[str] | None = None) -> float:
    """Trains; returns the last epoch's mean loss (of this process's clips)."""
    args = _parser().parse_args(argv)
    rank, world, device = _setup_distributed(args.device)
    torch.manual_seed(args.seed)  # every process builds the same initial model
    r21d.set_backend(args.backend)

    dataset = SyntheticClips(args.clips, args.classes, args.frames, args.size, seed=args.seed)
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                        shuffle=sampler is None, drop_last=True)
    # channels_last_3d is the kernels' fast layout on a GPU; the CPU's conv3d is faster in NCDHW
    memory_format = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format
    model = build_model(args.classes, args.weights, device, memory_format, args.sync_bn and world > 1)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    autocast = device.type == "cuda" and not args.no_autocast
    if rank == 0:
        print(f"r2plus1d_18 fused ({r21d.fusion_report(model).splitlines()[-1]}), "
              f"{world} process(es) on {device.type}, {len(loader)} steps per epoch", flush=True)

    mean_loss = float("nan")
    model.train()
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        progress = Progress(len(loader), f"epoch {epoch + 1}/{args.epochs}", enabled=rank == 0)
        total, steps = 0.0, 0
        for clips, labels in loader:
            clips = clips.to(device, memory_format=memory_format, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(clips)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()  # one host sync per step
            total, steps = total + value, steps + 1
            progress.update(loss=value)
        mean_loss = total / max(steps, 1)
        if rank == 0:
            print(f"epoch {epoch + 1}: mean loss {mean_loss:.4f}", flush=True)

    if args.save and rank == 0:
        plain = r21d.unfuse(model.module if world > 1 else model)
        torch.save(plain.state_dict(), args.save)
        print(f"saved {args.save} (loads into torchvision's r2plus1d_18 with a "
              f"{args.classes}-class fc)", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return mean_loss


if __name__ == "__main__":
    main()
