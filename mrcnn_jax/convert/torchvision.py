"""torchvision weights -> our Flax variables and model config.

* :func:`convert_torchvision_maskrcnn`: a ``maskrcnn_resnet50_fpn`` (v1) state dict (torchvision's
  published COCO checkpoint, or any model built the same way) -> full variables + the config that
  reproduces it (torchvision's preprocessing, ``aligned=False`` RoIAlign, its thresholds).
* :func:`convert_torchvision_resnet`: an ImageNet ``resnet50`` / ``resnet101`` state dict ->
  backbone variables only, for ``config.init_weights`` (the trainer keeps its fresh heads).
* :func:`convert_torchvision_maskrcnn_v2`: a ``maskrcnn_resnet50_fpn_v2`` state dict (FPN and
  head norms, 2-conv RPN head, 4conv1fc box head) -> variables + config (``modeling.heads_v2``).
* :func:`convert_torchvision_keypointrcnn`: a ``keypointrcnn_resnet50_fpn`` state dict (v1
  trunk and box head, keypoint head instead of the mask head) -> variables + a config with
  ``mask.enabled`` off and ``keypoint.enabled`` on (``modeling.keypoint_head``).

Our module names follow torchvision's, so the table is mostly renames: HWIO kernels from OIHW,
Dense kernels transposed, ``fc6`` re-ordered from torch's CHW flattening to our HWC one, and the
mask deconv's kernel spatially reversed (see ``common.deconv_kernel``). Both the current key
names (``rpn.head.conv.0.0.weight``) and the ones of the published 2019 checkpoints
(``rpn.head.conv.weight``, ``mask_head.mask_fcn1``) are accepted.

Torch is imported only by :func:`load_torch_state_dict`, never at import time.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax.convert import common
from mrcnn_jax.modeling import roi_heads
from mrcnn_jax.modeling.config import model_config
from mrcnn_jax.run import paths

_BODY = "backbone.body."
_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}

# Pre-0.13 torchvision names (the published COCO checkpoint) -> today's names.
_LEGACY_RENAMES = (
    (re.compile(r"backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)"),
     r"backbone.fpn.\1_blocks.\2.0.\3"),
    (re.compile(r"rpn\.head\.conv\.(weight|bias)"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)"),
     lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"),
)


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a ``.pth`` file, local or ``gs://`` (a state dict, or a training checkpoint with a
  ``model`` entry)."""
  import torch  # pylint: disable=g-import-not-at-top

  if paths.is_url(path):  # torch reads local files or seekable buffers
    with paths.one_line_errors("weight file", path):
      path = io.BytesIO(epath.Path(path).read_bytes())
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise common.ConversionError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return common.to_numpy_dict(obj)


