r"""Mask R-CNN R50-FPN in JAX against torchvision's on this machine: the JAX side and the runs.

Measured, for the full default model (random weights, 91 classes):

* train step, batch 2 at 512x512 (JAX: the jitted, sharded trainer step; torchvision: forward
  in train mode with synthetic targets, backward, SGD step);
* inference latency, batch 1 at 512x512 and at 800x1216, unpadded on both sides (torchvision
  pads to a multiple of 32, which 800x1216 already is; our model takes any multiple of 32).
  torchvision is timed to the outputs our ``predict`` returns
  (``torchvision_reference.torchvision_detect``); its whole ``model(images)`` call, which also
  pastes every mask into an image-sized array, is timed beside it as a second ratio. At 512x512
  our ``predict`` is also timed as a plain ``jax.jit`` (no ``prepare_inference``, XLA's default
  compiler options).

JAX compile times are reported separately. Each timed figure is the median of ``repeats`` runs
after one warm-up call, with a pause before each run (``timing.median_times``). With
``rounds`` > 0 each framework runs in a fresh process of its own, JAX and torchvision processes
taking turns for ``rounds`` rounds (:func:`isolated`); the table gives the median over rounds
and the "paired" ratio, the median of the per-round ratios, which drifting machine speed moves
least. ``rounds`` = 0 measures both in one process, runs alternating (:func:`in_process`).
``threads`` is the thread count of both frameworks (``threads.started_on``).

On a GPU host torchvision runs on the same GPU, each timed run ending when its results are on
the device. This module never imports torch: the torchvision side is
``torchvision_reference``, which the entry point passes in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.benchmarks import programs
from mrcnn_jax.benchmarks import synthetic
from mrcnn_jax.benchmarks import threads as threads_lib
from mrcnn_jax.benchmarks import timing

# A measuring process prints its rows as JSON after this tag (see ``isolated``).
RESULT_TAG = "BENCHMARK_ROWS_JSON:"
NUM_OBJECTS = 4  # rectangle instances per synthetic training image
TRAIN_SIZE, TRAIN_BATCH = (512, 512), 2
INFER_SIZES = (("infer_512", 512, 512), ("infer_800", 800, 1216))

Rows = Dict[str, Any]  # {key: (wall s, CPU s) or a count}
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure and how (the entry point's flags)."""
  repeats: int = 3  # timed runs per measurement (median reported)
  threads: int = 2  # threads per framework
  skip_torch: bool = False  # time the JAX model only
  skip_train: bool = False  # skip the train-step measurements
  compute_dtype: str = "float32"  # JAX activation dtype
  rounds: int = 3  # > 0: isolated processes taking turns, this many rounds; 0: in process
  torch_device: Optional[str] = None  # 'cpu' or 'cuda'; None: resolve_torch_device's choice


def resolve_torch_device(name: Optional[str]) -> str:
  """``name``, else 'cuda' when JAX's default backend is a GPU (the same GPU for both)."""
  if name:
    return name
  return "cuda" if jax.default_backend() == "gpu" else "cpu"


def measuring_cores(threads: int, rounds: int) -> Optional[List[int]]:
  """The cores a CPU run's measuring processes start on, None on a GPU run.

  Raises:
    ValueError: ``threads`` cores do not exist or cannot be used (with ``rounds`` = 0, this
      process's XLA thread pools already span every allowed core).
  """
  if jax.default_backend() != "cpu":
    return None
  cores = threads_lib.cpu_cores(threads)
  if rounds == 0 and len(cores) < len(os.sched_getaffinity(0)):
    raise ValueError(f"--threads={threads} with --rounds=0: fewer threads than cores "
                     "needs fresh processes (--rounds 1 or more)")
  return cores


def training_batch(rng: np.random.Generator, max_instances: int, mask_size: int) -> dict:
  """The synthetic train batch both frameworks step on (``TRAIN_BATCH`` x ``TRAIN_SIZE``)."""
  return synthetic.train_batch(rng, TRAIN_BATCH, *TRAIN_SIZE, max_instances, mask_size,
                               NUM_OBJECTS)


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------


