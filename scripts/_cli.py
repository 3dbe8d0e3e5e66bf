"""Shared bits of the entry points: console logging and one-line errors. Not a library module."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

from absl import logging  # noqa: E402

# Errors a user can fix from the command line: printed as one line, exit status 1.
USER_ERRORS = (OSError, ValueError, KeyError, FloatingPointError)  # OSError: missing files, storage

# Exit status when another process of the run is gone: EX_TEMPFAIL, a rerun may well succeed.
EXIT_PROCESS_GONE = 75


def setup_logging() -> None:
  """INFO to the console, without orbax's per-save and TensorFlow's bookkeeping lines."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  handler.addFilter(lambda r: "/orbax/" not in r.pathname and "/tensorflow/" not in r.pathname
                    and "/etils/" not in r.pathname)
  std_logging.getLogger("jax").setLevel(std_logging.WARNING)


def parse_flags(argv):
  """absl's flag parsing with a one-line error (``app.run(main, flags_parser=parse_flags)``)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {str(e).splitlines()[0]} (see --helpfull)", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # the --config file is missing or does not load
    print(f"error: could not load --config: {str(e).splitlines()[-1].strip()}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # A --config.x.y=... override that names no field or has the wrong type, or a config file
    # that fails to load: ml_collections raises these while the flags are parsed.
    message = str(e).splitlines()[0].strip("\"'") if str(e) else type(e).__name__
    print(f"error: bad --config or --config.* override: {message}", file=sys.stderr)
    sys.exit(2)


def run_main(fn, argv):
  """Returns ``fn(argv)``; a user error becomes ``error: <message>`` on stderr and exit 1."""
  try:
    return fn(argv)
  except USER_ERRORS as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


class DistributedFlags:
  """``--distributed`` / ``--coordinator_address`` / ``--num_processes`` / ``--process_id`` /
  ``--local_device_ids``: define them at import time (:func:`define_distributed_flags`), then
  call :meth:`initialize` first thing in ``main``, before anything touches JAX."""

  def __init__(self):
    from absl import flags  # pylint: disable=g-import-not-at-top
    self.mode = flags.DEFINE_enum(
        "distributed", "auto", ["auto", "on", "off"],
        "multi-process start-up: auto = when a SLURM (srun, >1 task) / Open MPI (>1 rank) job or "
        "a Cloud TPU VM is detected, or --coordinator_address is given; on = always; off = never")
    self.coordinator_address = flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0, reachable from all processes (not needed under SLURM, "
        "Open MPI 4 or on Cloud TPU)")
    self.num_processes = flags.DEFINE_integer("num_processes", None,
                                              "number of processes (detected where possible)")
    self.process_id = flags.DEFINE_integer("process_id", None,
                                           "this process's rank in [0, num_processes)")
    self.local_device_ids = flags.DEFINE_list(
        "local_device_ids", None, "comma-separated local device ids this process uses "
        "(e.g. one GPU per process; default: all, or JAX's choice under SLURM / Open MPI)")

  def initialize(self):
    """``mrcnn_jax.run.distributed.initialize`` with the flags' values."""
    from mrcnn_jax.run import distributed  # pylint: disable=g-import-not-at-top
    ids = self.local_device_ids.value
    return distributed.initialize(
        self.coordinator_address.value, self.num_processes.value, self.process_id.value,
        None if ids is None else [int(i) for i in ids], mode=self.mode.value)


def define_distributed_flags() -> DistributedFlags:
  """Defines the multi-process flags (train.py, evaluate.py)."""
  return DistributedFlags()


def _last_checkpoint(workdir: str) -> str:
  """``'step N'``: the newest checkpoint orbax committed in ``workdir``; or ``'none'``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.run import checkpoint, paths  # pylint: disable=g-import-not-at-top
  try:
    steps = ocp.step.checkpoint_steps(paths.join(workdir, checkpoint.CHECKPOINT_DIR))
  except Exception:  # pylint: disable=broad-except  # the line must come out regardless
    return "unknown"
  return f"step {max(steps)}" if steps else "none"


@contextlib.contextmanager
def exit_when_a_process_is_gone(workdir: str):
  """Runs the block; if another process of the run dies, prints one line and exits 75.

  Without this, a survivor shows a gloo traceback or hangs in a collective, then waits in JAX's
  shutdown barrier and aborts with a C++ fatal-error dump a minute or more later. Here it is
  ``error: process 1 of 2 is gone; last complete checkpoint: step 20; rerun the same command
  to resume`` within seconds, and ``os._exit``: the shutdown barrier (an atexit handler) would
  wait for the dead process. A no-op on one process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mrcnn_jax.run import distributed  # pylint: disable=g-import-not-at-top

  def on_lost(index: int) -> None:
    print(f"error: process {index} of {jax.process_count()} is gone; last complete checkpoint: "
          f"{_last_checkpoint(workdir)}; rerun the same command to resume", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PROCESS_GONE)  # pylint: disable=protected-access

  with distributed.PeerWatch(on_lost) as watch:
    try:
      yield
    except Exception:  # pylint: disable=broad-except
      # A failed collective (gloo: "Connection closed by peer"), or a checkpoint wait, may be
      # the first sign of a dead process: if the watch confirms one, on_lost ends this process.
      watch.wait_for_lost()
      raise


def load_config_or_exit(config_flag):
  """The ``--config`` value, or a one-line error if the flag is missing or its file is bad."""
  try:
    config = config_flag.value
    if config is not None:
      list(config.keys())  # a config that failed to load raises only when first used
  except Exception as e:  # pylint: disable=broad-except  # config file errors come in many types
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    print(f"error: could not load --config: {lines[-1]}", file=sys.stderr)
    sys.exit(1)
  if config is None:
    print("error: --config is required (e.g. --config experiments/shapes.py)", file=sys.stderr)
    sys.exit(1)
  return config
