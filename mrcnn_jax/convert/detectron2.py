"""Detectron2 model-zoo ``.pkl`` (R50-FPN / R101-FPN Mask R-CNN) -> our Flax variables + config.

A Detectron2 checkpoint is a pickled dict (``{'model': {name: numpy array}, '__author__': ...}``
or the inner dict itself); no torch and no Detectron2 install is needed to read it. Names map
one to one onto ours (``backbone.bottom_up.res2.0.conv1.norm.running_mean`` ->
``backbone/layer1/0/bn1/mean``), with three layout differences handled here:

* input: Detectron2's MSRA models take **BGR** 0-255 pixels minus a BGR mean, std 1. Our model
  takes RGB uint8, so the stem conv's input channels are reversed and the mean is stored in RGB
  order; the network computes exactly the same function of the same picture.
* classes: Detectron2's ``cls_score`` puts background **last** (K foreground, then background);
  ours puts it first (torchvision's layout). Its ``bbox_pred`` and mask ``predictor`` have no
  background slot (or one class-agnostic slot); ours have ``K + 1``: the background slot gets
  zeros (never read at inference), a class-agnostic slot is repeated for every class.
* RoIAlign is ``ROIAlignV2`` (``aligned=True``), and masks are pasted as Detectron2 pastes them,
  half-pixel exactly at the float box (``mask.aligned = True``), not as torchvision does.

The published R50/R101-FPN models put the ResNet stride in the first 1x1 conv
(``RESNETS.STRIDE_IN_1X1: True``, the default here: ``config.backbone.stride_in_1x1``) and use
unrounded cell anchors (``config.anchors.round = False``); both are set in the converted config.
Known differences from Detectron2 inference that the converted config cannot express (see the
module's ``KNOWN_DIFFERENCES``): its adaptive RoIAlign sampling (``POOLER_SAMPLING_RATIO: 0``,
not a static shape; we sample 2x2 per bin).
"""

from __future__ import annotations

import logging
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from etils import epath
import jax
import ml_collections
import numpy as np

from mrcnn_jax.convert import common
from mrcnn_jax.modeling.config import model_config
from mrcnn_jax.run import paths

_BODY = "backbone.bottom_up."
_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}
# Detectron2's MSRA pixel statistics, BGR order (cfg.MODEL.PIXEL_MEAN / PIXEL_STD).
D2_PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
D2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)

KNOWN_DIFFERENCES = (
    "RoIAlign sampling: Detectron2 uses adaptive sampling (ceil(roi size / output size) points "
    "per bin); ours uses a fixed 2x2 per bin (static shapes)",
)

# Keys in some checkpoints that hold no parameters.
_NON_PARAMETERS = (r".*\.num_batches_tracked", r"proposal_generator\.anchor_generator\..*",
                   r"pixel_mean", r"pixel_std")


def load_detectron2_pkl(path: str) -> Dict[str, np.ndarray]:
  """Reads a Detectron2 ``.pkl`` checkpoint, local or ``gs://``: ``{name: float32 array}``."""
  with paths.one_line_errors("weight file", path):
    data = epath.Path(path).read_bytes()
  obj = pickle.loads(data, encoding="latin1")
  if isinstance(obj, Mapping) and "blobs" in obj:
    raise NotImplementedError(
        f"{path} is a Caffe2/Detectron(1) blob file (keys like res2_0_branch2a_w); convert it "
        "with Detectron2's own checkpointer first, or use a Detectron2 model-zoo model_final.pkl")
  if isinstance(obj, Mapping) and "model" in obj:
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise common.ConversionError(f"{path}: expected a dict of arrays, got {type(obj).__name__}")
  return common.to_numpy_dict(obj)


def _stage_blocks(state: Mapping[str, Any]) -> Tuple[int, ...]:
  blocks = []
  for stage in range(2, 6):
    pat = re.compile(re.escape(f"{_BODY}res{stage}.") + r"(\d+)\.conv1\.weight")
    idx = [int(m.group(1)) for k in state if (m := pat.fullmatch(k))]
    if not idx:
      raise common.ConversionError(f"no {_BODY}res{stage}.* keys: not a Detectron2 ResNet")
    blocks.append(max(idx) + 1)
  return tuple(blocks)


