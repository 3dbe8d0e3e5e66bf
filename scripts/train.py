"""Trains (and evaluates) an experiment; restarting with the same workdir resumes it.

  python scripts/train.py --config experiments/shapes.py --workdir workdirs/shapes \
      --config.train.num_steps=2000 --config.train.batch_size=8

A thin wrapper over ``mrcnn_jax.training.train_and_evaluate(config, workdir)``.
"""

from __future__ import annotations

import _cli  # noqa: F401  (sets TensorFlow's log level before anything imports it)
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (checkpoints, TensorBoard, eval)")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _cli.load_config_or_exit(_CONFIG)
  from mrcnn_jax.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  _cli.run_main(lambda _: train_and_evaluate(config, _WORKDIR.value), argv)


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main, flags_parser=_cli.parse_flags)
