"""Whole-model parity of a converted torchvision ``maskrcnn_resnet50_fpn_v2``.

The oracle is torchvision's own ``maskrcnn_resnet50_fpn_v2`` (the full R50-FPN, weights=None)
with random weights, random BatchNorm statistics and biases (so a wrong mapping shows).
Training it briefly on a CPU would take minutes, so instead its class-logit and mask-logit
biases are *calibrated*: shifted so that, on a calibration image, every class logit averages 0
and the mask logits have median 0. That gives spread-out scores over all classes (not ~1.0 for
one class, whose near-ties would make the ranking arbitrary) and masks that are neither empty
nor full; torchvision's 0.05 score threshold is kept.

One forward pass on each side feeds every test: torchvision's intermediates come from forward
hooks, ours from ``capture_intermediates`` of ``MaskRCNN.predict``. Stages are compared in the
order they chain (features, RPN outputs, proposals, box logits/deltas on those proposals, mask
logits on the detections, detections), each float32 to rel. err. < 1e-4.

Speed: 256 x 320 inputs (multiples of 64, so torchvision's derived anchor strides are exact),
``min_size=256, max_size=320`` so torchvision does not resize them (scale exactly 1; its
800/1333 resize is the caller's, see ``torchvision_maskrcnn_config``), and 100 proposals /
20 detections per image on both sides, since the v2 box head's four 3x3 convs per RoI
dominate the CPU time.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest
import torch
from torchvision.models.detection import mask_rcnn
from torchvision.models.detection import rpn as tv_rpn

from mrcnn_jax import convert
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.convert import common
from mrcnn_jax.inference.masks import paste_mask
from tests.convert import torch_models as tm

pytestmark = pytest.mark.slow  # ~25 s for the shared forward passes, ~30 s for the scripts

_H, _W = 256, 320
_CLASSES = 4
_PROPOSALS = 100
_DETECTIONS = 20
_TOL = 1e-4
# Our modules whose outputs the stage tests read (top-level children of MaskRCNN).
_CAPTURED = ("fpn", "rpn_head", "box_predictor", "mask_predictor")


def _images(seed: int, n: int) -> np.ndarray:
  """[n, 256, 320, 3] uint8: noisy backgrounds with a few bright rectangles and ellipses."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:_H, :_W]
  out = np.empty((n, _H, _W, 3), np.float32)
  for img in out:
    img[:] = rng.uniform(0, 90, size=3)
    img += rng.normal(0, 8, size=img.shape)
    for _ in range(rng.integers(2, 5)):
      w, h = rng.integers(30, 120, size=2)
      x0, y0 = rng.integers(0, _W - w), rng.integers(0, _H - h)
      if rng.random() < 0.5:
        m = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
      else:
        m = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - y0 - h / 2) / (h / 2)) ** 2 <= 1
      img[m] = rng.uniform(120, 255, size=3)
  return np.clip(out, 0, 255).astype(np.uint8)


def _calibrate(model: torch.nn.Module) -> None:
  """Shifts the class and mask logit biases (see the module docstring) on one image."""
  heads = model.roi_heads
  with torch.no_grad():
    x, _ = model.transform(tm.to_torch(_images(99, 1)))
    feats = model.backbone(x.tensors)
    proposals, _ = model.rpn(x, feats)
    rep = heads.box_head(heads.box_roi_pool(feats, proposals, x.image_sizes))
    heads.box_predictor.cls_score.bias.sub_(heads.box_predictor.cls_score(rep).mean(0))
    masks = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(
        feats, [proposals[0][:_DETECTIONS]], x.image_sizes)))
    heads.mask_predictor.mask_fcn_logits.bias.sub_(masks.transpose(0, 1).flatten(1).median(1)[0])


