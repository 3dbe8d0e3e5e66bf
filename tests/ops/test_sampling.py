"""Tests for mrcnn_jax.ops.sampling: counts against torchvision's sampler, and randomness."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.stats
import torch
from torchvision.models.detection import _utils as det_utils

from mrcnn_jax.ops.sampling import sample_balanced

jit_sample = jax.jit(sample_balanced, static_argnums=(1, 2))


def random_labels(rng, n, p_pos, p_neg):
  """[n] int32 labels: 1 with prob p_pos, 0 with p_neg, else -1."""
  u = rng.uniform(size=n)
  return np.where(u < p_pos, 1, np.where(u < p_pos + p_neg, 0, -1)).astype(np.int32)


def torchvision_counts(labels, num_samples, fraction):
  torch.manual_seed(0)
  sampler = det_utils.BalancedPositiveNegativeSampler(num_samples, fraction)
  (pos,), (neg,) = sampler([torch.from_numpy(labels.astype(np.int64))])
  return int(pos.sum()), int(neg.sum())


def check_selection(labels, idx, valid, num_samples):
  """Structure every result must have; returns (num_pos, num_neg)."""
  idx = np.asarray(idx)
  valid = np.asarray(valid)
  assert idx.shape == valid.shape == (num_samples,)
  assert idx.dtype == np.int32 and valid.dtype == bool
  n_valid = int(valid.sum())
  assert np.all(valid[:n_valid]) and not np.any(valid[n_valid:])  # valid slots first
  chosen = idx[:n_valid]
  assert len(np.unique(chosen)) == n_valid  # no duplicates
  assert np.all((chosen >= 0) & (chosen < len(labels)))
  picked = labels[chosen]
  num_pos = int(np.sum(picked >= 1))
  assert np.all(picked[:num_pos] >= 1)  # positives first ...
  assert np.all(picked[num_pos:] == 0)  # ... then negatives, never an ignored one
  assert np.all(idx[n_valid:] == 0)  # padding holds a safe gather index
  return num_pos, n_valid - num_pos


@pytest.mark.parametrize(
    "seed,n,num_samples,fraction,p_pos,p_neg",
    [
        (0, 100, 16, 0.25, 0.3, 0.5),  # enough of both
        (1, 300, 64, 0.5, 0.05, 0.6),  # few positives: negatives fill the gap
        (2, 40, 32, 0.25, 0.5, 0.2),  # few negatives: padding at the end
        (3, 20, 64, 0.25, 0.4, 0.4),  # num_samples > N
        (4, 50, 10, 0.0, 0.4, 0.4),  # no positives wanted
        (5, 50, 10, 1.0, 0.4, 0.4),  # only positives wanted
        (6, 50, 10, 0.33, 0.0, 0.9),  # no positives at all
        (7, 50, 10, 0.25, 0.9, 0.0),  # no negatives at all
        (8, 30, 10, 0.25, 0.0, 0.0),  # everything ignored
        (9, 200, 7, 0.3, 0.4, 0.4),  # int() truncation of 2.1
    ],
)
def test_counts_match_torchvision(seed, n, num_samples, fraction, p_pos, p_neg):
  rng = np.random.default_rng(seed)
  labels = random_labels(rng, n, p_pos, p_neg)
  for k in range(3):
    idx, valid = jit_sample(labels, num_samples, fraction, jax.random.key(seed * 10 + k))
    got = check_selection(labels, idx, valid, num_samples)
    assert got == torchvision_counts(labels, num_samples, fraction)


def test_positive_labels_above_one_and_zero_sizes():
  labels = np.array([3, 0, -1, 2, 0, 1], np.int32)  # torchvision: >= 1 is positive
  idx, valid = jit_sample(labels, 4, 0.5, jax.random.key(0))
  assert check_selection(labels, idx, valid, 4) == torchvision_counts(labels, 4, 0.5) == (2, 2)
  idx, valid = sample_balanced(np.zeros((0,), np.int32), 5, 0.25, jax.random.key(0))
  assert np.asarray(idx).shape == (5,) and not np.any(np.asarray(valid))
  idx, valid = sample_balanced(labels, 0, 0.25, jax.random.key(0))
  assert np.asarray(idx).shape == (0,)


def test_deterministic_per_key_and_varies_across_keys():
  labels = random_labels(np.random.default_rng(0), 500, 0.2, 0.6)
  a = jit_sample(labels, 64, 0.25, jax.random.key(1))
  b = jit_sample(labels, 64, 0.25, jax.random.key(1))
  c = jit_sample(labels, 64, 0.25, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
  # Both positives and negatives are redrawn, not just one group.
  assert set(np.asarray(a[0])[:16]) != set(np.asarray(c[0])[:16])
  assert set(np.asarray(a[0])[16:]) != set(np.asarray(c[0])[16:])


def test_selection_is_uniform_over_many_keys():
  # 20 positives, 25 negatives, 5 ignored; draw 4 positives and 12 negatives per key.
  labels = np.array([1] * 20 + [0] * 25 + [-1] * 5, np.int32)
  labels = labels[np.random.default_rng(0).permutation(len(labels))]
  num_keys = 4000
  keys = jax.random.split(jax.random.key(123), num_keys)
  fn = jax.jit(jax.vmap(lambda k: sample_balanced(labels, 16, 0.25, k)))
  idx, valid = (np.asarray(x) for x in fn(keys))
  assert np.all(valid)
  counts = np.bincount(idx.reshape(-1), minlength=len(labels))
  assert np.all(counts[labels == -1] == 0)
  for group, per_draw in ((labels >= 1, 4), (labels == 0, 12)):
    observed = counts[group]
    expected = num_keys * per_draw / group.sum()
    np.testing.assert_allclose(observed.sum(), num_keys * per_draw)
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    # Fixed keys make this deterministic; a biased sampler (e.g. lowest indices first)
    # gives chi2 in the thousands.
    assert scipy.stats.chi2.sf(chi2, df=group.sum() - 1) > 1e-3, chi2
  # Which positive lands in the first slot is uniform too (order is random within a group).
  first = np.bincount(idx[:, 0], minlength=len(labels))[labels >= 1]
  expected = num_keys / 20
  chi2 = float(np.sum((first - expected) ** 2 / expected))
  assert scipy.stats.chi2.sf(chi2, df=19) > 1e-3, chi2


def test_vmap_over_images():
  rng = np.random.default_rng(3)
  labels = np.stack([random_labels(rng, 80, p, 0.5) for p in (0.05, 0.2, 0.4)])
  keys = jax.random.split(jax.random.key(0), 3)
  idx, valid = jax.jit(jax.vmap(lambda l, k: sample_balanced(l, 24, 0.25, k)))(labels, keys)
  for b in range(3):
    got = check_selection(labels[b], idx[b], valid[b], 24)
    assert got == torchvision_counts(labels[b], 24, 0.25)
    single = jit_sample(labels[b], 24, 0.25, keys[b])
    np.testing.assert_array_equal(np.asarray(idx[b]), np.asarray(single[0]))


@pytest.mark.parametrize(
    "call",
    [
        lambda: sample_balanced(np.zeros((2, 3), np.int32), 4, 0.25, jax.random.key(0)),
        lambda: sample_balanced(np.zeros((), np.int32), 4, 0.25, jax.random.key(0)),
        lambda: sample_balanced(np.zeros((5,), np.int32), 4, 1.5, jax.random.key(0)),
        lambda: sample_balanced(np.zeros((5,), np.int32), -1, 0.25, jax.random.key(0)),
    ],
)
def test_bad_arguments_raise(call):
  with pytest.raises(ValueError):
    call()
