"""Checks on paths and config that training and evaluation run before any device work.

Each fails at start-up with one line naming the field, instead of a traceback from deep inside
the input pipeline or after the last training step.
"""

from __future__ import annotations

import os

import ml_collections

__all__ = ["check_data_paths", "check_local_path", "check_num_classes"]


def check_local_path(name: str, path: str) -> None:
  """Refuses a URL (``gs://...``): checkpoints, summaries and data are read as files.

  Multi-host runs need a path that every host sees: an NFS / Filestore mount, or a bucket
  mounted with Cloud Storage FUSE at the same place on every host.
  """
  if "://" in str(path):
    raise ValueError(f"{name} {path!r} is a URL; use a filesystem path that every host sees "
                     "(an NFS/Filestore mount, or the bucket mounted with gcsfuse)")


def check_data_paths(config: ml_collections.ConfigDict, *, train: bool = True,
                     evaluate: bool = True) -> None:
  """Raises ``FileNotFoundError`` with one clear line when a configured data path is missing,
  and ``ValueError`` when evaluation is asked of a source that cannot give COCO metrics (before
  any training step, not after the last)."""
  d = config.data
  if d.source != "coco":
    if evaluate:
      raise ValueError(
          f"COCO evaluation needs an instances JSON as ground truth (config.data.source='coco'),"
          f" not source={d.source!r}: set config.eval.every_steps=0 and config.eval.at_end=False"
          " to train from it, and evaluate on a COCO JSON (config.data.eval_annotations)")
    return
  keys = (["train_annotations", "train_images"] if train else []) + (
      ["eval_annotations", "eval_images"] if evaluate else [])
  for key in keys:
    path = d.get(key)
    if not path:
      raise FileNotFoundError(f"config.data.{key} is not set")
    check_local_path(f"config.data.{key}", path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.data.{key} not found: {path}")


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
