"""torchvision's video ResNets with every width divided by ``divisor``: the same sites, (2+1)D
units, strides, shortcuts and residual tails as the full models, small enough for a whole forward
and backward in the Triton interpreter or a host-time measurement on the CPU."""

from __future__ import annotations

from torch import nn


def _stem(model: str, divisor: int) -> nn.Module:
    width = 64 // divisor
    if model == "r2plus1d_18":  # R2Plus1dStem's layers, narrowed
        mid = 45 // divisor
        return nn.Sequential(
            nn.Conv3d(3, mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
            nn.Conv3d(mid, width, (3, 1, 1), 1, (1, 0, 0), bias=False),
            nn.BatchNorm3d(width), nn.ReLU(inplace=True))
    if model == "r3d_18":  # BasicStem, narrowed
        return nn.Sequential(
            nn.Conv3d(3, width, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
            nn.BatchNorm3d(width), nn.ReLU(inplace=True))
    raise ValueError(f"no narrow {model!r}; expected 'r2plus1d_18' or 'r3d_18'")


def narrow_video_resnet(model: str = "r2plus1d_18", divisor: int = 16,
                        num_classes: int = 4) -> nn.Module:
    """torchvision's ``model`` (VideoResNet: BasicBlock, [2, 2, 2, 2]) with every width divided by
    ``divisor``."""
    from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, Conv3DSimple, VideoResNet

    width = 64 // divisor
    conv = Conv2Plus1D if model == "r2plus1d_18" else Conv3DSimple

    class Narrow(VideoResNet):
        def _make_layer(self, block, conv_builder, planes, blocks, stride=1):
            if planes == 64:  # the first layer: VideoResNet starts from 64 stem channels
                self.inplanes = width
            return super()._make_layer(block, conv_builder, planes // divisor, blocks, stride)

    net = Narrow(BasicBlock, [conv] * 4, [2, 2, 2, 2], lambda: _stem(model, divisor), num_classes)
    net.fc = nn.Linear(512 // divisor, num_classes)
    return net


def narrow_r2plus1d_18(divisor: int = 16, num_classes: int = 4) -> nn.Module:
    return narrow_video_resnet("r2plus1d_18", divisor, num_classes)


def conv_bn_pairs(model: nn.Module) -> int:
    """Conv3d modules of ``model`` (each followed by a BatchNorm in these ResNets)."""
    return sum(isinstance(m, nn.Conv3d) for m in model.modules())


__all__ = ["conv_bn_pairs", "narrow_r2plus1d_18", "narrow_video_resnet"]
