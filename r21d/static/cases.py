"""The static report's cases: each calls real launchers on small CPU tensors under
``_launch.capture()``, for every kernel family, dtype and layout, and the arch limits."""


from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

from ..problem import ConvProblem
from ..triton_kernels._layout import out_size

# Opt-in shared memory per block (what Triton compares metadata.shared against at launch).

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)
# r21d.triton_kernels.<module>
KERNEL_MODULES = ("pointwise", "depthwise", "depthwise_bwd", "implicit_gemm", "implicit_gemm_bwd", "conv2plus1d",
                  "batchnorm", "splitk")


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One representative call of a family's launchers, run under ``_launch.capture()``."""

    family: str
    name: str  # e.g. "fwd-eval"
    dtype: str  # "bf16", "fp16", "fp32-tf32", "fp32-ieee"
    layout: str  # a key of the family's shape table, e.g. "cl3d" (channels_last_3d), "cl3d-odd"
    run: Callable[[Case], None]

    @property
    def label(self) -> str:
        return f"{self.family}/{self.name}/{self.dtype}/{self.layout}"


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


@contextlib.contextmanager
def fp32_precision(dtype: str):
    """fp32-tf32 / fp32-ieee: set the cuDNN conv fp32 precision the launchers read, restore after."""
    import torch

    want = {"fp32-tf32": "tf32", "fp32-ieee": "ieee"}.get(dtype)
    if want is None:
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the new API only
        previous = conv.fp32_precision
        conv.fp32_precision = want
        try:
            yield
        finally:
            conv.fp32_precision = previous
    else:
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = want == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = previous


# Shapes: T = 8, H = W = 14 (an R(2+1)D late stage) so that, as in real video shapes, some
# sizes are not multiples of 16 (Triton specialises on that), and M = 3136 rows makes the weight
# gradient split over 4 row ranges (1 would be specialised to a constant). The "cl3d-odd" layout
# has the channel counts of R(2+1)D's intermediate tensors (45, 230): rows not 16-byte aligned.
# NCDHW needs no case of its own: the launchers convert it to channels_last_3d at the boundary.
PW_SHAPES = {
    "cl3d": dict(N=2, C_in=64, C_out=256, T=8, H=14, W=14),
    "cl3d-odd": dict(N=2, C_in=45, C_out=230, T=8, H=14, W=14),
}


def _pointwise(case: Case, stride=(1, 1, 1), padding=(0, 0, 0)) -> None:
    import torch

    from r21d.triton_kernels import pointwise

    s = PW_SHAPES[case.layout]
    dt = _torch_dtype(case.dtype)
    gen = torch.Generator().manual_seed(0)

    def act(*shape, dtype=dt):  # an activation tensor, channels_last_3d
        return torch.randn(*shape, generator=gen, dtype=dtype).contiguous(
            memory_format=torch.channels_last_3d)

    def vec(n=s["C_out"], dtype=torch.float32):
        return torch.randn(n, generator=gen, dtype=dtype)

    problem = ConvProblem(**s, stride=stride, padding=padding, layout="cl3d")
    x = act(*problem.input_shape)
    w = torch.randn(*problem.weight_shape, generator=gen, dtype=dt)
    bias, bn_weight, bn_bias = vec(dtype=dt), vec(), vec()
    rmean, rvar = vec(), vec().abs() + 1
    out_shape = problem.output_shape()
    op = case.name.split("-s2")[0]
    # SiLU everywhere: its epilogue and backward need more registers than ReLU's, so a tile
    # that does not spill with SiLU does not spill with ReLU.
    if op.startswith("fwd"):
        # fwd-eval-res: the heaviest eval epilogue: residual, and z + statistics saved for
        # autograd (eval-mode BN while training, e.g. frozen BN in fine-tuning)
        residual = act(*out_shape) if op == "fwd-eval-res" else None
        training = op == "fwd-train"
        pointwise.conv_bn_act_fwd(x, w, bias, bn_weight, bn_bias, rmean, rvar, residual, stride, padding,
                                  training=training, momentum=0.1, eps=1e-5, activation="silu",
                                  save=op != "fwd-eval")
    elif op in ("bwd", "bwd-eval"):  # every gradient, with a residual; bwd-eval: running stats
        grad_out, z, residual = act(*out_shape), act(*out_shape), act(*out_shape)
        pointwise.conv_bn_act_bwd(grad_out, x, w, bias, z, vec(), vec().abs(), bn_weight, bn_bias,
                                  residual, stride, padding, training=op == "bwd",
                                  activation="silu", needs=(True,) * 6)
    else:
        raise ValueError(case.name)


