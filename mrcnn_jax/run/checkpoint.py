"""Checkpoints with orbax: async saves, keep-N, an interval, and the resume order.

A checkpoint is one orbax step directory ``<workdir>/checkpoints/<step>/`` with two items:
``state`` (the whole ``TrainState``: params, optimizer state, batch stats, step, rng) and
``meta`` (JSON: the step, the data position, and the model config the parameters belong to).
Orbax writes a step directory under a temporary name (``<step>.orbax-checkpoint-tmp``) and renames
it when complete; in a bucket (``gs://``, no rename) it writes ``<step>/`` and marks it complete
with a ``commit_success.txt`` last. Either way a run killed mid-write leaves no half checkpoint
that :meth:`Checkpointer.latest_step` would return; the workdir's checkpointer deletes such
leftovers when it starts (orbax keeps them otherwise, a full state each, until that very step is
saved again). Every path here may be local or ``gs://`` (:mod:`mrcnn_jax.run.paths`).

Where the starting state comes from (:func:`restore_or_initialize`), first match wins:

1. the workdir's own latest complete checkpoint: the run was interrupted, continue it exactly;
2. ``config.resume``: a checkpoint of another run (its workdir, its ``checkpoints/`` folder or
   one step folder): the whole state, as if this run had been that one;
3. ``config.init_weights``: parameters only (an orbax checkpoint, a flax ``.msgpack`` or a
   ``.npz`` of ``/``-joined parameter paths); leaves whose path or shape differ keep their
   fresh initialisation (fine-tuning with another number of classes);
4. the fresh state from scratch.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Optional

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mrcnn_jax.modeling.config import upgrade_model_config
from mrcnn_jax.run import paths

PyTree = Any

CHECKPOINT_DIR = "checkpoints"

# Orbax's name for a step folder being written: `<step>.orbax-checkpoint-tmp` (older versions
# append `-<timestamp>`); it becomes `<step>` only when the write is complete.
_TMP_MARK = ".orbax-checkpoint-tmp"


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager`` for ``TrainState``.

  Args:
    directory: where step folders go (created if missing): local (absolute or relative) or
      ``gs://``.
    every_steps: save only at multiples of this step (``save(force=True)`` ignores it).
    max_to_keep: the newest this many checkpoints are kept, older ones deleted.
    async_save: write in a background thread while training continues.
    cleanup_tmp: delete uncommitted step folders left by a killed run. Only for the run that
      owns ``directory``: a reader of another run's checkpoints must not delete the folder
      that run is writing.
  """

  def __init__(self, directory: str, *, every_steps: int = 1000, max_to_keep: int = 3,
               async_save: bool = True, cleanup_tmp: bool = False):
    self.directory = paths.resolve(directory)
    self.every_steps = max(int(every_steps), 1)
    if cleanup_tmp and jax.process_index() == 0:
      # Before the manager exists, synchronously: orbax's own `cleanup_tmp_directories` runs
      # in a thread that only the next save waits for, and a run ending before any save (a
      # refused restart) leaves it racing the interpreter's shutdown.
      _remove_uncommitted(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or ``None``."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step > 0 and step % self.every_steps == 0

  def save(self, step: int, state: PyTree, meta: dict, *, force: bool = False) -> bool:
    """Starts saving ``state`` at ``step`` (async); returns whether a save was started."""
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(dict(meta, step=int(step))))
    return bool(self._manager.save(step, args=args, force=True))

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
    """Restores ``(state, meta)`` at ``step`` into ``abstract_state``'s structure and shardings."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              meta=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored.state, dict(restored.meta or {})

  def read_meta(self, step: int) -> dict:
    """The JSON item alone (cheap; lets a caller vet a checkpoint before restoring it)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta or {})

  def wait(self) -> None:
    """Blocks until the pending async save (if any) is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _remove_uncommitted(directory: str) -> None:
  """Deletes the step folders under ``directory`` that orbax never committed (renamed, or in a
  bucket given their ``commit_success.txt``)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return
  for path in sorted(directory.iterdir()):
    uncommitted = _TMP_MARK in path.name or (
        paths.is_url(directory) and path.name.isdigit() and not ocp.step.is_path_finalized(path))
    if uncommitted and path.is_dir():
      logging.warning("removing an uncommitted checkpoint left by an interrupted run: %s", path)
      path.rmtree(missing_ok=True)


def make_checkpointer(config: ml_collections.ConfigDict, workdir: str) -> Checkpointer:
  """The workdir's checkpointer, from ``config.checkpoint``; it owns the folder (cleans up)."""
  c = config.checkpoint
  return Checkpointer(paths.join(workdir, CHECKPOINT_DIR), every_steps=c.every_steps,
                      max_to_keep=c.max_to_keep, async_save=c.async_save, cleanup_tmp=True)


def checkpoint_meta(config: ml_collections.ConfigDict, step: int, data_position: int) -> dict:
  """The JSON saved next to the state: enough to refuse a restart with another model."""
  return {"step": int(step), "data_position": int(data_position),
          "model_config": json.loads(config.model.to_json_best_effort())}


_RESUME_ADVICE = "use a fresh workdir or config.init_weights to start from its parameters"


