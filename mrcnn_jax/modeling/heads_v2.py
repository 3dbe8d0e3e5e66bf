"""The head variants of torchvision's ``maskrcnn_resnet50_fpn_v2`` (Li et al., "Benchmarking
Detection Transfer Learning with Vision Transformers", 2021 recipe).

* :class:`RPNHeadV2`: torchvision ``RPNHead(conv_depth=n)``: ``n`` 3x3 conv + ReLU layers
  (with bias, no norm) shared over levels, then the objectness and delta convs.
* :class:`FastRCNNConvFCHead`: ``n`` 3x3 conv + norm + ReLU layers, flatten, ``m`` fc + ReLU
  (v2: 4 convs of 256 with BatchNorm, one fc of 1024).
* :class:`MaskRCNNHeadsNorm`: torchvision ``MaskRCNNHeads(..., norm_layer=...)``: 3x3 conv
  (no bias) + norm + ReLU layers.

Module names mirror torchvision's ``nn.Sequential`` indices so that a converter maps them one
to one: ``box_head/0/0/kernel`` <- ``roi_heads.box_head.0.0.weight`` (the conv of
``Conv2dNormActivation`` 0), ``box_head/0/1/scale`` <- ``...0.1.weight`` (its norm),
``box_head/5/kernel`` <- ``...5.weight`` (the fc after 4 convs and the ``Flatten`` at index 4).
Norm layers are :func:`mrcnn_jax.modeling.resnet.make_norm`'s (``'frozen_bn'``, ``'bn'``,
``'gn'``) or ``'none'`` (then the convs have a bias, as torchvision's do without a norm).

``MaskRCNN`` selects them from the config (``modeling/config.py``; v1 defaults):
``rpn.head_convs > 1`` -> :class:`RPNHeadV2`; ``roi.box_head_convs > 0`` ->
:class:`FastRCNNConvFCHead`; ``mask.norm != 'none'`` -> :class:`MaskRCNNHeadsNorm`; with
``fpn.norm`` for the FPN. ``train`` reaches their norms (batch statistics for 'bn', over the
valid RoI slots only, see :func:`batch_stats_mask`; 'bn' needs ``config.norm = 'bn'`` so the
trainer carries ``batch_stats``), and ``trainable_mask`` freezes the
arrays :func:`is_frozen_norm_path` names. ``convert_torchvision_maskrcnn_v2`` returns a config
that selects all of them (tests/convert/test_end_to_end_v2.py: whole-model parity).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import layers
from mrcnn_jax.modeling import resnet as resnet_lib
from mrcnn_jax.modeling import rpn as rpn_lib

NORMS = ("none", "frozen_bn", "bn", "gn")
# torchvision's RPNHead init: normal(std=0.01), bias 0.
_rpn_init = nn.initializers.normal(stddev=0.01)
# torch's default Linear init: U(+-1/sqrt(fan_in)) for the kernel (and the bias, see _fc).
_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _uniform_bias(fan_in: int):
  """torch's default Linear bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


def _check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"head norm must be one of {NORMS}, got {norm!r}")


def batch_stats_mask(valid: jax.Array, ndim: int) -> jax.Array:
  """RoI-slot validity [N] -> BatchNorm ``mask`` [N, 1, ...] (``ndim`` dimensions).

  Trainable BatchNorm in a head takes its batch statistics over the valid slots only: the
  static-shape batch pads each image's RoIs to a fixed count, and torchvision's heads, which
  see only real RoIs, never normalise with padding (or, for the mask head, background). With no
  valid slot at all, every slot counts: a mean over nothing would put NaN into the running
  statistics, and no output of such a batch reaches a loss anyway.
  """
  valid = jnp.asarray(valid, bool).reshape(-1)
  valid = jnp.where(jnp.any(valid), valid, True)
  return valid.reshape(valid.shape + (1,) * (ndim - 1))


class ConvNormAct(nn.Module):
  """torchvision ``Conv2dNormActivation``: 3x3 conv (``0``), norm (``1``), ReLU.

  Attributes:
    features: output channels.
    norm: one of :data:`NORMS`; ``'none'`` gives the conv a bias and no norm layer.
    dtype: activation dtype.
    conv: the conv layer class (``KernelSet.conv``).
  """

  features: int
  norm: str = "none"
  dtype: Any = jnp.float32
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               valid: Optional[jax.Array] = None) -> jax.Array:
    """x: [N, H, W, C] -> [N, H, W, features]; ``train`` selects BatchNorm batch statistics,
    taken over the ``valid`` [N] rows only when given (:func:`batch_stats_mask`)."""
    _check_norm(self.norm)
    x = self.conv(self.features, (3, 3), padding=((1, 1), (1, 1)),
                  use_bias=self.norm == "none", kernel_init=resnet_lib.conv_init,
                  bias_init=nn.initializers.zeros, dtype=self.dtype,
                  param_dtype=jnp.float32, name="0")(x)
    if self.norm != "none":
      norm = resnet_lib.make_norm(self.norm, train=train, frozen=False, epsilon=1e-5,
                                  momentum=0.9, gn_groups=32, dtype=self.dtype, name="1")
      if self.norm == "bn" and train and valid is not None:
        x = norm(x, mask=batch_stats_mask(valid, x.ndim))
      else:
        x = norm(x)
    return nn.relu(x)


