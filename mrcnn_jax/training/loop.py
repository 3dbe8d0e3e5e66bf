"""The training loop: ``train_and_evaluate(config, workdir)``.

One call trains an experiment from its config, in a notebook or from ``scripts/train.py``:
builds the mesh, model, state and input; resumes (see :mod:`mrcnn_jax.run.checkpoint` for
the order); compiles the sharded step once per training input shape (``config.data.buckets``,
else ``image_size``) before the first step and runs each batch on its shape's program; fetches
metrics every ``config.log.every_steps`` steps (the device is never blocked on a per-step
transfer); writes TensorBoard scalars and prediction images and a console progress line
(process 0 only); checkpoints on the interval, at the end and on SIGTERM; evaluates
periodically and at the end.

Multi-process (after :func:`mrcnn_jax.run.distributed.initialize`): every process runs this
same function; the mesh spans the devices of all of them, each feeds its own slice of the batch,
all of them take part in every checkpoint save/restore (orbax coordinates them), and a SIGTERM
that reaches any of them stops all of them after the same step (:class:`_StopSignal`).

A non-finite loss or gradient norm stops the run with ``FloatingPointError`` naming the step and
the offending values. Metrics are flushed (and checked) before every checkpoint, so the last
checkpoint on disk always holds a state reached by finite losses and finite updates (a step's
``grad_norm`` is that of the update it applied: finite losses with an infinite gradient would
otherwise save NaN parameters).
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from mrcnn_jax import data as data_lib
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax.evaluation import coco_eval
from mrcnn_jax.evaluation import evaluator as evaluator_lib
from mrcnn_jax.inference import batch_predict
from mrcnn_jax.run import checkpoint as ckpt_lib
from mrcnn_jax.run import checks
from mrcnn_jax.run import distributed as distributed_lib
from mrcnn_jax.run import paths
from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import train_state as train_state_lib
from mrcnn_jax.training import train_step as train_step_lib

PyTree = Any


# ------------------------------------------------------------------------------------------ setup

class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks between steps (checkpoint, then a clean exit)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _StopSignal:
  """SIGTERM -> "save and stop after this step", decided by every process at the same step.

  One process: :class:`_SigtermFlag`, read after each step. Several: the hosts may get the
  signal at different steps, or only one of them does, and a host that left the loop alone
  would leave the others hanging in the next collective. So the decision is collective: with
  JAX's preemption service (on by default after ``jax.distributed.initialize``; its notifier
  owns SIGTERM) every process asks ``reached_preemption_sync_point(step)``, which costs nothing
  until a notice arrives and then turns true everywhere at one step past every process's
  current one; without the service, the flags are all-gathered after every step (a host sync
  per step: slower, still correct).
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._service = self._multi and distributed_lib.preemption_sync_available()
    self._flag = _SigtermFlag()
    if self._multi and not self._service:
      logging.warning("JAX's preemption service is off: SIGTERM is agreed on by an all-gather "
                      "after every step")

  def __enter__(self):
    if not self._service:  # the service's notifier catches SIGTERM; a handler here would steal it
      self._flag.__enter__()
    return self

  def __exit__(self, *exc):
    if not self._service:
      self._flag.__exit__(*exc)

  def should_stop(self, step: int) -> bool:
    """Called by every process after dispatching step ``step`` (increasing, every step)."""
    if self._service:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if self._multi:
      flags = multihost_utils.process_allgather(np.asarray([self._flag.received]))
      return bool(np.any(flags))
    return self._flag.received


# ------------------------------------------------------------------------------------ logging

class _Writer:
  """TensorBoard scalars and images, on process 0 only (else no-ops).

  Written with ``tf.summary.write`` and the TensorBoard plugins' metadata (``scalars``,
  ``images``), the format ``tf.summary.scalar`` / ``image`` produce, so the files open in
  TensorBoard while the ``tensorboard`` package itself is not needed to write them.
  """

  def __init__(self, workdir: str, enabled: bool):
    self._writer = None
    if enabled and jax.process_index() == 0:
      self._meta = {
          name: summary_pb2.SummaryMetadata(
              plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=name))
          for name in ("scalars", "images")}
      self._writer = tf.summary.create_file_writer(paths.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for k, v in values.items():
        tf.summary.write(k, tf.constant(float(v), tf.float32), step=step,
                         metadata=self._meta["scalars"])

  def images(self, step: int, name: str, images: list) -> None:
    if self._writer is None or not images:
      return
    with self._writer.as_default():
      for i, image in enumerate(images):
        image = np.asarray(image, np.uint8)
        # The images plugin's tensor: [width, height, encoded image...] as strings.
        png = tf.io.encode_png(image).numpy()
        tensor = tf.constant([str(image.shape[1]), str(image.shape[0]), png])
        tf.summary.write(f"{name}/{i}", tensor, step=step, metadata=self._meta["images"])

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


# Checked at every flush: the losses, and the norm of the gradient each step applied.
_CHECKED_FINITE = frozenset(train_step_lib.LOSS_KEYS) | {"total_loss", "grad_norm"}


class _MetricBuffer:
  """Per-step metric dicts kept on device until :meth:`flush` fetches them in one transfer."""

  def __init__(self):
    self.pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def flush(self) -> Optional[dict]:
    """Fetches, checks finiteness, and returns the means (or ``None`` if nothing is pending)."""
    if not self.pending:
      return None
    steps, device_metrics = zip(*self.pending)
    self.pending = []
    host = jax.device_get(list(device_metrics))
    for step, m in zip(steps, host):
      bad = {k: float(v) for k, v in m.items()
             if k in _CHECKED_FINITE and not np.isfinite(v)}
      if bad:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step}: {bad}; stopping (the last checkpoint "
            "holds the last state reached with finite losses and gradients)")
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