def check_model_config(config: ml_collections.ConfigDict, meta: dict, source: str, *,
                       ignore: frozenset = frozenset(), advice: str = _RESUME_ADVICE) -> None:
  """Raises ``ValueError`` when a checkpoint's model config differs from ``config.model`` in a
  field not in ``ignore`` (dotted paths such as ``'model.roi.score_threshold'``)."""
  saved = meta.get("model_config")
  if saved is None:
    return
  current = json.loads(config.model.to_json_best_effort())
  # A field added to the model config after the checkpoint was written is absent from its
  # JSON; it counts as unchanged while the current value is that field's default.
  saved = json.loads(upgrade_model_config(saved).to_json_best_effort())
  diffs = sorted(d for d in _diff(saved, current) if d not in ignore)
  if diffs:
    raise ValueError(
        f"checkpoint {source} was trained with a different model config "
        f"({', '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}); {advice}")


def _diff(a: Any, b: Any, prefix: str = "model") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in set(a) | set(b):
      out += _diff(a.get(k), b.get(k), f"{prefix}.{k}")
    return out
  norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  JSON has no tuples
  return [] if norm(a) == norm(b) else [prefix]


def _resolve_checkpoint(path: str) -> tuple[Checkpointer, int]:
  """A workdir, its ``checkpoints/`` folder, or one step folder -> (checkpointer, step)."""
  path = paths.resolve(path)
  with paths.one_line_errors("checkpoint", path):
    folder = epath.Path(path)
    if not folder.is_dir():
      paths.check_exists("checkpoint", path)  # a missing bucket or no permission, by name
      raise FileNotFoundError(f"checkpoint not found: {path}")
    if (folder / CHECKPOINT_DIR).is_dir():
      folder = folder / CHECKPOINT_DIR
    if folder.name.isdigit() and (folder / "state").is_dir():
      return Checkpointer(str(folder.parent), async_save=False), int(folder.name)
    path = str(folder)
  ckpt = Checkpointer(path, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint under {path}")
  return ckpt, step


def restore_checkpoint(path: str, abstract_state: PyTree,
                       config: Optional[ml_collections.ConfigDict] = None
                       ) -> tuple[PyTree, dict]:
  """Restores a whole state from a workdir / checkpoints folder / step folder."""
  ckpt, step = _resolve_checkpoint(path)
  try:
    if config is not None:  # before restoring: mismatched shapes would fail less clearly
      check_model_config(config, ckpt.read_meta(step), f"{path} (step {step})")
    state, meta = ckpt.restore(step, abstract_state)
  finally:
    ckpt.close()
  return state, meta


# Model-config fields that do not change what trained weights mean: inference settings (how
# many proposals and detections, thresholds, dtype, chunking) and training-only ones (sampling,
# loss, which layers train). Predicting or evaluating with other values is legitimate; any
# other field (architecture, anchors, normalisation, RoIAlign, box coding) must match.
INFERENCE_FREE_FIELDS = frozenset(f"model.{k}" for k in (
    "compute_dtype", "detections_per_image", "backbone.trainable_layers", "backbone.bn_momentum",
    "backbone.remat", "backbone.frozen_stage_statistics", "mask.target_sampling_ratio",
    "rpn.pre_nms_top_k_train", "rpn.pre_nms_top_k_test", "rpn.post_nms_top_k_train",
    "rpn.post_nms_top_k_test", "rpn.nms_threshold", "rpn.min_size", "rpn.score_threshold",
    "rpn.fg_iou_threshold", "rpn.bg_iou_threshold", "rpn.batch_size_per_image",
    "rpn.positive_fraction", "rpn.box_loss_beta", "roi.fg_iou_threshold",
    "roi.bg_iou_threshold", "roi.batch_size_per_image", "roi.positive_fraction",
    "roi.box_loss_beta", "roi.score_threshold", "roi.nms_threshold", "roi.min_size",
    "roi.pre_nms_top_k", "mask.rois_per_image", "mask.chunk_size", "keypoint.rois_per_image",
    "keypoint.loss_weight", "keypoint.max_resize", "keypoint.chunk_size"))


def check_checkpoint_model(config: ml_collections.ConfigDict, path: str) -> None:
  """``ValueError`` when the checkpoint at ``path`` (workdir, ``checkpoints/`` folder or step
  folder) was trained with a model whose weights mean something else than ``config.model``'s
  (architecture, anchors, pixel normalisation, RoIAlign, box coding: every field but
  :data:`INFERENCE_FREE_FIELDS`); weights files (no saved config) pass.

  For inference and evaluation, which load parameters by name: a changed anchor size, pixel
  mean or RoIAlign alignment would otherwise give wrong detections without any error.
  """
  if _is_file(path):
    return
  ckpt, step = _resolve_checkpoint(path)
  try:
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  check_model_config(config, meta, f"{path} (step {step})", ignore=INFERENCE_FREE_FIELDS,
                     advice="use the config it was trained with; only inference settings "
                     "such as thresholds may change")


def _restore_raw(path: str) -> dict:
  """A checkpoint's saved state as nested dicts of numpy arrays (no target structure)."""
  ckpt, step = _resolve_checkpoint(path)
  try:
    # Onto this process's first device, whatever device layout wrote the checkpoint (a
    # 2-process run's checkpoint read by 1 process, or the reverse); the default restores
    # the saved layout and fails with "Topology mismatch" when it differs.
    args = ocp.args.Composite(state=ocp.args.StandardRestore(
        fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])))
    restored = ckpt._manager.restore(step, args=args)  # pylint: disable=protected-access
  finally:
    ckpt.close()
  return restored.state


