"""TFDS source: any builder with ``coco/2017``'s features, read from ``config.data.tfds_data_dir``.

Features read (the TFDS COCO spec): ``image`` (uint8 [h, w, 3]), ``image/id`` (int64),
``objects``: {``bbox`` [N, 4] float32 normalised (ymin, xmin, ymax, xmax), ``label`` [N] int64
0-based, ``is_crowd`` [N] bool}. Class ids are ``label + 1`` (TFDS labels are already contiguous;
:attr:`InputPipeline.categories` holds the builder's label names with ids 1..K).

Masks (``config.data.tfds_masks``). TFDS ``coco/2017`` has *no instance masks*, so:
* ``'panoptic'``: ``panoptic_image`` (PNG, id = R + 256 G + 256^2 B) and ``panoptic_objects``
  {``id``, ``bbox``, ``label``, ``is_crowd``}, as in ``coco/2017_panoptic``; each object's mask
  is ``panoptic id == object id``. Every panoptic object becomes an instance (filter stuff
  classes in the builder if you train on things only).
* ``'boxes'``: each instance mask fills its box (box-supervised masks: an explicit opt-in).
* ``'auto'``: ``'panoptic'`` when the builder has it, otherwise a ``ValueError`` saying so.

Order and sharding. Each host reads ``tfds.even_splits(split, process_count)[process_index]``.
Training repeats, shuffles with a seeded buffer and resumes by ``skip`` over undecoded records
(images are decoded after the skip, so resuming reads but does not decode the skipped records).
The skip counts records, so resume is exact unless records were filtered at run time: with
``skip_empty_train`` the images without instances (known only after reading, unlike the COCO
JSON source) shift the resumed stream slightly.
Evaluation pads every host to the same number of batches with ``example_valid=False`` slots.

Keypoints: ``coco/2017`` has none, so ``config.model.keypoint.enabled`` with this source is a
``ValueError`` before anything is read.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mrcnn_jax.data import batching
from mrcnn_jax.data import coco as coco_lib
from mrcnn_jax.data import transforms

_SHUFFLE_BUFFER = 1024


def _builder(config):
  d = config.data
  if batching.num_keypoints(config):
    raise ValueError(f"config.model.keypoint.enabled needs keypoint annotations, which the TFDS "
                     f"source does not read ({d.tfds_name!r}; coco/2017 has none): use "
                     "config.data.source = 'coco' with a person_keypoints JSON")
  return tfds.builder(d.tfds_name, data_dir=d.tfds_data_dir or None)


def _mask_mode(builder, config) -> str:
  mode = config.data.tfds_masks
  has_panoptic = "panoptic_image" in builder.info.features
  if mode == "auto":
    if not has_panoptic:
      raise ValueError(f"TFDS builder {builder.name!r} has no instance masks (no "
                       "'panoptic_image'); set config.data.tfds_masks = 'boxes' to train on "
                       "box-filled masks, or use a COCO JSON source (config.data.source='coco')")
    return "panoptic"
  if mode == "panoptic" and not has_panoptic:
    raise ValueError(f"config.data.tfds_masks='panoptic' but {builder.name!r} has no "
                     "'panoptic_image' feature")
  if mode not in ("panoptic", "boxes"):
    raise ValueError(f"config.data.tfds_masks must be 'auto', 'panoptic' or 'boxes', got {mode!r}")
  return mode


def _categories(builder, mode) -> coco_lib.CategoryMap:
  objects = builder.info.features["panoptic_objects" if mode == "panoptic" else "objects"]
  names = objects["label"].names
  return coco_lib.CategoryMap([{"id": i + 1, "name": n} for i, n in enumerate(names)])


def _to_raw(features, mode: str):
  """A TFDS example (images still encoded) -> a raw example (see transforms.transform_example)."""
  image = tf.io.decode_image(features["image"], channels=3, expand_animations=False)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  objects = features["panoptic_objects" if mode == "panoptic" else "objects"]
  keep = tf.logical_not(tf.cast(objects["is_crowd"], tf.bool))
  bbox = tf.boolean_mask(tf.reshape(objects["bbox"], [-1, 4]), keep)
  fh, fw = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  boxes = tf.stack([bbox[:, 1] * fw, bbox[:, 0] * fh, bbox[:, 3] * fw, bbox[:, 2] * fh], axis=1)
  classes = tf.cast(tf.boolean_mask(objects["label"], keep), tf.int32) + 1
  if mode == "panoptic":
    pan = tf.cast(tf.io.decode_png(features["panoptic_image"], channels=3), tf.int32)
    pan_id = pan[..., 0] + 256 * pan[..., 1] + 65536 * pan[..., 2]
    ids = tf.cast(tf.boolean_mask(objects["id"], keep), tf.int32)
    masks = tf.cast(tf.equal(pan_id[None], ids[:, None, None]), tf.uint8)
  else:
    ys = tf.range(h, dtype=tf.float32)[None, :, None] + 0.5
    xs = tf.range(w, dtype=tf.float32)[None, None, :] + 0.5
    b = boxes[:, :, None, None]
    masks = tf.cast((xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3]), tf.uint8)
  return {"image": image, "boxes": boxes, "classes": classes, "masks": masks,
          "image_id": tf.cast(features["image/id"], tf.int32), "ok": tf.constant(True)}


def _read(builder, split: str, mode: str):
  decoders = {"image": tfds.decode.SkipDecoding()}
  if mode == "panoptic":
    decoders["panoptic_image"] = tfds.decode.SkipDecoding()
  return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                            read_config=tfds.ReadConfig(interleave_cycle_length=1))


def build_tfds_train_dataset(config, *, global_batch_size: Optional[int] = None,
                             seed: Optional[int] = None, start_step: int = 0,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None) -> batching.InputPipeline:
  """The TFDS training stream; same arguments as :func:`pipeline.build_train_dataset`."""
  d = config.data
  p, num_p = batching.host_info(process_index, process_count)
  gb = int(global_batch_size or config.train.batch_size)
  hb = batching.host_batch_size(gb, num_p)
  seed = int(config.seed if seed is None else seed)
  builder = _builder(config)
  mode = _mask_mode(builder, config)
  split = tfds.even_splits(d.train_split, n=num_p)[p]
  kwargs = batching.transform_kwargs(config, training=True)

  def element(k, features):
    raw = _to_raw(features, mode)
    if d.skip_empty_train:
      raw["ok"] = tf.shape(raw["classes"])[0] > 0
    g = (k // hb) * gb + p * hb + k % hb  # as pipeline.build_train_dataset
    return transforms.transform_example(raw, tf.stack([tf.cast(seed, tf.int64) + 0x5EED, g]),
                                        **kwargs)

  ds = _read(builder, split, mode).repeat().shuffle(_SHUFFLE_BUFFER, seed=seed)
  ds = ds.enumerate().skip(int(start_step) * hb)
  ds = ds.map(element, num_parallel_calls=int(d.num_parallel_calls), deterministic=True)
  ds = ds.filter(lambda ex: ex["example_valid"])
  ds = ds.batch(hb, drop_remainder=True).prefetch(int(d.prefetch))
  ds = ds.with_options(batching.dataset_options())
  return batching.InputPipeline(
      ds, source=None, categories=_categories(builder, mode), stats=coco_lib.DataStats(),
      global_batch_size=gb, host_batch_size=hb, num_batches=None,
      num_examples=builder.info.splits[d.train_split].num_examples)


def build_tfds_eval_dataset(config, *, global_batch_size: Optional[int] = None,
                            process_index: Optional[int] = None,
                            process_count: Optional[int] = None) -> batching.InputPipeline:
  """The TFDS evaluation stream; same arguments as :func:`pipeline.build_eval_dataset`."""
  d = config.data
  p, num_p = batching.host_info(process_index, process_count)
  gb = int(global_batch_size or d.eval_batch_size)
  hb = batching.host_batch_size(gb, num_p)
  builder = _builder(config)
  mode = _mask_mode(builder, config)
  splits = tfds.even_splits(d.eval_split, n=num_p)
  counts = [builder.info.splits[s].num_examples for s in splits]
  num_batches = math.ceil(max(counts) / hb) if max(counts) else 0
  kwargs = batching.transform_kwargs(config, training=False)
  zero_seed = tf.zeros([2], tf.int64)
  real = _read(builder, splits[p], mode).map(lambda f: _to_raw(f, mode))
  placeholder = {k: tf.constant(v) for k, v in coco_lib.placeholder_example().items()}
  pad = tf.data.Dataset.from_tensors(placeholder).repeat(num_batches * hb - counts[p])
  ds = real.concatenate(pad).map(lambda raw: transforms.transform_example(raw, zero_seed, **kwargs),
                                 num_parallel_calls=int(d.num_parallel_calls), deterministic=True)
  ds = ds.batch(hb, drop_remainder=True).prefetch(int(d.prefetch))
  ds = ds.with_options(batching.dataset_options())
  return batching.InputPipeline(
      ds, source=None, categories=_categories(builder, mode), stats=coco_lib.DataStats(),
      global_batch_size=gb, host_batch_size=hb, num_batches=num_batches,
      num_examples=int(np.sum(counts)))
