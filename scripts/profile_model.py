r"""Where the time of the compiled model goes on this machine, per module, in milliseconds.

Runs the jitted ``predict`` (or the train step, ``--mode train``) of the default R50-FPN config
several times under ``jax.profiler.trace``, reads each XLA operation's time from the trace,
keeps per operation the *minimum over the runs* (on a shared machine other tenants inflate
whole runs at random; the per-operation minimum is far steadier than any run's wall time), and
adds the operations up per model module, which XLA keeps in each operation's ``op_name``
metadata (the Flax module path, e.g. ``backbone/layer3/2/conv2``). This is how the speed work
in docs/benchmarks.md found what to change.

``predict`` is compiled with XLA's default options here, not with the
``modeling.inference_compiler_options()`` that ``inference.Predictor`` uses: those move the dots
from YNNPACK to XLA's Eigen runtime, which runs them asynchronously, so the trace would time
only their dispatch (``--noynn_dots`` shows that).

Usage::

  python scripts/profile_model.py                                  # predict, 512x512, 5 runs
  python scripts/profile_model.py --height 800 --width 1216 --depth 3 --top 30
  python scripts/profile_model.py --mode train --batch 2
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Callable, Dict, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import _synthetic  # scripts/_synthetic.py

_MODE = flags.DEFINE_enum("mode", "predict", ["predict", "train"], "what to profile")
_HEIGHT = flags.DEFINE_integer("height", 512, "image height (a multiple of 32)")
_WIDTH = flags.DEFINE_integer("width", 512, "image width (a multiple of 32)")
_BATCH = flags.DEFINE_integer("batch", 1, "images per call")
_RUNS = flags.DEFINE_integer("runs", 5, "profiled runs (per-operation minimum over them)")
_DEPTH = flags.DEFINE_integer("depth", 2, "module path components per row")
_TOP = flags.DEFINE_integer("top", 15, "slowest single operations to list")
_PREPARE = flags.DEFINE_bool("prepare", True, "predict: variables through "
                             "modeling.prepare_inference, as inference.Predictor does")
_YNN_DOTS = flags.DEFINE_bool(
    "ynn_dots", True, "predict: compile with XLA's default options, whose dots run in "
    "YNNPACK and are timed by the trace. --noynn_dots compiles as inference.Predictor does "
    "(modeling.inference_compiler_options(): Eigen's dots, which run asynchronously: the "
    "trace times only their dispatch, so the table leaves their time out)")

_RUN_MARKER = "profile_model_run"
# Operations that only contain others (their time is their children's): not counted.
_CONTAINERS = ("conditional", "while", "call", "async-start", "async-done")


def hlo_operations(hlo_text: str) -> Dict[str, Tuple[str, str]]:
  """``{instruction name: (opcode, op_name metadata)}`` from compiled HLO text."""
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?([a-z][a-z0-9\-]*)\(", line)
    if not m:
      continue
    meta = re.search(r'op_name="([^"]*)"', line)
    ops[m.group(1)] = (m.group(2), meta.group(1) if meta else "")
  return ops


def module_of(op_name: str, depth: int) -> str:
  """The first ``depth`` components of the module path in an ``op_name``.

  ``jit(<lambda>)/MaskRCNN.predict/MaskRCNN._box_branch/cond/branch_0_fun/box_head/fc6/
  dot_general`` -> ``_box_branch/_head`` at depth 2. Dropped: the primitive at the end, the
  outer ``jit(...)``, the traced method (``predict``), class prefixes and control-flow parts
  (``cond``, ``branch_k_fun``, ``while``, ``body``, ``closed_call``); a named ``jit(f)`` or
  ``vmap(f)`` counts as ``f`` (``vmap(jit(_batched_nms_jit))`` -> ``_batched_nms_jit``).
  """
  components = op_name.split("/")[:-1]
  if components and components[0].startswith(("jit(", "pjit(")):
    components = components[1:]  # the jitted function
  parts = []
  for p in components:
    while True:
      m = re.fullmatch(r"(?:jit|vmap|pjit|jvp|transpose|checkpoint|remat)\((.*)\)", p)
      if not m:
        break
      p = m.group(1)
    if p in ("", "<lambda>", "main", "cond", "while", "body", "closed_call"):
      continue
    if re.fullmatch(r"branch_\d+_fun", p):
      continue
    parts.append(re.sub(r"^[A-Z]\w*\.", "", p))  # "MaskRCNN._pool" -> "_pool"
  parts = parts[1:]  # the traced method itself (predict, losses, ...)
  return "/".join(parts[:depth]) or "(top level)"


def per_operation_minimum(trace_events: Sequence[dict], runs: int) -> Dict[str, float]:
  """Per trace event name, the minimum over the marked runs of its total time (microseconds)."""
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace_events
                 if e.get("ph") == "X" and str(e.get("name", "")).startswith(_RUN_MARKER))
  if len(spans) != runs:
    raise RuntimeError(f"found {len(spans)} marked runs in the trace, expected {runs}")
  totals = collections.defaultdict(lambda: [0.0] * runs)
  for e in trace_events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    for i, (start, stop) in enumerate(spans):
      if start <= e["ts"] <= stop:
        totals[e["name"]][i] += e["dur"]
        break
  return {name: min(v) for name, v in totals.items()}


def profile(fn: Callable[[], object], runs: int) -> Dict[str, float]:
  """Runs ``fn`` (which must block until done) ``runs`` times under the profiler.

  Returns per trace event name the minimum over the runs of its time, in microseconds.
  """
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for i in range(runs):
        with jax.profiler.TraceAnnotation(f"{_RUN_MARKER}{i}"):
          fn()
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
      raise RuntimeError(f"the profiler wrote no perfetto trace under {trace_dir}")
    with gzip.open(files[0]) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return per_operation_minimum(events, runs)


def by_module(times: Dict[str, float], operations: Dict[str, Tuple[str, str]],
              depth: int) -> collections.Counter:
  """Milliseconds per module: the XLA operations' times added up by :func:`module_of`."""
  out = collections.Counter()
  for name, us in times.items():
    op = operations.get(name)
    if op is None or op[0] in _CONTAINERS:
      continue
    out[module_of(op[1], depth)] += us / 1e3
  return out