def _pointwise_s2(case: Case) -> None:
    _pointwise(case, stride=(1, 2, 2), padding=(0, 0, 0))


# Depthwise: an X3D stage (216 channels: a multiple of 8, not of 16), its odd-channel variant
# (54: rows 4-byte aligned in 16-bit) and NCDHW, which the kernels address in place.
DW_SHAPES = {
    "dw-cl3d": dict(N=2, C=216, T=4, H=14, W=14, cl=True),
    "dw-cl3d-odd": dict(N=2, C=54, T=4, H=14, W=14, cl=True),
    "dw-ncdhw": dict(N=2, C=216, T=4, H=14, W=14, cl=False),
}
DW_LAYOUTS = tuple(DW_SHAPES)
DW_DTYPES = ("bf16", "fp16", "fp32")
# name -> (kernel, stride, padding)
DW_GEOMETRY = {"k333": ((3, 3, 3), (1, 1, 1), (1, 1, 1)), "k133-s2": ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
               "k511": ((5, 1, 1), (1, 1, 1), (2, 0, 0))}


def _depthwise(case: Case) -> None:
    import torch

    from r21d.triton_kernels import depthwise, depthwise_bwd

    op, geometry = case.name.rsplit("/", 1) if "/" in case.name else (case.name, "k333")
    kernel, stride, padding = DW_GEOMETRY[geometry]
    s = DW_SHAPES[case.layout]
    dt = _torch_dtype(case.dtype)
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last_3d if s["cl"] else torch.contiguous_format

    def act(*shape):
        return torch.randn(*shape, generator=gen, dtype=dt).contiguous(memory_format=fmt)

    def vec(dtype=torch.float32):
        return torch.randn(s["C"], generator=gen, dtype=dtype)

    problem = ConvProblem(N=s["N"], C_in=s["C"], C_out=s["C"], T=s["T"], H=s["H"], W=s["W"],
                          kernel=kernel, stride=stride, padding=padding, groups=s["C"],
                          layout="cl3d" if s["cl"] else "ncdhw")
    x = act(*problem.input_shape)
    w = torch.randn(*problem.weight_shape, generator=gen, dtype=dt)
    bias, bn_weight, bn_bias, rmean, rvar = vec(dt), vec(), vec(), vec(), vec().abs() + 1
    out_shape = problem.output_shape()
    dilation = problem.dilation
    # SiLU and a residual everywhere: the costliest epilogue and backward prologue.
    if op.startswith("fwd"):
        depthwise.conv_bn_act_fwd(x, w, bias, bn_weight, bn_bias, rmean, rvar, act(*out_shape), stride,
                                  padding, dilation, training=op == "fwd-train", momentum=0.1,
                                  eps=1e-5, activation="silu", save=True)
    elif op == "bwd":
        depthwise_bwd.conv_bn_act_bwd(act(*out_shape), x, w, bias, act(*out_shape), vec(),
                                      vec().abs(), bn_weight, bn_bias, act(*out_shape), stride, padding,
                                      dilation, training=True, activation="silu", needs=(True,) * 6)
    else:
        raise ValueError(case.name)


# Implicit GEMM: an R(2+1)D layer1 unit (64 -> 144 channels: rows 16-byte aligned), its odd-channel
# variant (45 -> 230, R(2+1)D's stem and layer2 intermediates), and the 3-channel stem, whose
# K loop runs flat over (tap, channel). Geometries (kernel, stride, padding, groups) are the
# classes that specialise differently: Triton turns sizes and strides equal to 1 into constants.
IG_SHAPES = {
    "ig-cl3d": dict(N=2, C_in=64, C_out=144, T=8, H=14, W=14),
    "ig-cl3d-odd": dict(N=2, C_in=45, C_out=230, T=8, H=14, W=14),
    "ig-stem": dict(N=2, C_in=3, C_out=45, T=8, H=28, W=28),
}
IG_GEOMETRY = {
    "k133": ((1, 3, 3), (1, 1, 1), (0, 1, 1), 1),
    "k311": ((3, 1, 1), (1, 1, 1), (1, 0, 0), 1),
    "k133-s2": ((1, 3, 3), (1, 2, 2), (0, 1, 1), 1),
    "k311-s2": ((3, 1, 1), (2, 1, 1), (1, 0, 0), 1),
    "k333": ((3, 3, 3), (1, 1, 1), (1, 1, 1), 1),
    "k333-g4": ((3, 3, 3), (1, 1, 1), (1, 1, 1), 4),
    "k177-s2": ((1, 7, 7), (1, 2, 2), (0, 3, 3), 1),
}