def detectron2_config(state: Optional[Mapping[str, Any]] = None,
                      num_classes: Optional[int] = None,
                      input_format: str = "BGR",
                      stride_in_1x1: bool = True) -> ml_collections.ConfigDict:
  """The model config closest to Detectron2's ``mask_rcnn_R_{50,101}_FPN_*`` inference.

  Args:
    state: the checkpoint, to read layer sizes, class count and (if stored) pixel statistics.
    num_classes: classes including background (81 for COCO: Detectron2 numbers the 80 COCO
      categories contiguously, not torchvision's 91 ids); overrides the state's.
    input_format: the checkpoint's ``cfg.INPUT.FORMAT``: 'BGR' (MSRA models, mean/std in BGR
      order) or 'RGB'.
    stride_in_1x1: the checkpoint's ``RESNETS.STRIDE_IN_1X1`` (True for the MSRA R50/R101).

  Resizing is the caller's: Detectron2 tests at shorter side 800 (longer <= 1333) and pads to a
  multiple of 32.
  """
  c = model_config()
  c.norm = "frozen_bn"
  mean, std = D2_PIXEL_MEAN_BGR, D2_PIXEL_STD_BGR
  if state is not None and "pixel_mean" in state:
    mean = tuple(float(v) for v in np.ravel(state["pixel_mean"]))
  if state is not None and "pixel_std" in state:
    std = tuple(float(v) for v in np.ravel(state["pixel_std"]))
  if input_format == "BGR":
    mean, std = mean[::-1], std[::-1]
  elif input_format != "RGB":
    raise ValueError(f"input_format must be 'BGR' or 'RGB', got {input_format!r}")
  c.pixel_mean, c.pixel_std = tuple(mean), tuple(std)
  c.roi.aligned = True  # ROIAlignV2
  c.mask.aligned = True  # its paste_masks_in_image (grid_sample) and its aligned mask targets
  c.backbone.stride_in_1x1 = bool(stride_in_1x1)
  c.anchors.round = False  # DefaultAnchorGenerator keeps fractional cell anchors
  # Detectron2 keeps boxes of any positive size (RPN MIN_SIZE 0, no filter after the heads).
  c.rpn.min_size = 0.0
  c.roi.min_size = 0.0
  c.rpn.post_nms_top_k_train = 1000  # RPN.POST_NMS_TOPK_TRAIN in Base-RCNN-FPN
  c.rpn.box_loss_beta = 0.0  # SMOOTH_L1_BETA 0: plain L1
  c.roi.box_loss_beta = 0.0
  if state is not None:
    blocks = _stage_blocks(state)
    if blocks in _DEPTHS:
      c.backbone.depth, c.backbone.stage_blocks = _DEPTHS[blocks], None
    else:
      c.backbone.stage_blocks = blocks
    c.backbone.width = int(state[f"{_BODY}stem.conv1.weight"].shape[0])
    if "backbone.fpn_lateral2.weight" in state:
      c.fpn.channels = int(state["backbone.fpn_lateral2.weight"].shape[0])
    if "roi_heads.box_head.fc1.weight" in state:
      c.roi.representation_size = int(state["roi_heads.box_head.fc1.weight"].shape[0])
    if "roi_heads.box_predictor.cls_score.weight" in state:
      c.num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    convs = []
    while f"roi_heads.mask_head.mask_fcn{len(convs) + 1}.weight" in state:
      convs.append(int(state[f"roi_heads.mask_head.mask_fcn{len(convs) + 1}.weight"].shape[0]))
    if convs:
      c.mask.conv_channels = tuple(convs)
  if num_classes is not None:
    c.num_classes = int(num_classes)
  return c


# ---------------------------------------------------------------------------- class layouts


def _bg_first(w: np.ndarray) -> np.ndarray:
  """Rows [fg_1..fg_K, bg] -> [bg, fg_1..fg_K] (axis 0)."""
  return np.concatenate([w[-1:], w[:-1]], axis=0)


