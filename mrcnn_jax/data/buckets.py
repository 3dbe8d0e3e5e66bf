"""Aspect-ratio buckets for training: which static input shape each image goes to, and which
images form each global batch.

With ``config.data.buckets = ((832, 1344), (1344, 832))`` a landscape COCO image is padded to
832 x 1344 instead of a 1344 x 1344 square; every global batch holds images of one bucket, so
each batch still has one static shape and the train step compiles once per bucket.

Assignment (:func:`assign_bucket`): the bucket whose aspect ``h / w`` is closest to the image's
in log scale (the image's size from the JSON; scaling keeps the aspect), the first listed on a
tie (a square image between 832 x 1344 and 1344 x 832 goes to the first).

Schedule (:class:`BucketSchedule`): epoch ``e`` permutes the records by a hash of
``(seed, e)``; each bucket's records, in that order, are cut into global batches, and the
epoch's batches are put in an order drawn from another hash of ``(seed, e)``. Each bucket's
last ``n_b mod global_batch`` records of the epoch (different ones every epoch) are dropped,
so every epoch has the same number of steps and step ``s`` is epoch ``s // steps_per_epoch``:
a pure function of ``(seed, s)``, which resume and host slicing rely on. The hash is
numpy-version independent (splitmix64), so a resumed run reads the same batches.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from mrcnn_jax.data import batching
from mrcnn_jax.data import transforms

# The backbone's coarsest stride (C5): a bucket that is a multiple of it gives every feature
# map whole cells, so where a bucket pads does not move any feature or anchor over the image.
STRIDE = 32

Shape = Tuple[int, int]
_MASK64 = (1 << 64) - 1


def _scaled_extent(aspect: float, min_size: int, max_size: int) -> Tuple[float, float]:
  """(h, w) the min_size / max_size rule scales an image of ``aspect`` = h / w to (0..inf)."""
  if aspect <= 1.0:  # landscape or square: h is the short side
    return min(min_size, max_size * aspect), (min(min_size / aspect, max_size) if aspect
                                              else max_size)
  return min(min_size * aspect, max_size), min(min_size, max_size / aspect)


def check_buckets(buckets, min_size: int = 0, max_size: int = 0) -> Tuple[Shape, ...]:
  """``config.data.buckets`` as a tuple of (h, w) ints; ``ValueError`` (one line) when invalid.

  Each bucket is a pair of positive multiples of :data:`STRIDE`, no two alike. With
  ``min_size`` > 0 each bucket must hold, unscaled by jitter and never cropped, the largest
  image that :func:`assign_bucket` sends it: the image sizes are monotone in the aspect, so it
  is checked at the ends of the bucket's aspect interval (one bucket: the interval is all
  aspects, and this is ``transforms.check_resize``'s rule, max_size on both sides).
  """
  try:
    shapes = tuple((int(h), int(w)) for h, w in buckets)
  except (TypeError, ValueError):
    raise ValueError(f"config.data.buckets must be (height, width) pairs, got {buckets!r}"
                     ) from None
  for h, w in shapes:
    if h <= 0 or w <= 0 or h % STRIDE or w % STRIDE:
      raise ValueError(f"config.data.buckets: {h}x{w} must be positive multiples of {STRIDE} "
                       "(the backbone's coarsest stride)")
  # Same aspect twice: assign_bucket would send every image to the first of them.
  if len({h / w for h, w in shapes}) != len(shapes):
    raise ValueError(f"config.data.buckets: two buckets of the same aspect in {shapes}")
  if not shapes or not (min_size or max_size):
    return shapes
  transforms.check_resize((max_size, max_size), min_size, max_size)  # 0 < min_size <= max_size
  aspects = sorted(h / w for h, w in shapes)
  for h, w in shapes:
    i = aspects.index(h / w)
    # The aspect interval the bucket receives: up to the geometric midpoints with its neighbours.
    lo = math.sqrt(aspects[i - 1] * aspects[i]) if i else 0.0
    hi = math.sqrt(aspects[i] * aspects[i + 1]) if i + 1 < len(aspects) else math.inf
    need_h = _scaled_extent(hi, min_size, max_size)[0]
    need_w = _scaled_extent(lo, min_size, max_size)[1]
    if need_h > h or need_w > w:
      raise ValueError(
          f"config.data.buckets: {h}x{w} receives images of aspect (h/w) {lo:.3g}..{hi:.3g}, "
          f"which min_size={min_size}, max_size={max_size} scale to up to "
          f"{math.ceil(need_h)}x{math.ceil(need_w)}: a bucket must hold them (they are padded, "
          "never cropped)")
  return shapes


def assign_bucket(height: int, width: int, buckets: Sequence[Shape]) -> int:
  """Index of the bucket whose aspect is closest to ``height / width`` (log scale; first on ties).

  Compared exactly in integers: ``|log(h*bw) - log(w*bh)|`` orders as ``max/min`` of the two
  products, so a square image between mirrored buckets is a true tie.
  """
  best, best_ratio = 0, None
  for i, (bh, bw) in enumerate(buckets):
    a, b = int(height) * int(bw), int(width) * int(bh)
    ratio = (max(a, b), min(a, b))  # the fraction max/min >= 1, kept as integers
    if best_ratio is None or ratio[0] * best_ratio[1] < best_ratio[0] * ratio[1]:
      best, best_ratio = i, ratio
  return best


def train_image_sizes(config) -> List[Shape]:
  """The static (h, w) of the training batches: the buckets, or ``[image_size]`` without."""
  d = config.data
  buckets = tuple(d.get("buckets", ()) or ())
  if buckets:
    return list(check_buckets(buckets, int(d.get("min_size", 0)), int(d.get("max_size", 0))))
  return [tuple(int(v) for v in d.image_size)]


def train_batch_specs(config, batch_size: int) -> Dict[Shape, Dict[str, Tuple[tuple, np.dtype]]]:
  """Per training image size, ``{key: (shape, numpy dtype)}`` of a batch of ``batch_size``.

  What the loop compiles the train step for before the first batch arrives.
  """
  d = config.data
  specs = {}
  for size in train_image_sizes(config):
    signature = transforms.output_signature(size, int(d.max_instances), int(d.mask_size),
                                            batching.num_keypoints(config))
    specs[size] = {k: ((int(batch_size),) + tuple(shape), np.dtype(dtype.as_numpy_dtype))
                   for k, (shape, dtype) in signature.items()
                   if k != transforms.NUM_TRUNCATED_KEY}
  return specs


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser on uint64 (wrapping arithmetic): a fixed, well-mixed hash."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_permutation(n: int, *words: int) -> np.ndarray:
  """A permutation of ``range(n)`` [n] int64, a pure function of ``words`` (ints)."""
  state = np.zeros((), np.uint64)
  for word in words:
    state = _splitmix64(state ^ np.uint64(int(word) & _MASK64))
  keys = _splitmix64(state ^ np.arange(n, dtype=np.uint64))
  return np.argsort(keys, kind="stable").astype(np.int64)


class BucketSchedule:
  """Which records form each global batch, every batch from one bucket (module docstring).

  Args:
    record_buckets: [n] int, the bucket of each record (:func:`assign_bucket`).
    num_buckets: how many buckets there are.
    global_batch_size: images per global batch.
    seed: the run's seed.

  Raises:
    ValueError: when no bucket holds a global batch of images.
  """

  _CACHED_EPOCHS = 2  # a prefetching pipeline straddles at most one epoch boundary

  def __init__(self, record_buckets: Sequence[int], num_buckets: int, global_batch_size: int,
               seed: int):
    self.record_buckets = np.asarray(record_buckets, np.int64)
    self.num_buckets = int(num_buckets)
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.bucket_sizes = np.bincount(self.record_buckets, minlength=self.num_buckets)
    self.batches_per_bucket = self.bucket_sizes // self.global_batch_size
    self.steps_per_epoch = int(self.batches_per_bucket.sum())
    if not self.steps_per_epoch:
      raise ValueError(f"no bucket holds a global batch of {self.global_batch_size} images "
                       f"(images per bucket: {self.bucket_sizes.tolist()})")
    self._lock = threading.Lock()
    self._epochs: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()

  def _build_epoch(self, epoch: int):
    gb = self.global_batch_size
    order = hash_permutation(len(self.record_buckets), self.seed, epoch, 0)
    members = [order[self.record_buckets[order] == b] for b in range(self.num_buckets)]
    rows, owner, first = [], [], []  # per batch: its records, its bucket, its first position
    for b, m in enumerate(members):
      k = int(self.batches_per_bucket[b])
      rows.append(m[:k * gb].reshape(k, gb))
      owner += [b] * k
      first += range(0, k * gb, gb)
    shuffle = hash_permutation(self.steps_per_epoch, self.seed, epoch, 1)
    return (np.concatenate(rows)[shuffle], np.asarray(owner, np.int64)[shuffle],
            np.asarray(first, np.int64)[shuffle], members)

  def epoch(self, epoch: int):
    """``(records [S, gb], bucket [S], first [S], members)`` of ``epoch`` (S = steps per epoch):
    batch j's records, its bucket, the position of its first record in ``members[bucket]``
    (that bucket's records in this epoch's order)."""
    with self._lock:
      if epoch not in self._epochs:
        self._epochs[epoch] = self._build_epoch(epoch)
        while len(self._epochs) > self._CACHED_EPOCHS:
          self._epochs.popitem(last=False)
      return self._epochs[epoch]

  def bucket_of_step(self, step: int) -> int:
    """The bucket of global batch ``step``."""
    epoch, j = divmod(int(step), self.steps_per_epoch)
    return int(self.epoch(epoch)[1][j])

  def slot(self, step: int, row: int) -> Tuple[int, Iterator[int]]:
    """``(bucket, candidates)`` for row ``row`` of global batch ``step``.

    ``candidates`` yields the slot's record, then (for when it cannot be loaded) the records
    after it in its bucket's order of this epoch, wrapping around: each of the bucket once.
    """
    epoch, j = divmod(int(step), self.steps_per_epoch)
    _, owner, first, members = self.epoch(epoch)
    bucket = int(owner[j])
    m = members[bucket]
    start = int(first[j]) + int(row)
    return bucket, (int(m[(start + t) % len(m)]) for t in range(len(m)))
