"""Draws a trained model's predictions on images of any size; writes COCO-results JSON + PNGs.

  python scripts/predict.py --config experiments/shapes.py --workdir workdirs/shapes \
      --images 'data_cache/shapes/val/*.png' --out predictions/

Every path may be local or ``gs://`` (``--images 'gs://bucket/photos/*.jpg' --out
gs://bucket/predictions``); a missing bucket or a refused permission is one line, before the
model loads. ``--checkpoint`` picks one step folder instead of the workdir's latest.
``--batch_size N`` runs N images per call of the compiled program (the last batch padded), the
host's mask pasting and overlays of one batch overlapped with the next batch's network work;
each image's result is that of predicting it alone at that batch size. Unreadable images are
skipped and listed (in the log and in ``<out>/results.json``); they do not stop the run, but if
none can be read the exit status is 1. An ``--out`` folder holding another run's results is
refused unless ``--overwrite`` (which deletes that run's ``results.json`` and overlays, nothing
else).
A keypoint model's records carry ``keypoints`` and its overlays draw the keypoints scoring above
``config.eval.keypoint_draw_threshold`` (``--config.eval.keypoint_draw_threshold=...``), joined
by the skeletons of the config's annotation JSON.
"""

from __future__ import annotations

import _cli  # noqa: F401
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the run whose latest checkpoint to use")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a checkpoint (overrides --workdir)")
_IMAGES = flags.DEFINE_string("images", None,
                              "an image file, a folder or a glob pattern (local or gs://)")
_OUT = flags.DEFINE_string("out", None, "output folder for results.json and overlays (local or "
                           "gs://)")
_SCORE = flags.DEFINE_float("score_threshold", 0.5, "drop detections below this score")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "images per call of the compiled program")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "replace the results.json and overlays a previous run left in --out "
    "(without it such a folder is refused); other files there are kept")
flags.mark_flags_as_required(["images", "out"])


def _predict(config):
  from mrcnn_jax import inference  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.inference.predictor import check_out_dir  # pylint: disable=g-import-not-at-top
  source = _CHECKPOINT.value or _WORKDIR.value
  if not source:
    raise ValueError("give --workdir or --checkpoint")
  if _BATCH_SIZE.value < 1:
    raise ValueError(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}")
  paths = inference.expand_image_paths(_IMAGES.value)
  check_out_dir(_OUT.value, _OVERWRITE.value)  # before loading the model
  predictor = inference.Predictor.from_workdir(config, source, score_threshold=_SCORE.value,
                                                batch_size=_BATCH_SIZE.value)
  out = inference.predict_files(predictor, paths, _OUT.value, overwrite=_OVERWRITE.value)
  print(f"{len(out['overlays'])} images, {out['num_instances']} instances -> {out['results']}")
  for path, reason in out["failed"]:
    print(f"skipped (unreadable): {path}: {reason}")
  if not out["overlays"]:
    raise ValueError(f"none of the {len(paths)} images could be read (listed above and in "
                     f"{out['results']})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _cli.load_config_or_exit(_CONFIG)
  _cli.run_main(lambda _: _predict(config), argv)


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main, flags_parser=_cli.parse_flags)
