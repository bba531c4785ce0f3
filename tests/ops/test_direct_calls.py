"""r21d's eager calls of the Triton families (r21d.direct_calls): the launchers called directly,
the running statistics updated in place. They must be the op's call exactly: the same output,
gradients and running statistics, bit for bit, as the same call with something observing it
(which calls the op), in two fewer allocations per training call and no copy-back. Kernels run
in the Triton interpreter on tiny shapes."""

from __future__ import annotations

import contextlib

import pytest
import torch

import r21d
from r21d import direct_calls
from r21d.triton_kernels import _launch
from tests.utils import GRAD_NAMES, ConvProblem, OpsSeen, clone_inputs, conv_kwargs, make_inputs

pytestmark = pytest.mark.usefixtures("strict")

CASES = {
    "pointwise": ConvProblem(C_in=5, C_out=6, residual=True),
    "depthwise": ConvProblem(C_in=4, C_out=4, groups=4, kernel=(3, 3, 3), padding=(1, 1, 1), T=2,
                             H=3, W=3, layout="cl3d"),
    "implicit-gemm": ConvProblem(C_in=4, C_out=6, kernel=(1, 3, 3), padding=(0, 1, 1), bias=False,
                                 layout="cl3d", activation="silu"),
}


class _Observer(torch.overrides.TorchFunctionMode):
    """Sees every torch call and changes nothing: fused calls then go through the ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _training_step(case, momentum, observed: bool):
    args = clone_inputs(make_inputs(case, torch.float32, "cpu"), requires_grad=True)
    rm, rv = args["running_mean"], args["running_var"]
    where, versions = (rm.data_ptr(), rv.data_ptr()), (rm._version, rv._version)
    with r21d.use_backend("triton"), _launch.count() as counter:
        if observed:
            with _Observer():
                y = _call(args, case, momentum)
        else:
            y = _call(args, case, momentum)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    assert (rm.data_ptr(), rv.data_ptr()) == where
    assert rm._version > versions[0] and rv._version > versions[1]  # autograd saw them change
    grads = [args[n].grad for n in GRAD_NAMES if args[n] is not None]
    return [y.detach(), rm, rv, *grads], counter.allocations


def _call(args, case, momentum):
    kwargs = conv_kwargs(case, training=True)
    if isinstance(momentum, torch.Tensor):  # the cumulative average's device-side factor
        p = r21d.functional.plan(args["x"], args["weight"], args["bias"], args["bn_weight"],
                                 args["bn_bias"], args["running_mean"], args["running_var"],
                                 residual=args["residual"], **{k: v for k, v in kwargs.items()
                                                              if k not in ("momentum", "eps")})
        return r21d.functional.run(p, args["x"], args["weight"], args["bias"], args["bn_weight"],
                                   args["bn_bias"], args["running_mean"], args["running_var"],
                                   momentum=momentum, eps=1e-5, residual=args["residual"])
    return r21d.functional.conv_bn_act3d(
        args["x"], args["weight"], args["bias"], args["bn_weight"], args["bn_bias"],
        args["running_mean"], args["running_var"], residual=args["residual"], **kwargs)


@pytest.mark.parametrize("family", list(CASES))
def test_an_eager_training_call_is_the_ops_call_with_the_statistics_updated_in_place(family):
    got, allocations = _training_step(CASES[family], 0.1, observed=False)
    want, op_allocations = _training_step(CASES[family], 0.1, observed=True)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert allocations == op_allocations - 2  # no new running statistics to copy back


def test_a_device_side_momentum_blends_the_batch_statistics_in_after_the_call():
    """momentum=None's 1 / num_batches_tracked lives on the device: the launcher returns the
    batch statistics and the blend happens after it, as for the op."""
    case = CASES["implicit-gemm"]
    factor = torch.tensor(1 / 3)
    got, allocations = _training_step(case, factor, observed=False)
    want, op_allocations = _training_step(case, factor, observed=True)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert allocations == op_allocations


def test_a_backward_something_observes_calls_the_backward_op():
    """A forward run eagerly, its backward under a dispatch mode (as compiled autograd or a
    profiler entered around ``backward()`` would see it): the mode sees the backward op, and
    the gradients are the launcher's."""
    case = CASES["implicit-gemm"]

    grads, seen = [], OpsSeen()
    for observed in (False, True):
        args = clone_inputs(make_inputs(case, torch.float32, "cpu"), requires_grad=True)
        with r21d.use_backend("triton"):
            y = _call(args, case, 0.1)
        with seen if observed else contextlib.nullcontext():
            y.sum().backward()
        grads.append([args[n].grad for n in GRAD_NAMES if args[n] is not None])
    assert "r21d::implicit_gemm_conv_bn_act_backward" in seen.ops
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_launch_form_is_what_the_ops_give_their_launchers():
    assert direct_calls.launch_form([1, 2, 2], [0, 1, 1], [1, 1, 1], 1, "none", 0, "g") == (
        ((1, 2, 2), (0, 1, 1), (1, 1, 1), True), (None, False), "g")
    assert direct_calls.launch_form((1, 1, 1), (0, 0, 0), (1, 1, 1), False, "relu", True, "")[1] \
        == ("relu", True)


def test_an_eager_training_unit_updates_both_running_statistics_in_place():
    """The (2+1)D unit's training op (r21d.unit_ops.train_in_place): the same outputs, gradients
    and running statistics as the op's call, in four fewer allocations."""
    import copy

    from tests.utils import perturb_batchnorm

    torch.manual_seed(0)
    unit = r21d.fuse(perturb_batchnorm(r21d.SpatioTemporalConv(3, 5, 3, padding=1))).train()
    results = []
    for observed in (False, True):
        model = copy.deepcopy(unit)
        buffers = [b for name, b in model.named_buffers() if "running" in name]
        versions = [b._version for b in buffers]
        x = torch.randn(1, 3, 2, 3, 4, generator=torch.Generator().manual_seed(2),
                        requires_grad=True)
        with r21d.use_backend("triton"), _launch.count() as counter:
            with _Observer() if observed else contextlib.nullcontext():
                y = model(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        assert all(b._version > v for b, v in zip(buffers, versions))
        results.append(([y.detach(), x.grad, *[p.grad for p in model.parameters()], *buffers],
                        counter.allocations))
    (got, allocations), (want, op_allocations) = results
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert allocations == op_allocations - 4


def test_saved_tensor_hooks_see_everything_the_backward_keeps():
    """Activation checkpointing and CPU offload work through saved-tensor hooks: a direct
    call's autograd node packs what the op's does, its conv output and statistics included."""
    case = CASES["implicit-gemm"]
    packed = {}
    for observed in (False, True):
        shapes = packed[observed] = []
        args = clone_inputs(make_inputs(case, torch.float32, "cpu"), requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=shapes: s.append(t.shape) or t,
                                                      lambda t: t):
            with r21d.use_backend("triton"), _Observer() if observed else contextlib.nullcontext():
                _call(args, case, 0.1)
    assert sorted(packed[False]) == sorted(packed[True])
    assert len(packed[False]) == 7  # x, weight, BN weight and bias, z, mean, invstd (no bias)