def _with_background(w: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
  """Axis 0 of ``per_class`` rows per foreground class (or one class-agnostic group) -> a
  zero background group first, then ``num_classes - 1`` groups."""
  groups = w.shape[0] // per_class
  if groups == 1 and num_classes > 2:  # class-agnostic: the same rows for every class
    w = np.concatenate([w] * (num_classes - 1), axis=0)
  elif groups != num_classes - 1:
    raise common.ConversionError(
        f"class-dependent weight {w.shape}: {groups} classes, expected {num_classes - 1} or 1")
  return np.concatenate([np.zeros((per_class,) + w.shape[1:], w.dtype), w], axis=0)


def _table(expected: common.Flat, config: ml_collections.ConfigDict, bgr: bool):
  k1, pooled = config.num_classes, config.roi.pooler_size
  ident = lambda w: w  # noqa: E731
  rows = []
  for path in expected:
    module, leaf = path[1], path[-1]
    suffix = "weight" if leaf == "kernel" else leaf
    kernel = leaf == "kernel"
    if module == "backbone":
      mods = path[2:-1]
      if mods[0] in ("conv1", "bn1"):
        base = _BODY + "stem.conv1"
      else:
        stage, block = int(mods[0][len("layer"):]) + 1, mods[1]
        if mods[2] == "downsample":
          base = f"{_BODY}res{stage}.{block}.shortcut"
        else:
          base = f"{_BODY}res{stage}.{block}.conv{mods[2][-1]}"
      if kernel:
        flip = bgr and mods[0] == "conv1"
        fn = (lambda w: common.conv_kernel(w[:, ::-1])) if flip else common.conv_kernel
        rows.append((path, base + ".weight", fn))
      else:
        rows.append((path, f"{base}.norm.{common.NORM_LEAVES[leaf]}", ident))
      continue
    layer = path[2]
    if module == "fpn":
      kind, idx = layer.rsplit("_", 1)
      name = f"backbone.fpn_{'lateral' if kind == 'inner_blocks' else 'output'}{int(idx) + 2}"
      fn = common.conv_kernel
    elif module == "rpn_head":
      name = "proposal_generator.rpn_head." + {
          "conv": "conv", "cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}[layer]
      fn = common.conv_kernel
    elif module == "box_head":
      name = f"roi_heads.box_head.{'fc1' if layer == 'fc6' else 'fc2'}"
      fn = ((lambda w: common.flatten_chw_dense_kernel(w, pooled)) if layer == "fc6"
            else common.dense_kernel)
    elif module == "box_predictor" and layer == "cls_score":
      name = "roi_heads.box_predictor.cls_score"
      fn = lambda w: common.dense_kernel(_bg_first(w))  # noqa: E731
      if not kernel:
        rows.append((path, f"{name}.bias", _bg_first))
        continue
    elif module == "box_predictor" and layer == "bbox_pred":
      name = "roi_heads.box_predictor.bbox_pred"
      fn = lambda w: common.dense_kernel(_with_background(w, k1, 4))  # noqa: E731
      if not kernel:
        rows.append((path, f"{name}.bias", lambda w: _with_background(w, k1, 4)))
        continue
    elif module == "mask_head":
      name = f"roi_heads.mask_head.{layer}"
      fn = common.conv_kernel
    elif module == "mask_predictor" and layer == "conv5_mask":
      name, fn = "roi_heads.mask_head.deconv", common.deconv_kernel
    elif module == "mask_predictor":
      name = "roi_heads.mask_head.predictor"
      fn = lambda w: common.conv_kernel(_with_background(w, k1, 1))  # noqa: E731
      if not kernel:
        rows.append((path, f"{name}.bias", lambda w: _with_background(w, k1, 1)))
        continue
    else:
      raise common.ConversionError(f"no Detectron2 counterpart for {'/'.join(path)}")
    rows.append((path, f"{name}.{suffix}", fn if kernel else ident))
  return rows


def convert_detectron2(
    state: Mapping[str, Any],
    *,
    num_classes: Optional[int] = None,
    config: Optional[ml_collections.ConfigDict] = None,
    input_format: str = "BGR",
    stride_in_1x1: bool = True,
    key: Optional[jax.Array] = None,
) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """Detectron2 Mask R-CNN R-FPN weights -> ``(variables, config)``.

  Args:
    state: ``{name: array}`` in Detectron2's names (:func:`load_detectron2_pkl`).
    num_classes: classes including background, for fine-tuning; a different count from the
      checkpoint's re-initialises the class-dependent layers (logged by name).
    config: the config to convert into (default :func:`detectron2_config` of ``state``).
    input_format: the checkpoint's ``INPUT.FORMAT``; 'BGR' reverses the stem's input channels
      so our model takes RGB.
    stride_in_1x1: the checkpoint's ``RESNETS.STRIDE_IN_1X1`` (True for the model zoo's MSRA
      R50/R101 models); sets ``config.backbone.stride_in_1x1`` (also of a given ``config``).
      The weights are the same either way; only where the stride sits differs.
    key: PRNG key for re-initialised layers.

  Raises:
    ConversionError: unknown or missing keys, or shape mismatches, all named.
  """
  state = common.to_numpy_dict(state)
  if config is None:
    config = detectron2_config(state, num_classes, input_format, stride_in_1x1)
  else:
    config = ml_collections.ConfigDict(config.to_dict())
    config.backbone.stride_in_1x1 = bool(stride_in_1x1)
    if num_classes is not None:
      config.num_classes = int(num_classes)
  src = common.SourceWeights(state, "Detectron2 checkpoint")
  src.ignore(_NON_PARAMETERS, "non-parameter")
  # Old FrozenBatchNorm checkpoints store only the affine: statistics are then (0, 1).
  for k in [k for k in state if k.endswith(".norm.weight")]:
    base = k[:-len("weight")]
    if base + "running_mean" not in state:
      c = state[k].shape[0]
      src.arrays[base + "running_mean"] = np.zeros((c,), np.float32)
      src.arrays[base + "running_var"] = np.ones((c,), np.float32)
      logging.info("Detectron2 checkpoint: %s has no running statistics, using (0, 1)", base)
  variables = common.convert_table(
      src, config, common.expected_variables(config),
      lambda e: _table(e, config, input_format == "BGR"),
      (r"roi_heads\.box_predictor\..*", r"roi_heads\.mask_head\.predictor\..*"), key)
  return variables, config
