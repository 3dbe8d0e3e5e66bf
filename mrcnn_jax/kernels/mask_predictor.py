"""The mask predictor applied as matmuls: ``roi_heads.MaskRCNNPredictor``'s parameters and values.

A 2x2 stride-2 transposed conv has no overlapping windows, so it is one [C, 4C] matmul per input
pixel followed by a depth-to-space; XLA:CPU lowers the transposed conv's kernel gradient to a
dilated convolution far slower than that matmul's. Given ``classes``, only those classes' logits
are computed (one column of the 1x1 kernel per RoI) instead of all K+1 channels.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import layers
from mrcnn_jax.modeling.roi_heads import deconv_init
from mrcnn_jax.modeling.roi_heads import mask_conv_init


class MatmulMaskPredictor(nn.Module):
  """2x2 stride-2 deconv + ReLU + 1x1 conv: [N, 14, 14, C] -> [N, 28, 28, K+1] float32 logits.

  Parameters are those of ``roi_heads.MaskRCNNPredictor`` (``conv5_mask``: a Flax
  ``ConvTranspose``'s kernel [2, 2, C, C] and bias; ``mask_fcn_logits``: a 1x1 ``Conv``'s kernel
  [1, 1, C, K+1] and bias), created with the same initialisers in the same order.
  """

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, classes: Optional[jax.Array] = None) -> jax.Array:
    """As ``roi_heads.MaskRCNNPredictor.__call__``: [N, 2h, 2w, K+1] logits (or of ``classes``)."""
    n, h, w, c = x.shape
    deconv = _ParamHolder((2, 2, c, c), (c,), deconv_init, name="conv5_mask")
    logits_p = _ParamHolder((1, 1, c, self.num_classes), (self.num_classes,), mask_conv_init,
                            name="mask_fcn_logits")
    k5, b5 = deconv()
    k1, b1 = logits_p()
    dt = self.dtype
    # Flax's ConvTranspose (transpose_kernel=False, VALID) writes input pixel (i, j) times
    # kernel tap (1 - a, 1 - b) to output pixel (2i + a, 2j + b): hence the flip.
    kflip = k5[::-1, ::-1]  # [a, b, C, O]
    y = jnp.einsum("nijc,abco->nijabo", x.astype(dt), kflip.astype(dt))
    y = nn.relu(layers.add_bias(y, b5))  # [N, h, w, 2, 2, C]
    if classes is None:
      out = layers.add_bias(jnp.einsum("nijabo,ok->nijabk", y, k1[0, 0].astype(dt)), b1)
      out = out.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, self.num_classes)
      return out.astype(jnp.float32)
    wc = jnp.take(k1[0, 0], classes, axis=1).T  # [N, C]
    out = jnp.einsum("nijabo,no->nijab", y, wc.astype(dt)).astype(jnp.float32)
    out = out + jnp.take(b1, classes)[:, None, None, None, None]
    return out.transpose(0, 1, 3, 2, 4).reshape(n, 2 * h, 2 * w)


class _ParamHolder(nn.Module):
  """A conv layer's ``kernel`` and ``bias`` parameters, applied by the caller."""

  kernel_shape: Tuple[int, ...]
  bias_shape: Tuple[int, ...]
  kernel_init: Any

  @nn.compact
  def __call__(self) -> Tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", self.kernel_init, self.kernel_shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, self.bias_shape, jnp.float32)
    return kernel, bias
