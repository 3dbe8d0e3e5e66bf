r"""Trains our Mask R-CNN and torchvision's from the same converted weights, on the same synthetic
data in the same order, with the same recipe, over several seeds; writes both loss curves and
each one's final box / mask AP (pycocotools) to --out (issue 28).

See ``mrcnn_jax.benchmarks.training_vs_torchvision`` for what is matched and how, and
docs/benchmarks.md ("Training vs torchvision") for the figures. The verdict per figure: the
two frameworks' means over seeds differ by at most the spread over seeds.

Usage::

  python scripts/compare_training.py --out /tmp/training_vs_torchvision   # 300 steps, seeds 0,1,2
  python scripts/compare_training.py --steps 40 --seeds 0 --noevaluate --out /tmp/short
"""

# torchvision segfaults if imported after TensorFlow: load it before anything else.
import torch  # noqa: I001

import functools

from absl import app
from absl import flags
from absl import logging

from mrcnn_jax.benchmarks import training_vs_torchvision as tvt
import _cli  # scripts/_cli.py

_DEFAULT = tvt.Recipe()
_STEPS = flags.DEFINE_integer("steps", _DEFAULT.steps, "SGD steps per run.", lower_bound=1)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"],
                           "Seeds: initial weights, batch order, sampling.")
_BATCH = flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Images per step.",
                              lower_bound=1)
_LR = flags.DEFINE_float("learning_rate", _DEFAULT.learning_rate, "Peak learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", _DEFAULT.warmup_steps,
                               "Linear warm-up steps (from 0.001x).", lower_bound=1)
_TRAIN = flags.DEFINE_integer("num_train", _DEFAULT.num_train, "Training images.", lower_bound=1)
_VAL = flags.DEFINE_integer("num_val", _DEFAULT.num_val, "Validation images.", lower_bound=1)
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Score both with pycocotools at the end.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 1, "torch.set_num_threads (JAX uses every core). 1: this narrow model "
    "gains little from a second thread, and torch's OpenMP threads run 10-20x slower when "
    "another process shares the cores.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "training_vs_torchvision",
                           "Folder for training_vs_torchvision.json and .png.")


def _recipe_and_seeds(argv):
  del argv
  recipe = tvt.Recipe(steps=_STEPS.value, batch_size=_BATCH.value, learning_rate=_LR.value,
                      warmup_steps=_WARMUP.value, num_train=_TRAIN.value, num_val=_VAL.value)
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise ValueError(f"--seeds takes integers, got {','.join(_SEEDS.value)}") from None
  return recipe, seeds


def main(argv):
  recipe, seeds = _cli.run_main(_recipe_and_seeds, argv)
  logging.set_verbosity(logging.WARNING)
  torch.set_num_threads(_TORCH_THREADS.value)
  log = functools.partial(print, flush=True)
  results = tvt.run(recipe, seeds, evaluate=_EVALUATE.value, log=log)
  log(tvt.format_summary(results["summary"]))
  for path in tvt.write(results, _OUT.value):
    log(f"wrote {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
