"""Evaluates a trained run on its config's eval split (COCO AP of ``config.eval.iou_types``:
bbox, segm and / or keypoints).

  python scripts/evaluate.py --config experiments/shapes.py --workdir workdirs/shapes \
      [--checkpoint workdirs/shapes/checkpoints/1500]

Takes the multi-process flags of ``train.py`` (``--distributed``, ``--coordinator_address``,
``--num_processes``, ``--process_id``): each process scores its share of the images.
Prints the COCO numbers per IoU type (12; 10 for keypoints) and per-category AP; writes
``<workdir>/eval/metrics_*.json`` and ``detections_*.json``. The workdir and the checkpoint may
be local or ``gs://``.
"""

from __future__ import annotations

import _cli  # noqa: F401
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's folder; results go to <workdir>/eval")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "a checkpoint step folder (default: the workdir's latest)")
flags.mark_flags_as_required(["workdir"])
_DISTRIBUTED = _cli.define_distributed_flags()


def _evaluate(config):
  from mrcnn_jax.evaluation import coco_eval  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.evaluation.evaluator import evaluate_checkpoint  # pylint: disable=g-import-not-at-top
  metrics = evaluate_checkpoint(config, _CHECKPOINT.value or _WORKDIR.value, _WORKDIR.value)
  print(metrics["data"]["summary"])
  print(coco_eval.format_metrics({k: metrics[k] for k in config.eval.iou_types}))
  t = metrics["timing"]
  print(f"{t['num_images']} images, {t['images_per_second']:.1f} images/s, post-processing "
        f"{100 * t['postprocess_share']:.0f}% of the inference loop")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _cli.run_main(lambda _: _DISTRIBUTED.initialize(), argv)  # before any other JAX call
  config = _cli.load_config_or_exit(_CONFIG)
  _cli.run_main(lambda _: _evaluate(config), argv)


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main, flags_parser=_cli.parse_flags)
