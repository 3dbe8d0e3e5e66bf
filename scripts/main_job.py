"""The README's main job: synthetic shapes -> train -> evaluate -> draw predictions -> AP.

  python scripts/main_job.py --workdir workdirs/shapes        # what `make demo` runs

1. writes the synthetic shapes data set (COCO format, 1000 train / 50 val images of 128 px;
   skipped when already there);
2. trains ``experiments/shapes.py`` in ``--workdir`` (a rerun resumes / reuses the checkpoint);
3. evaluates on the validation split (COCO bbox and segm AP, JSON in ``<workdir>/eval/``);
4. draws the predictions on validation images into ``<workdir>/predictions/``;
5. prints mask and box AP and the wall time.

Config overrides work as for train.py, e.g. ``--config.train.num_steps=100`` for a quick look,
except the data paths, which ``--data_dir`` sets (a ``--config.data.*_annotations`` or
``*_images`` override is refused: train.py takes your own data).
"""

from __future__ import annotations

import json
import os
import time

import _cli  # noqa: F401
from absl import app
from absl import flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "..", "experiments", "shapes.py"), "experiment config file",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/shapes", "output folder")
_DATA_DIR = flags.DEFINE_string("data_dir", "data_cache/shapes", "where the shapes data set goes")
_NUM_DRAW = flags.DEFINE_integer("num_draw", 8, "validation images to draw predictions on")

# The data set experiments/shapes.py's figures are for (docs/benchmarks.md, "Main job").
DEMO_DATA = dict(num_train=1000, num_val=50, size=128, seed=0)


def _holds_demo_data(paths) -> bool:
  """Whether the folder holds the demo's data set (an older, smaller one is made again)."""
  counts = []
  for key in ("train_annotations", "eval_annotations"):
    try:
      with open(paths[key]) as f:
        counts.append(len(json.load(f)["images"]))
    except (OSError, ValueError, KeyError):
      return False
  return counts == [DEMO_DATA["num_train"], DEMO_DATA["num_val"]]


def _run(config) -> None:
  from mrcnn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mrcnn_jax import inference  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top

  start = time.time()
  data_dir = _DATA_DIR.value
  paths = data_lib.shapes_data_paths(data_dir)
  overrides = config_flags.get_override_values(flags.FLAGS["config"])  # {"data.x": v, ...}
  overridden = sorted(k for k in paths if f"data.{k}" in overrides)
  if overridden:
    raise ValueError(f"main_job.py trains on the shapes data set in --data_dir; it does not take "
                     f"config.data.{', config.data.'.join(overridden)} (use scripts/train.py "
                     "for your own data)")
  if not _holds_demo_data(paths):
    print(f"[1/4] generating the shapes data set ({DEMO_DATA['num_train']} train / "
          f"{DEMO_DATA['num_val']} val images) in {data_dir}", flush=True)
    data_lib.generate_shapes(data_dir, **DEMO_DATA)
  with config.unlocked():
    config.data.update(paths)
    config.eval.at_end = True

  print(f"[2/4] training {config.train.num_steps} steps in {_WORKDIR.value}", flush=True)
  result = train_and_evaluate(config, _WORKDIR.value)
  metrics = result["eval"]
  print("[3/4] evaluated on the validation split", flush=True)

  out_dir = os.path.join(_WORKDIR.value, "predictions")
  images = inference.expand_image_paths(paths["eval_images"])[:_NUM_DRAW.value]
  predictor = inference.Predictor.from_workdir(config, _WORKDIR.value)
  drawn = inference.predict_files(predictor, images, out_dir)
  montage = os.path.join(out_dir, "montage.png")
  inference.save_png(_montage(predictor, images), montage)
  print(f"[4/4] drew {len(drawn['overlays'])} predictions in {out_dir} (all: {montage})",
        flush=True)

  segm, bbox = metrics["segm"], metrics["bbox"]
  timing = metrics["timing"]
  print(f"\nmask AP {segm['AP']:.3f}  AP50 {segm['AP50']:.3f}  AP75 {segm['AP75']:.3f}   "
        f"box AP {bbox['AP']:.3f}  AP50 {bbox['AP50']:.3f}")
  print(f"per class mask AP: " + ", ".join(
      f"{k} {v:.3f}" for k, v in sorted(segm["per_category"].items())))
  print(f"eval {timing['images_per_second']:.1f} images/s; total wall time "
        f"{(time.time() - start) / 60:.1f} min; results in "
        f"{os.path.join(_WORKDIR.value, 'eval')}")


def _montage(predictor, paths, factor: int = 3):
  """The predictions on ``paths`` drawn 3x enlarged (the images are 128 px), in one grid."""
  from mrcnn_jax import inference  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.inference import visualize  # pylint: disable=g-import-not-at-top
  tiles = []
  for path in paths:
    image = inference.load_image(path)
    r = predictor(image)
    big, boxes, masks = visualize.upscale(image, r["boxes"], r["masks"], factor)
    tiles.append(visualize.draw_instances(big, boxes, r["scores"], r["labels"], masks))
  return visualize.make_grid(tiles, cols=4)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _cli.load_config_or_exit(_CONFIG)
  _cli.run_main(lambda _: _run(config), argv)


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main, flags_parser=_cli.parse_flags)
