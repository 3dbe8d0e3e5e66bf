"""ResNet-50/101 backbone (He et al., "Deep Residual Learning", 2016) in torchvision's layout.

torchvision's variant ("ResNet v1.5") puts the stride on the 3x3 convolution of each
bottleneck; ``config.backbone.stride_in_1x1`` puts it on the first 1x1 instead, as the original
MSRA ResNet and Detectron2's model-zoo R50/R101 (``RESNETS.STRIDE_IN_1X1``) do. Parameter names follow torchvision's so that a converter maps them one to one:
``conv1``, ``bn1``, ``layer1/0/conv1``, ``layer1/0/downsample/0`` (conv), ``.../downsample/1``
(norm), ... Kernels are HWIO; a norm layer holds ``scale``/``bias`` in ``params`` and
``mean``/``var`` in ``batch_stats`` (torchvision's ``weight``/``bias``/``running_mean``/
``running_var``) for trainable BatchNorm; FrozenBatchNorm keeps all four (``scale``, ``bias``,
``mean``, ``var``) in ``params`` so the frozen model has no mutable collection; GroupNorm has
``scale``/``bias`` only.

Frozen parts get zero gradient *inside* the model (``stop_gradient``), so XLA prunes their
backward pass; :func:`trainable_mask` tells the optimizer which parameters to leave alone.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling import layers


STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# config.backbone.remat: what the backward pass recomputes instead of keeping (jax.checkpoint).
REMAT_CHOICES = ("none", "blocks", "stages")
EXPANSION = 4
# torchvision's order for ``trainable_layers``: the first ``n`` of these train.
_LAYERS_BY_TRAINABILITY = ("layer4", "layer3", "layer2", "layer1", "conv1")
_NORM_NAMES = ("bn1", "bn2", "bn3")

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine (torchvision ``FrozenBatchNorm2d``).

  ``y = (x - mean) * scale / sqrt(var + eps) + bias``, folded into one multiply-add; all four
  arrays are wrapped in ``stop_gradient`` so they never receive gradient.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    # The statistics sit in ``params`` too (masked out of the optimizer by trainable_mask), so
    # a frozen-BN model is a single ``params`` collection with nothing mutable.
    mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
    scale, bias, mean, var = (jax.lax.stop_gradient(a) for a in (scale, bias, mean, var))
    mult = scale * jax.lax.rsqrt(var + self.epsilon)  # float32, then cast once
    shift = bias - mean * mult
    return x * mult.astype(x.dtype) + shift.astype(x.dtype)


class BatchNorm(nn.Module):
  """torch ``BatchNorm2d`` over the last axis (the ``'bn'`` norm).

  Training (``use_running_average=False``) normalises with the batch's mean and biased
  variance, taken over the positions ``mask`` selects (all by default), and moves the running
  statistics towards the batch mean and the *unbiased* variance, ``n / (n - 1)`` times the
  biased one, as PyTorch does (``flax.linen.BatchNorm`` stores the biased one: 3% apart for the
  30 positions of a stride-32 level of two 96 x 160 images). Otherwise the running statistics
  normalise. Statistics in float32 under any compute dtype; names as ``nn.BatchNorm``'s.
  """

  use_running_average: bool
  momentum: float = 0.9  # flax convention: running = momentum * running + (1 - momentum) * batch
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Any = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      if mask is None:
        n = jnp.float32(xf.size // c)
        mean = jnp.mean(xf, axes)
        var = jnp.mean(jnp.square(xf - mean), axes)
      else:
        w = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape[:-1] + (1,))
        n = jnp.sum(w)
        mean = jnp.sum(xf * w, axes) / n
        var = jnp.sum(jnp.square(xf - mean) * w, axes) / n
      if not self.is_initializing():
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        m = self.momentum
        running_mean.value = m * running_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        running_var.value = m * running_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
    mult = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((x.astype(jnp.float32) - mean) * mult + bias).astype(self.dtype)


def make_norm(norm: str, *, train: bool, frozen: bool, epsilon: float, momentum: float,
              gn_groups: int, dtype: Any, name: str) -> nn.Module:
  """One normalisation layer of the kind ``norm`` names.

  Args:
    norm: 'frozen_bn', 'bn' or 'gn'.
    train: whether BatchNorm uses (and updates) batch statistics.
    frozen: the layer sits in a frozen stage: BatchNorm then uses its running statistics.
    epsilon, momentum, gn_groups: layer settings (momentum in flax's convention).
    dtype: activation dtype.
    name: the layer's parameter name.
  """
  if norm == "frozen_bn":
    return FrozenBatchNorm(epsilon=epsilon, name=name)
  if norm == "bn":
    return BatchNorm(use_running_average=(not train) or frozen, momentum=momentum,
                     epsilon=epsilon, dtype=dtype, name=name)
  if norm == "gn":
    return _GroupNorm(groups=gn_groups, epsilon=epsilon, dtype=dtype, name=name)
  raise ValueError(f"norm must be 'frozen_bn', 'bn' or 'gn', got {norm!r}")


class _GroupNorm(nn.Module):
  """GroupNorm whose group count shrinks to divide narrow (test-size) layers."""

  groups: int
  epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = max(g for g in range(1, min(self.groups, c) + 1) if c % g == 0)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    # Statistics in float32 even under bfloat16 compute.
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


def _conv(conv: Any, features: int, kernel: int, stride: int, dtype: Any,
          name: str) -> nn.Module:
  """A bias-free ``conv`` layer (a ``KernelSet.conv`` class, ``layers.Conv`` by default)."""
  pad = (kernel - 1) // 2  # torch's symmetric padding, not "SAME" (differs for stride 2)
  return conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
              use_bias=False, kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32,
              name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (x4 channels) with a projection shortcut when shapes change.

  ``stride_in_1x1`` moves the stride to the first 1x1 conv (MSRA / Detectron2 layout).
  """

  planes: int
  stride: int
  norm: str
  train: bool
  frozen: bool
  norm_kwargs: Tuple[Tuple[str, Any], ...]
  dtype: Any
  stride_in_1x1: bool = False
  conv: Any = layers.Conv

  def _norm(self, name):
    return make_norm(self.norm, train=self.train, frozen=self.frozen, dtype=self.dtype,
                     name=name, **dict(self.norm_kwargs))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_ch = self.planes * EXPANSION
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    y = nn.relu(self._norm("bn1")(_conv(self.conv, self.planes, 1, s1, self.dtype, "conv1")(x)))
    y = nn.relu(self._norm("bn2")(_conv(self.conv, self.planes, 3, s3, self.dtype, "conv2")(y)))
    y = self._norm("bn3")(_conv(self.conv, out_ch, 1, 1, self.dtype, "conv3")(y))
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = _Downsample(out_ch, self.stride, self.norm, self.train, self.frozen, self.norm_kwargs,
                      self.dtype, self.conv, name="downsample")(x)
    return nn.relu(y + x)


class _Downsample(nn.Module):
  """torchvision's ``downsample`` Sequential: ``0`` is the 1x1 conv, ``1`` the norm."""

  features: int
  stride: int
  norm: str
  train: bool
  frozen: bool
  norm_kwargs: Tuple[Tuple[str, Any], ...]
  dtype: Any
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, x):
    x = _conv(self.conv, self.features, 1, self.stride, self.dtype, "0")(x)
    return make_norm(self.norm, train=self.train, frozen=self.frozen, dtype=self.dtype,
                     name="1", **dict(self.norm_kwargs))(x)