def _implicit_gemm(case: Case) -> None:
    import torch

    from r21d.triton_kernels import implicit_gemm, implicit_gemm_bwd

    op, geometry = case.name.split("/")
    kernel, stride, padding, groups = IG_GEOMETRY[geometry]
    s = IG_SHAPES[case.layout]
    dt = _torch_dtype(case.dtype)
    gen = torch.Generator().manual_seed(0)

    def act(*shape):  # channels_last_3d activations and weights, as a converted model has
        return torch.randn(*shape, generator=gen, dtype=dt).contiguous(
            memory_format=torch.channels_last_3d)

    def vec(dtype=torch.float32):
        return torch.randn(s["C_out"], generator=gen, dtype=dtype)

    problem = ConvProblem(**s, kernel=kernel, stride=stride, padding=padding, groups=groups,
                          layout="cl3d")
    x = act(*problem.input_shape)
    w = act(*problem.weight_shape)
    bias, bn_weight, bn_bias, rmean, rvar = vec(dt), vec(), vec(), vec(), vec().abs() + 1
    dilation = problem.dilation
    out_shape = problem.output_shape()
    # SiLU everywhere (the costlier epilogue and backward); a residual where it makes the
    # epilogue heavier (fwd-eval-res also saves z and the statistics for autograd)
    if op.startswith("fwd"):
        residual = act(*out_shape) if op == "fwd-eval-res" else None
        implicit_gemm.conv_bn_act_fwd(x, w, bias, bn_weight, bn_bias, rmean, rvar, residual, stride,
                                      padding, dilation, training=op == "fwd-train", momentum=0.1,
                                      eps=1e-5, activation="silu", save=op != "fwd-eval")
    elif op in ("bwd", "bwd-eval"):
        implicit_gemm_bwd.conv_bn_act_bwd(act(*out_shape), x, w, bias, act(*out_shape), vec(),
                                          vec().abs(), bn_weight, bn_bias, act(*out_shape), stride,
                                          padding, dilation, training=op == "bwd",
                                          activation="silu", needs=(True,) * 6)
    else:
        raise ValueError(case.name)


# The (2+1)D unit: r2plus1d_18's layer1 unit (64 -> 144 -> 64, rows 16-byte aligned),
# a downsampling unit with odd intermediate channels (64 -> 230 -> 128, spatial and temporal
# stride 2: two frames per step) and the stem (3 -> 45 -> 64, 1x7x7 stride 2: unaligned rows).
UNIT_SHAPES = {
    "unit-cl3d": dict(C_in=64, C_mid=144, C_out=64, H=14, k=3, s=1, st=1),
    "unit-cl3d-s2": dict(C_in=64, C_mid=230, C_out=128, H=14, k=3, s=2, st=2),
    "unit-stem": dict(C_in=3, C_mid=45, C_out=64, H=28, k=7, s=2, st=1),
}


