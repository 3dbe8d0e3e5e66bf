"""What every source's input pipeline shares: host slicing, the iterable of host batches, and
the transform and ``tf.data`` options.

Both :mod:`mrcnn_jax.data.pipeline` (COCO JSON) and :mod:`mrcnn_jax.data.tfds_source` build on
this module, so neither reaches into the other.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterator, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from mrcnn_jax.data import coco as coco_lib
from mrcnn_jax.data import transforms

__all__ = ["InputPipeline", "dataset_options", "host_batch_size", "host_info",
           "num_keypoints", "transform_kwargs"]


def host_info(process_index: Optional[int] = None, process_count: Optional[int] = None):
  """(process_index, process_count), defaulting to JAX's."""
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  """Per-host batch; the global batch must split evenly over hosts."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}")
  return global_batch_size // process_count


class InputPipeline:
  """An iterable of host batches (dicts of numpy arrays, the batch contract).

  Attributes:
    dataset: the ``tf.data.Dataset`` of host batches (with the extra ``_num_truncated`` [B]
      field, which iteration pops and counts).
    source: the random-access source (:class:`~mrcnn_jax.data.coco.CocoSource`) or None (TFDS).
    categories: the :class:`~mrcnn_jax.data.coco.CategoryMap` (contiguous <-> dataset ids).
    stats: :class:`~mrcnn_jax.data.coco.DataStats` (skips and truncations, by reason).
    global_batch_size, host_batch_size: batch sizes.
    num_batches: batches per host (evaluation), None for the infinite training stream.
    num_examples: images in the source (evaluation: the number of valid slots over all hosts).
  """

  def __init__(self, dataset, *, source, categories, stats, global_batch_size, host_batch_size,
               num_batches, num_examples):
    self.dataset = dataset
    self.source = source
    self.categories = categories
    self.stats = stats
    self.global_batch_size = global_batch_size
    self.host_batch_size = host_batch_size
    self.num_batches = num_batches
    self.num_examples = num_examples

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    it = iter(self.dataset)
    while True:
      try:
        batch = next(it)
      except StopIteration:
        return
      except tf.errors.OpError as e:
        # A BadExampleError of the loader ('raise' mode, or a stream that cannot load
        # anything) surfaces as a TF error; re-raise its own message rather than TF's wrapped
        # traceback (read from the error text: other loader threads may have counted more
        # skips, and so changed stats.last_error, since).
        raised = re.search(r"BadExampleError: ([^\n]+)", str(e))
        if raised:
          raise coco_lib.BadExampleError(raised.group(1)) from None
        raise
      batch = {k: v.numpy() for k, v in batch.items()}
      truncated = int(batch.pop(transforms.NUM_TRUNCATED_KEY).sum())
      if truncated:
        self.stats.count("truncated_instances", f"{truncated} instances beyond max_instances "
                         "dropped in a batch", n=truncated)
      yield batch


def num_keypoints(config) -> int:
  """K the batches carry (``config.model.keypoint.num_keypoints``), 0 when keypoints are off."""
  keypoint = config.get("model", {}).get("keypoint")
  if keypoint is None or not keypoint.get("enabled", False):
    return 0
  k = int(keypoint.num_keypoints)
  if k <= 0:
    raise ValueError(f"config.model.keypoint.num_keypoints must be positive, got {k}")
  return k


def transform_kwargs(config, training: bool,
                     keypoint_names: Sequence[str] = ()) -> Dict[str, Any]:
  """``transforms.transform_example``'s keyword arguments from ``config.data`` (and, with
  keypoints on, ``config.model.keypoint``; ``keypoint_names``: the source's K names, which the
  default flip pairs come from)."""
  d = config.data
  kwargs = dict(image_size=tuple(int(v) for v in d.image_size),
                max_instances=int(d.max_instances), mask_size=int(d.mask_size),
                training=training, scale_range=tuple(float(v) for v in d.scale_range),
                random_flip=bool(d.random_flip), min_size=int(d.get("min_size", 0)),
                max_size=int(d.get("max_size", 0)))
  k = num_keypoints(config)
  if k:
    if len(keypoint_names) != k:
      raise ValueError(f"config.model.keypoint.num_keypoints = {k} but the data names "
                       f"{len(keypoint_names)} keypoints: {list(keypoint_names)}")
    pairs = tuple(tuple(p) for p in (d.get("keypoint_flip_pairs", ()) or ()))
    kwargs.update(num_keypoints=k,
                  keypoint_flip=transforms.keypoint_flip_permutation(keypoint_names, pairs))
  return kwargs


def dataset_options() -> tf.data.Options:
  """Deterministic order (resume and host slicing rely on it), parallel maps."""
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options
