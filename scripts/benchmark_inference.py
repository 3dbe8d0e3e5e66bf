r"""Inference sweep: predict over batch sizes x input shapes x dtypes on this backend.

Compile (cold, and warm from JAX's persistent cache), latency p50/p90/p99 on device-resident
inputs, images/s, FLOPs, bytes, memory and MFU per point, written as JSON, CSV and a PNG plot
(``mrcnn_jax.benchmarks.inference_sweep``). ``--exported DIR`` instead times an exported
artifact (``scripts/export.py``) against the in-process ``predict`` at its batch and shape.

Usage::

  XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/benchmark_inference.py \
      --batch_sizes 1,2,4,8,16 --shapes 832x1344,1344x1344 --dtypes float32,bfloat16 --out sweep
  python scripts/benchmark_inference.py --exported export/shapes --rounds 5
"""

import functools
import json
import os

from absl import app
from absl import flags
from absl import logging

from mrcnn_jax.benchmarks import inference_sweep
import _cli  # scripts/_cli.py

_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8"], "Batch sizes.")
_SHAPES = flags.DEFINE_list("shapes", ["832x1344"], "Padded input shapes, HxW.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Latency samples and throughput calls per point.",
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per point.", lower_bound=1)
_HLO = flags.DEFINE_bool("hlo", False, "Also write each program's StableHLO and HLO to --out.")
_EXPORTED = flags.DEFINE_string("exported", None, "Time this exported artifact's folder against "
                                "the in-process predict instead of sweeping.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "--exported: alternating rounds.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "inference_sweep", "Folder for sweep.json/.csv/.png.")


def _shape(text):
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--shapes takes HxW values such as 832x1344, got {text!r}") from None
  if h < 128 or w < 128:
    raise ValueError(f"--shapes: {text} is smaller than 128 px on a side")
  return h, w


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  log = functools.partial(print, flush=True)
  if _EXPORTED.value:
    result = inference_sweep.compare_exported(_EXPORTED.value, _ROUNDS.value, log=log)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "exported.json"), "w") as f:
      json.dump(result, f, indent=1)
    return
  for d in _DTYPES.value:
    if d not in ("float32", "bfloat16"):
      raise ValueError(f"--dtypes takes float32 and bfloat16, got {d!r}")
  try:
    batches = [int(b) for b in _BATCHES.value]
  except ValueError:
    raise ValueError(f"--batch_sizes takes integers, got {_BATCHES.value}") from None
  if min(batches) < 1:
    raise ValueError(f"--batch_sizes must be >= 1, got {batches}")
  options = inference_sweep.SweepOptions(
      batch_sizes=batches, shapes=[_shape(s) for s in _SHAPES.value], dtypes=_DTYPES.value,
      repeats=_REPEATS.value, warmup=_WARMUP.value, hlo_dir=_OUT.value if _HLO.value else None)
  paths = inference_sweep.write(inference_sweep.sweep(options, log), _OUT.value)
  log("wrote " + ", ".join(paths))


if __name__ == "__main__":
  app.run(lambda argv: _cli.run_main(main, argv), flags_parser=_cli.parse_flags)