class ResLayer(nn.Module):
  """One stage (torchvision ``layerN``): blocks named ``0``, ``1``, ...

  ``remat_blocks`` recomputes each block's inner activations in the backward pass
  (``nn.remat``): only the block outputs are kept. Parameter names are unchanged.
  """

  planes: int
  blocks: int
  stride: int
  norm: str
  train: bool
  frozen: bool
  norm_kwargs: Tuple[Tuple[str, Any], ...]
  dtype: Any
  stride_in_1x1: bool = False
  conv: Any = layers.Conv
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Bottleneck) if self.remat_blocks else Bottleneck
    for i in range(self.blocks):
      x = block(self.planes, self.stride if i == 0 else 1, self.norm, self.train,
                self.frozen, self.norm_kwargs, self.dtype, self.stride_in_1x1, self.conv,
                name=str(i))(x)
    return x


def stage_blocks(config) -> Tuple[int, ...]:
  """Blocks per stage from ``config.backbone`` (``stage_blocks`` overrides ``depth``)."""
  if config.backbone.stage_blocks is not None:
    return tuple(config.backbone.stage_blocks)
  if config.backbone.depth not in STAGE_BLOCKS:
    raise ValueError(f"backbone.depth must be one of {sorted(STAGE_BLOCKS)}, "
                     f"got {config.backbone.depth}")
  return STAGE_BLOCKS[config.backbone.depth]