# ------------------------------------------------------------------------------ compilation

def _compile_train_steps(step_fn, state, config: ml_collections.ConfigDict, mesh) -> dict:
  """``{(h, w): program}``: the train step compiled for each training input shape (the
  ``config.data.buckets``, or ``image_size``), ahead of the first step, so no step waits on a
  compile (the loop's barrier before its first step then lets all processes start together).

  A ``step_fn`` without ``lower`` (not a jitted function) is used as it is, for every shape.
  """
  batch_size = int(config.train.batch_size)
  sharding = sharding_lib.batch_sharding(mesh)
  programs = {}
  for size, spec in data_lib.train_batch_specs(config, batch_size).items():
    if not hasattr(step_fn, "lower"):
      programs[size] = step_fn
      continue
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
             for k, (shape, dtype) in spec.items()}
    t0 = time.perf_counter()
    programs[size] = step_fn.lower(state, batch).compile()
    if jax.process_index() == 0:
      logging.info("train step compiled for %dx%d inputs (batch %d) in %.1fs", size[0], size[1],
                   batch_size, time.perf_counter() - t0)
  return programs


def _program_for(programs: dict, batch: dict):
  """The compiled train step for ``batch``'s image shape."""
  size = tuple(batch["image"].shape[1:3])
  if size not in programs:
    raise ValueError(f"a training batch of {size[0]}x{size[1]} images, but the train step was "
                     f"compiled for {sorted(programs)} (config.data.buckets / image_size)")
  return programs[size]


