r"""Where the time of the compiled model goes on this machine, per module, in milliseconds.

Profiles the jitted ``predict`` (or the train step, ``--mode train``) of the default R50-FPN
config and adds the XLA operations' times up per model module; see
``mrcnn_jax.benchmarks.profiling``.

Usage::

  python scripts/profile_model.py                                  # predict, 512x512, 5 runs
  python scripts/profile_model.py --height 800 --width 1216 --depth 3 --top 30
  python scripts/profile_model.py --mode train --batch 2
"""

from __future__ import annotations

from absl import app
from absl import flags

from mrcnn_jax.benchmarks import profiling

_MODE = flags.DEFINE_enum("mode", "predict", ["predict", "train"], "what to profile")
_HEIGHT = flags.DEFINE_integer("height", 512, "image height (a multiple of 32)")
_WIDTH = flags.DEFINE_integer("width", 512, "image width (a multiple of 32)")
_BATCH = flags.DEFINE_integer("batch", 1, "images per call")
_RUNS = flags.DEFINE_integer("runs", 5, "profiled runs (per-operation minimum over them)")
_DEPTH = flags.DEFINE_integer("depth", 2, "module path components per row")
_TOP = flags.DEFINE_integer("top", 15, "slowest single operations to list")
_PREPARE = flags.DEFINE_bool("prepare", True, "predict: variables through "
                             "kernels.prepare_inference, as inference.Predictor does")
_YNN_DOTS = flags.DEFINE_bool(
    "ynn_dots", True, "predict: compile with XLA's default options, whose dots run in "
    "YNNPACK and are timed by the trace. --noynn_dots compiles as inference.Predictor does "
    "(kernels.compiler_options(): Eigen's dots, which run asynchronously: the "
    "trace times only their dispatch, so the table leaves their time out)")


def main(argv):
  del argv
  print(profiling.profile_model(_MODE.value, _HEIGHT.value, _WIDTH.value, _BATCH.value,
                                _RUNS.value, _DEPTH.value, _TOP.value, _PREPARE.value,
                                _YNN_DOTS.value))


if __name__ == "__main__":
  app.run(main)
