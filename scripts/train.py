"""Trains (and evaluates) an experiment; restarting with the same workdir resumes it.

  python scripts/train.py --config experiments/shapes.py --workdir workdirs/shapes \
      --config.train.num_steps=2000 --config.train.batch_size=8

Several processes (hosts) run the same command; the workdir must be shared by all of them:

  # SLURM (srun, one task per GPU or per node) and Cloud TPU pods: detected, no extra flags.
  srun python scripts/train.py --config ... --workdir /shared/run
  # Anything else: name the coordinator (process 0's host and a free port) and the ranks.
  python scripts/train.py ... --coordinator_address=host0:12345 --num_processes=2 --process_id=0
  python scripts/train.py ... --coordinator_address=host0:12345 --num_processes=2 --process_id=1

``--distributed=auto|on|off`` (default auto) says whether to start JAX's multi-process runtime;
see ``mrcnn_jax.run.distributed``. If a process dies (killed, its host lost), each of the
others prints ``error: process K of N is gone; last complete checkpoint: step S; rerun the same
command to resume`` within seconds and exits with status 75. A thin wrapper over
``mrcnn_jax.training.train_and_evaluate(config, workdir)``.
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
_DISTRIBUTED = _cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _cli.run_main(lambda _: _DISTRIBUTED.initialize(), argv)  # before any other JAX call
  config = _cli.load_config_or_exit(_CONFIG)
  from mrcnn_jax.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  with _cli.exit_when_a_process_is_gone(_WORKDIR.value):
    _cli.run_main(lambda _: train_and_evaluate(config, _WORKDIR.value), argv)


if __name__ == "__main__":
  _cli.setup_logging()
  app.run(main, flags_parser=_cli.parse_flags)
