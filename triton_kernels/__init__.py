"""r21d's Triton kernels, installed as ``r21d.triton_kernels`` (never as a top-level package).

One module per kernel family, each with its ``@triton.jit`` kernels and plain launchers:
``pointwise`` (1x1x1 conv + BN + activation), ``depthwise`` (depthwise conv + BN + activation),
``implicit_gemm`` (spatial, temporal, dense and grouped conv + BN + activation), ``batchnorm``
(statistics, normalise, backward reduction shared by every family), ``splitk`` (deterministic
split-K sums); ``_gemm`` holds what the GEMM-shaped families share (tiles, the BN epilogue, the
dz prologue). Importing this
package does not import Triton; importing a family module does.
"""