def _conv2plus1d(case: Case) -> None:
    import torch

    from r21d.triton_kernels import conv2plus1d

    s = UNIT_SHAPES[case.layout]
    dt = _torch_dtype(case.dtype)
    gen = torch.Generator().manual_seed(0)

    def act(*shape):
        return torch.randn(*shape, generator=gen, dtype=dt).contiguous(
            memory_format=torch.channels_last_3d)

    def bn(c):  # weight, bias, running mean, running var
        return (torch.randn(c, generator=gen), torch.randn(c, generator=gen),
                torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 1)

    k, sp, st = s["k"], s["s"], s["st"]
    x = act(2, s["C_in"], 8, s["H"], s["H"])
    w1 = act(s["C_mid"], s["C_in"], 1, k, k)
    w2 = act(s["C_out"], s["C_mid"], 3, 1, 1)
    h_out = out_size(s["H"], k, sp, k // 2)
    residual = act(2, s["C_out"], out_size(8, 3, st, 1), h_out, h_out) if case.name == "eval-res" else None
    if case.name == "train":  # the two chained implicit GEMMs (BN1 + ReLU prologue) and backward
        from r21d.triton_kernels import conv2plus1d_train

        geometry = ((1, sp, sp), (0, k // 2, k // 2), (1, 1, 1), (st, 1, 1), (1, 0, 0), (1, 1, 1))
        g1, b1, rm1, rv1 = bn(s["C_mid"])
        g2, b2, rm2, rv2 = bn(s["C_out"])
        out, z1, m1, i1, z2, m2, i2, *_ = conv2plus1d_train.unit_train_fwd(
            x, w1, None, g1, b1, rm1, rv1, 0.1, 1e-5, w2, None, g2, b2, rm2, rv2, 0.1, 1e-5, None,
            *geometry, "relu", True)
        conv2plus1d_train.unit_train_bwd(act(*out.shape), x, w1, None, g1, b1, z1, m1, i1, w2,
                                         None, g2, b2, z2, m2, i2, None, *geometry, "relu",
                                         (True,) * 9 + (False,))
        return
    conv2plus1d.unit_eval(x, w1, None, *bn(s["C_mid"]), 1e-5, w2, None, *bn(s["C_out"]), 1e-5,
                          residual, (sp, sp), (k // 2, k // 2), st, 1,
                          "silu" if residual is not None else "relu")


def _grid(family, names, dtypes, layouts, run) -> list[Case]:
    return [Case(family, n, d, lay, run) for n in names for d in dtypes for lay in layouts]


ALL_DTYPES = ("bf16", "fp16", "fp32-tf32", "fp32-ieee")
IG_OPS = ("fwd-eval", "fwd-eval-res", "fwd-train", "bwd", "bwd-eval")
ALL_LAYOUTS = tuple(PW_SHAPES)

CASES: list[Case] = [
    # pointwise (1x1x1) conv + BN + act: eval (one launch), eval with residual and saving for
    # autograd, training forward (conv with statistics epilogue, finalize, normalise), training
    # and eval backward (BN reduce and finalize, dgrad, split-K wgrad and its sum).
    *_grid("pointwise", ("fwd-eval", "fwd-eval-res", "fwd-train", "bwd", "bwd-eval"),
           ALL_DTYPES, ALL_LAYOUTS, _pointwise),
    # a spatially strided (downsampling) pointwise conv: stride is then not a constant 1
    Case("pointwise", "fwd-eval-s2", "bf16", "cl3d", _pointwise_s2),
    Case("pointwise", "bwd-s2", "bf16", "cl3d", _pointwise_s2),
    # depthwise conv + BN + act: eval (one launch, with residual and saving for autograd),
    # training forward (statistics pass, finalize, normalising pass), backward; 3x3x3 in every
    # dtype and layout, the other geometry classes in bf16 channels_last_3d
    *_grid("depthwise", ("fwd-eval", "fwd-train", "bwd"), DW_DTYPES, DW_LAYOUTS, _depthwise),
    *_grid("depthwise", [f"{op}/{g}" for op in ("fwd-eval", "bwd") for g in ("k133-s2", "k511")],
           ("bf16",), ("dw-cl3d",), _depthwise),
    # implicit-GEMM conv + BN + act: the spatial unit in every dtype and both channel classes;
    # the other geometry classes in bf16; the 3-channel stem (flat K loop) in every dtype
    *_grid("implicit_gemm", [f"{op}/k133" for op in IG_OPS], ALL_DTYPES, ("ig-cl3d", "ig-cl3d-odd"),
           _implicit_gemm),
    *_grid("implicit_gemm", [f"{op}/{g}" for op in IG_OPS for g in ("k311", "k133-s2", "k311-s2", "k333", "k333-g4")],
           ("bf16",), ("ig-cl3d",), _implicit_gemm),
    *_grid("implicit_gemm", [f"{op}/k177-s2" for op in IG_OPS], ALL_DTYPES, ("ig-stem",), _implicit_gemm),
    # the eval-mode (2+1)D unit (one kernel), with ReLU, and with a residual and SiLU; the
    # training unit's forward and backward (implicit GEMMs with the BN1 + ReLU prologue)
    *_grid("conv2plus1d", ("eval", "eval-res", "train"), ALL_DTYPES, tuple(UNIT_SHAPES), _conv2plus1d),
]