def frozen_modules(config) -> Tuple[str, ...]:
  """Top-level backbone module names frozen by ``config.backbone.trainable_layers``."""
  n = config.backbone.trainable_layers
  if not 0 <= n <= 5:
    raise ValueError(f"backbone.trainable_layers must be in [0, 5], got {n}")
  trainable = set(_LAYERS_BY_TRAINABILITY[:n])
  if n == 5:
    trainable.add("bn1")  # torchvision trains the stem's norm only when everything trains
  return tuple(m for m in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
               if m not in trainable)


class ResNet(nn.Module):
  """ResNet body returning C2..C5.

  Attributes:
    config: ``config.model``.
    conv: the conv layer class (``KernelSet.conv``).
  """

  config: Any
  conv: Any = layers.Conv

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Sequence[jax.Array]:
    """x: [B, H, W, 3] normalised image in the compute dtype -> [C2, C3, C4, C5], NHWC.

    ``train`` selects batch statistics for trainable BatchNorm; other norms ignore it.

    Cl has stride ``2**l`` (spatial size ``ceil(H / 2**l)``) and ``width * 2**(l-2) * 4``
    channels (256, 512, 1024, 2048 for ResNet-50).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    frozen = set(frozen_modules(cfg))
    statistics = cfg.backbone.frozen_stage_statistics
    if statistics not in ("running", "batch"):
      raise ValueError("backbone.frozen_stage_statistics must be 'running' or 'batch', got "
                       f"{statistics!r}")
    fixed_norms = frozen if statistics == "running" else set()  # BatchNorm on running stats
    norm_kwargs = (("epsilon", cfg.backbone.norm_eps), ("momentum", cfg.backbone.bn_momentum),
                   ("gn_groups", cfg.backbone.gn_groups))
    width = cfg.backbone.width

    x = _conv(self.conv, width, 7, 2, dtype, "conv1")(x)
    x = make_norm(cfg.norm, train=train, frozen="bn1" in fixed_norms, dtype=dtype, name="bn1",
                  **dict(norm_kwargs))(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    if "conv1" in frozen:
      x = jax.lax.stop_gradient(x)
    remat = cfg.backbone.remat
    if remat not in REMAT_CHOICES:
      raise ValueError(f"backbone.remat must be one of {REMAT_CHOICES}, got {remat!r}")
    layer = nn.remat(ResLayer) if remat == "stages" else ResLayer
    feats = []
    for i, blocks in enumerate(stage_blocks(cfg)):
      name = f"layer{i + 1}"
      x = layer(width * 2**i, blocks, 1 if i == 0 else 2, cfg.norm, train,
                name in fixed_norms, norm_kwargs, dtype, bool(cfg.backbone.stride_in_1x1),
                self.conv, remat == "blocks", name=name)(x)
      if name in frozen:
        # Nothing upstream trains: cutting the graph here makes their gradients exactly zero
        # and lets XLA drop their backward pass.
        x = jax.lax.stop_gradient(x)
      feats.append(x)
    return feats


def _is_norm_path(keys: Sequence[str]) -> bool:
  for i, k in enumerate(keys):
    if k in _NORM_NAMES or (k == "1" and i > 0 and keys[i - 1] == "downsample"):
      return True
  return False


def backbone_trainable(keys: Sequence[str], config) -> bool:
  """Whether the backbone parameter at path ``keys`` (below the backbone module) trains."""
  if keys and keys[0] in frozen_modules(config):
    return False
  if config.norm == "frozen_bn" and _is_norm_path(keys):
    return False
  return True