def jax_train(rows: Rows, compute_dtype: str = "float32", log: Log = print) -> Callable[[], None]:
  """Compiles the train step (times recorded in ``rows``); returns a function running one step."""
  config = synthetic.model_config(*TRAIN_SIZE, TRAIN_BATCH, compute_dtype)
  mesh = programs.make_mesh(jax.devices()[:1])
  model = programs.build_model(config, mesh)
  with timing.Clock() as init_clock:
    state = jax.block_until_ready(programs.train_state(config, model, mesh))
  step_fn = programs.train_step(config, model, mesh, state)
  batch = training_batch(np.random.default_rng(0), config.data.max_instances,
                         config.data.mask_size)
  batch = programs.shard_batch(batch, mesh)
  with timing.Clock() as compile_clock:
    compiled = step_fn.lower(state, batch).compile()
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  rows["train_compile"] = (compile_clock.wall, compile_clock.cpu)
  rows["init"] = (init_clock.wall, init_clock.cpu)
  holder[0], metrics = compiled(holder[0], batch)  # the state is donated: keep the new one
  log(f"JAX train metrics: { {k: round(float(v), 4) for k, v in metrics.items()} }")
  return run


@functools.lru_cache(maxsize=None)
def _model_and_variables(height: int, width: int, compute_dtype: str):
  """The inference model at one input size and its random variables, made once per size (the
  512x512 rows of the library path and of a plain ``jax.jit`` share them)."""
  model = programs.build_model(synthetic.model_config(height, width, 1, compute_dtype))
  return model, programs.random_variables(model, (height, width))


def jax_infer(rows: Rows, key: str, height: int, width: int, padded_height: int,
              padded_width: int, compute_dtype: str = "float32",
              prepare: bool = True) -> Callable[[], object]:
  """Compiles ``predict`` (compile time in ``rows``); returns a function running it once.

  With ``prepare``, the library's inference path: the variables first go through
  ``programs.prepare_inference`` (its time in ``rows[key + '_prepare']``) and ``predict``
  compiles as ``inference.Predictor`` compiles it. Without: a plain ``jax.jit`` of ``predict``
  on the plain variables. The image is ``height`` x ``width`` of random pixels, zero-padded to
  ``padded_height`` x ``padded_width``.
  """
  model, variables = _model_and_variables(padded_height, padded_width, compute_dtype)
  if prepare:
    with timing.Clock() as c:
      variables = jax.block_until_ready(
          programs.prepare_inference(model, variables, (padded_height, padded_width)))
    rows[key + "_prepare"] = (c.wall, c.cpu)
  image = np.zeros((1, padded_height, padded_width, 3), np.uint8)
  image[:, :height, :width] = np.random.default_rng(1).integers(0, 256, (1, height, width, 3))
  valid_size = jnp.asarray([[height, width]], jnp.int32)
  predict = programs.predict_function(model, library=prepare)
  with timing.Clock() as c:
    compiled = predict.lower(variables, image, valid_size).compile()
  rows[key + "_compile"] = (c.wall, c.cpu)
  image = jax.device_put(image)
  out = compiled(variables, image, valid_size)
  rows[key + "_detections"] = int(out["valid"].sum())
  return lambda: jax.block_until_ready(compiled(variables, image, valid_size))


def measure_jax(options: Options, log: Log = print) -> Rows:
  """Every JAX measurement, in this process: {key: (wall s, CPU s) or a count}."""
  rows, repeats, dtype = {}, options.repeats, options.compute_dtype
  if not options.skip_train:
    rows["train"] = timing.median_times([jax_train(rows, dtype, log)], repeats)[0][0]
  # At 512x512 also as a plain jax.jit, the two taking turns.
  (rows["infer_512"], rows["infer_512_plain"]), _ = timing.median_times(
      [jax_infer(rows, "infer_512", 512, 512, 512, 512, dtype),
       jax_infer(rows, "infer_512_plain", 512, 512, 512, 512, dtype, prepare=False)], repeats)
  rows["infer_800"] = timing.median_times(
      [jax_infer(rows, "infer_800", 800, 1216, 800, 1216, dtype)], repeats)[0][0]
  return rows


