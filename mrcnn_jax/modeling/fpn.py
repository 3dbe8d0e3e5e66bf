"""Feature Pyramid Network (Lin et al., "Feature Pyramid Networks for Object Detection", 2017).

torchvision's ``FeaturePyramidNetwork`` with ``LastLevelMaxPool``: a 1x1 lateral conv per input
level (``inner_blocks_i``), a top-down pathway of nearest-neighbour upsampling and addition, a
3x3 output conv per level (``layer_blocks_i``), and P6 as a stride-2 subsample of P5
(``max_pool2d(kernel=1, stride=2)``), which only the RPN uses.

``norm`` (``config.fpn.norm``) adds a norm layer after every lateral and output conv, whose
bias it then drops, as torchvision's ``maskrcnn_resnet50_fpn_v2`` FPN (``norm_layer=
BatchNorm2d``): conv ``inner_blocks_i`` is followed by ``inner_blocks_i_norm`` (torchvision
``inner_blocks.i.1``), ``layer_blocks_i`` by ``layer_blocks_i_norm``.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.modeling import layers
from mrcnn_jax.modeling import resnet as resnet_lib

# torchvision's FPN init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)), bias 0.
fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def upsample_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest-neighbour resize of ``x`` [B, h, w, C] to ``size`` (H, W), torch's legacy rule.

  torch's ``interpolate(mode="nearest", size=...)`` reads source index ``floor(i * h / H)``;
  for the usual exact factor 2 that is a plain repeat.
  """
  h, w = x.shape[1:3]
  out_h, out_w = size
  if (out_h, out_w) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.minimum(np.floor(np.arange(out_h) * (h / out_h)).astype(np.int32), h - 1)
  cols = np.minimum(np.floor(np.arange(out_w) * (w / out_w)).astype(np.int32), w - 1)
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """C2..C5 -> P2..P6, all with ``channels`` channels.

  Attributes:
    channels: output channels (256).
    dtype: activation dtype.
    norm: 'none' (v1) or a norm of ``resnet.make_norm`` ('frozen_bn', 'bn', 'gn'; v2: BatchNorm)
      after each conv.
    conv: the conv layer class (``KernelSet.conv``).
  """

  channels: int = 256
  dtype: Any = jnp.float32
  norm: str = "none"
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], train: bool = False) -> List[jax.Array]:
    """feats: [C2, C3, C4, C5], each [B, Hl, Wl, Cl] -> [P2, P3, P4, P5, P6], [B, Hl, Wl, channels].

    P6 has spatial size ``ceil(H5 / 2)``. ``train`` selects batch statistics for ``norm='bn'``.
    """
    if self.norm not in ("none", "frozen_bn", "bn", "gn"):
      raise ValueError(f"fpn norm must be 'none', 'frozen_bn', 'bn' or 'gn', got {self.norm!r}")

    def conv(kernel, name):
      pad = (kernel - 1) // 2
      layer = self.conv(self.channels, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                        use_bias=self.norm == "none", kernel_init=fpn_init,
                        bias_init=nn.initializers.zeros, dtype=self.dtype,
                        param_dtype=jnp.float32, name=name)
      if self.norm == "none":
        return layer
      norm = resnet_lib.make_norm(self.norm, train=train, frozen=False, epsilon=1e-5,
                                  momentum=0.9, gn_groups=32, dtype=self.dtype,
                                  name=f"{name}_norm")
      return lambda x: norm(layer(x))

    n = len(feats)
    laterals = [conv(1, f"inner_blocks_{i}")(f) for i, f in enumerate(feats)]
    outs = [None] * n
    top = laterals[-1]
    outs[-1] = conv(3, f"layer_blocks_{n - 1}")(top)
    for i in range(n - 2, -1, -1):
      top = laterals[i] + upsample_nearest(top, laterals[i].shape[1:3])
      outs[i] = conv(3, f"layer_blocks_{i}")(top)
    outs.append(outs[-1][:, ::2, ::2])  # LastLevelMaxPool: max over a 1x1 window, stride 2
    return outs
