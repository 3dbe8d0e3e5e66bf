r"""Benchmarks Mask R-CNN R50-FPN in JAX against torchvision's on this machine, in one run.

See ``mrcnn_jax.benchmarks.model_vs_torchvision`` for what is measured and how, and
docs/benchmarks.md for the current figures. ``--threads`` is the thread count of both
frameworks (on CPU each measuring process is pinned to that many cores; ``--threads 1``
compares the two on one core). On a GPU host torchvision runs on the same GPU; run it there
with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (else the parent and each JAX process would take
75% of the GPU's memory at start-up).

Usage::

  python scripts/benchmark.py                      # everything
  python scripts/benchmark.py --skip_train --rounds 1 --repeats 2   # inference only
  python scripts/benchmark.py --skip_torch --repeats 2
"""

# torchvision segfaults if imported after TensorFlow: load it before anything else.
import torch  # noqa: I001
import torchvision  # noqa: F401

import dataclasses
import functools
import json
import os
import sys

from absl import app
from absl import flags
import jax

from mrcnn_jax.benchmarks import model_vs_torchvision as mvt
from mrcnn_jax.benchmarks import torchvision_reference
import _cli  # scripts/_cli.py

_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per measurement (median reported)")
_THREADS = flags.DEFINE_integer(
    "threads", 2, "threads per framework: torch.set_num_threads, and on CPU each measuring "
    "process pinned to this many cores, which XLA sizes its CPU thread pools from",
    lower_bound=1)
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "time the JAX model only")
_SKIP_TRAIN = flags.DEFINE_bool("skip_train", False, "skip the train-step measurements")
_DTYPE = flags.DEFINE_string("compute_dtype", "float32", "JAX activation dtype")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "> 0: each framework runs in its own fresh process, JAX and torchvision "
    "processes taking turns for this many rounds; 0: both in this process")
_TORCH_DEVICE = flags.DEFINE_enum(
    "torch_device", None, ["cpu", "cuda"], "where torchvision runs; default: 'cuda' when JAX's "
    "default backend is a GPU (the same GPU for both), else 'cpu'")
_ONLY = flags.DEFINE_enum("only", None, ["jax", "torch"],
                          "internal: measure one framework and print its rows as JSON")


def main(argv):
  torch.set_num_threads(_THREADS.value)
  log = functools.partial(print, flush=True)
  options = mvt.Options(_REPEATS.value, _THREADS.value, _SKIP_TORCH.value, _SKIP_TRAIN.value,
                        _DTYPE.value, _ROUNDS.value, _TORCH_DEVICE.value)
  if _ONLY.value:  # a measuring process, started (and pinned) by mvt.isolated
    # JAX's backend starts inside the measurement, as in a user's process: not to pick a device.
    rows = (mvt.measure_jax(options, log) if _ONLY.value == "jax" else
            torchvision_reference.measure(dataclasses.replace(
                options, torch_device=mvt.resolve_torch_device(_TORCH_DEVICE.value))))
    print(mvt.RESULT_TAG + json.dumps(rows), flush=True)
    return
  cores = _cli.run_main(lambda _: mvt.measuring_cores(_THREADS.value, _ROUNDS.value), argv)
  if cores is not None:
    log(f"each framework on cores {cores}")
  options = dataclasses.replace(options,
                                torch_device=mvt.resolve_torch_device(_TORCH_DEVICE.value))
  log(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
      f"torch {torch.__version__} on {options.torch_device}, threads {torch.get_num_threads()}; "
      f"compute dtype {_DTYPE.value}")
  if _ROUNDS.value > 0:
    results = mvt.isolated(options, [sys.executable, os.path.abspath(__file__)], cores, log)
  else:
    results = mvt.in_process(options, torchvision_reference, log)
  print(mvt.format_table(*results))


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
