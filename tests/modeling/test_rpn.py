"""RPN head, proposal generation and anchor targets, against torchvision's RegionProposalNetwork."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import rpn as tv_rpn

from mrcnn_jax.modeling import rpn as rpn_lib
from mrcnn_jax.ops.anchors import generate_anchors

IMAGE = (64, 96)
SIZES = ((8,), (16,), (32,), (64,), (128,))


def _tv_rpn(pre, post, nms=0.7, batch=64, fraction=0.5):
  return tv_rpn.RegionProposalNetwork(
      tv_rpn.AnchorGenerator(SIZES, ((0.5, 1.0, 2.0),) * 5), tv_rpn.RPNHead(1, 3),
      fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=batch,
      positive_fraction=fraction, pre_nms_top_n=dict(training=pre, testing=pre),
      post_nms_top_n=dict(training=post, testing=post), nms_thresh=nms, score_thresh=0.0).eval()


def _anchors():
  per_level = generate_anchors(IMAGE, sizes=SIZES)
  return rpn_lib.concat_anchors(per_level), rpn_lib.level_sizes(per_level)


def _gt(rng, g, scale=1.0):
  xy = rng.uniform(0, 60, (g, 2))
  wh = rng.uniform(6, 40, (g, 2)) * scale
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


@pytest.mark.parametrize("seed,pre,post", [(0, 50, 40), (1, 1000, 300), (2, 7, 20)])
def test_proposals_match_torchvision_filter_proposals(seed, pre, post):
  rng = np.random.default_rng(seed)
  anchors, level_sizes = _anchors()
  n = anchors.shape[0]
  objectness = rng.normal(size=(2, n)).astype(np.float32)
  deltas = (rng.normal(size=(2, n, 4)) * 0.5).astype(np.float32)
  # Image 0's true content is smaller than the padded input: clipping then makes the boxes of
  # far-out anchors degenerate, and the small-box filter must drop them.
  valid_size = np.array([[40, 70], [64, 96]], np.int32)

  tv = _tv_rpn(pre, post)
  props = torch.stack([tv.box_coder.decode_single(torch.tensor(d), torch.tensor(anchors))
                       for d in deltas])
  want_boxes, want_scores = tv.filter_proposals(
      props, torch.tensor(objectness), [tuple(v) for v in valid_size.tolist()],
      list(level_sizes))

  fn = functools.partial(rpn_lib.generate_proposals, level_sizes=level_sizes,
                         pre_nms_top_k=pre, post_nms_top_k=post, nms_threshold=0.7,
                         min_size=1e-3)
  boxes, scores, valid = jax.jit(jax.vmap(fn, in_axes=(0, 0, None, 0)))(
      objectness, deltas, anchors, valid_size)
  assert boxes.shape == (2, post, 4) and scores.shape == (2, post) and valid.shape == (2, post)
  for i in range(2):
    k = want_boxes[i].shape[0]
    assert int(valid[i].sum()) == k
    assert bool(valid[i, :k].all())  # valid rows first, best first
    np.testing.assert_allclose(np.asarray(boxes[i, :k]), want_boxes[i].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(scores[i, :k]), want_scores[i].numpy(), atol=1e-6)
    assert np.all(np.asarray(boxes[i, k:]) == 0)
    assert np.all(np.asarray(boxes[i, :k, 2]) <= valid_size[i, 1])
    assert np.all(np.asarray(boxes[i, :k, 3]) <= valid_size[i, 0])


def test_proposals_have_no_gradient():
  anchors, level_sizes = _anchors()
  n = anchors.shape[0]
  fn = functools.partial(rpn_lib.generate_proposals, anchors=anchors,
                         valid_size=jnp.array(IMAGE), level_sizes=level_sizes,
                         pre_nms_top_k=20, post_nms_top_k=10, nms_threshold=0.7, min_size=1e-3)
  rng = np.random.default_rng(0)
  obj = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
  d = jnp.asarray(rng.normal(size=(n, 4)) * 0.1, jnp.float32)
  g_obj, g_d = jax.grad(lambda o, d: jnp.sum(fn(o, d)[0]) + jnp.sum(fn(o, d)[1]),
                        argnums=(0, 1))(obj, d)
  assert not np.any(np.asarray(g_obj)) and not np.any(np.asarray(g_d))


@pytest.mark.parametrize("seed,num_gt", [(0, 3), (1, 1), (2, 6)])
def test_anchor_targets_follow_torchvision_assignment(seed, num_gt):
  rng = np.random.default_rng(seed)
  anchors, _ = _anchors()
  gt = _gt(rng, num_gt)
  pad = 2  # padded GT rows must behave as if absent
  gt_padded = np.concatenate([gt, np.zeros((pad, 4), np.float32)])
  gt_valid = np.array([True] * num_gt + [False] * pad)

  tv = _tv_rpn(100, 100, batch=64, fraction=0.5)
  labels, matched = tv.assign_targets_to_anchors([torch.tensor(anchors)],
                                                 [dict(boxes=torch.tensor(gt))])
  labels, matched = labels[0].numpy(), matched[0]
  want_targets = tv.box_coder.encode_single(matched, torch.tensor(anchors)).numpy()

  fn = functools.partial(rpn_lib.rpn_targets, fg_iou_threshold=0.7, bg_iou_threshold=0.3,
                         batch_size_per_image=64, positive_fraction=0.5)
  t = jax.jit(fn)(anchors, gt_padded, gt_valid, jax.random.key(seed))
  index, valid, positive = (np.asarray(t[k]) for k in ("index", "valid", "positive"))
  num_pos, num_neg = int((labels == 1).sum()), int((labels == 0).sum())
  want_pos = min(num_pos, 32)
  assert positive.sum() == want_pos
  assert (valid & ~positive).sum() == min(num_neg, 64 - want_pos)
  assert len(set(index[valid].tolist())) == valid.sum()  # no anchor twice
  np.testing.assert_array_equal(labels[index[valid]], positive[valid].astype(np.float32))
  np.testing.assert_array_equal(np.asarray(t["label"]), positive.astype(np.float32))
  np.testing.assert_allclose(np.asarray(t["target"])[positive], want_targets[index[positive]],
                             rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(t["target"])[~positive] == 0)


def test_anchor_targets_without_ground_truth_are_all_background():
  anchors, _ = _anchors()
  fn = functools.partial(rpn_lib.rpn_targets, fg_iou_threshold=0.7, bg_iou_threshold=0.3,
                         batch_size_per_image=64, positive_fraction=0.5)
  t = jax.jit(fn)(anchors, np.zeros((3, 4), np.float32), np.zeros((3,), bool),
                  jax.random.key(0))
  assert np.asarray(t["valid"]).all() and not np.asarray(t["positive"]).any()
  assert np.isfinite(np.asarray(t["target"])).all()


def test_rpn_head_layout_matches_torchvision():
  """Objectness/deltas flattened in torchvision's anchor order (level, position, anchor)."""
  gen = torch.Generator().manual_seed(0)
  tv = tv_rpn.RPNHead(6, 3)
  for p in tv.parameters():
    torch.nn.init.normal_(p, std=0.3, generator=gen)
  feats = [torch.randn(2, 6, h, w, generator=gen) for h, w in ((8, 12), (4, 6), (2, 3))]
  with torch.no_grad():
    logits, bbox = tv(feats)
    want_obj, want_deltas = tv_rpn.concat_box_prediction_layers(logits, bbox)
  sd = tv.state_dict()
  conv = lambda name: dict(kernel=sd[f"{name}.weight"].numpy().transpose(2, 3, 1, 0),
                           bias=sd[f"{name}.bias"].numpy())
  params = dict(conv=conv("conv.0.0"), cls_logits=conv("cls_logits"),
                bbox_pred=conv("bbox_pred"))
  obj, deltas = jax.jit(lambda p, f: rpn_lib.RPNHead(3).apply({"params": p}, f))(
      params, [jnp.asarray(f.numpy().transpose(0, 2, 3, 1)) for f in feats])
  assert obj.dtype == jnp.float32 and obj.shape == (2, 3 * (96 + 24 + 6))
  np.testing.assert_allclose(np.asarray(obj).reshape(-1), want_obj.numpy().reshape(-1),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(deltas).reshape(-1, 4), want_deltas.numpy(),
                             rtol=1e-4, atol=1e-4)
