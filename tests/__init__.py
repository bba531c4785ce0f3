"""r21d's tests.

fp32 precision: the GEMM kernels follow cuDNN's convolution precision flags (TF32 by default, with
operands rounded as cuDNN rounds them). On a machine without CUDA the kernels run in the Triton
interpreter and are compared with PyTorch's CPU convolutions, which compute fp32 in IEEE, so the
flags are set to IEEE here: in the pytest process and in every process a test spawns (they import
this package too). tests/ops/test_tf32.py sets TF32 where it checks it. On a GPU the defaults stay:
the kernels and cuDNN then both run TF32.
"""

import torch

if not torch.cuda.is_available():
    # the legacy switch sets cuDNN's conv and RNN alike, so tests may still read and restore it
    torch.backends.cudnn.allow_tf32 = False