@pytest.fixture(scope="module")
def v2_model():
  torch.manual_seed(0)
  model = mask_rcnn.maskrcnn_resnet50_fpn_v2(
      weights=None, weights_backbone=None, num_classes=_CLASSES, min_size=_H, max_size=_W,
      rpn_post_nms_top_n_test=_PROPOSALS, box_detections_per_img=_DETECTIONS)
  model = tm.randomize_biases(tm.randomize_norms(model, 0), 0).eval()
  _calibrate(model)
  return model


def _convert(model):
  variables, config = convert.convert_torchvision_maskrcnn_v2(model.state_dict())
  config.rpn.post_nms_top_k_test = _PROPOSALS  # the oracle's test-speed settings
  config.detections_per_image = _DETECTIONS
  return variables, config


@pytest.fixture(scope="module", params=[kernels.PLAIN, kernels.CPU], ids=["plain", "cpu"])
def run(v2_model, request):
  """Both models on the same two images: torchvision's stage outputs (hooks) and ours, on the
  plain layers and on the CPU kernels."""
  images = _images(0, 2)
  tv = {}
  hooks = [(v2_model.backbone, "feats"), (v2_model.rpn.head, "rpn_head"),
           (v2_model.rpn, "proposals"), (v2_model.roi_heads.box_predictor, "box"),
           (v2_model.roi_heads.mask_predictor, "mask")]
  handles = [m.register_forward_hook(lambda _, i, o, k=k: tv.__setitem__(k, (i, o)))
             for m, k in hooks]
  try:
    with torch.no_grad():
      detections = v2_model(tm.to_torch(images))
  finally:
    for h in handles:
      h.remove()
  assert tuple(tv["feats"][0][0].shape) == (2, 3, _H, _W)  # neither resized nor padded

  variables, config = _convert(v2_model)
  model = modeling.MaskRCNN(config, kernels=request.param)
  captured = lambda mdl, method: method == "__call__" and mdl.name in _CAPTURED  # noqa: E731
  out, state = jax.jit(lambda v, x: model.apply(
      v, x, method=modeling.MaskRCNN.predict, capture_intermediates=captured,
      mutable=["intermediates"]))(variables, jnp.asarray(images))
  ours = {k: v["__call__"][0] for k, v in state["intermediates"].items()}
  anchors_and_sizes = lambda m: m._anchors((_H, _W))  # noqa: E731
  valid_size = jnp.asarray([[_H, _W]] * 2, jnp.int32)
  proposals, _, proposal_valid = jax.jit(lambda v, o, d: model.apply(
      v, method=lambda m: m._proposals(o, d, *anchors_and_sizes(m), valid_size, train=False)))(
          variables, *ours["rpn_head"])
  return dict(images=images, tv=tv, detections=detections, variables=variables, config=config,
              out=jax.tree.map(np.asarray, out), ours=jax.tree.map(np.asarray, ours),
              proposals=np.asarray(proposals), proposal_valid=np.asarray(proposal_valid))


def test_converted_config_and_variables_are_v2(v2_model, run):
  config, variables = run["config"], run["variables"]
  assert (config.rpn.head_convs, config.roi.box_head_convs, config.num_classes) == (2, 4, 4)
  assert config.fpn.norm == config.roi.box_head_norm == config.mask.norm == "frozen_bn"
  assert config.backbone.depth == 50 and config.backbone.stage_blocks is None
  params = variables["params"]
  assert set(params["rpn_head"]) == {"conv_0", "conv_1", "cls_logits", "bbox_pred"}
  assert set(params["box_head"]) == {"0", "1", "2", "3", "5"}
  # Every torchvision value (parameters and BN statistics, here all FrozenBN params) has a home.
  tv_values = sum(v.numel() for k, v in v2_model.state_dict().items()
                  if not k.endswith("num_batches_tracked"))
  assert sum(x.size for x in jax.tree.leaves(variables)) == tv_values
  mask = jax.tree_util.tree_flatten_with_path(modeling.trainable_mask(params, config))[0]
  frozen = {"/".join(str(p.key) for p in path) for path, trainable in mask if not trainable}
  assert {"fpn/inner_blocks_0_norm/mean", "box_head/3/1/scale", "mask_head/0/1/var"} <= frozen
  assert not {"box_head/3/0/kernel", "box_head/5/kernel", "rpn_head/conv_1/kernel",
              "fpn/layer_blocks_2/kernel", "mask_head/0/0/kernel"} & frozen


