"""Stage-by-stage parity of the converted ``maskrcnn_resnet50_fpn`` (v1) with torchvision.

Each stage gets the *same* inputs on both sides (torchvision's FPN features, its RPN outputs,
its proposals), so a difference is the stage's own; random weights with random BN statistics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import image_list
from torchvision.models.detection import rpn as tv_rpn

from mrcnn_jax import modeling
from mrcnn_jax.modeling import roi_heads as roi_lib
from mrcnn_jax.modeling import rpn as rpn_lib
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import boxes as box_ops
from tests.convert import torch_models as tm

_TOL = 1e-4
_H, _W = 64, 128  # multiples of 64, so torchvision's derived anchor strides are exact


@pytest.fixture(scope="module")
def stage(v1_model, v1_converted):
  """Torch features and per-stage torchvision outputs on one random image."""
  variables, config = v1_converted
  x = np.random.default_rng(0).normal(size=(1, _H, _W, 3)).astype(np.float32)
  images = image_list.ImageList(tm.nchw(x), [(_H, _W)])
  with torch.no_grad():
    feats = v1_model.backbone(images.tensors)
    tv_feats = list(feats.values())
    obj, deltas = v1_model.rpn.head(tv_feats)
    obj_flat, deltas_flat = tv_rpn.concat_box_prediction_layers(obj, deltas)
    proposals, _ = v1_model.rpn(images, feats)
  return dict(variables=variables, config=config, images=images, feats=feats,
              ours_feats=[jnp.asarray(tm.nhwc(f)) for f in tv_feats],
              obj=obj_flat.numpy().reshape(1, -1), deltas=deltas_flat.numpy().reshape(1, -1, 4),
              proposals=proposals[0].numpy())


def _apply(stage, fn, *args):
  model = modeling.MaskRCNN(stage["config"])
  return jax.jit(lambda v, *a: model.apply(v, *a, method=fn))(stage["variables"], *args)


def test_config_is_torchvision_v1(v1_converted):
  _, config = v1_converted
  assert config.num_classes == 91 and config.backbone.depth == 50
  assert config.roi.aligned is False and config.roi.representation_size == 1024
  assert tuple(config.mask.conv_channels) == (256,) * 4
  np.testing.assert_allclose(config.pixel_mean, [123.675, 116.28, 103.53], rtol=1e-6)
  np.testing.assert_allclose(config.pixel_std, [58.395, 57.12, 57.375], rtol=1e-6)


def test_rpn_objectness_and_deltas(stage):
  obj, deltas = _apply(stage, lambda m, f: m.rpn_head(f), stage["ours_feats"])
  assert tm.rel_err(obj, stage["obj"]) < _TOL
  assert tm.rel_err(deltas, stage["deltas"]) < _TOL


def test_proposals(stage):
  r = stage["config"].rpn
  per_level = anchor_ops.generate_anchors((_H, _W))
  fn = jax.jit(functools.partial(
      rpn_lib.generate_proposals, level_sizes=rpn_lib.level_sizes(per_level),
      pre_nms_top_k=r.pre_nms_top_k_test, post_nms_top_k=r.post_nms_top_k_test,
      nms_threshold=r.nms_threshold, min_size=r.min_size, score_threshold=r.score_threshold))
  boxes, _, valid = fn(jnp.asarray(stage["obj"][0]), jnp.asarray(stage["deltas"][0]),
                       jnp.asarray(rpn_lib.concat_anchors(per_level)),
                       jnp.asarray([_H, _W], jnp.int32))
  ref = stage["proposals"]
  ours = np.asarray(boxes)[np.asarray(valid)]
  assert len(ref) > 50
  # The same boxes in the same order, except NMS ties: a box whose IoU with a better box is the
  # threshold to float32 rounding (0.6999999 here, 0.7000000 in torch) may be kept on one side
  # only. Seen on one CPU and not another: the decoded boxes differ in the last bit.
  same = np.abs(ours[:, None, :] - ref[None, :, :]).max(-1) < 1e-3
  for side, kept_by_other in ((ours, same.any(1)), (ref, same.any(0))):
    iou = np.asarray(box_ops.box_iou(jnp.asarray(side), jnp.asarray(side)))
    for i in np.flatnonzero(~kept_by_other):
      assert i > 0 and abs(iou[i, :i].max() - r.nms_threshold) < 1e-5, (i, iou[i, :i].max())
  assert (~same.any(1)).sum() + (~same.any(0)).sum() <= 2
  assert tm.rel_err(ours[same.any(1)], ref[same.any(0)]) < _TOL


def test_box_head_logits_and_deltas_on_same_rois(stage, v1_model):
  rois = stage["proposals"]
  with torch.no_grad():
    pooled = v1_model.roi_heads.box_roi_pool(stage["feats"], [torch.from_numpy(rois)],
                                             stage["images"].image_sizes)
    logits, deltas = v1_model.roi_heads.box_predictor(v1_model.roi_heads.box_head(pooled))
  ours_logits, ours_deltas = _apply(stage, lambda m, f, b: m._box_branch(f, b),
                                    stage["ours_feats"], jnp.asarray(rois)[None])
  assert tm.rel_err(ours_logits[0], logits.numpy()) < _TOL
  assert tm.rel_err(ours_deltas[0], deltas.numpy().reshape(len(rois), -1, 4)) < _TOL


def test_detections_from_same_head_outputs(stage, v1_model):
  """RoIHeads.postprocess_detections vs our detect() on torchvision's head outputs."""
  rois = torch.from_numpy(stage["proposals"])
  heads = v1_model.roi_heads
  with torch.no_grad():
    pooled = heads.box_roi_pool(stage["feats"], [rois], stage["images"].image_sizes)
    logits, deltas = heads.box_predictor(heads.box_head(pooled))
    boxes, scores, labels = heads.postprocess_detections(logits, deltas, [rois], [(_H, _W)])
  ro, c = stage["config"].roi, stage["config"]
  det = jax.jit(functools.partial(
      roi_lib.detect, weights=tuple(ro.box_weights), score_threshold=ro.score_threshold,
      nms_threshold=ro.nms_threshold, min_size=ro.min_size, detections=c.detections_per_image))(
          jnp.asarray(logits.numpy()), jnp.asarray(deltas.numpy().reshape(len(rois), -1, 4)),
          jnp.asarray(rois.numpy()), jnp.ones((len(rois),), bool), jnp.asarray([_H, _W]))
  n = len(scores[0])
  assert n > 5 and int(det["valid"].sum()) == n
  assert tm.rel_err(det["boxes"][:n], boxes[0].numpy()) < _TOL
  np.testing.assert_allclose(det["scores"][:n], scores[0].numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(det["classes"][:n], labels[0].numpy())


def test_mask_logits_on_same_rois(stage, v1_model):
  rois = stage["proposals"][:40]
  with torch.no_grad():
    pooled = v1_model.roi_heads.mask_roi_pool(stage["feats"], [torch.from_numpy(rois)],
                                              stage["images"].image_sizes)
    ref = v1_model.roi_heads.mask_predictor(v1_model.roi_heads.mask_head(pooled)).numpy()
  cfg = stage["config"]

  def all_classes(m, f, b):
    p = m._pool(f, b, cfg.mask.pooler_size, cfg.mask.sampling_ratio)[0]
    return m.mask_predictor(m.mask_head(p))

  ours = _apply(stage, all_classes, stage["ours_feats"], jnp.asarray(rois)[None])
  assert tm.rel_err(np.transpose(np.asarray(ours), (0, 3, 1, 2)), ref) < _TOL
  classes = np.arange(len(rois), dtype=np.int32) % 90 + 1
  picked = _apply(stage, lambda m, f, b, k: m._mask_branch(f, b, k), stage["ours_feats"],
                  jnp.asarray(rois)[None], jnp.asarray(classes)[None])
  assert tm.rel_err(picked[0], ref[np.arange(len(rois)), classes]) < _TOL
