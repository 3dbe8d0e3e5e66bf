"""tf.data training and evaluation pipelines with per-host sharding and exact resume.

Usage::

  train = build_train_dataset(config, start_step=step)   # infinite, host-local batches
  for host_batch in train:                               # dicts of numpy arrays
    batch = run.make_global_batch(host_batch, mesh)      # global jax.Arrays, 'data'-sharded
  for host_batch in build_eval_dataset(config):          # finite; same batch count per host
    ...  # use host_batch['example_valid'] to ignore padding slots

Order. The training stream is a pure function of ``(seed, epoch, position)``: global position
``g`` (example g of the run, over all hosts) reads record
``index_shuffle(g mod n, seed=(seed, g // n))``, so every epoch is a fresh permutation, and
host ``p`` of ``P`` takes rows ``[p * hb, (p + 1) * hb)`` of every global batch (``hb`` = global
batch / P), so a global batch is the same, row for row, for any host count. Resuming at step
``s`` starts there: nothing is replayed. Augmentation draws are stateless in
``(seed, g)``, so the resumed examples are bit-identical. (A bad image dropped at run time shifts
the following examples of that host by one; resume stays exact when none is dropped.)

Buckets (``config.data.buckets``, the 'coco' source): every global batch holds images of one
aspect-ratio bucket and has its static shape; which records form global batch ``s`` is a pure
function of ``(seed, s)`` (:mod:`mrcnn_jax.data.buckets`: a hashed permutation per epoch, cut
per bucket into global batches, the batches in a hashed order; each bucket's last partial
batch of an epoch is dropped), host ``p`` takes the same rows as above, and augmentation draws
are stateless in ``(seed, g)`` as above. A bad image keeps its slot, filled by the next image
of its bucket that loads, so batches never mix buckets and resume stays exact.

Records (``config.data.train_records`` / ``eval_records``, :mod:`mrcnn_jax.data.records`): a
:class:`~mrcnn_jax.data.records.RecordSource` stands in for the JSON source it was made from,
with the same records in the same order, so everything above holds unchanged and the batches
are those of the JSON source, bit for bit; each host reads only the records of its rows.

Keypoints (``config.model.keypoint.enabled``): the source reads each instance's keypoints
(:class:`~mrcnn_jax.data.coco.CocoSource` with ``num_keypoints``) and every batch, training,
bucketed or evaluation, carries ``gt_keypoints`` [B, G, K, 3] beside ``gt_boxes``
(:mod:`mrcnn_jax.data.transforms`); with keypoints off the batches are exactly as without them.

Evaluation: the n images are padded to a multiple of the global batch; host ``p`` takes the
same rows of every global batch as in training; positions >= n are padding slots
(``example_valid`` False, ``image_id`` -1), so every image is seen exactly once and every host
runs the same number of batches. A bad image also keeps its slot, marked ``example_valid``
False.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

from absl import logging
import numpy as np
import tensorflow as tf

from mrcnn_jax.data import buckets as buckets_lib
from mrcnn_jax.data import coco as coco_lib
from mrcnn_jax.data import records as records_lib
from mrcnn_jax.data import tfds_source
from mrcnn_jax.data import transforms
from mrcnn_jax.data.batching import dataset_options
from mrcnn_jax.data.batching import host_batch_size
from mrcnn_jax.data.batching import host_info
from mrcnn_jax.data.batching import InputPipeline
from mrcnn_jax.data.batching import num_keypoints
from mrcnn_jax.data.batching import transform_kwargs

_RAW_DTYPES = (tf.uint8, tf.float32, tf.int32, tf.uint8, tf.int32, tf.bool)
_RAW_KEYS = ("image", "boxes", "classes", "masks", "image_id", "ok")
_RAW_SHAPES = ((None, None, 3), (None, 4), (None,), (None, None, None), (), ())


def _raw_fields(source: coco_lib.CocoSource):
  """(keys, dtypes, shapes) of the raw examples ``source.load`` returns."""
  if not source.num_keypoints:
    return _RAW_KEYS, _RAW_DTYPES, _RAW_SHAPES
  return (_RAW_KEYS + ("keypoints",), _RAW_DTYPES + (tf.float32,),
          _RAW_SHAPES + ((None, source.num_keypoints, 3),))


def _guarded_load(source: coco_lib.CocoSource, give_up_after: int = 0):
  """A Python function: record index (-1 = padding) -> ``source.load``'s example dict.

  ``give_up_after`` > 0 (training): when that many loads have all failed and none has ever
  succeeded (e.g. every image missing because ``train_images`` names the wrong folder), raise
  ``BadExampleError`` naming the skip counts. Training drops (or replaces) failed examples, so
  such a stream would otherwise never yield a batch. (Only "none ever": failures in a row would
  also fire on a mostly broken but usable set, as parallel loads and hosts interleave.)
  """
  loads = [0, False]  # loads so far, whether one succeeded; map calls run on several threads
  lock = threading.Lock()

  def py_load(index):
    ex = source.load(int(index))
    if give_up_after:
      with lock:
        loads[0] += 1
        loads[1] = loads[1] or bool(ex["ok"])
        hopeless = not loads[1] and loads[0] >= give_up_after
      if hopeless:
        message = (f"none of the first {give_up_after} training examples could be used (skips "
                   f"so far: {source.stats.as_dict()}; last: {source.stats.last_error}); check "
                   "config.data.train_images")
        raise coco_lib.BadExampleError(message)
    return ex

  return py_load


def _raw_example(values, source: coco_lib.CocoSource) -> dict:
  """The tensors of a ``tf.numpy_function`` returning :func:`_raw_fields`' keys -> a raw
  example dict."""
  keys, _, shapes = _raw_fields(source)
  raw = {}
  for key, v, shape in zip(keys, values, shapes):
    v.set_shape(shape)
    raw[key] = v
  return raw


def _load_fn(source: coco_lib.CocoSource, give_up_after: int = 0):
  """A tf function: record index (int64, -1 = padding) -> raw example dict (see
  :func:`_guarded_load` for ``give_up_after``)."""
  py_load = _guarded_load(source, give_up_after)
  keys, dtypes, _ = _raw_fields(source)

  def py_values(index):
    ex = py_load(index)
    return tuple(ex[k] for k in keys)

  def load(index):
    return _raw_example(tf.numpy_function(py_values, [index], dtypes, stateful=False), source)

  return load


def _make_source(config, training: bool, stats) -> coco_lib.CocoSource:
  d = config.data
  which = "train" if training else "eval"
  records = d.get(f"{which}_records")
  if records:  # the same records, sizes and examples as the JSON they were made from
    return records_lib.RecordSource(records, training=training,
                                    skip_empty=bool(d.skip_empty_train),
                                    on_bad_example=str(d.on_bad_example), stats=stats,
                                    num_keypoints=num_keypoints(config))
  ann, images = ((d.train_annotations, d.train_images) if training
                 else (d.eval_annotations, d.eval_images))
  if not ann:
    raise ValueError(f"config.data.{which}_annotations is empty: point it at a COCO instances "
                     "JSON (e.g. from `python -m mrcnn_jax.data.shapes --out DIR`) or set "
                     f"config.data.{which}_records")
  return coco_lib.CocoSource(ann, images, training=training, skip_empty=bool(d.skip_empty_train),
                             on_bad_example=str(d.on_bad_example), stats=stats,
                             num_keypoints=num_keypoints(config))


def _source_kwargs(config, source: coco_lib.CocoSource, training: bool):
  """``transform_kwargs`` for ``source``, which must read the keypoints the config wants."""
  k = num_keypoints(config)
  if source.num_keypoints != k:
    raise ValueError(f"config.model.keypoint wants {k} keypoints per instance (0: off) but the "
                     f"source reads {source.num_keypoints} (CocoSource(num_keypoints=...))")
  kwargs = transform_kwargs(config, training=training, keypoint_names=source.keypoint_names)
  if k:
    names, perm = source.keypoint_names, kwargs["keypoint_flip"]
    logging.info("keypoints %s; the horizontal flip swaps %s", list(names),
                 [(names[i], names[j]) for i, j in enumerate(perm) if i < j])
  return kwargs


def build_train_dataset(config, *, global_batch_size: Optional[int] = None,
                        seed: Optional[int] = None, start_step: int = 0,
                        process_index: Optional[int] = None, process_count: Optional[int] = None,
                        source: Optional[coco_lib.CocoSource] = None) -> InputPipeline:
  """The infinite training stream of host batches.

  Args:
    config: the full config (reads ``config.data``, ``config.train.batch_size``, ``config.seed``).
    global_batch_size: overrides ``config.train.batch_size``.
    seed: overrides ``config.seed`` (shuffling and augmentation).
    start_step: the first global step to produce (resume), without replaying earlier steps.
    process_index, process_count: this host and the host count (default: JAX's).
    source: a prebuilt :class:`CocoSource` (default: from ``config.data``).
  """
  d = config.data
  bucket_shapes = buckets_lib.train_image_sizes(config) if d.get("buckets") else None
  if d.source == "tfds":
    if bucket_shapes:
      raise ValueError("config.data.buckets need the 'coco' source (its JSON gives every "
                       "image's size up front); set config.data.buckets = () for 'tfds'")
    return tfds_source.build_tfds_train_dataset(
        config, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
        process_index=process_index, process_count=process_count)
  if d.source != "coco":
    raise ValueError(f"config.data.source must be 'coco' or 'tfds', got {d.source!r}")
  p, num_p = host_info(process_index, process_count)
  gb = int(global_batch_size or config.train.batch_size)
  hb = host_batch_size(gb, num_p)
  seed = int(config.seed if seed is None else seed)
  if source is None:
    source = _make_source(config, True, coco_lib.DataStats())
  stats = source.stats
  n = len(source)
  if n == 0:
    raise ValueError("the training source has no usable image (all skipped or empty)")
  kwargs = _source_kwargs(config, source, training=True)
  if bucket_shapes:
    ds = _bucketed_examples(config, source, bucket_shapes, kwargs, p=p, gb=gb, hb=hb, seed=seed,
                            start_step=int(start_step))
    ds = ds.batch(hb, drop_remainder=True).prefetch(int(d.prefetch))
    return InputPipeline(ds.with_options(dataset_options()), source=source,
                         categories=source.categories, stats=stats, global_batch_size=gb,
                         host_batch_size=hb, num_batches=None, num_examples=n)
  # This host's first 2n loads try most records at least once: none usable means none is.
  load = _load_fn(source, give_up_after=2 * n)

  def element(k):
    # Global position in the run: host p holds rows [p*hb, (p+1)*hb) of each global batch, so
    # the global batch is the same, row for row, whatever the number of hosts (and with it
    # each row's augmentation and sampling randomness).
    g = (k // hb) * gb + p * hb + k % hb
    epoch, i = g // n, g % n
    record = tf.random.experimental.index_shuffle(i, tf.stack([tf.cast(seed, tf.int64), epoch]),
                                                  n - 1)
    raw = load(record)
    aug_seed = tf.stack([tf.cast(seed, tf.int64) + 0x5EED, g])
    return transforms.transform_example(raw, aug_seed, **kwargs)

  ds = tf.data.Dataset.range(int(start_step) * hb, np.iinfo(np.int64).max)
  ds = ds.map(element, num_parallel_calls=int(d.num_parallel_calls), deterministic=True)
  ds = ds.filter(lambda ex: ex["example_valid"])  # bad examples (counted in stats) leave training
  ds = ds.batch(hb, drop_remainder=True).prefetch(int(d.prefetch)).with_options(dataset_options())
  return InputPipeline(ds, source=source, categories=source.categories, stats=stats,
                       global_batch_size=gb, host_batch_size=hb, num_batches=None, num_examples=n)


def _bucketed_examples(config, source: coco_lib.CocoSource, shapes, kwargs, *, p: int, gb: int,
                       hb: int, seed: int, start_step: int) -> tf.data.Dataset:
  """This host's examples, in order, from global batch ``start_step`` on, each global batch
  from one bucket (:class:`~mrcnn_jax.data.buckets.BucketSchedule`).

  A bad example keeps its slot: it is replaced by the next record of its bucket in the
  epoch's order that loads (the skip is counted as usual), so batches never mix buckets and
  the stream stays a pure function of ``(seed, step)`` (a resume is exact even then).
  """
  record_buckets = [buckets_lib.assign_bucket(r.height, r.width, shapes) for r in source.records]
  schedule = buckets_lib.BucketSchedule(record_buckets, len(shapes), gb, seed)
  for (h, w), count, batches in zip(shapes, schedule.bucket_sizes, schedule.batches_per_bucket):
    log = logging.warning if batches == 0 else logging.info
    log("train bucket %dx%d: %d images, %d global batches of %d per epoch%s", h, w, count,
        batches, gb, "" if batches else " (fewer images than a batch: never trained on)")
  py_load = _guarded_load(source, give_up_after=2 * len(source))
  keys, dtypes, _ = _raw_fields(source)

  def py_slot(step, row):
    bucket, candidates = schedule.slot(int(step), int(row))
    for record in candidates:
      ex = py_load(record)
      if ex["ok"]:
        return tuple(ex[k] for k in keys) + (np.int32(bucket),)
    h, w = shapes[bucket]
    raise coco_lib.BadExampleError(
        f"no image of train bucket {h}x{w} could be loaded (skips so far: "
        f"{source.stats.as_dict()}; last: {source.stats.last_error})")

  def element(k):
    step, row = k // hb, p * hb + k % hb  # host p: rows [p*hb, (p+1)*hb) of each global batch
    values = tf.numpy_function(py_slot, [step, row], dtypes + (tf.int32,), stateful=False)
    raw, bucket = _raw_example(values[:-1], source), values[-1]
    aug_seed = tf.stack([tf.cast(seed, tf.int64) + 0x5EED, step * gb + row])
    # One transform per bucket, each with its static shape; the batch's shape is its bucket's.
    branches = [lambda size=size: transforms.transform_example(raw, aug_seed,
                                                               **dict(kwargs, image_size=size,
                                                                      bucket=True))
                for size in shapes]
    return tf.switch_case(bucket, branches)

  ds = tf.data.Dataset.range(start_step * hb, np.iinfo(np.int64).max)
  return ds.map(element, num_parallel_calls=int(config.data.num_parallel_calls),
                deterministic=True)


def eval_positions(num_examples: int, global_batch_size: int, process_index: int,
                   process_count: int) -> np.ndarray:
  """Record index of each host-local eval slot, in order (-1 = padding slot)."""
  num_batches = math.ceil(num_examples / global_batch_size)
  host = global_batch_size // process_count
  # Host p's slots are rows [p*host, (p+1)*host) of every global batch, as in training.
  g = (np.arange(num_batches)[:, None] * global_batch_size + process_index * host
       + np.arange(host)[None, :]).reshape(-1)
  return np.where(g < num_examples, g, -1).astype(np.int64)


def build_eval_dataset(config, *, global_batch_size: Optional[int] = None,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       source: Optional[coco_lib.CocoSource] = None) -> InputPipeline:
  """The finite evaluation stream: every image once over all hosts, last batch padded.

  Args:
    config: the full config (reads ``config.data``; batch ``config.data.eval_batch_size``).
    global_batch_size: overrides ``config.data.eval_batch_size``.
    process_index, process_count: this host and the host count (default: JAX's).
    source: a prebuilt :class:`CocoSource` (default: from ``config.data``).
  """
  d = config.data
  if d.source == "tfds":
    return tfds_source.build_tfds_eval_dataset(
        config, global_batch_size=global_batch_size, process_index=process_index,
        process_count=process_count)
  if d.source != "coco":
    raise ValueError(f"config.data.source must be 'coco' or 'tfds', got {d.source!r}")
  p, num_p = host_info(process_index, process_count)
  gb = int(global_batch_size or d.eval_batch_size)
  hb = host_batch_size(gb, num_p)
  if source is None:
    source = _make_source(config, False, coco_lib.DataStats())
  stats = source.stats
  positions = eval_positions(len(source), gb, p, num_p)
  load = _load_fn(source)
  kwargs = _source_kwargs(config, source, training=False)
  zero_seed = tf.zeros([2], tf.int64)
  ds = tf.data.Dataset.from_tensor_slices(positions)
  ds = ds.map(lambda r: transforms.transform_example(load(r), zero_seed, **kwargs),
              num_parallel_calls=int(d.num_parallel_calls), deterministic=True)
  ds = ds.batch(hb, drop_remainder=True).prefetch(int(d.prefetch)).with_options(dataset_options())
  logging.info("eval input: %d images, %d batches of %d per host", len(source),
               len(positions) // hb, hb)
  return InputPipeline(ds, source=source, categories=source.categories, stats=stats,
                       global_batch_size=gb, host_batch_size=hb,
                       num_batches=len(positions) // hb, num_examples=len(source))
