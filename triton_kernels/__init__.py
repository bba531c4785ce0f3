"""r21d's Triton kernels, installed as ``r21d.triton_kernels`` (never as a top-level package).

One module per kernel family, each with its ``@triton.jit`` kernels and plain launchers:
``pointwise`` (1x1x1 conv + BN + activation), ``batchnorm`` (statistics, normalise, backward
reduction shared by every family), ``splitk`` (deterministic split-K sums). Importing this
package does not import Triton; importing a family module does.
"""
