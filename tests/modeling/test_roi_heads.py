"""RoI heads: head layouts, training-RoI sampling and detection post-processing vs torchvision."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection import mask_rcnn as tv_mrcnn
from torchvision.models.detection import roi_heads as tv_roi

from mrcnn_jax.kernels import conv as conv_lib
from mrcnn_jax.kernels.mask_predictor import MatmulMaskPredictor
from mrcnn_jax.modeling import roi_heads as roi_lib

# The plain layers and the CPU kernels' (same parameters, same values).
PATHS = pytest.mark.parametrize("conv,predictor", [
    (nn.Conv, roi_lib.MaskRCNNPredictor), (conv_lib.Conv, MatmulMaskPredictor)],
    ids=["plain", "cpu"])


def _tv_roi_heads(detections=100, batch=64, score=0.05, nms=0.5):
  return tv_roi.RoIHeads(None, None, None, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
                         batch_size_per_image=batch, positive_fraction=0.25,
                         bbox_reg_weights=None, score_thresh=score, nms_thresh=nms,
                         detections_per_img=detections)


def _boxes(rng, n, lo=0, hi=80, wmin=2, wmax=40):
  xy = rng.uniform(lo, hi, (n, 2))
  wh = rng.uniform(wmin, wmax, (n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def _conv(sd, name):
  return dict(kernel=sd[f"{name}.weight"].numpy().transpose(2, 3, 1, 0),
              bias=sd[f"{name}.bias"].numpy())


def _nhwc(t):
  return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def test_box_head_and_predictor_match_torchvision():
  gen = torch.Generator().manual_seed(0)
  c, r, rep, k = 6, 7, 16, 5
  head, pred = tv_frcnn.TwoMLPHead(c * r * r, rep), tv_frcnn.FastRCNNPredictor(rep, k)
  x = torch.randn(10, c, r, r, generator=gen)
  with torch.no_grad():
    want_logits, want_deltas = pred(head(x))
  sd = head.state_dict()
  # fc6 reads NHWC-flattened features: permute torch's (c, h, w) input order to (h, w, c).
  fc6 = sd["fc6.weight"].numpy().reshape(rep, c, r, r).transpose(2, 3, 1, 0).reshape(-1, rep)
  head_p = dict(fc6=dict(kernel=fc6, bias=sd["fc6.bias"].numpy()),
                fc7=dict(kernel=sd["fc7.weight"].numpy().T, bias=sd["fc7.bias"].numpy()))
  psd = pred.state_dict()
  pred_p = {n: dict(kernel=psd[f"{n}.weight"].numpy().T, bias=psd[f"{n}.bias"].numpy())
            for n in ("cls_score", "bbox_pred")}

  @jax.jit
  def run(hp, pp, x):
    return roi_lib.FastRCNNPredictor(k).apply(
        {"params": pp}, roi_lib.TwoMLPHead(rep).apply({"params": hp}, x))

  logits, deltas = run(head_p, pred_p, _nhwc(x))
  assert logits.shape == (10, k) and deltas.shape == (10, k, 4)
  np.testing.assert_allclose(np.asarray(logits), want_logits.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(deltas).reshape(10, -1), want_deltas.numpy(),
                             rtol=1e-4, atol=1e-5)


@PATHS
def test_mask_head_and_predictor_match_torchvision(conv, predictor):
  gen = torch.Generator().manual_seed(1)
  c, k = 8, 4
  head = tv_mrcnn.MaskRCNNHeads(c, [c, c], 1)
  pred = tv_mrcnn.MaskRCNNPredictor(c, c, k)
  for p in list(head.parameters()) + list(pred.parameters()):
    torch.nn.init.normal_(p, std=0.2, generator=gen)
  x = torch.randn(3, c, 14, 14, generator=gen)
  with torch.no_grad():
    want = pred(head(x)).numpy().transpose(0, 2, 3, 1)
  hsd, psd = head.state_dict(), pred.state_dict()
  head_p = {f"mask_fcn{i + 1}": _conv(hsd, f"{i}.0") for i in range(2)}
  w = psd["conv5_mask.weight"].numpy()  # [in, out, kh, kw]
  pred_p = dict(conv5_mask=dict(kernel=w.transpose(2, 3, 0, 1)[::-1, ::-1],
                                bias=psd["conv5_mask.bias"].numpy()),
                mask_fcn_logits=_conv(psd, "mask_fcn_logits"))

  @jax.jit
  def run(hp, pp, x):
    return predictor(k).apply(
        {"params": pp}, roi_lib.MaskRCNNHead((c, c), conv=conv).apply({"params": hp}, x))

  got = run(head_p, pred_p, _nhwc(x))
  assert got.shape == (3, 28, 28, k) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("predictor", [roi_lib.MaskRCNNPredictor, MatmulMaskPredictor],
                         ids=["plain", "matmul"])
def test_mask_predictor_per_class_and_flax_layout(seed, predictor):
  """The predictor equals Flax ConvTranspose + Conv on the same parameter tree, and its
  per-class path equals the full logits indexed by class."""
  c, k, n = 6, 5, 7
  x = jax.random.normal(jax.random.PRNGKey(seed), (n, 14, 14, c))
  classes = jnp.asarray(np.random.default_rng(seed).integers(0, k, n), jnp.int32)
  pred = predictor(k)
  params = pred.init(jax.random.PRNGKey(seed + 10), x)["params"]
  assert params["conv5_mask"]["kernel"].shape == (2, 2, c, c)
  assert params["mask_fcn_logits"]["kernel"].shape == (1, 1, c, k)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 20), p.shape), params)
  deconv = nn.ConvTranspose(c, (2, 2), strides=(2, 2), padding="VALID")
  conv = nn.Conv(k, (1, 1))
  want = conv.apply({"params": params["mask_fcn_logits"]},
                    nn.relu(deconv.apply({"params": params["conv5_mask"]}, x)))
  full = jax.jit(lambda p, x: pred.apply({"params": p}, x))(params, x)
  np.testing.assert_allclose(np.asarray(full), np.asarray(want), rtol=1e-4, atol=1e-4)
  per = jax.jit(lambda p, x, cl: pred.apply({"params": p}, x, cl))(params, x, classes)
  assert per.shape == (n, 28, 28) and per.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(per),
                             np.take_along_axis(np.asarray(want), np.asarray(classes)[:, None, None,
                                                                                     None],
                                                axis=-1)[..., 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_rois_follow_torchvision_assignment(seed):
  rng = np.random.default_rng(seed)
  num_gt, num_props, pad_props, pad_gt = 3, 80, 20, 2
  gt = _boxes(rng, num_gt, wmin=10)
  gt_classes = rng.integers(1, 5, num_gt).astype(np.int32)
  # Proposals: jittered copies of the GT (foreground) plus random boxes (mostly background).
  jitter = (gt[rng.integers(0, num_gt, 30)] + rng.normal(0, 2, (30, 4))).astype(np.float32)
  props = np.concatenate([jitter, _boxes(rng, num_props - 30)])
  heads = _tv_roi_heads(batch=64)
  with_gt = heads.add_gt_proposals([torch.tensor(props)], [torch.tensor(gt)])
  matched, labels = heads.assign_targets_to_proposals(
      with_gt, [torch.tensor(gt)], [torch.tensor(gt_classes, dtype=torch.int64)])
  matched, labels = matched[0].numpy(), labels[0].numpy()  # over props + gt

  # Ours sees padded proposals and padded GT; neither may ever be sampled or matched.
  props_padded = np.concatenate([props, np.zeros((pad_props, 4), np.float32)])
  props_valid = np.array([True] * num_props + [False] * pad_props)
  gt_padded = np.concatenate([gt, np.zeros((pad_gt, 4), np.float32)])
  cls_padded = np.concatenate([gt_classes, np.zeros((pad_gt,), np.int32)])
  gt_valid = np.array([True] * num_gt + [False] * pad_gt)
  fn = functools.partial(roi_lib.sample_rois, fg_iou_threshold=0.5, bg_iou_threshold=0.5,
                         batch_size_per_image=64, positive_fraction=0.25)
  s = jax.jit(fn)(props_padded, props_valid, gt_padded, cls_padded, gt_valid,
                  jax.random.key(seed))
  rois, valid, cls, gt_idx, target = (np.asarray(s[k]) for k in
                                      ("rois", "valid", "labels", "matched", "target"))
  assert rois.shape == (64, 4) and cls.dtype == np.int32
  num_fg, num_bg = int((labels > 0).sum()), int((labels == 0).sum())
  fg = valid & (cls > 0)
  assert fg.sum() == min(num_fg, 16)
  assert (valid & (cls == 0)).sum() == min(num_bg, 64 - fg.sum())
  assert np.all(fg[:fg.sum()])  # positives first: the mask branch takes a prefix
  # Map each sampled RoI back to torchvision's candidate list (props then GT, no padding).
  cands = np.concatenate([props, gt])
  for j in np.nonzero(valid)[0]:
    i = int(np.nonzero(np.all(cands == rois[j], axis=1))[0][0])
    assert cls[j] == labels[i]
    if cls[j] > 0:
      assert gt_idx[j] == matched[i]
  want_target = heads.box_coder.encode_single(torch.tensor(gt[gt_idx[fg]]),
                                              torch.tensor(rois[fg])).numpy()
  np.testing.assert_allclose(target[fg], want_target, rtol=1e-5, atol=1e-4)
  assert np.all(target[~fg] == 0) and np.all(rois[~valid] == 0)
  # Every real GT box is among the candidates and matches itself, so >= 3 foreground.
  assert fg.sum() >= num_gt


@pytest.mark.parametrize("seed,k,detections", [(0, 4, 20), (1, 3, 100), (2, 6, 7)])
def test_detect_matches_torchvision_postprocess(seed, k, detections):
  rng = np.random.default_rng(seed)
  r, pad = 60, 12
  props = _boxes(rng, r)
  logits = (rng.normal(size=(r, k + 1)) * 2).astype(np.float32)
  deltas = (rng.normal(size=(r, (k + 1) * 4)) * 0.5).astype(np.float32)
  size = (70, 90)
  heads = _tv_roi_heads(detections=detections)
  want_boxes, want_scores, want_labels = heads.postprocess_detections(
      torch.tensor(logits), torch.tensor(deltas), [torch.tensor(props)], [size])
  want_boxes, want_scores, want_labels = (t[0].numpy() for t in
                                          (want_boxes, want_scores, want_labels))

  # Padded proposals with high scores must never be detected.
  props_p = np.concatenate([props, _boxes(rng, pad)])
  logits_p = np.concatenate([logits, np.full((pad, k + 1), 5.0, np.float32)])
  deltas_p = np.concatenate([deltas, np.zeros((pad, (k + 1) * 4), np.float32)])
  valid_p = np.array([True] * r + [False] * pad)
  fn = functools.partial(roi_lib.detect, weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.05,
                         nms_threshold=0.5, min_size=1e-2, detections=detections)
  out = jax.jit(fn)(logits_p, deltas_p.reshape(r + pad, k + 1, 4), props_p, valid_p,
                    jnp.array(size))
  n = want_boxes.shape[0]
  assert out["boxes"].shape == (detections, 4) and out["classes"].dtype == jnp.int32
  valid = np.asarray(out["valid"])
  assert valid.sum() == n and valid[:n].all()
  np.testing.assert_allclose(np.asarray(out["boxes"])[:n], want_boxes, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["scores"])[:n], want_scores, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["classes"])[:n], want_labels)
  assert np.all(np.asarray(out["classes"])[n:] == 0) and np.all(np.asarray(out["scores"])[n:] == 0)


def test_detect_with_pre_nms_cap_keeps_the_top_detections():
  rng = np.random.default_rng(5)
  r, k = 40, 3
  props = _boxes(rng, r)
  logits = (rng.normal(size=(r, k + 1)) * 2).astype(np.float32)
  deltas = (rng.normal(size=(r, k + 1, 4)) * 0.5).astype(np.float32)
  common = dict(weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.05, nms_threshold=0.5,
                min_size=1e-2, detections=10)
  args = (logits, deltas, props, np.ones((r,), bool), jnp.array((80, 80)))
  full = roi_lib.detect(*args, **common)
  capped = roi_lib.detect(*args, pre_nms_top_k=r * k // 2, **common)
  # NMS is greedy by score: the best detections only depend on higher-scored candidates.
  np.testing.assert_allclose(np.asarray(capped["scores"])[:3], np.asarray(full["scores"])[:3])


def _detect_inputs(rng, r, k, crowded):
  """One image's head outputs; ``crowded``: half the proposals are one box, confidently of
  class 1, so NMS over the best few candidates keeps a single detection."""
  props = _boxes(rng, r)
  logits = (rng.normal(size=(r, k + 1)) * 2).astype(np.float32)
  if crowded:
    props[: r // 2] = (10.0, 10.0, 50.0, 50.0)
    logits[: r // 2] = -4.0
    logits[: r // 2, 1] = 8.0 + rng.uniform(0, 1, r // 2)
  deltas = (rng.normal(size=(r, k + 1, 4)) * 0.2).astype(np.float32)
  return logits, deltas, props, np.ones((r,), bool), np.array((80, 80), np.int32)


@pytest.mark.parametrize("crowded", [(False, False), (False, True), (True, True)])
def test_detect_batch_equals_detect_per_image(crowded):
  """The prefix-first NMS of detect_batch gives exactly detect's results, both when the best
  ``prefix`` candidates suffice (no crowding) and when some image needs the full sort."""
  rng = np.random.default_rng(11)
  r, k, detections, prefix = 24, 3, 5, 8
  images = [_detect_inputs(rng, r, k, c) for c in crowded]
  args = [jnp.asarray(np.stack(a)) for a in zip(*images)]
  common = dict(weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.05, nms_threshold=0.5,
                min_size=1e-2, detections=detections)
  want = jax.vmap(functools.partial(roi_lib.detect, **common))(*args)
  got = jax.jit(functools.partial(roi_lib.detect_batch, prefix=prefix, **common))(*args)
  only_prefix = jax.vmap(functools.partial(roi_lib.detect, pre_nms_top_k=prefix, **common))(
      *args)
  for image, c in enumerate(crowded):
    # The premise of each case: the prefix alone is enough exactly when not crowded.
    kept = int(np.asarray(only_prefix["valid"][image]).sum())
    assert (kept == detections) == (not c), (image, kept)
    if c:
      assert not np.array_equal(only_prefix["boxes"][image], want["boxes"][image])
  # The same detections in the same slots. Their values agree to float32 rounding only: the
  # two are different programs (one jitted, one op by op), and a GPU's compiler may fuse the
  # box decode differently in each (seen on an H200: one coordinate 1 ulp apart).
  for key in ("classes", "valid"):
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
  for key in ("boxes", "scores"):
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6, atol=0,
                               err_msg=key)
  assert np.asarray(want["valid"]).sum(-1).min() == detections


def test_detect_batch_with_a_cap_is_detect_with_the_cap():
  rng = np.random.default_rng(12)
  images = [_detect_inputs(rng, 24, 3, c) for c in (False, True)]
  args = [jnp.asarray(np.stack(a)) for a in zip(*images)]
  common = dict(weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.05, nms_threshold=0.5,
                min_size=1e-2, detections=5, pre_nms_top_k=8)
  want = jax.vmap(functools.partial(roi_lib.detect, **common))(*args)
  got = roi_lib.detect_batch(*args, **common)
  for key in ("boxes", "scores", "classes", "valid"):
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


@pytest.mark.parametrize("seed", [0, 1])
def test_conv3x3_gradients_match_lax_conv(seed):
  """The custom-gradient mask-head conv equals lax's conv in value and in both gradients."""
  kx, kk, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (3, 9, 7, 5))
  kernel = jax.random.normal(kk, (3, 3, 5, 4))
  ct = jax.random.normal(kc, (3, 9, 7, 4))
  plain = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda f: jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(f(x, k) * ct), (0, 1)))
  mask_conv = lambda x, k: conv_lib.conv2d(x, k, 1, 1)  # the CPU kernels' mask-head conv
  (v0, (gx0, gk0)), (v1, (gx1, gk1)) = loss(plain)(x, kernel), loss(mask_conv)(x, kernel)
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gk1), np.asarray(gk0), rtol=1e-4, atol=1e-4)