def test_fpn_features(run):
  tv_feats = list(run["tv"]["feats"][1].values())
  ours = run["ours"]["fpn"]
  assert len(ours) == len(tv_feats) == 5
  for level, (o, r) in enumerate(zip(ours, tv_feats)):
    assert tm.rel_err(o, tm.nhwc(r)) < _TOL, f"P{level + 2}"


def test_rpn_objectness_and_deltas(run):
  obj, deltas = tv_rpn.concat_box_prediction_layers(*run["tv"]["rpn_head"][1])
  ours_obj, ours_deltas = run["ours"]["rpn_head"]
  assert tm.rel_err(ours_obj, obj.numpy().reshape(2, -1)) < _TOL
  assert tm.rel_err(ours_deltas, deltas.numpy().reshape(2, -1, 4)) < _TOL


def _counts(run):
  return [len(p) for p in run["tv"]["proposals"][1][0]]


def test_proposals(run):
  for b, ref in enumerate(run["tv"]["proposals"][1][0]):
    n = len(ref)
    assert n > 50 and int(run["proposal_valid"][b].sum()) == n, (b, n)
    assert tm.rel_err(run["proposals"][b, :n], ref.numpy()) < _TOL, b


def test_box_logits_and_deltas(run):
  """Our box branch ran on our proposals, equal to torchvision's (above), in the same order."""
  logits, deltas = (t.numpy() for t in run["tv"]["box"][1])
  ours_logits, ours_deltas = run["ours"]["box_predictor"]
  start = 0
  for b, n in enumerate(_counts(run)):
    assert tm.rel_err(ours_logits[b, :n], logits[start:start + n]) < _TOL, b
    assert tm.rel_err(ours_deltas[b, :n], deltas[start:start + n].reshape(n, -1, 4)) < _TOL, b
    start += n


def _pairs(run):
  """(image, our index, torchvision index) of each torchvision detection, after checking the
  counts agree. Both sides rank by score; equal-rank detections are paired."""
  pairs = []
  for b, r in enumerate(run["detections"]):
    n = len(r["scores"])
    assert n >= 5 and int(run["out"]["valid"][b].sum()) == n, (b, n)
    pairs += [(b, i, i) for i in range(n)]
  return pairs


def test_mask_logits(run):
  """Our mask branch ran on our detections (paired with torchvision's by the test below)."""
  ref = run["tv"]["mask"][1].numpy()  # [sum D_b, K + 1, 28, 28], torchvision's detections
  ours = run["ours"]["mask_predictor"].reshape(2, _DETECTIONS, 28, 28)
  offsets = np.cumsum([0] + [len(r["labels"]) for r in run["detections"]])
  got, want = [], []
  for b, i, j in _pairs(run):
    label = int(run["detections"][b]["labels"][j])
    got.append(ours[b, i])
    want.append(ref[offsets[b] + j, label])
  assert tm.rel_err(np.stack(got), np.stack(want)) < _TOL


def _check_detection(where, box, tv_box, cls, tv_cls, score, tv_score, mask, tv_mask):
  assert tm.box_iou(box, tv_box) >= 0.99, (where, box, tv_box)
  assert cls == tv_cls, (where, cls, tv_cls)
  assert abs(score - tv_score) <= 1e-3, (where, score, tv_score)
  assert tm.mask_iou(mask, tv_mask) >= 0.98, (where, tm.mask_iou(mask, tv_mask))