def load_params(path: str) -> dict[str, np.ndarray]:
  """Parameters from a checkpoint or a weights file, flattened to ``{'a/b/kernel': array}``.

  Args:
    path: a ``.npz`` (keys are ``/``-joined parameter paths), a flax ``.msgpack`` (the params
      tree, or a variables dict with ``'params'``), or a checkpoint (workdir, its
      ``checkpoints/`` folder or a step folder).
  """
  path = paths.resolve(path)
  if _is_file(path) and path.endswith(".npz"):
    with paths.one_line_errors("weights file", path):
      data = epath.Path(path).read_bytes()
    with np.load(io.BytesIO(data)) as f:
      return {k: f[k] for k in f.files}
  if _is_file(path) and path.endswith(".msgpack"):
    with paths.one_line_errors("weights file", path):
      data = epath.Path(path).read_bytes()
    tree = flax.serialization.msgpack_restore(data)
    tree = tree.get("params", tree)
    return _flatten(tree)
  return _flatten(_restore_raw(path)["params"])


def _is_file(path: str) -> bool:
  """A file (not a folder) at ``path``, local or in a bucket."""
  path = paths.resolve(path)
  with paths.one_line_errors("checkpoint", path):
    return epath.Path(path).is_file()


def load_variables(path: str) -> tuple[dict, Optional[int]]:
  """``({'params': ...[, 'batch_stats': ...]}, step)`` of a checkpoint, as numpy trees.

  ``path`` is anything :func:`load_params` takes; weights files have no step (``None``).
  """
  if _is_file(path):
    params = flax.traverse_util.unflatten_dict(load_params(path), sep="/")
    return {"params": params}, None
  raw = _restore_raw(path)
  variables = {"params": raw["params"]}
  if raw.get("batch_stats"):
    variables["batch_stats"] = raw["batch_stats"]
  step = raw.get("step")
  return variables, (None if step is None else int(np.asarray(step)))


def load_collection(path: str, name: str) -> PyTree:
  """A checkpoint's other variable collection (e.g. ``'batch_stats'``), ``{}`` if none."""
  if _is_file(path):
    return {}
  return _restore_raw(path).get(name) or {}


def _flatten(tree: PyTree) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(tree), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def merge_params(params: PyTree, loaded: dict[str, np.ndarray]) -> tuple[PyTree, int, list[str]]:
  """Takes each leaf of ``params`` from ``loaded`` where the path and shape match.

  Returns:
    ``(new_params, num_loaded, skipped_paths)``.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  skipped, count = [], 0
  for key, value in flat.items():
    new = loaded.get(key)
    if new is not None and tuple(new.shape) == tuple(value.shape):
      flat[key] = jax.device_put(np.asarray(new, value.dtype), value.sharding)
      count += 1
    else:
      skipped.append(key)
  return flax.traverse_util.unflatten_dict(flat, sep="/"), count, skipped


def restore_or_initialize(config: ml_collections.ConfigDict, checkpointer: Checkpointer,
                          state: PyTree) -> tuple[PyTree, dict, str]:
  """Applies the resume order to a freshly created (sharded) ``state``.

  Args:
    config: the full config (reads ``resume``, ``init_weights`` and ``model``).
    checkpointer: the workdir's checkpointer.
    state: the scratch ``TrainState``; its shardings are kept on restore.

  Returns:
    ``(state, meta, source)``: ``meta`` holds at least ``step`` and ``data_position``;
    ``source`` says where the state came from, for the log.
  """
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  step = checkpointer.latest_step()
  if step is not None:
    check_model_config(config, checkpointer.read_meta(step), f"{checkpointer.directory}/{step}")
    restored, meta = checkpointer.restore(step, abstract)
    return restored, meta, f"workdir checkpoint at step {step}"
  if config.get("resume"):
    restored, meta = restore_checkpoint(config.resume, abstract, config)
    return restored, meta, f"config.resume={config.resume} (step {meta.get('step')})"
  if config.get("init_weights"):
    params, count, skipped = merge_params(state.params, load_params(config.init_weights))
    if count == 0:
      raise ValueError(f"config.init_weights={config.init_weights}: no parameter matches the "
                       "model (paths or shapes all differ)")
    if skipped:
      logging.info("init_weights: %d leaves keep their initialisation, e.g. %s",
                   len(skipped), skipped[:3])
    meta = {"step": 0, "data_position": 0}
    return state.replace(params=params), meta, (
        f"config.init_weights={config.init_weights} ({count} leaves loaded, "
        f"{len(skipped)} fresh)")
  return state, {"step": 0, "data_position": 0}, "scratch"