class RPNHeadV2(nn.Module):
  """torchvision ``RPNHead(conv_depth=num_convs)``: objectness and deltas per anchor.

  Same outputs and anchor order as ``mrcnn_jax.modeling.rpn.RPNHead`` (which is the
  ``num_convs == 1`` case with its conv named ``conv``); here the convs are ``conv_0``,
  ``conv_1``, ... (torchvision ``rpn.head.conv.{i}.0``).

  Attributes:
    num_anchors: anchors per location ``A``.
    num_convs: 3x3 conv + ReLU layers before the predictors (v2: 2).
    dtype: activation dtype; the outputs are float32.
    conv: the conv layer class (``KernelSet.conv``).
  """

  num_anchors: int
  num_convs: int = 2
  dtype: Any = jnp.float32
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array]) -> Tuple[jax.Array, jax.Array]:
    """feats: [P2..P6], each [B, Hl, Wl, C].

    Returns:
      objectness: [B, N] float32 logits, N = sum_l Hl * Wl * A.
      deltas: [B, N, 4] float32 ``(dx, dy, dw, dh)``.
    """
    c = feats[0].shape[-1]
    a = self.num_anchors
    kw = dict(kernel_init=_rpn_init, bias_init=nn.initializers.zeros, dtype=self.dtype,
              param_dtype=jnp.float32)
    convs = [self.conv(c, (3, 3), padding=((1, 1), (1, 1)), name=f"conv_{i}", **kw)
             for i in range(self.num_convs)]
    cls = self.conv(a, (1, 1), name="cls_logits", **kw)
    bbox = self.conv(4 * a, (1, 1), name="bbox_pred", **kw)

    def trunk(t):
      for conv in convs:
        t = nn.relu(conv(t))
      return t

    return rpn_lib.predict_levels(feats, trunk, cls, bbox, a)


class FastRCNNConvFCHead(nn.Module):
  """torchvision ``FastRCNNConvFCHead``: convs, flatten (HWC), fc + ReLU layers.

  Attributes:
    conv_channels: output channels of each conv + norm + ReLU (v2: (256,) * 4).
    fc_sizes: width of each fc + ReLU (v2: (1024,)).
    norm: one of :data:`NORMS` (v2: BatchNorm).
    dtype: activation dtype.
    conv: the conv layer class (``KernelSet.conv``).
  """

  conv_channels: Sequence[int] = (256, 256, 256, 256)
  fc_sizes: Sequence[int] = (1024,)
  norm: str = "bn"
  dtype: Any = jnp.float32
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               valid: Optional[jax.Array] = None) -> jax.Array:
    """x: [..., h, w, C] pooled RoI features -> [..., fc_sizes[-1]]; ``valid`` [...] bool
    (optional) marks the real RoIs, over which trainable BatchNorm takes its statistics."""
    lead = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:])
    for i, c in enumerate(self.conv_channels):
      x = ConvNormAct(c, self.norm, self.dtype, self.conv, name=str(i))(x, train, valid)
    x = x.reshape(lead + (-1,))  # HWC order; the converter permutes torch's CHW fc weights
    index = len(self.conv_channels) + 1  # torchvision's Flatten sits at len(conv_channels)
    for size in self.fc_sizes:
      x = nn.relu(layers.Dense(size, kernel_init=_linear_init,
                               bias_init=_uniform_bias(x.shape[-1]), dtype=self.dtype,
                               param_dtype=jnp.float32, name=str(index))(x))
      index += 2  # Linear, ReLU
    return x


class MaskRCNNHeadsNorm(nn.Module):
  """torchvision ``MaskRCNNHeads(in, channels, 1, norm_layer)``: conv + norm + ReLU layers.

  Attributes:
    channels: output channels of each layer (v2: (256,) * 4).
    norm: one of :data:`NORMS` (v2: BatchNorm).
    dtype: activation dtype.
    conv: the conv layer class (``KernelSet.conv``).
  """

  channels: Sequence[int] = (256, 256, 256, 256)
  norm: str = "bn"
  dtype: Any = jnp.float32
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               valid: Optional[jax.Array] = None) -> jax.Array:
    """x: [N, 14, 14, C] -> [N, 14, 14, channels[-1]]; ``valid`` [N] bool (optional) marks
    the slots over which trainable BatchNorm takes its statistics (the positives)."""
    for i, c in enumerate(self.channels):
      x = ConvNormAct(c, self.norm, self.dtype, self.conv, name=str(i))(x, train, valid)
    return x


def is_frozen_norm_path(keys: Sequence[str], config: Any) -> bool:
  """Whether a (non-backbone) parameter path is a FrozenBatchNorm array of these heads or of
  the FPN, which ``trainable_mask`` must mark False (they get no gradient either way)."""
  if not keys:
    return False
  if keys[0] == "fpn":
    return config.fpn.norm == "frozen_bn" and keys[1].endswith("_norm")
  norm = {"box_head": config.roi.box_head_norm,
          "mask_head": config.mask.norm}.get(keys[0])
  return norm == "frozen_bn" and len(keys) >= 3 and keys[2] == "1"