def _check_non_trivial(labels, scores, masks):
  """The comparison means something: several classes, spread scores, non-empty partial masks."""
  assert len(set(labels)) >= 2, labels
  assert max(scores) - min(scores) > 0.1, scores
  fill = [m.mean() for m in masks]
  assert sum(0.0 < f < 0.9 for f in fill) >= len(masks) // 2, fill


def test_detections_end_to_end(run):
  out = run["out"]
  for b, i, j in _pairs(run):
    r = run["detections"][b]
    box = out["boxes"][b, i]
    _check_detection((b, i), box, r["boxes"][j].numpy(), int(out["classes"][b, i]),
                     int(r["labels"][j]), float(out["scores"][b, i]), float(r["scores"][j]),
                     paste_mask(out["masks"][b, i], box, (_H, _W)) > 0.5,
                     r["masks"][j, 0].numpy() > 0.5)
  for r in run["detections"]:
    _check_non_trivial(r["labels"].tolist(), r["scores"].tolist(),
                       [m[0].numpy() > 0.5 for m in r["masks"]])


def test_class_count_change_reinitialises_only_class_layers(v2_model, run):
  ft, config = convert.convert_torchvision_maskrcnn_v2(v2_model.state_dict(), num_classes=3,
                                                       key=jax.random.key(1))
  assert config.num_classes == 3 and config.roi.box_head_convs == 4
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(ft)}
  ref = {jax.tree_util.keystr(p): x for p, x in
         jax.tree_util.tree_leaves_with_path(run["variables"])}
  assert set(flat) == set(ref)
  changed = [k for k in flat if "['box_predictor']" in k or "['mask_fcn_logits']" in k]
  assert len(changed) == 6
  for k, v in flat.items():
    if k in changed:
      assert v.shape[-1] in (3, 12), (k, v.shape)
    else:
      np.testing.assert_array_equal(v, ref[k], err_msg=k)


def test_convert_weights_then_predict_script(v2_model, run, tmp_path):
  """``torch.save`` -> ``convert_weights.py --source torchvision-v2`` -> ``predict.py`` on PNG
  files -> COCO-results JSON == torchvision's detections on the same images."""
  folder, pth = tmp_path / "images", tmp_path / "v2.pth"
  out, pred = tmp_path / "converted", tmp_path / "pred"
  folder.mkdir()
  for i, image in enumerate(run["images"]):
    Image.fromarray(image).save(folder / f"img{i}.png")
  torch.save(v2_model.state_dict(), pth)
  tm.run_script("convert_weights.py", "--source", "torchvision-v2", "--input", str(pth), "--output",
          str(out))
  with open(out / common.CONFIG_FILE) as f:
    config = common.config_from_json(f.read())
  assert (config.rpn.head_convs, config.roi.box_head_convs, config.mask.norm) == (
      2, 4, "frozen_bn")
  tm.run_script("predict.py", "--config", f"{out}/config.py:{_H},{_W}", "--checkpoint", str(out),
          "--images", str(folder), "--out", str(pred), "--score_threshold=0.0",
          f"--config.model.rpn.post_nms_top_k_test={_PROPOSALS}",
          f"--config.model.detections_per_image={_DETECTIONS}")
  with open(pred / "results.json") as f:
    results = json.load(f)
  assert not results["failed"]
  for b, r in enumerate(run["detections"]):  # the PNGs hold the very same pixels
    dets = [d for d in results["detections"] if d["image_id"] == b]
    assert len(dets) == len(r["scores"]) >= 5, (b, len(dets), len(r["scores"]))
    for i, d in enumerate(dets):  # both sides best first
      x, y, w, h = d["bbox"]
      _check_detection((b, i), np.array([x, y, x + w, y + h]), r["boxes"][i].numpy(),
                       d["category_id"], int(r["labels"][i]), d["score"], float(r["scores"][i]),
                       mask_utils.decode(d["segmentation"]).astype(bool),
                       r["masks"][i, 0].numpy() > 0.5)
