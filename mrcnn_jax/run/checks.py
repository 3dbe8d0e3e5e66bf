"""Checks on paths and config that training and evaluation run before any device work.

Each fails at start-up with one line naming the field, instead of a traceback from deep inside
the input pipeline or after the last training step. Paths may be local or ``gs://``: a missing
bucket, a missing object and a refused permission each get their own line
(:mod:`mrcnn_jax.run.paths`).
"""

from __future__ import annotations

import ml_collections
import tensorflow as tf

from mrcnn_jax.run import paths

__all__ = ["check_data_paths", "check_num_classes", "check_weight_paths"]


def check_data_paths(config: ml_collections.ConfigDict, *, train: bool = True,
                     evaluate: bool = True) -> None:
  """Raises ``FileNotFoundError`` with one clear line when a configured data path is missing,
  and ``ValueError`` when evaluation is asked of a source that cannot give COCO metrics (before
  any training step, not after the last)."""
  d = config.data
  if d.source == "tfds" and d.get("tfds_data_dir"):
    paths.check_exists("config.data.tfds_data_dir", d.tfds_data_dir)
  if d.source != "coco":
    if evaluate:
      raise ValueError(
          f"COCO evaluation needs an instances JSON as ground truth (config.data.source='coco'),"
          f" not source={d.source!r}: set config.eval.every_steps=0 and config.eval.at_end=False"
          " to train from it, and evaluate on a COCO JSON (config.data.eval_annotations)")
    return
  for split, wanted in (("train", train), ("eval", evaluate)):
    if not wanted:
      continue
    if d.get(f"{split}_records"):  # read instead of the JSON and the images
      _check_records(f"config.data.{split}_records", d.get(f"{split}_records"))
      continue
    for key in (f"{split}_annotations", f"{split}_images"):
      path = d.get(key)
      if not path:
        raise FileNotFoundError(f"config.data.{key} is not set")
      paths.check_exists(f"config.data.{key}", path)


def _check_records(name: str, spec: str) -> None:
  """Record files: an index, a shard pattern, or shards comma-separated."""
  for part in (p.strip() for p in str(spec).split(",") if p.strip()):
    if any(c in part for c in "*?["):
      directory = part.rsplit("/", 1)[0]
      paths.check_exists(name, directory)
      with paths.one_line_errors(name, part):
        if not tf.io.gfile.glob(paths.resolve(part)):
          raise FileNotFoundError(f"{name}: no file matches {part}")
    else:
      paths.check_exists(name, part)


def check_weight_paths(config: ml_collections.ConfigDict) -> None:
  """``config.resume`` and ``config.init_weights``, where set, must exist and be readable."""
  for key in ("resume", "init_weights"):
    if config.get(key):
      paths.check_exists(f"config.{key}", config.get(key))


def check_num_classes(config: ml_collections.ConfigDict, categories) -> None:
  """The model must predict the data set's K classes plus background.

  Args:
    config: the full config (reads ``model.num_classes``).
    categories: the data set's :class:`~mrcnn_jax.data.coco.CategoryMap` (its ``num_classes``
      counts the background).
  """
  if int(config.model.num_classes) != categories.num_classes:
    raise ValueError(
        f"config.model.num_classes={config.model.num_classes} but the data set has "
        f"{categories.num_classes - 1} categories (+1 background = {categories.num_classes})")
