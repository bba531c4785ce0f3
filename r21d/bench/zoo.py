"""pytorchvideo's models as bench builders: the depthwise family's whole models (X3D's and CSN's
channel-wise 3x3x3 convs), built for a case's clip (their heads pool the last stage whole).

Each builder takes the clip (``frames``, ``size``) and ``num_classes``; pytorchvideo is imported
when one is called (a case's prediction says so where it is not installed).
"""

from __future__ import annotations

from torch import nn


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def x3d_m(frames: int, size: int, num_classes: int = 400) -> nn.Module:
    """X3D-M (width x2.0, depth x2.2, bottleneck x2.25): depthwise 3x3x3 convs, SE, Swish."""
    from pytorchvideo.models.x3d import create_x3d

    return create_x3d(input_clip_length=frames, input_crop_size=size, model_num_class=num_classes,
                      width_factor=2.0, depth_factor=2.2)


def csn_50(frames: int, size: int, num_classes: int = 400) -> nn.Module:
    """ir-CSN-50: ResNet-50 bottlenecks whose 3x3x3 conv is channel-wise (depthwise)."""
    from pytorchvideo.models.csn import create_csn

    # the last stage is frames / 8 x size / 32 (temporal strides 1, 2, 2, 2; spatial 32)
    pool = (_ceil_div(frames, 8), _ceil_div(size, 32), _ceil_div(size, 32))
    return create_csn(model_depth=50, model_num_class=num_classes, head_pool_kernel_size=pool)


BUILDERS = {"x3d_m": x3d_m, "csn_50": csn_50}
