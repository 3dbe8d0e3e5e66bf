r"""Where the time of the compiled model goes, per module, from a profiler trace.

Runs the jitted ``predict`` (or the train step) of the default R50-FPN config several times
under ``jax.profiler.trace``, reads each XLA operation's time from the trace, keeps per
operation the *minimum over the runs* (on a shared machine other tenants inflate whole runs at
random; the per-operation minimum is far steadier than any run's wall time), and adds the
operations up per model module, which XLA keeps in each operation's ``op_name`` metadata (the
Flax module path, e.g. ``backbone/layer3/2/conv2``).

``predict`` is compiled with XLA's default options by default, not as ``inference.Predictor``
compiles it: the library's CPU options move the dots from YNNPACK to XLA's Eigen runtime, which
runs them asynchronously, so the trace would time only their dispatch (``ynn_dots=False`` shows
that).
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
from typing import Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.benchmarks import programs
from mrcnn_jax.benchmarks import synthetic

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


def model_call(mode: str, height: int, width: int, batch: int, prepare: bool = True,
               ynn_dots: bool = True):
  """(jitted function, its arguments, a runner that takes the compiled function and blocks)
  for the default config on ``synthetic`` inputs; ``mode`` is 'predict' or 'train'."""
  config = synthetic.model_config(height, width, batch)
  model = programs.build_model(config)
  host_batch = synthetic.train_batch(np.random.default_rng(0), batch, height, width,
                                     config.data.max_instances, config.data.mask_size)
  if mode == "predict":
    variables = programs.random_variables(model, (height, width))
    if prepare:
      variables = programs.prepare_inference(model, variables, (height, width), batch)
    fn = programs.predict_function(model, library=not ynn_dots)
    args = [variables, jax.device_put(host_batch["image"]), jnp.asarray(host_batch["valid_size"])]
    return fn, args, lambda compiled: jax.block_until_ready(compiled(*args))
  mesh = programs.make_mesh(jax.devices()[:1])
  model = programs.build_model(config, mesh)
  state = programs.train_state(config, model, mesh)
  device_batch = programs.shard_batch(host_batch, mesh)
  fn = programs.train_step(config, model, mesh, state)
  holder = [state]

  def run(compiled):
    holder[0], metrics = compiled(holder[0], device_batch)
    jax.block_until_ready(metrics)

  return fn, [holder[0], device_batch], run


def profile_model(mode: str = "predict", height: int = 512, width: int = 512, batch: int = 1,
                  runs: int = 5, depth: int = 2, top: int = 15, prepare: bool = True,
                  ynn_dots: bool = True, log: Callable[[str], None] = print) -> str:
  """Compiles and profiles the model (see the module docstring); returns the report.

  Args:
    mode: 'predict' or 'train'.
    height: image height, a multiple of 32.
    width: image width, a multiple of 32.
    batch: images per call.
    runs: profiled runs (per-operation minimum over them).
    depth: module path components per row.
    top: slowest single operations to list.
    prepare: predict: variables through ``prepare_inference``, as ``inference.Predictor`` does.
    ynn_dots: predict: compile with XLA's default options (see the module docstring).
    log: where the compile time and three unprofiled wall times go.

  Returns:
    A Markdown table of milliseconds per module, then the ``top`` slowest operations.
  """
  fn, args, run = model_call(mode, height, width, batch, prepare, ynn_dots)
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  log(f"compiled in {time.perf_counter() - start:.1f} s")
  operations = hlo_operations(compiled.as_text())
  run(compiled)  # warm-up
  walls = []
  for _ in range(3):
    start = time.perf_counter()
    run(compiled)
    walls.append(time.perf_counter() - start)
  log(f"wall s, 3 runs without the profiler: {[round(w, 3) for w in walls]}")
  times = profile(lambda: run(compiled), runs)
  modules = by_module(times, operations, depth)
  lines: List[str] = [
      f"\n{mode} {batch}x{height}x{width}: per module, the sum of its operations' minimum time "
      f"over {runs} profiled runs", "| module | ms |\n|---|---:|"]
  small = 0.0
  for name, ms in modules.most_common():
    if ms < 1.0:
      small += ms
    else:
      lines.append(f"| {name} | {ms:.1f} |")
  lines.append(f"| (the rest, each < 1 ms) | {small:.1f} |")
  lines.append(f"| total | {sum(modules.values()):.1f} |")
  lines.append(f"\nslowest {top} operations (ms, opcode, module path):")
  leaves = {n: t for n, t in times.items()
            if n in operations and operations[n][0] not in _CONTAINERS}
  for name, us in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
    opcode, op_name = operations[name]
    lines.append(f"{us / 1e3:8.1f}  {name} ({opcode})  {module_of(op_name, 99)}")
  return "\n".join(lines)
