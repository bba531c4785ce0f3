"""r21d._C, the CUDA C++ extension: loads beside the Python ops of the same namespace and says
how it was built. Skipped where the package was installed without it (R21D_SKIP_CUDA_BUILD=1)."""

import json

import pytest
import torch

import r21d
from r21d import _extension

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason=str(_extension.unavailable_reason()))


def test_build_info():
    info = _extension.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cuda_archs"], "no device code compiled"
    assert all(a.startswith("sm_") for a in info["cuda_archs"])
    assert json.loads(torch.ops.r21d.build_info()) == info


def test_op_namespace_shared_with_python_ops():
    # the TORCH_LIBRARY block of _C and the Python custom ops live in one namespace
    assert hasattr(torch.ops.r21d, "build_info")
    assert hasattr(torch.ops.r21d, "pointwise_conv_bn_act")


def test_cuda_backend_listed_only_with_a_gpu():
    assert ("cuda" in r21d.available_backends()) == torch.cuda.is_available()