# ------------------------------------------------------------------------------------------------
# Both frameworks
# ------------------------------------------------------------------------------------------------


def isolated(options: Options, command: Sequence[str], cores: Optional[Sequence[int]],
             log: Log = print) -> Tuple[Rows, Rows, Dict[str, float]]:
  """Each framework in a fresh process of its own, JAX and torchvision taking turns, each
  started on ``cores`` (None: wherever this process may run).

  In one process the two share glibc's allocator and the cores' idle-spinning worker threads,
  and each changes the other's speed; separate processes measure each as a user would run it.

  Args:
    options: what to measure; ``options.torch_device`` must be resolved.
    command: the entry point to start, e.g. ``[sys.executable, 'scripts/benchmark.py']``; it
      takes the flags ``--only``, ``--repeats``, ``--threads``, ``--compute_dtype``,
      ``--skip_train`` and ``--torch_device``, and prints ``RESULT_TAG`` then the rows as JSON.
    cores: see above.
    log: where each round's rows go.

  Returns:
    ({key: median over rounds} of the JAX rows, the same of the torchvision rows, {key: median
    of the per-round ratios JAX / torchvision}).
  """
  per_round = {"jax": [], "torch": []}
  for r in range(options.rounds):
    for framework in ("jax", "torch"):
      if framework == "torch" and options.skip_torch:
        continue
      cmd = [*command, f"--only={framework}", f"--repeats={options.repeats}",
             f"--threads={options.threads}", f"--compute_dtype={options.compute_dtype}",
             f"--skip_train={options.skip_train}"]
      if framework == "torch":
        # Resolved by the caller, so the torchvision process never starts a JAX backend.
        cmd.append(f"--torch_device={options.torch_device}")
      with threads_lib.started_on(cores):  # so its XLA thread pools have that many threads
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode != 0 or RESULT_TAG not in proc.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
      rows = json.loads(proc.stdout.split(RESULT_TAG, 1)[1])
      per_round[framework].append(rows)
      log(f"round {r + 1}/{options.rounds} {framework}: {rows}")
  median = lambda rs, k: tuple(statistics.median(r[k][i] for r in rs) for i in (0, 1))
  jx = {k: median(per_round["jax"], k) if isinstance(v, list) else v
        for k, v in per_round["jax"][0].items()}
  tv = {k: median(per_round["torch"], k) if isinstance(v, list) else v
        for k, v in (per_round["torch"][0].items() if per_round["torch"] else [])}
  paired = {}
  for key, tk, jk in (("train", "train", "train"), ("train_builder_default",) * 2 + ("train",),
                      ("infer_512",) * 3, ("infer_800",) * 3,
                      ("infer_512_full", "infer_512_full", "infer_512"),
                      ("infer_800_full", "infer_800_full", "infer_800"),
                      ("infer_512_plain", "infer_512", "infer_512_plain")):
    if tk in tv and jk in jx:
      paired[key] = statistics.median(a[jk][0] / b[tk][0]
                                      for a, b in zip(per_round["jax"], per_round["torch"]))
  return jx, tv, paired


