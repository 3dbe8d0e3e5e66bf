"""The keypoint branch's head and predictor (Mask R-CNN, sec. 5 "Human Pose Estimation").

Each of an instance's K keypoints is modelled as a one-hot mask: the branch predicts K
heatmaps per RoI, and training is a softmax over each heatmap's pixels (``losses.keypoint_loss``).
As in the paper and torchvision's ``keypointrcnn_resnet50_fpn``:

* :class:`KeypointRCNNHeads`: eight 3x3 conv (512) + ReLU layers on the 14x14 RoI features;
* :class:`KeypointRCNNPredictor`: a 4x4 stride-2 transposed conv to K channels (14 -> 28),
  then 2x bilinear upsampling (28 -> 56), the paper's 56x56 heatmaps.

Names follow torchvision's ``roi_heads.keypoint_head`` (an ``nn.Sequential`` whose convs sit at
the even indices ``0, 2, ..., 14``, ReLUs between) and ``roi_heads.keypoint_predictor``
(``kps_score_lowres``), so the converter is renames and transposes.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import layers
from mrcnn_jax.modeling.roi_heads import deconv_init
from mrcnn_jax.modeling.roi_heads import MaskRCNNHead


class KeypointRCNNHeads(MaskRCNNHead):
  """``len(channels)`` 3x3 conv + ReLU layers: [N, 14, 14, C] -> [N, 14, 14, channels[-1]].

  The mask head's layers (kaiming-normal (fan_out, ReLU) kernels, zero bias), eight of 512 by
  default, with torchvision's names: conv ``i`` is the module ``str(2 * i)`` (its
  ``Sequential`` index; the ReLUs take the odd ones).
  """

  channels: Sequence[int] = (512,) * 8

  def layer_name(self, i: int) -> str:
    return str(2 * i)


def upsample2x_bilinear(x: jax.Array) -> jax.Array:
  """[N, h, w, C] -> [N, 2h, 2w, C]: bilinear, ``align_corners=False`` (torch's
  ``interpolate(scale_factor=2, mode='bilinear')``).

  Output pixel ``2i`` samples the input at ``i - 1/4`` and ``2i + 1`` at ``i + 1/4``, so each is
  a 3/4 : 1/4 blend of pixel ``i`` and its neighbour on that side; at the border the neighbour
  is the edge pixel itself (torch clamps the sample position to the image).
  """

  def along(x, axis):
    n = x.shape[axis]
    take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
    before = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)  # pixel i - 1, clamped
    after = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)  # pixel i + 1, clamped
    even, odd = 0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after
    out = jnp.stack([even, odd], axis=axis + 1)  # interleave: ..., 2i, 2i + 1, ...
    return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])

  return along(along(x, 1), 2)


class KeypointRCNNPredictor(nn.Module):
  """[N, 14, 14, C] -> [N, 56, 56, K] float32 heatmap logits, one channel per keypoint.

  ``kps_score_lowres`` is a Flax ``ConvTranspose`` (kernel [4, 4, C, K]): torchvision's
  ``ConvTranspose2d(C, K, 4, stride=2, padding=1)``, whose output is exactly twice its input;
  as a correlation of the stride-dilated input that padding is 4 - 1 - 1 = 2 per side.
  """

  num_keypoints: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.ConvTranspose(self.num_keypoints, (4, 4), strides=(2, 2),
                             padding=((2, 2), (2, 2)), kernel_init=deconv_init,
                             dtype=self.dtype, param_dtype=jnp.float32,
                             name="kps_score_lowres")(x)
    # The heatmaps are logits of a softmax over their pixels (loss and argmax): float32.
    return upsample2x_bilinear(x.astype(jnp.float32))
