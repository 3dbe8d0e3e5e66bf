r"""Micro-benchmark of the detection ops: jitted JAX against torchvision on this CPU, in one run.

RoIAlign (1000 RoIs -> 7x7, 100 RoIs -> 14x14 over P2-P5 of an 800x1216 image) and NMS (4,000
and 20,000 boxes); see ``mrcnn_jax.benchmarks.ops``. Both frameworks run ``--threads`` threads
(default: every core this process may use): the process pins itself to that many cores before
JAX starts its CPU client, and torchvision runs with ``torch.set_num_threads(--threads)``.

Usage::

  python scripts/benchmark_ops.py
  python scripts/benchmark_ops.py --repeats 9 --cases roi_7x7,nms_4k
"""

# torchvision segfaults if imported after TensorFlow: load it before anything else.
import torch  # noqa: I001
import torchvision

import functools
import os

from absl import app
from absl import flags
from absl import logging
import jax

from mrcnn_jax.benchmarks import ops
from mrcnn_jax.benchmarks import threads
from mrcnn_jax.benchmarks import torchvision_reference
import _cli  # scripts/_cli.py

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per case (the median is reported).")
_THREADS = flags.DEFINE_integer(
    "threads", len(os.sched_getaffinity(0)),
    "Threads per framework: this process runs on that many cores (XLA sizes its CPU thread "
    "pools from them) and torch.set_num_threads.", lower_bound=1)
_CASES = flags.DEFINE_list("cases", list(ops.CASES), "Which cases to run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random inputs.")


def _check_flags_and_pin(argv):
  del argv
  ops.check_cases(_CASES.value)
  threads.pin_this_process(_THREADS.value)


def main(argv):
  _cli.run_main(_check_flags_and_pin, argv)  # before anything starts JAX's CPU client
  logging.set_verbosity(logging.WARNING)  # no "Unable to initialize backend 'tpu'" line
  torch.set_num_threads(_THREADS.value)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, both on cores {sorted(os.sched_getaffinity(0))}, "
        f"torchvision {torchvision.__version__}; median of {_REPEATS.value} runs")
  results = ops.run_cases(_CASES.value, torchvision_reference, _REPEATS.value, _SEED.value,
                          log=functools.partial(print, flush=True))
  print("\n" + ops.format_table(results))


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