def in_process(options: Options, reference: Any,
               log: Log = print) -> Tuple[Rows, Rows, Dict[str, float]]:
  """Both frameworks in this process, taking turns run by run (``rounds`` = 0).

  ``reference`` is the ``torchvision_reference`` module (unused with ``skip_torch``);
  ``options.torch_device`` must be resolved. Returns what :func:`isolated` returns, the
  paired ratios taken run by run.
  """
  jx, tv, paired, repeats = {}, {}, {}, options.repeats
  dtype, device, skip_torch = options.compute_dtype, options.torch_device, options.skip_torch

  def measure(key, jax_run, torch_runs=()):
    """Times the JAX run and the torchvision ``(key, run)`` pairs in turns."""
    times, walls = timing.median_times([jax_run] + [run for _, run in torch_runs], repeats)
    jx[key] = times[0]
    for (tk, _), t, w in zip(torch_runs, times[1:], walls[1:]):
      tv[tk] = t
      # Each JAX run over the torchvision run right after it.
      paired[tk] = statistics.median(a / b for a, b in zip(walls[0], w))
    log(f"{key} JAX: {jx[key]} torchvision: { {tk: tv[tk] for tk, _ in torch_runs} }")

  if not options.skip_train:
    jax_run = jax_train(jx, dtype, log)
    log(f"JAX train compile: {jx['train_compile']}")
    measure("train", jax_run,
            () if skip_torch else [("train", reference.train(matched=True, device=device))])
    if not skip_torch:
      # Our step against torchvision's builder default, again in turns.
      measure("train_vs_builder_default", jax_run,
              [("train_builder_default", reference.train(matched=False, device=device))])
  for key, h, w in INFER_SIZES:
    jax_run = jax_infer(jx, key, h, w, h, w, dtype)
    measure(key, jax_run, () if skip_torch else
            list(zip((key, key + "_full"), reference.infer(tv, key, h, w, device))))
  measure("infer_512_plain",
          jax_infer(jx, "infer_512_plain", 512, 512, 512, 512, dtype, prepare=False))
  log(f"JAX: {jx}")
  log(f"torchvision: {tv}")
  return jx, tv, paired


def format_table(jx: Rows, tv: Rows, paired: Dict[str, float]) -> str:
  """The results as a Markdown table: wall and CPU seconds, their ratios, compile times and
  detection counts."""
  lines = ["| measurement | JAX wall s | torchvision wall s | wall ratio | paired wall ratio | "
           "JAX CPU s | torchvision CPU s | CPU ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  names = {"train": "train step, batch 2, 512x512",
           "infer_512": "inference, batch 1, 512x512",
           "infer_800": "inference, batch 1, 800x1216"}
  plain = ("inference, batch 1, 512x512, plain jax.jit (no prepare_inference, XLA's default "
           "compiler options)")
  fmt = lambda d, k, i: f"{d[k][i]:.2f}" if k in d else "-"
  ratio = lambda jk, tk, i: f"{jx[jk][i] / tv[tk][i]:.2f}" if jk in jx and tk in tv else "-"
  pair = lambda tk: f"{paired[tk]:.2f}" if tk in paired else "-"

  def row(label, jk, tk, pk=None):
    lines.append(f"| {label} | {fmt(jx, jk, 0)} | {fmt(tv, tk, 0)} | {ratio(jk, tk, 0)} | "
                 f"{pair(pk or tk)} | {fmt(jx, jk, 1)} | {fmt(tv, tk, 1)} | {ratio(jk, tk, 1)} |")

  for k, label in names.items():
    if k in jx:
      row(label, k, k)
  for k in ("infer_512", "infer_800"):
    if k + "_full" in tv:
      row(f"{names[k]}, against torchvision's whole call (its masks also pasted into "
          "[N, 1, H, W])", k, k + "_full")
  if "infer_512_plain" in jx:
    row(plain, "infer_512_plain", "infer_512", "infer_512_plain")
  if "train_builder_default" in tv:
    # In one process (rounds = 0) our step was timed again beside that variant.
    jk = "train_vs_builder_default" if "train_vs_builder_default" in jx else "train"
    row("train step vs torchvision builder default (BatchNorm2d, all layers trainable)",
        jk, "train_builder_default")
  for k in ("train_compile", "infer_512_compile", "infer_800_compile", "infer_512_prepare",
            "infer_800_prepare", "init"):
    if k in jx:
      lines.append(f"| JAX {k.replace('_', ' ')} | {fmt(jx, k, 0)} | - | - | - | {fmt(jx, k, 1)} "
                   "| - | - |")
  for k in ("infer_512_detections", "infer_800_detections"):
    lines.append(f"| detections ({k.split('_')[1]}) | {jx.get(k, '-')} | {tv.get(k, '-')} | "
                 "- | - | - | - | - |")
  return "\n".join(lines)
