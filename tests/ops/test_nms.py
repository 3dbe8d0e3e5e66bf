"""Tests for mrcnn_jax.ops.nms against torchvision.ops.nms / batched_nms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from mrcnn_jax.ops.nms import batched_nms, nms


def _random_boxes(rng, n, extent=200.0, max_side=60.0):
  """Random xyxy boxes, dense enough that many overlap."""
  xy = rng.uniform(-10.0, extent, (n, 2))
  wh = rng.uniform(0.5, max_side, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _clustered_boxes(rng, n):
  """Jittered copies of a few boxes: long suppression chains, IoUs near any threshold."""
  centres = _random_boxes(rng, max(1, n // 20))
  boxes = centres[rng.integers(0, len(centres), n)]
  return (boxes + rng.normal(0.0, 2.0, (n, 4))).astype(np.float32)


def _distinct_scores(rng, n):
  return (rng.permutation(n).astype(np.float32) + 1.0) / n


def _valid(out):
  out = np.asarray(out)
  return out[out >= 0]


def _tv_nms(boxes, scores, thr):
  return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()


def _tv_batched(boxes, scores, classes, thr):
  return torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                     torch.from_numpy(classes), thr).numpy()


def _pad(n, *arrays):
  """Pads to a few fixed sizes with -inf scores (padding), so tests share compilations."""
  size = 64 if n <= 64 else 2048
  boxes, scores, *rest = arrays
  boxes = np.pad(boxes, ((0, size - n), (0, 0)), constant_values=3.0)  # would suppress if kept
  scores = np.pad(scores, (0, size - n), constant_values=-np.inf)
  return (boxes, scores, *(np.pad(r, (0, size - n)) for r in rest))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 13, 300, 1500])
@pytest.mark.parametrize("make", [_random_boxes, _clustered_boxes])
def test_nms_matches_torchvision(seed, n, make):
  rng = np.random.default_rng(seed)
  boxes, scores = make(rng, n), _distinct_scores(rng, n)
  boxes_p, scores_p = _pad(n, boxes, scores)
  for thr in (0.3, 0.7):
    # A small block size exercises many tiles and the cross-block suppression.
    out = nms(boxes_p, scores_p, thr, len(scores_p), block_size=64)
    ref = _tv_nms(boxes, scores, thr)
    np.testing.assert_array_equal(_valid(out), ref)
    np.testing.assert_array_equal(np.asarray(out)[len(ref):], -1)


def test_unpadded_odd_size_and_output_longer_than_input():
  rng = np.random.default_rng(11)
  n = 13
  boxes, scores = _clustered_boxes(rng, n), _distinct_scores(rng, n)
  out = nms(boxes, scores, 0.5, n + 3)
  assert out.shape == (n + 3,) and out.dtype == jnp.int32
  ref = _tv_nms(boxes, scores, 0.5)
  np.testing.assert_array_equal(_valid(out), ref)
  np.testing.assert_array_equal(np.asarray(out)[len(ref):], -1)


def test_nms_default_block_several_thousand():
  rng = np.random.default_rng(7)
  n = 3000
  boxes, scores = _clustered_boxes(rng, n), _distinct_scores(rng, n)
  ref = _tv_nms(boxes, scores, 0.5)
  assert 0 < len(ref) < n  # the case suppresses something and keeps something
  np.testing.assert_array_equal(_valid(nms(boxes, scores, 0.5, n)), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 40, 1000])
def test_batched_nms_matches_torchvision(seed, n):
  rng = np.random.default_rng(seed)
  boxes, scores = _clustered_boxes(rng, n), _distinct_scores(rng, n)
  classes = rng.integers(0, 4, n).astype(np.int64)
  boxes_p, scores_p, classes_p = _pad(n, boxes, scores, classes)
  out = batched_nms(boxes_p, scores_p, classes_p, 0.5, len(scores_p), block_size=64)
  ref = _tv_batched(boxes, scores, classes, 0.5)
  np.testing.assert_array_equal(_valid(out), ref)
  # Class awareness matters here: plain NMS keeps fewer boxes.
  assert len(_tv_nms(boxes, scores, 0.5)) < len(ref) or n == 1


def test_identical_boxes_of_two_classes_both_kept():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
  scores = np.array([0.9, 0.8, 0.7], np.float32)
  classes = np.array([1, 2, 1], np.int32)
  boxes, scores, classes = _pad(3, boxes, scores, classes)
  np.testing.assert_array_equal(_valid(batched_nms(boxes, scores, classes, 0.5, 64,
                                                   block_size=64)), [0, 1])
  np.testing.assert_array_equal(_valid(nms(boxes, scores, 0.5, 64, block_size=64)), [0])


@pytest.mark.parametrize("block_size", [64, 1])  # within a block; across blocks
@pytest.mark.parametrize("ids", [[2**24, 2**24 + 1], [-(2**24) - 1, -(2**24)],
                                 [2**31 - 1, 2**31 - 2]])
def test_large_group_ids_are_exact(ids, block_size):
  # Ids that round to the same float32 are still different groups (torchvision's offset trick
  # merges them); equal ids still suppress.
  boxes, scores = np.array([[0, 0, 10, 10]] * 3, np.float32), np.array([0.9, 0.8, 0.7], np.float32)
  classes = np.array(ids + ids[:1], np.int32)
  boxes, scores, classes = _pad(3, boxes, scores, classes)
  np.testing.assert_array_equal(_valid(batched_nms(boxes, scores, classes, 0.5, 64,
                                                   block_size=block_size)), [0, 1])


def test_hand_computed_threshold_is_strict():
  # IoU([0,0,2,2], [0,0,2,1]) = 2 / (4 + 2 - 2) = 0.5 exactly in float32; the third box is far.
  boxes = np.array([[0, 0, 2, 2], [0, 0, 2, 1], [10, 10, 11, 11]], np.float32)
  scores = np.array([0.9, 0.8, 0.1], np.float32)
  # IoU exactly 0.5 is not > 0.5: kept.
  boxes, scores = _pad(3, boxes, scores)
  np.testing.assert_array_equal(_valid(nms(boxes, scores, 0.5, 64, block_size=64)), [0, 1, 2])
  np.testing.assert_array_equal(_valid(nms(boxes, scores, 0.49, 64, block_size=64)), [0, 2])


def test_neg_inf_scores_never_kept_and_sorted_output():
  rng = np.random.default_rng(3)
  n = 200
  boxes, scores = _random_boxes(rng, n), _distinct_scores(rng, n)
  pad = rng.random(n) < 0.4
  scores_padded = np.where(pad, -np.inf, scores).astype(np.float32)
  boxes_p, scores_p = _pad(n, boxes, scores_padded)
  out = _valid(nms(boxes_p, scores_p, 0.6, len(scores_p), block_size=64))
  assert not np.any(pad[out])
  assert np.all(np.diff(scores_padded[out]) < 0)  # highest score first
  ref_idx = np.flatnonzero(~pad)
  ref = ref_idx[_tv_nms(boxes[~pad], scores[~pad], 0.6)]
  np.testing.assert_array_equal(out, ref)
  # All padding: nothing kept.
  np.testing.assert_array_equal(
      nms(boxes[:64], np.full(64, -np.inf, np.float32), 0.6, 64, block_size=64), -1)


def test_max_output_size_truncates_to_top():
  rng = np.random.default_rng(4)
  n = 500
  boxes, scores = _random_boxes(rng, n), _distinct_scores(rng, n)
  ref = _tv_nms(boxes, scores, 0.7)
  assert len(ref) > 50
  # Blocks of 32 and 50 outputs: the loop stops inside a block, which keeps more than needed.
  np.testing.assert_array_equal(nms(boxes, scores, 0.7, 50, block_size=32), ref[:50])


def test_jit_vmap_and_traced_threshold():
  rng = np.random.default_rng(5)
  b, n = 3, 120
  boxes = np.stack([_clustered_boxes(rng, n) for _ in range(b)])
  scores = np.stack([_distinct_scores(rng, n) for _ in range(b)])
  scores[1, 60:] = -np.inf  # per-example padding
  thr = np.array([0.3, 0.5, 0.7], np.float32)
  f = jax.jit(jax.vmap(lambda bx, sc, t: nms(bx, sc, t, n, block_size=32)))
  out = np.asarray(f(boxes, scores, thr))
  classes = rng.integers(0, 3, (b, n)).astype(np.int32)
  g = jax.jit(jax.vmap(lambda bx, sc, c: batched_nms(bx, sc, c, 0.5, n, block_size=32)))
  out_b = np.asarray(g(boxes, scores, classes))
  for i in range(b):
    valid = np.isfinite(scores[i])
    idx = np.flatnonzero(valid)
    ref = idx[_tv_nms(boxes[i][valid], scores[i][valid], float(thr[i]))]
    np.testing.assert_array_equal(_valid(out[i]), ref)
    ref_b = idx[_tv_batched(boxes[i][valid], scores[i][valid], classes[i][valid].astype(np.int64),
                            0.5)]
    np.testing.assert_array_equal(_valid(out_b[i]), ref_b)


def test_degenerate_boxes():
  # Zero-area boxes have union 0 with each other (IoU NaN in torchvision): never suppress.
  boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 4, 4], [0, 0, 4, 4]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
  ref = _tv_nms(boxes, scores, 0.5)
  np.testing.assert_array_equal(_valid(nms(*_pad(4, boxes, scores), 0.5, 64, block_size=64)), ref)
  np.testing.assert_array_equal(nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                                    0.5, 3), -1)


def test_rank_errors():
  boxes = np.zeros((5, 4), np.float32)
  scores = np.zeros((5,), np.float32)
  with pytest.raises(ValueError):
    nms(boxes[None], scores, 0.5, 3)
  with pytest.raises(ValueError):
    nms(boxes[:, :3], scores, 0.5, 3)
  with pytest.raises(ValueError):
    nms(boxes, scores[None], 0.5, 3)
  with pytest.raises(ValueError):
    nms(boxes, scores[:4], 0.5, 3)
  with pytest.raises(ValueError):
    batched_nms(boxes, scores, np.zeros((5, 1), np.int32), 0.5, 3)
