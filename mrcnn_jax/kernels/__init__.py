"""mrcnn_jax.kernels: platform-specific algorithms, chosen once where a program is built.

The model (``mrcnn_jax.modeling``) is plain Flax / ``lax``; a ``KernelSet`` given to it swaps in
faster forms of its convs, mask predictor and RoI pooling with the same parameters and values.
This package holds the XLA:CPU ones (Winograd 3x3 convs, matmul kernel gradients, the matmul
mask predictor, the per-RoI pooling loop), the fast CPU initialisation key, precomputed Winograd
transforms for inference and XLA:CPU compiler options for ``predict``::

    from mrcnn_jax import kernels, modeling
    model = modeling.MaskRCNN(config.model, kernels=kernels.select(config.kernels, mesh=mesh),
                              mesh=mesh)
    fast = kernels.prepare_inference(model, variables, (512, 512))  # no-op for PLAIN
    predict = kernels.jit_predict(model)  # jax.jit with kernels.compiler_options()
"""

from mrcnn_jax.kernels.compiler import compiler_options
from mrcnn_jax.kernels.compiler import jit_predict
from mrcnn_jax.kernels.cpu import CPU
from mrcnn_jax.kernels.cpu import CPU_SHARDED
from mrcnn_jax.kernels.cpu import init_key
from mrcnn_jax.kernels.cpu import prepare_inference
from mrcnn_jax.kernels.cpu import select
from mrcnn_jax.modeling.kernel_set import KernelSet
from mrcnn_jax.modeling.kernel_set import PLAIN

__all__ = [
    "CPU",
    "CPU_SHARDED",
    "KernelSet",
    "PLAIN",
    "compiler_options",
    "init_key",
    "jit_predict",
    "prepare_inference",
    "select",
]
