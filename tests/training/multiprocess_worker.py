"""One process of a multi-process test: runs ``scripts/train.py`` or ``scripts/evaluate.py``.

Launched by ``tests/training/test_multiprocess.py`` (never imported by pytest as a test)::

  python tests/training/multiprocess_worker.py --script=train --record_dir=DIR \\
      [--sigterm_at_step=K --sigterm_process=1] -- \\
      --config=tests/training/multiprocess_worker.py:DATA_DIR --workdir=W \\
      --coordinator_address=localhost:PORT --num_processes=2 --process_id=0

The real entry point runs unchanged; this wrapper only watches it and writes
``DIR/record_<process index>.json``: the run's result, the losses of every step, the image ids
this process scored, and the metrics. ``--sigterm_at_step=K`` sends
SIGTERM to this process (only where ``jax.process_index() == --sigterm_process``) right after
it dispatches step ``K``: a deterministic stand-in for a preemption notice reaching one host.

The module also serves as the experiment config (``get_config``): a tiny Mask R-CNN on 64 px
synthetic shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSS_KEYS = ("total_loss", "rpn_objectness", "rpn_box", "roi_class", "roi_box", "roi_mask")


def get_config(data_dir: str):
  """The tiny experiment on a shapes folder (``python -m mrcnn_jax.data.shapes`` layout)."""
  from mrcnn_jax.config import get_base_config  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.data import shapes_data_paths  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.modeling.config import tiny_model_config  # pylint: disable=g-import-not-at-top

  c = get_base_config()
  c.data.update(shapes_data_paths(data_dir))
  c.data.image_size = (64, 64)
  c.data.max_instances = 8
  c.data.mask_size = 16
  c.data.eval_batch_size = 4  # 2 per process with 2 processes
  c.data.num_parallel_calls = 2
  c.model = tiny_model_config(num_classes=4)
  c.model.roi.score_threshold = 0.0  # an untrained model still outputs boxes to compare
  c.train.batch_size = 4  # global: 2 per process with 2 processes, 1 per device
  c.train.num_steps = 4
  c.train.warmup_steps = 2
  c.train.decay_steps = (3,)
  c.checkpoint.every_steps = 2
  c.checkpoint.max_to_keep = 5
  c.checkpoint.async_save = True
  c.eval.at_end = True
  c.eval.every_steps = 0
  c.log.every_steps = 1
  c.log.tensorboard = False
  return c


def _instrument(args, record: dict) -> None:
  """Patches the library so the run reports what it did (the code paths stay the real ones)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.evaluation import coco_eval  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.training import loop  # pylint: disable=g-import-not-at-top

  device_metrics = record.setdefault("_device_metrics", {})
  original_add = loop._MetricBuffer.add  # pylint: disable=protected-access

  def add(self, step, metrics):
    device_metrics[int(step)] = {k: metrics[k] for k in LOSS_KEYS}  # fetched after the run
    original_add(self, step, metrics)
    if (args.sigterm_at_step is not None and step == args.sigterm_at_step
        and jax.process_index() == args.sigterm_process):
      record["sigterm_sent_at_step"] = int(step)
      os.kill(os.getpid(), signal.SIGTERM)

  loop._MetricBuffer.add = add  # pylint: disable=protected-access

  original_to_coco = coco_eval.detections_to_coco

  def detections_to_coco(det, host_batch, *a, **kw):
    valid = host_batch["example_valid"].astype(bool)
    record.setdefault("eval_image_ids", []).extend(int(i) for i in host_batch["image_id"][valid])
    return original_to_coco(det, host_batch, *a, **kw)

  coco_eval.detections_to_coco = detections_to_coco

  original_train = loop.train_and_evaluate

  def train_and_evaluate(config, workdir):
    result = original_train(config, workdir)
    record["result"] = result
    return result

  loop.train_and_evaluate = train_and_evaluate

  original_eval_ckpt = evaluator_lib.evaluate_checkpoint

  def evaluate_checkpoint(*a, **kw):
    metrics = original_eval_ckpt(*a, **kw)
    record["result"] = {"eval": metrics}
    return metrics

  evaluator_lib.evaluate_checkpoint = evaluate_checkpoint


def _write(record: dict, record_dir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  device_metrics = record.pop("_device_metrics", {})
  record["losses"] = {str(s): {k: float(np.asarray(jax.device_get(v))) for k, v in m.items()}
                      for s, m in sorted(device_metrics.items())}
  result = record.get("result") or {}
  ev = result.get("eval")
  if ev is not None:
    result["eval"] = {k: ev[k] for k in ("bbox", "segm", "timing") if k in ev}
    for iou in ("bbox", "segm"):
      if iou in result["eval"]:
        result["eval"][iou] = {k: v for k, v in result["eval"][iou].items()
                               if k != "per_category"}
  record["process_index"] = jax.process_index()
  record["process_count"] = jax.process_count()
  os.makedirs(record_dir, exist_ok=True)
  with open(os.path.join(record_dir, f"record_{jax.process_index()}.json"), "w") as f:
    json.dump(record, f, indent=1, default=float)


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--script", choices=("train", "evaluate"), required=True)
  parser.add_argument("--record_dir", required=True)
  parser.add_argument("--sigterm_at_step", type=int, default=None)
  parser.add_argument("--sigterm_process", type=int, default=0)
  args, rest = parser.parse_known_args()
  if rest and rest[0] == "--":
    rest = rest[1:]
  record: dict = {"argv": rest}
  _instrument(args, record)
  script = os.path.join(REPO, "scripts", f"{args.script}.py")
  sys.path.insert(0, os.path.dirname(script))  # the scripts import their sibling `_cli`
  sys.argv = [script] + rest
  code = 0
  try:
    runpy.run_path(script, run_name="__main__")
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  if code == 0:
    _write(record, args.record_dir)
  return code


if __name__ == "__main__":
  sys.exit(main())