# --------------------------------------------------------------------------------------- loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint), then evaluates.

  Args:
    config: the full experiment config (``mrcnn_jax.config.get_base_config()`` + overrides).
    workdir: output folder: ``checkpoints/``, ``tensorboard/``, ``eval/``, ``config.json``.

  Returns:
    ``{'step': final step, 'train': last fetched train metrics, 'eval': last eval metrics
    (without images) or None, 'source': where the starting state came from,
    'stopped_by_sigterm': bool}``.
  """
  workdir = paths.resolve(workdir)
  is_main = jax.process_index() == 0
  want_eval = bool(config.eval.every_steps) or bool(config.eval.at_end)
  checks.check_data_paths(config, train=True, evaluate=want_eval)
  checks.check_weight_paths(config)
  if is_main:
    paths.check_writable_dir("workdir", workdir)
    with paths.one_line_errors("workdir", workdir):
      (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

  mesh = sharding_lib.make_run_mesh(config)
  sharding_lib.check_batch_size(int(config.train.batch_size), mesh)
  model = modeling.MaskRCNN(config.model, kernels=kernels.select(config.kernels, mesh=mesh),
                            mesh=mesh)
  optimizer = train_state_lib.default_optimizer(config)
  state = train_state_lib.create_train_state(config, model, jax.random.PRNGKey(config.seed), mesh,
                                             optimizer=optimizer)
  checkpointer = ckpt_lib.make_checkpointer(config, workdir)
  state, meta, source = ckpt_lib.restore_or_initialize(config, checkpointer, state)
  start_step = int(jax.device_get(state.step))
  data_position = int(meta.get("data_position", start_step))
  num_steps = int(config.train.num_steps)
  logging.info("process %d/%d, %d devices; starting at step %d of %d from %s",
               jax.process_index(), jax.process_count(), mesh.size, start_step, num_steps,
               source)

  train_data = data_lib.build_train_dataset(config, start_step=data_position)
  checks.check_num_classes(config, train_data.categories)
  eval_data = None
  evaluator = None
  if want_eval:
    eval_data = data_lib.build_eval_dataset(config)
    evaluator = evaluator_lib.Evaluator(config, batch_predict.make_batch_predict(model, mesh), mesh)
  step_fn = train_step_lib.make_train_step(config, model, mesh, state, optimizer=optimizer)
  programs = _compile_train_steps(step_fn, state, config, mesh)  # one per input shape
  writer = _Writer(workdir, bool(config.log.tensorboard))
  buffer = _MetricBuffer()
  log_every = max(int(config.log.every_steps), 1)
  batch_size = int(config.train.batch_size)

  def run_eval(step: int) -> dict:
    t0 = time.perf_counter()
    metrics = evaluator.evaluate(
        state.variables(), eval_data, workdir=workdir, step=step, progress=is_main,
        num_images_to_draw=int(config.eval.num_images_to_draw))
    if is_main:
      logging.info("step %d eval (%.0fs): %s\n%s", step, time.perf_counter() - t0,
                   metrics["data"]["summary"],
                   coco_eval.format_metrics({k: metrics[k] for k in config.eval.iou_types}))
    scalars = {f"eval/{k}": v for k, v in coco_eval.summary_scalars(metrics).items()}
    scalars["eval/images_per_second"] = metrics["timing"]["images_per_second"]
    scalars["eval/postprocess_share"] = metrics["timing"]["postprocess_share"]
    writer.scalars(step, scalars)
    writer.images(step, "predictions", metrics.pop("images", []))
    writer.flush()
    return metrics

  # Throughput over the window since the last fetch; the first window includes compilation, so
  # the ETA uses the most recent window only.
  window = {"t": time.perf_counter(), "step": start_step}
  last_train: dict = {}

  def flush_and_log(step: int) -> None:
    means = buffer.flush()
    if means is None:
      return
    now = time.perf_counter()
    steps_done = step - window["step"]
    dt = now - window["t"]
    window.update(t=now, step=step)
    if steps_done <= 0:
      return
    step_time = dt / steps_done
    means["images_per_second"] = batch_size * steps_done / max(dt, 1e-9)
    means["step_time"] = step_time
    last_train.clear()
    last_train.update(means)
    writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
    if is_main:
      eta = _format_eta((num_steps - step) * step_time)
      logging.info("step %d/%d  loss %.4f  (mask %.3f)  lr %.4g  %.1f img/s  %.2fs/step  ETA %s",
                   step, num_steps, means["total_loss"], means.get("roi_mask", math.nan),
                   means["learning_rate"], means["images_per_second"], step_time, eta)

  def save(step: int, force: bool = False) -> None:
    if not force and not checkpointer.should_save(step):
      return
    flush_and_log(step)  # a checkpoint is written only after its losses were seen finite
    # One batch per step, so the data position is the step (the pipeline resumes without
    # replaying: build_train_dataset(start_step=...)).
    checkpointer.save(step, state, ckpt_lib.checkpoint_meta(config, step, step), force=force)

  eval_metrics = None
  stopped = False
  iterator = iter(train_data)
  try:
    with _StopSignal() as stop_signal:
      for step in range(start_step, num_steps):
        host_batch = next(iterator)
        batch = sharding_lib.make_global_batch(host_batch, mesh)
        if step == start_step:  # all processes start stepping together (a no-op on one)
          distributed_lib.barrier("train_step")
        state, metrics = _program_for(programs, batch)(state, batch)
        buffer.add(step + 1, metrics)  # steps count from 1, as in the progress line
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
          flush_and_log(step + 1)
        save(step + 1)
        if stop_signal.should_stop(step):
          logging.warning("SIGTERM%s: saving a checkpoint at step %d and stopping",
                          " (to one or more processes; all stop here)" if jax.process_count() > 1
                          else "", step + 1)
          save(step + 1, force=True)
          stopped = True
          break
        if evaluator is not None and config.eval.every_steps and (
            (step + 1) % int(config.eval.every_steps) == 0) and step + 1 < num_steps:
          eval_metrics = run_eval(step + 1)
      final_step = int(jax.device_get(state.step))
      flush_and_log(final_step)
      if not stopped:
        save(final_step, force=True)
  finally:
    # Also when the loop raises (a non-finite loss): the save in flight holds a state whose
    # losses were seen finite, and an async save still pending at interpreter exit is lost.
    checkpointer.close()
  if not stopped and evaluator is not None and config.eval.at_end:
    eval_metrics = run_eval(final_step)
  writer.flush()
  stats = train_data.stats.as_dict()
  if stats:
    logging.info("data: %s", stats)
  return {"step": final_step, "train": dict(last_train), "eval": eval_metrics,
          "source": source, "stopped_by_sigterm": stopped}
