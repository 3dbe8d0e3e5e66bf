"""Losses against torchvision's loss functions on the valid subset (padding slots must not count)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import roi_heads as tv_roi

from mrcnn_jax.modeling import losses


@pytest.mark.parametrize("beta", [1.0 / 9, 1.0, 0.0])
def test_smooth_l1_matches_torch(beta):
  x = np.random.default_rng(0).normal(size=(1000,)).astype(np.float32)
  want = F.smooth_l1_loss(torch.tensor(x), torch.zeros(1000), beta=beta, reduction="none")
  np.testing.assert_allclose(np.asarray(jax.jit(losses.smooth_l1, static_argnums=1)(x, beta)),
                             want.numpy(), rtol=1e-6, atol=1e-7)


def _valid(rng, b, n, frac=0.8):
  return rng.uniform(size=(b, n)) < frac


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_rcnn_losses_match_torchvision(seed):
  rng = np.random.default_rng(seed)
  b, r, k = 2, 24, 5
  logits = rng.normal(size=(b, r, k)).astype(np.float32) * 2
  deltas = rng.normal(size=(b, r, k, 4)).astype(np.float32)
  labels = rng.integers(0, k, (b, r)).astype(np.int32)
  targets = rng.normal(size=(b, r, 4)).astype(np.float32)
  valid = _valid(rng, b, r)
  labels = np.where(valid, labels, 0)  # as sample_rois leaves padding slots
  want_cls, want_box = tv_roi.fastrcnn_loss(
      torch.tensor(logits[valid]), torch.tensor(deltas[valid].reshape(-1, 4 * k)),
      [torch.tensor(labels[valid], dtype=torch.int64)], [torch.tensor(targets[valid])])
  cls, box = jax.jit(losses.fast_rcnn_losses)(logits, deltas, labels, targets, valid)
  assert cls.dtype == jnp.float32 and cls.shape == ()
  np.testing.assert_allclose(float(cls), want_cls.item(), rtol=1e-5)
  np.testing.assert_allclose(float(box), want_box.item(), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_rpn_losses_match_torchvision_normalisation(seed):
  """torchvision: BCE mean over sampled anchors; smooth-L1 (beta 1/9) summed over positives
  and divided by the number of sampled anchors, all images together."""
  rng = np.random.default_rng(seed)
  b, s = 2, 32
  obj = rng.normal(size=(b, s)).astype(np.float32)
  deltas = rng.normal(size=(b, s, 4)).astype(np.float32)
  targets = rng.normal(size=(b, s, 4)).astype(np.float32)
  valid = _valid(rng, b, s)
  positive = valid & (rng.uniform(size=(b, s)) < 0.3)
  labels = positive.astype(np.float32)
  want_obj = F.binary_cross_entropy_with_logits(torch.tensor(obj[valid]),
                                                torch.tensor(labels[valid]))
  want_box = F.smooth_l1_loss(torch.tensor(deltas[positive]), torch.tensor(targets[positive]),
                              beta=1 / 9, reduction="sum") / valid.sum()
  got_obj, got_box = jax.jit(losses.rpn_losses)(obj, deltas, labels, targets, positive, valid)
  np.testing.assert_allclose(float(got_obj), want_obj.item(), rtol=1e-5)
  np.testing.assert_allclose(float(got_box), want_box.item(), rtol=1e-5)


def test_mask_loss_matches_torch_mean_over_foreground_pixels():
  rng = np.random.default_rng(0)
  b, m, s = 2, 6, 28
  logits = rng.normal(size=(b, m, s, s)).astype(np.float32) * 3
  targets = rng.uniform(size=(b, m, s, s)).astype(np.float32)
  valid = np.array([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
  want = F.binary_cross_entropy_with_logits(torch.tensor(logits[valid]),
                                            torch.tensor(targets[valid]))
  got = jax.jit(losses.mask_loss)(logits, targets, valid)
  np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)


def test_losses_without_foreground_are_zero_with_zero_gradient():
  """No positive at all (torchvision returns ``mask_logits.sum() * 0``): finite zeros."""
  logits = jnp.full((1, 4, 28, 28), 3.0)
  targets = jnp.full((1, 4, 28, 28), jnp.nan)  # never read where invalid
  valid = jnp.zeros((1, 4), bool)
  value, grad = jax.value_and_grad(losses.mask_loss)(logits, targets, valid)
  assert float(value) == 0.0 and not np.any(np.asarray(grad))
  deltas = jnp.ones((1, 4, 3, 4))
  box_targets = jnp.full((1, 4, 4), jnp.nan)  # e.g. encoded against a padded zero box
  labels = jnp.zeros((1, 4), jnp.int32)
  fn = lambda d: losses.fast_rcnn_losses(jnp.zeros((1, 4, 3)), d, labels, box_targets,
                                         jnp.ones((1, 4), bool))
  cls, box = fn(deltas)
  assert float(box) == 0.0 and np.isfinite(float(cls)) and float(cls) > 0
  assert np.all(np.asarray(jax.grad(lambda d: fn(d)[1])(deltas)) == 0)
  rpn = lambda d: losses.rpn_losses(jnp.zeros((1, 4)), d, jnp.zeros((1, 4)), box_targets,
                                    jnp.zeros((1, 4), bool), jnp.ones((1, 4), bool))
  obj, box = rpn(deltas[:, :, 0])
  assert float(box) == 0.0 and np.isclose(float(obj), np.log(2.0))
  assert np.all(np.asarray(jax.grad(lambda d: rpn(d)[1])(deltas[:, :, 0])) == 0)