def _model_call(mode: str, height: int, width: int, batch: int, prepare: bool = True,
                ynn_dots: bool = True):
  """(jitted function, its arguments, a runner that blocks) for the default config, on the
  synthetic inputs of scripts/benchmark.py."""
  from mrcnn_jax import modeling  # pylint: disable=g-import-not-at-top
  from mrcnn_jax import training  # pylint: disable=g-import-not-at-top

  config = _synthetic.model_config(height, width, batch)
  model = modeling.MaskRCNN(config.model)
  host_batch = _synthetic.train_batch(np.random.default_rng(0), batch, height, width,
                                      config.data.max_instances, config.data.mask_size)
  if mode == "predict":
    variables = jax.jit(lambda k: modeling.init_variables(model, k, (height, width)))(
        jax.random.PRNGKey(0))
    if prepare:
      variables = modeling.prepare_inference(model, variables, (height, width), batch)
    fn = (jax.jit(lambda v, im, vs: model.apply(v, im, vs, method=type(model).predict))
          if ynn_dots else modeling.jit_predict(model))
    args = [variables, jax.device_put(host_batch["image"]), jnp.asarray(host_batch["valid_size"])]
    return fn, args, lambda compiled: jax.block_until_ready(compiled(*args))
  mesh = training.make_mesh(jax.devices()[:1])
  state = training.create_train_state(config, model, jax.random.PRNGKey(0), mesh)
  device_batch = training.shard_batch(host_batch, mesh)
  fn = training.make_train_step(config, model, mesh, state)
  holder = [state]

  def run(compiled):
    holder[0], metrics = compiled(holder[0], device_batch)
    jax.block_until_ready(metrics)

  return fn, [holder[0], device_batch], run


def main(argv):
  del argv
  fn, args, run = _model_call(_MODE.value, _HEIGHT.value, _WIDTH.value, _BATCH.value,
                              _PREPARE.value, _YNN_DOTS.value)
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  print(f"compiled in {time.perf_counter() - start:.1f} s")
  operations = hlo_operations(compiled.as_text())
  run(compiled)  # warm-up
  walls = []
  for _ in range(3):
    start = time.perf_counter()
    run(compiled)
    walls.append(time.perf_counter() - start)
  print(f"wall s, 3 runs without the profiler: {[round(w, 3) for w in walls]}")
  times = profile(lambda: run(compiled), _RUNS.value)
  modules = by_module(times, operations, _DEPTH.value)
  print(f"\n{_MODE.value} {_BATCH.value}x{_HEIGHT.value}x{_WIDTH.value}: per module, "
        f"the sum of its operations' minimum time over {_RUNS.value} profiled runs")
  print("| module | ms |\n|---|---:|")
  small = 0.0
  for name, ms in modules.most_common():
    if ms < 1.0:
      small += ms
    else:
      print(f"| {name} | {ms:.1f} |")
  print(f"| (the rest, each < 1 ms) | {small:.1f} |")
  print(f"| total | {sum(modules.values()):.1f} |")
  print(f"\nslowest {_TOP.value} operations (ms, opcode, module path):")
  leaves = {n: t for n, t in times.items()
            if n in operations and operations[n][0] not in _CONTAINERS}
  for name, us in sorted(leaves.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    opcode, op_name = operations[name]
    print(f"{us / 1e3:8.1f}  {name} ({opcode})  {module_of(op_name, 99)}")


if __name__ == "__main__":
  app.run(main)
