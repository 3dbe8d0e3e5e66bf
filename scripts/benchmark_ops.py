r"""Micro-benchmark of the detection ops: jitted JAX against torchvision on this CPU, in one run.

Cases (the sizes of a Mask R-CNN R50-FPN step on an 800x1216 image, 256 channels):
  * RoIAlign, 1000 RoIs -> 7x7 over P2-P5 (box head), multilevel, sampling_ratio 2;
  * RoIAlign, 100 RoIs -> 14x14 over P2-P5 (mask head at test time), same;
  * NMS of 4,000 and of 20,000 random boxes at IoU 0.7, max_output_size = number of boxes.
JAX: ``multilevel_roi_align`` against ``torchvision.ops.MultiScaleRoIAlign`` (both with
aligned=False), ``nms`` against ``torchvision.ops.nms``. Compilation is timed on its own
(``lower().compile()``); timed runs are the median of ``--repeats`` after one warm-up call.
Both frameworks run ``--threads`` threads (default: every core this process may use): the
process pins itself to that many cores before JAX starts its CPU client, which sizes its
thread pools from them, and torchvision runs with ``torch.set_num_threads(--threads)``.

Usage::

  python scripts/benchmark_ops.py                 # ~1-2 minutes on 2 CPU cores
  python scripts/benchmark_ops.py --repeats 9 --cases roi_7x7,nms_4k
"""

# torchvision segfaults if imported after TensorFlow: load it before anything else.
import torch  # noqa: I001
import torchvision

import os
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.nms import nms
from mrcnn_jax.ops.roi_align import multilevel_roi_align
import _cli  # scripts/_cli.py

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per case (the median is reported).")
_THREADS = flags.DEFINE_integer(
    "threads", len(os.sched_getaffinity(0)),
    "Threads per framework: this process runs on that many cores (XLA sizes its CPU thread "
    "pools from them) and torch.set_num_threads.", lower_bound=1)
_CASES = flags.DEFINE_list("cases", ["roi_7x7", "roi_14x14", "nms_4k", "nms_20k"],
                           "Which cases to run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random inputs.")

IMAGE = (800, 1216)
STRIDES = (4, 8, 16, 32)
CHANNELS = 256


def _median_time(fn, repeats):
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _random_boxes(rng, n, min_side, max_side):
  side = np.exp(rng.uniform(np.log(min_side), np.log(max_side), (n, 2)))
  xy = rng.uniform(0.0, 1.0, (n, 2)) * (np.array([IMAGE[1], IMAGE[0]]) - side).clip(1)
  return np.concatenate([xy, xy + side], -1).astype(np.float32)


def _roi_case(rng, num_rois, size):
  """Returns (jax fn, jax args, torch fn, check(jax_out, torch_out) -> str)."""
  feats = [rng.normal(size=(1, IMAGE[0] // s, IMAGE[1] // s, CHANNELS)).astype(np.float32)
           for s in STRIDES]
  boxes = _random_boxes(rng, num_rois, 16, 700)  # spread over all four levels
  fn = lambda f, b: multilevel_roi_align(f, b, size, strides=STRIDES, sampling_ratio=2,
                                         aligned=False)
  args = ([jnp.asarray(f) for f in feats], jnp.asarray(boxes[None]))
  pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], size, 2)
  x = {f"p{i + 2}": torch.from_numpy(f).permute(0, 3, 1, 2).contiguous()
       for i, f in enumerate(feats)}
  torch_fn = lambda: pooler(x, [torch.from_numpy(boxes)], [IMAGE])

  def check(got, want):
    want = want.permute(0, 2, 3, 1).numpy()
    err = np.linalg.norm(np.asarray(got)[0] - want) / np.linalg.norm(want)
    return f"rel err {err:.1e}"
  return fn, args, torch_fn, check


def _nms_case(rng, n):
  boxes = _random_boxes(rng, n, 8, 300)
  scores = rng.uniform(size=n).astype(np.float32)
  fn = lambda b, s: nms(b, s, 0.7, n)
  tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
  torch_fn = lambda: torchvision.ops.nms(tb, ts, 0.7)

  def check(got, want):
    got = np.asarray(got)
    same = np.array_equal(got[got >= 0], want.numpy())
    return f"{int((got >= 0).sum())} kept, {'same' if same else 'DIFFERENT'}"
  return fn, (jnp.asarray(boxes), jnp.asarray(scores)), torch_fn, check


CASES = {
    "roi_7x7": ("RoIAlign 1000 RoIs 7x7, P2-P5, 256 ch", lambda r: _roi_case(r, 1000, 7)),
    "roi_14x14": ("RoIAlign 100 RoIs 14x14, P2-P5, 256 ch", lambda r: _roi_case(r, 100, 14)),
    "nms_4k": ("NMS 4,000 boxes, IoU 0.7", lambda r: _nms_case(r, 4000)),
    "nms_20k": ("NMS 20,000 boxes, IoU 0.7", lambda r: _nms_case(r, 20000)),
}


def _check_flags_and_pin(argv):
  """Checks --cases; puts this thread, and the threads it starts from now on (XLA's, torch's),
  on --threads cores."""
  del argv
  unknown = sorted(set(_CASES.value) - set(CASES))
  if unknown:
    raise ValueError(f"--cases: unknown {unknown}; the cases are {sorted(CASES)}")
  os.sched_setaffinity(0, _cli.cpu_cores(_THREADS.value))


def main(argv):
  _cli.run_main(_check_flags_and_pin, argv)  # before anything starts JAX's CPU client
  logging.set_verbosity(logging.WARNING)  # no "Unable to initialize backend 'tpu'" line
  torch.set_num_threads(_THREADS.value)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, both on cores {sorted(os.sched_getaffinity(0))}, "
        f"torchvision {torchvision.__version__}; median of {_REPEATS.value} runs")
  rows = []
  for name in _CASES.value:
    label, make = CASES[name]
    fn, args, torch_fn, check = make(np.random.default_rng(_SEED.value))
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax_s = _median_time(lambda: jax.block_until_ready(compiled(*args)), _REPEATS.value)
    torch_s = _median_time(torch_fn, _REPEATS.value)
    rows.append((label, compile_s, jax_s, torch_s, check(compiled(*args), torch_fn())))
    print(f"{label:42s} compile {compile_s:6.2f} s  jax {jax_s:8.4f} s  "
          f"torchvision {torch_s:8.4f} s  ratio {jax_s / torch_s:5.2f}  ({rows[-1][4]})",
          flush=True)

  print("\n| case | JAX compile (s) | JAX (s) | torchvision (s) | JAX / torchvision | check |")
  print("|---|---:|---:|---:|---:|---|")
  for label, compile_s, jax_s, torch_s, note in rows:
    print(f"| {label} | {compile_s:.2f} | {jax_s:.4f} | {torch_s:.4f} | "
          f"{jax_s / torch_s:.2f} | {note} |")


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