def canonical_keys(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Renames legacy torchvision keys to today's (a no-op on current state dicts)."""
  out = {}
  for k, v in state.items():
    for pattern, repl in _LEGACY_RENAMES:
      k = pattern.sub(repl, k) if pattern.fullmatch(k) else k
    out[k] = v
  return out


# ---------------------------------------------------------------------------- configs


def _stage_blocks(state: Mapping[str, Any], prefix: str) -> Tuple[int, ...]:
  blocks = []
  for layer in range(1, 5):
    pat = re.compile(re.escape(f"{prefix}layer{layer}.") + r"(\d+)\.conv1\.weight")
    idx = [int(m.group(1)) for k in state if (m := pat.fullmatch(k))]
    if not idx:
      raise common.ConversionError(f"no {prefix}layer{layer}.* keys: not a torchvision ResNet")
    blocks.append(max(idx) + 1)
  return tuple(blocks)


def _set_backbone(config: ml_collections.ConfigDict, state: Mapping[str, Any],
                  prefix: str) -> None:
  blocks = _stage_blocks(state, prefix)
  if blocks in _DEPTHS:
    config.backbone.depth = _DEPTHS[blocks]
    config.backbone.stage_blocks = None
  else:
    config.backbone.stage_blocks = blocks
  if f"{prefix}conv1.weight" in state:
    config.backbone.width = int(state[f"{prefix}conv1.weight"].shape[0])


def torchvision_maskrcnn_config(state: Optional[Mapping[str, Any]] = None,
                                num_classes: Optional[int] = None) -> ml_collections.ConfigDict:
  """The model config reproducing torchvision's ``maskrcnn_resnet50_fpn`` (v1).

  Preprocessing (ImageNet mean/std on RGB), FrozenBatchNorm, anchors, RPN and detection
  thresholds and ``aligned=False`` RoIAlign are torchvision's defaults (``model_config()``).
  With ``state``, the layer sizes are read from it (depth, widths, FPN channels, box-head width,
  mask-head convs, class count), so a checkpoint of a customised torchvision model converts too.
  ``num_classes`` (background included) overrides the state's class count.

  Resizing is the caller's: torchvision resizes the shorter side to 800 (longer <= 1333) and
  pads to a multiple of 32 before the network; feed our model the same resized, padded image
  (``anchors.strides_from_grid`` places the anchors as torchvision does at such sizes).
  """
  c = model_config()
  c.norm = "frozen_bn"
  c.anchors.strides_from_grid = True  # its AnchorGenerator's rule, exact at any padded size
  # Its train mode: a trainable BatchNorm ('bn') in a frozen stage still uses batch statistics.
  c.backbone.frozen_stage_statistics = "batch"
  if state is not None:
    state = canonical_keys(state)
    _set_backbone(c, state, _BODY)
    if "backbone.fpn.inner_blocks.0.0.weight" in state:
      c.fpn.channels = int(state["backbone.fpn.inner_blocks.0.0.weight"].shape[0])
    if "roi_heads.box_head.fc6.weight" in state:
      c.roi.representation_size = int(state["roi_heads.box_head.fc6.weight"].shape[0])
    if "roi_heads.box_predictor.cls_score.weight" in state:
      c.num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    convs = []
    while f"roi_heads.mask_head.{len(convs)}.0.weight" in state:
      convs.append(int(state[f"roi_heads.mask_head.{len(convs)}.0.weight"].shape[0]))
    if convs:
      c.mask.conv_channels = tuple(convs)
  if num_classes is not None:
    c.num_classes = int(num_classes)
  return c


# ---------------------------------------------------------------------------- tables


def _identity(w):
  return w


def backbone_table(expected: common.Flat, prefix: str):
  """Rows ``(our path, torch key, transform)`` for every ResNet leaf in ``expected``.

  Our names are torchvision's (``layer1/0/downsample/1/mean`` <- ``layer1.0.downsample.1.
  running_mean``), in ``params`` or ``batch_stats`` depending on ``config.norm``.
  """
  rows = []
  for path in expected:
    if path[1] != "backbone":
      continue
    mods, leaf = path[2:-1], path[-1]
    base = prefix + ".".join(mods)
    if leaf == "kernel":
      rows.append((path, base + ".weight", common.conv_kernel))
    elif leaf in common.NORM_LEAVES:
      rows.append((path, f"{base}.{common.NORM_LEAVES[leaf]}", _identity))
    else:
      raise common.ConversionError(f"no torchvision counterpart for {'/'.join(path)}")
  return rows


def heads_table(expected: common.Flat, pooled: int):
  """Rows for the FPN, RPN head and RoI heads leaves in ``expected``."""
  rows = []
  for path in expected:
    module, leaf = path[1], path[-1]
    if module == "backbone":
      continue
    layer = path[2]
    suffix = "weight" if leaf == "kernel" else leaf
    if module == "fpn":
      kind, idx = layer.rsplit("_", 1)  # inner_blocks_0 -> inner_blocks.0.0
      name = f"backbone.fpn.{kind}.{idx}.0.{suffix}"
      fn = common.conv_kernel
    elif module == "rpn_head":
      name = f"rpn.head.{'conv.0.0' if layer == 'conv' else layer}.{suffix}"
      fn = common.conv_kernel
    elif module == "box_head":
      name = f"roi_heads.box_head.{layer}.{suffix}"
      fn = ((lambda w: common.flatten_chw_dense_kernel(w, pooled)) if layer == "fc6"
            else common.dense_kernel)
    elif module == "box_predictor":
      name = f"roi_heads.box_predictor.{layer}.{suffix}"
      fn = common.dense_kernel
    elif module == "mask_head":
      i = int(layer[len("mask_fcn"):]) - 1
      name = f"roi_heads.mask_head.{i}.0.{suffix}"
      fn = common.conv_kernel
    elif module == "mask_predictor":
      name = f"roi_heads.mask_predictor.{layer}.{suffix}"
      fn = common.deconv_kernel if layer == "conv5_mask" else common.conv_kernel
    else:
      raise common.ConversionError(f"no torchvision counterpart for {'/'.join(path)}")
    rows.append((path, name, fn if leaf == "kernel" else _identity))
  return rows


# ---------------------------------------------------------------------------- converters

# torchvision's class-dependent layers (skipped when fine-tuning to another class count).
_CLASS_KEYS = (r"roi_heads\.box_predictor\..*", r"roi_heads\.mask_predictor\.mask_fcn_logits\..*")



def convert_torchvision_maskrcnn(
    state: Mapping[str, Any],
    *,
    num_classes: Optional[int] = None,
    config: Optional[ml_collections.ConfigDict] = None,
    key: Optional[jax.Array] = None,
) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """torchvision ``maskrcnn_resnet50_fpn`` (v1) state dict -> ``(variables, config)``.

  Args:
    state: ``{name: tensor or array}`` (``model.state_dict()`` or a loaded ``.pth``).
    num_classes: classes including background for fine-tuning; if it differs from the
      checkpoint's, the class-dependent layers are re-initialised (logged by name).
    config: the model config to convert into (default: :func:`torchvision_maskrcnn_config` of
      ``state``); its layer sizes must match the checkpoint's.
    key: PRNG key for re-initialised layers (default ``jax.random.key(0)``).

  Returns:
    ``variables`` (``{'params': ...}``, plus ``batch_stats`` if ``config.norm == 'bn'``) and
    the config.

  Raises:
    ConversionError: unknown or missing keys, or shape mismatches, all named.
  """
  state = canonical_keys(common.to_numpy_dict(state))
  if "rpn.head.conv.1.0.weight" in state or "roi_heads.box_head.0.0.weight" in state:
    raise common.ConversionError("this is a maskrcnn_resnet50_fpn_v2 state dict; use "
                                 "convert_torchvision_maskrcnn_v2 (--source torchvision-v2)")
  if _KEYPOINT_LOGITS in state:
    raise common.ConversionError("this is a keypointrcnn_resnet50_fpn state dict; use "
                                 "convert_torchvision_keypointrcnn (--source "
                                 "torchvision-keypoint)")
  src = common.SourceWeights(state, "torchvision Mask R-CNN state dict")
  src.ignore([r".*\.num_batches_tracked"], "BatchNorm step-counter")
  if config is None:
    config = torchvision_maskrcnn_config(state, num_classes)
  elif num_classes is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.num_classes = int(num_classes)
  variables = common.convert_table(
      src, config, common.expected_variables(config),
      lambda e: backbone_table(e, _BODY) + heads_table(e, config.roi.pooler_size),
      _CLASS_KEYS, key)
  return variables, config


def convert_torchvision_resnet(
    state: Mapping[str, Any],
    *,
    config: Optional[ml_collections.ConfigDict] = None,
) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """ImageNet ``torchvision.models.resnet50/101`` state dict -> backbone variables.

  Returns ``({'params': {'backbone': ...}}, config)`` (plus ``batch_stats`` for
  ``config.norm == 'bn'``): only the ResNet; with ``config.init_weights`` the trainer keeps
  its own initialisation for FPN, RPN and heads. The classifier (``fc.*``) is dropped with a
  log line. ``config`` defaults to :func:`torchvision_maskrcnn_config` with the state's depth.
  """
  state = common.to_numpy_dict(state)
  src = common.SourceWeights(state, "torchvision ResNet state dict")
  src.ignore([r".*\.num_batches_tracked"], "BatchNorm step-counter")
  src.ignore([r"fc\.(weight|bias)"], "ImageNet classifier")
  if config is None:
    config = torchvision_maskrcnn_config()
    _set_backbone(config, state, "")
  expected = {p: v for p, v in common.expected_variables(config).items() if p[1] == "backbone"}
  flat = common.apply_table(backbone_table(expected, ""), src)
  common.check_against_expected(flat, expected, src)
  return common.unflatten(flat), config


# ---------------------------------------------------------------------------- v2


def torchvision_maskrcnn_v2_config(state: Optional[Mapping[str, Any]] = None,
                                   num_classes: Optional[int] = None,
                                   head_norm: str = "frozen_bn") -> ml_collections.ConfigDict:
  """The model config of torchvision's ``maskrcnn_resnet50_fpn_v2``.

  v1's (:func:`torchvision_maskrcnn_config`) plus: a norm after every FPN conv
  (``fpn.norm``), a 2-conv RPN head (``rpn.head_convs``), a box head of 4 conv + norm layers
  and one fc (``roi.box_head_convs``, ``roi.box_head_conv_channels``, ``roi.box_head_norm``;
  ``representation_size`` is the fc's width) and norms in the mask head (``mask.norm``). Its
  BatchNorms run on their running statistics at inference: ``head_norm='frozen_bn'`` (default)
  reproduces that; 'bn' keeps them trainable (then set ``config.norm = 'bn'`` as well).
  """
  c = torchvision_maskrcnn_config(state, num_classes)
  c.fpn.norm = head_norm
  c.rpn.head_convs = 2
  c.roi.box_head_convs = 4
  c.roi.box_head_conv_channels = 256
  c.roi.box_head_norm = head_norm
  c.mask.norm = head_norm
  if state is None:
    return c
  if "backbone.fpn.inner_blocks.0.0.weight" in state:
    c.fpn.channels = int(state["backbone.fpn.inner_blocks.0.0.weight"].shape[0])
  n = 0
  while f"rpn.head.conv.{n}.0.weight" in state:
    n += 1
  c.rpn.head_convs = n or c.rpn.head_convs
  n = 0
  while f"roi_heads.box_head.{n}.0.weight" in state:
    n += 1
  if n:
    c.roi.box_head_convs = n
    c.roi.box_head_conv_channels = int(state["roi_heads.box_head.0.0.weight"].shape[0])
  fc = f"roi_heads.box_head.{c.roi.box_head_convs + 1}.weight"
  if fc in state:
    c.roi.representation_size = int(state[fc].shape[0])
  return c


def expected_variables_v2(config: ml_collections.ConfigDict) -> common.Flat:
  """Variable shapes of the v2 model: ``MaskRCNN(config)``'s, whose ``fpn``, ``rpn_head``,
  ``box_head`` and ``mask_head`` follow the config's v2 switches (``modeling.heads_v2``)."""
  return common.expected_variables(config)


def heads_table_v2(expected: common.Flat, pooled: int):
  """Rows for the v2 FPN, RPN head, box head and mask head leaves (predictors as v1)."""
  rows = []
  for path in expected:
    module, leaf = path[1], path[-1]
    if module == "backbone":
      continue
    layer = path[2]
    suffix = "weight" if leaf == "kernel" else leaf
    if module == "fpn":  # inner_blocks_0 -> inner_blocks.0.0, inner_blocks_0_norm -> ...0.1
      is_norm = layer.endswith("_norm")
      kind, idx = (layer[:-len("_norm")] if is_norm else layer).rsplit("_", 1)
      if is_norm:
        name, fn = f"backbone.fpn.{kind}.{idx}.1.{common.NORM_LEAVES[leaf]}", _identity
      else:
        name, fn = f"backbone.fpn.{kind}.{idx}.0.{suffix}", common.conv_kernel
    elif module == "rpn_head":
      i = layer[len("conv_"):] if layer.startswith("conv_") else None
      name = f"rpn.head.{f'conv.{i}.0' if i is not None else layer}.{suffix}"
      fn = common.conv_kernel
    elif module in ("box_head", "mask_head"):
      base = f"roi_heads.{module}.{layer}"
      if len(path) == 4:  # box_head/5/kernel: the fc over torch's CHW flattening
        name = f"{base}.{suffix}"
        fn = lambda w: common.flatten_chw_dense_kernel(w, pooled)  # noqa: E731
      elif path[3] == "0":
        name, fn = f"{base}.0.{suffix}", common.conv_kernel
      else:
        name, fn = f"{base}.1.{common.NORM_LEAVES[leaf]}", _identity
    else:
      rows += heads_table({path: expected[path]}, pooled)
      continue
    rows.append((path, name, fn if leaf == "kernel" else _identity))
  return rows


def convert_torchvision_maskrcnn_v2(
    state: Mapping[str, Any],
    *,
    num_classes: Optional[int] = None,
    config: Optional[ml_collections.ConfigDict] = None,
    key: Optional[jax.Array] = None,
) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """torchvision ``maskrcnn_resnet50_fpn_v2`` state dict -> ``(variables, config)``.

  As :func:`convert_torchvision_maskrcnn`, with :func:`torchvision_maskrcnn_v2_config`: the
  result runs in ``MaskRCNN(config)`` (FPN and head norms, 2-conv RPN head, 4conv1fc box head).

  Raises:
    ConversionError: unknown or missing keys, or shape mismatches, all named.
  """
  state = canonical_keys(common.to_numpy_dict(state))
  if "roi_heads.box_head.fc6.weight" in state:
    raise common.ConversionError("this is a maskrcnn_resnet50_fpn (v1) state dict; use "
                                 "convert_torchvision_maskrcnn (--source torchvision)")
  src = common.SourceWeights(state, "torchvision Mask R-CNN v2 state dict")
  src.ignore([r".*\.num_batches_tracked"], "BatchNorm step-counter")
  if config is None:
    config = torchvision_maskrcnn_v2_config(state, num_classes)
  elif num_classes is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.num_classes = int(num_classes)
  variables = common.convert_table(
      src, config, expected_variables_v2(config),
      lambda e: backbone_table(e, _BODY) + heads_table_v2(e, config.roi.pooler_size),
      _CLASS_KEYS, key)
  return variables, config


def log_summary(variables: Mapping[str, Any], what: str) -> None:
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
  logging.info("%s: %d arrays, %.1fM values", what, len(jax.tree.leaves(variables)), n / 1e6)


# ---------------------------------------------------------------------------- keypoints

_KEYPOINT_LOGITS = "roi_heads.keypoint_predictor.kps_score_lowres.weight"


def torchvision_keypointrcnn_config(state: Optional[Mapping[str, Any]] = None,
                                    num_classes: Optional[int] = None
                                    ) -> ml_collections.ConfigDict:
  """The model config of torchvision's ``keypointrcnn_resnet50_fpn``.

  v1's (:func:`torchvision_maskrcnn_config`: trunk, RPN, box head and thresholds are the same)
  with the mask branch off and the keypoint branch on: 14x14 RoIAlign (sampling ratio 2), eight
  3x3 convs of 512 and K = 17 keypoints, 2 classes (background, person). With ``state``, the
  keypoint convs' widths and K are read from it (K from the predictor's weight [C, K, 4, 4]).
  """
  c = torchvision_maskrcnn_config(state, num_classes)
  c.mask.enabled = False
  c.keypoint.enabled = True
  if state is None:
    c.num_classes = 2 if num_classes is None else int(num_classes)
    return c
  state = canonical_keys(state)
  convs = []
  while f"roi_heads.keypoint_head.{2 * len(convs)}.weight" in state:
    convs.append(int(state[f"roi_heads.keypoint_head.{2 * len(convs)}.weight"].shape[0]))
  if convs:
    c.keypoint.conv_channels = tuple(convs)
  if _KEYPOINT_LOGITS in state:
    c.keypoint.num_keypoints = int(state[_KEYPOINT_LOGITS].shape[1])
  return c


def keypoint_table(expected: common.Flat):
  """Rows for the keypoint head and predictor leaves in ``expected``: ``keypoint_head/<i>``
  is torchvision's ``Sequential`` index ``i`` (the convs; ReLUs between), the predictor's
  ``kps_score_lowres`` a transposed conv."""
  rows = []
  for path in expected:
    module, layer, leaf = path[1], path[2], path[-1]
    name = f"roi_heads.{module}.{layer}.{'weight' if leaf == 'kernel' else leaf}"
    if leaf != "kernel":
      fn = _identity
    elif module == "keypoint_predictor":
      fn = common.deconv_kernel
    else:
      fn = common.conv_kernel
    rows.append((path, name, fn))
  return rows


def convert_torchvision_keypointrcnn(
    state: Mapping[str, Any],
    *,
    num_classes: Optional[int] = None,
    config: Optional[ml_collections.ConfigDict] = None,
    key: Optional[jax.Array] = None,
) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """torchvision ``keypointrcnn_resnet50_fpn`` state dict -> ``(variables, config)``.

  As :func:`convert_torchvision_maskrcnn`, with :func:`torchvision_keypointrcnn_config`: the
  result runs in ``MaskRCNN(config)`` as a box + keypoint model (no mask branch), whose
  ``predict`` gives torchvision's boxes, keypoints and keypoint scores. With another
  ``num_classes`` the box predictor is re-initialised (the keypoint layers are
  class-agnostic, so they are kept).

  Raises:
    ConversionError: not a Keypoint R-CNN state dict, unknown or missing keys, or shape
      mismatches, all named.
  """
  state = canonical_keys(common.to_numpy_dict(state))
  if _KEYPOINT_LOGITS not in state:
    raise common.ConversionError(f"no {_KEYPOINT_LOGITS}: not a keypointrcnn_resnet50_fpn "
                                 "state dict (Mask R-CNN: --source torchvision)")
  src = common.SourceWeights(state, "torchvision Keypoint R-CNN state dict")
  src.ignore([r".*\.num_batches_tracked"], "BatchNorm step-counter")
  if config is None:
    config = torchvision_keypointrcnn_config(state)
  target_classes = int(config.num_classes if num_classes is None else num_classes)
  # Converted at the checkpoint's class count; then only the box predictor is class-dependent.
  config = ml_collections.ConfigDict(config.to_dict())
  logits = state.get("roi_heads.box_predictor.cls_score.weight")
  config.num_classes = target_classes if logits is None else int(logits.shape[0])

  def table(expected):
    keypoints = {p: v for p, v in expected.items() if p[1].startswith("keypoint_")}
    rest = {p: v for p, v in expected.items() if p not in keypoints}
    return (backbone_table(rest, _BODY) + heads_table(rest, config.roi.pooler_size)
            + keypoint_table(keypoints))

  variables = common.convert_table(src, config, common.expected_variables(config), table, (),
                                   key)
  if target_classes != config.num_classes:
    logging.info("num_classes %d -> %d: re-initialised box_predictor; kept the rest",
                 config.num_classes, target_classes)
    config.num_classes = target_classes
    fresh = roi_heads.FastRCNNPredictor(target_classes).init(
        jax.random.key(0) if key is None else key,
        jnp.zeros((1, config.roi.representation_size)))
    variables["params"]["box_predictor"] = fresh["params"]
  return variables, config
