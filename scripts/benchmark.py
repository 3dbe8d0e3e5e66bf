r"""Benchmarks Mask R-CNN R50-FPN in JAX against torchvision's on this machine, in one run.

Measures, for the full default model (random weights, 91 classes):
  * train step, batch 2 at 512x512 (JAX: the jitted, sharded ``make_train_step``; torchvision:
    forward in train mode with synthetic targets, backward, SGD step);
  * inference latency, batch 1 at 512x512 and at 800x1216 (unpadded on both sides: torchvision
    pads to a multiple of 32, which 800x1216 already is, and our model takes any multiple of 32;
    P6 is ``ceil(P5 / 2)`` = 13 rows either way. Padding to 832 rows, a multiple of 64, cost 4%
    more compute, for 32 rows torchvision does not have). torchvision is timed to the outputs
    our ``predict`` returns (``torchvision_detect``: boxes, scores, labels and 28x28 mask
    probabilities); its whole ``model(images)`` call, which also pastes every mask into an
    image-sized array, is timed beside it as a second ratio.
JAX compile times are reported separately. Each timed figure is the median of ``--repeats``
runs after one warm-up call, with a 1 s pause before each run. By default (``--rounds 3``)
each framework runs in a fresh process of its own, JAX and torchvision processes taking turns
for three rounds; the table gives the median over rounds and the "paired" ratio, the median
of the per-round ratios, which drifting machine speed moves least. Sharing one process made
each framework change the other's speed by up to 25% (see ``_isolated``); ``--rounds 0``
still measures that way, runs alternating. ``--threads`` is the thread count of both
frameworks: torchvision runs with ``torch.set_num_threads(--threads)``, and on a CPU run each
measuring process is pinned to that many cores (its first allowed ones), from which XLA sizes
its CPU thread pools. ``--threads 1`` compares the two on one core, with no threading in the
ratio. The default, 2, is every core of this machine.

On a GPU host (JAX's default backend a GPU) torchvision runs on the same GPU
(``--torch_device``), each timed run ending when its results are on the device
(``jax.block_until_ready``; ``torch.cuda.synchronize``). Run it there with
``XLA_PYTHON_CLIENT_PREALLOCATE=false``: otherwise the parent process and each JAX process
would take 75% of the GPU's memory at start-up.

The torchvision reference is ``maskrcnn_resnet50_fpn`` built in the configuration our default
config mirrors: FrozenBatchNorm2d and ``trainable_backbone_layers=3`` (the builder switches to
BatchNorm2d with every layer trainable when ``weights_backbone=None``; that variant's train
step is timed too, as "builder default", for reference).

Usage::

  python scripts/benchmark.py                      # everything, ~12 minutes on 2 CPU cores
  python scripts/benchmark.py --skip_train --rounds 1 --repeats 2   # inference only, ~2 min
  python scripts/benchmark.py --skip_torch --repeats 2
"""

# torchvision segfaults if imported after TensorFlow: load it before anything else.
import torch  # noqa: I001
import torchvision  # noqa: F401
from torchvision.models.detection import backbone_utils
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.ops import misc as tv_misc

import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax import modeling
from mrcnn_jax import training
import _cli  # scripts/_cli.py
import _synthetic as _synthetic_inputs  # scripts/_synthetic.py

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
    "processes taking turns for this many rounds (see _isolated); 0: both in this process")
_TORCH_DEVICE = flags.DEFINE_enum(
    "torch_device", None, ["cpu", "cuda"], "where torchvision runs; default: 'cuda' when JAX's "
    "default backend is a GPU (the same GPU for both), else 'cpu'")
_ONLY = flags.DEFINE_enum("only", None, ["jax", "torch"],
                          "internal: measure one framework and print its rows as JSON")
_NUM_OBJECTS = 4
_PAUSE_S = 1.0  # between timed runs, see _median_times


class _Clock:
  """Wall seconds and this process's CPU seconds (all threads) of a block of work.

  On a shared machine wall time is inflated by other processes; CPU seconds are much less so
  (both frameworks run 2 threads here), so both are reported.
  """

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall
    self.cpu = time.process_time() - self.cpu


def _median_times(fns, repeats):
  """Per function, (median wall s, median CPU s) of ``repeats`` calls after one warm-up call.

  The functions take turns (a, b, a, b, ...), so a change in the machine's speed during the run
  (other tenants of a shared host) affects all of them alike instead of whichever ran then.
  """
  for fn in fns:
    fn()  # warm-up (allocations, caches)
  walls, cpus = [[] for _ in fns], [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      # Idle worker threads of the framework that just ran spin for a while before they sleep
      # (OpenMP's wait policy; XLA's thread pool): started at once, the next run would share
      # the two cores with them (measured: our train step 5.2 s right after torchvision's,
      # 3.7-4.0 s on its own).
      time.sleep(_PAUSE_S)
      with _Clock() as c:
        fn()
      walls[i].append(c.wall)
      cpus[i].append(c.cpu)
  return [(statistics.median(w), statistics.median(c)) for w, c in zip(walls, cpus)], walls


def _synthetic(rng, batch, height, width, max_instances, mask_size):
  """Random images and ``_NUM_OBJECTS`` rectangle instances per image, in both formats."""
  jax_batch = _synthetic_inputs.train_batch(rng, batch, height, width, max_instances, mask_size,
                                            _NUM_OBJECTS)
  images, boxes, classes, valid = (jax_batch[k] for k in ("image", "gt_boxes", "gt_classes",
                                                          "gt_valid"))
  tv_images = [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]
  tv_targets = []
  for b in range(batch):
    n = int(valid[b].sum())
    masks = torch.zeros((n, height, width), dtype=torch.uint8)
    for i in range(n):
      x0, y0, x1, y1 = boxes[b, i].astype(int)
      masks[i, y0:y1, x0:x1] = 1
    tv_targets.append({"boxes": torch.from_numpy(boxes[b, :n]),
                       "labels": torch.from_numpy(classes[b, :n]).long(), "masks": masks})
  return jax_batch, tv_images, tv_targets


def _torch_device() -> torch.device:
  if _TORCH_DEVICE.value:
    return torch.device(_TORCH_DEVICE.value)
  return torch.device("cuda" if jax.default_backend() == "gpu" else "cpu")


def _torch_sync(device: torch.device):
  """Waits for the device's queued work, so a timed run ends when its results exist (CUDA runs
  asynchronously, as JAX's dispatch does; ``jax.block_until_ready`` is the JAX side)."""
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _torchvision_model(min_size, max_size, matched=True):
  if not matched:
    return tv_mask_rcnn.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                              min_size=min_size, max_size=max_size)
  trunk = torchvision.models.resnet50(weights=None, norm_layer=tv_misc.FrozenBatchNorm2d)
  backbone = backbone_utils._resnet_fpn_extractor(trunk, 3)
  return tv_mask_rcnn.MaskRCNN(backbone, num_classes=91, min_size=min_size, max_size=max_size)


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------


def _jax_config(height, width, batch):
  return _synthetic_inputs.model_config(height, width, batch, _DTYPE.value)


def jax_train(rows):
  """Compiles the train step (times recorded in ``rows``); returns a function running one step."""
  config = _jax_config(512, 512, 2)
  model = modeling.MaskRCNN(config.model)
  mesh = training.make_mesh(jax.devices()[:1])
  with _Clock() as init_clock:
    state = training.create_train_state(config, model, jax.random.PRNGKey(0), mesh)
    jax.block_until_ready(state)
  step_fn = training.make_train_step(config, model, mesh, state)
  batch, _, _ = _synthetic(np.random.default_rng(0), 2, 512, 512, config.data.max_instances,
                           config.data.mask_size)
  batch = training.shard_batch(batch, mesh)
  with _Clock() as compile_clock:
    compiled = step_fn.lower(state, batch).compile()
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    jax.block_until_ready(metrics)

  rows["train_compile"] = (compile_clock.wall, compile_clock.cpu)
  rows["init"] = (init_clock.wall, init_clock.cpu)
  holder[0], metrics = compiled(holder[0], batch)  # the state is donated: keep the new one
  print("JAX train metrics:", {k: round(float(v), 4) for k, v in metrics.items()})
  return run


@functools.lru_cache(maxsize=None)
def _jax_model_and_variables(height, width):
  """The inference model at one input size and its random variables, made once per size (the
  512x512 rows of the library path and of a plain ``jax.jit`` share them)."""
  model = modeling.MaskRCNN(_jax_config(height, width, 1).model)
  variables = jax.jit(lambda k: modeling.init_variables(model, k, (height, width)))(
      jax.random.PRNGKey(0))
  return model, variables


def jax_infer(rows, key, height, width, padded_height, padded_width, prepare=True):
  """Compiles ``predict`` (compile time in ``rows``); returns a function running it once.

  With ``prepare``, the library's inference path (``inference.Predictor``): the variables
  first go through ``modeling.prepare_inference`` (Winograd kernel transforms computed once;
  its time is in ``rows[key + '_prepare']``) and ``predict`` compiles with
  ``modeling.inference_compiler_options()`` (on CPU, dots by XLA's Eigen runtime instead of
  YNNPACK). Without: a plain ``jax.jit`` of ``predict`` on the plain variables.
  """
  model, variables = _jax_model_and_variables(padded_height, padded_width)
  if prepare:
    with _Clock() as c:
      variables = jax.block_until_ready(
          modeling.prepare_inference(model, variables, (padded_height, padded_width)))
    rows[key + "_prepare"] = (c.wall, c.cpu)
  image = np.zeros((1, padded_height, padded_width, 3), np.uint8)
  image[:, :height, :width] = np.random.default_rng(1).integers(0, 256, (1, height, width, 3))
  valid_size = jnp.asarray([[height, width]], jnp.int32)
  predict = (modeling.jit_predict(model) if prepare else
             jax.jit(lambda v, im, vs: model.apply(v, im, vs, method=type(model).predict)))
  with _Clock() as c:
    compiled = predict.lower(variables, image, valid_size).compile()
  rows[key + "_compile"] = (c.wall, c.cpu)
  image = jax.device_put(image)
  out = compiled(variables, image, valid_size)
  rows[key + "_detections"] = int(out["valid"].sum())
  return lambda: jax.block_until_ready(compiled(variables, image, valid_size))


# ------------------------------------------------------------------------------------------------
# torchvision
# ------------------------------------------------------------------------------------------------


def torch_train(matched):
  """Returns a function running one torchvision train step (forward, backward, SGD)."""
  torch.manual_seed(0)
  device = _torch_device()
  model = _torchvision_model(512, 512, matched).train().to(device)
  _, images, targets = _synthetic(np.random.default_rng(0), 2, 512, 512, 100, 28)
  images = [im.to(device) for im in images]
  targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)

  def run():
    losses = model(images, targets)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    _torch_sync(device)

  return run


def torchvision_detect(model, images):
  """torchvision's eval forward up to the outputs our ``predict`` returns, per image: boxes,
  scores, labels and the predicted class's 28x28 mask probabilities ([N, 1, 28, 28]).

  ``model(images)`` does this and then ``transform.postprocess``: it scales the boxes back to
  the input size (a no-op here: the transform does not resize) and pastes every mask into an
  image-sized [N, 1, H, W] array (``paste_masks_in_image``). ``predict`` leaves pasting to its
  caller (``inference.Predictor`` and the evaluator paste on the host), so the like-for-like
  time is this one; the whole call is timed beside it.
  """
  image_list, _ = model.transform(images)
  features = model.backbone(image_list.tensors)
  proposals, _ = model.rpn(image_list, features)
  detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
  return detections


def torch_infer(rows, key, height, width):
  """Returns two functions running torchvision inference once, on one model: its forward to
  our ``predict``'s outputs (``torchvision_detect``), and the whole ``model(images)`` call."""
  torch.manual_seed(0)
  device = _torch_device()
  model = _torchvision_model(min(height, width), max(height, width)).eval().to(device)
  image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
  # On the device before timing, as the JAX side's image is (jax.device_put).
  images = [(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0).to(device)]

  def timed(forward):
    def run():
      with torch.inference_mode():
        out = forward(images)
      _torch_sync(device)
      return out
    return run

  detect, full = timed(functools.partial(torchvision_detect, model)), timed(model)
  # That the two agree is tests/test_benchmark.py's to check; one call here would only be a
  # second warm-up of the whole call (``_median_times`` warms both up).
  rows[key + "_detections"] = len(detect()[0]["boxes"])
  return detect, full


def _measure_one(framework, repeats):
  """All measurements of one framework in this process: {key: (wall s, CPU s) or value}."""
  rows = {}
  if framework == "jax":
    if not _SKIP_TRAIN.value:
      run = jax_train(rows)
      rows["train"] = _median_times([run], repeats)[0][0]
    # At 512x512 also as a plain jax.jit (no prepare_inference, XLA's default compiler
    # options), the two taking turns.
    (rows["infer_512"], rows["infer_512_plain"]), _ = _median_times(
        [jax_infer(rows, "infer_512", 512, 512, 512, 512),
         jax_infer(rows, "infer_512_plain", 512, 512, 512, 512, prepare=False)], repeats)
    rows["infer_800"] = _median_times([jax_infer(rows, "infer_800", 800, 1216, 800, 1216)],
                                      repeats)[0][0]
  else:
    if not _SKIP_TRAIN.value:
      rows["train"] = _median_times([torch_train(matched=True)], repeats)[0][0]
      rows["train_builder_default"] = _median_times([torch_train(matched=False)], repeats)[0][0]
    for key, h, w in (("infer_512", 512, 512), ("infer_800", 800, 1216)):
      (rows[key], rows[key + "_full"]), _ = _median_times(torch_infer(rows, key, h, w),
                                                          repeats)
  return rows


def _isolated(rounds, repeats, cores):
  """Each framework in a fresh process of its own, JAX and torchvision taking turns, each
  started on ``cores`` (None: wherever this process may run).

  Why: in one process the two share glibc's allocator and the cores' idle-spinning worker
  threads, and each changes the other's speed. torchvision's inference at 512x512, 2.1 s in a
  fresh process of its own, took between 1.7 and 2.6 s in one process with ours, depending on
  what ran before it (through glibc's dynamic mmap threshold: each fresh page is a page
  fault); our train step took 5.2 s right after torchvision's instead of 3.7-4.0 s (see
  docs/benchmarks.md). Separate processes measure each as a user would run it.

  Returns ({key: median over rounds}, {key: median over rounds}, {key: median of the
  per-round ratios JAX / torchvision}) for the JAX rows, torchvision rows and the ratios.
  """
  per_round = {"jax": [], "torch": []}
  for r in range(rounds):
    for framework in ("jax", "torch"):
      if framework == "torch" and _SKIP_TORCH.value:
        continue
      cmd = [sys.executable, os.path.abspath(__file__), f"--only={framework}",
             f"--repeats={repeats}", f"--threads={_THREADS.value}",
             f"--compute_dtype={_DTYPE.value}", f"--skip_train={_SKIP_TRAIN.value}"]
      if framework == "torch":
        # Resolved here, so the torchvision process never starts a JAX backend of its own.
        cmd.append(f"--torch_device={_torch_device().type}")
      with _started_on(cores):  # so its XLA thread pools have --threads threads
        proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode != 0 or _RESULT_TAG not in proc.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
      out = proc.stdout
      rows = json.loads(out.split(_RESULT_TAG, 1)[1])
      per_round[framework].append(rows)
      print(f"round {r + 1}/{rounds} {framework}:", rows, flush=True)
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


_RESULT_TAG = "BENCHMARK_ROWS_JSON:"


@contextlib.contextmanager
def _started_on(cores):
  """Processes started inside run on ``cores`` (all allowed ones if None).

  A child inherits the CPU affinity of the thread that starts it, so this thread is pinned
  while inside and set back after. (``subprocess``'s ``preexec_fn`` would do it in the child,
  but only by a plain ``fork`` of this multi-threaded process.)
  """
  if cores is None:
    yield
    return
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cores)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def _measuring_cores(argv):
  """The cores a CPU run's measuring processes start on, None on a GPU run; ``ValueError``
  if ``--threads`` cores do not exist or cannot be used."""
  del argv
  if jax.default_backend() != "cpu":
    return None
  cores = _cli.cpu_cores(_THREADS.value)
  print(f"each framework on cores {cores}", flush=True)
  if _ROUNDS.value == 0 and len(cores) < len(os.sched_getaffinity(0)):
    # This process's XLA thread pools already exist, sized to every allowed core.
    raise ValueError(f"--threads={_THREADS.value} with --rounds=0: fewer threads than cores "
                     "needs fresh processes (--rounds 1 or more)")
  return cores


def main(argv):
  torch.set_num_threads(_THREADS.value)
  repeats = _REPEATS.value
  if _ONLY.value:  # a measuring process, started (and pinned) by _isolated
    print(_RESULT_TAG + json.dumps(_measure_one(_ONLY.value, repeats)), flush=True)
    return
  cores = _cli.run_main(_measuring_cores, argv)
  jx, tv, paired = {}, {}, {}
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"torch {torch.__version__} on {_torch_device()}, threads {torch.get_num_threads()}; "
        f"compute dtype {_DTYPE.value}", flush=True)
  skip_torch = _SKIP_TORCH.value
  if _ROUNDS.value > 0:
    jx, tv, paired = _isolated(_ROUNDS.value, repeats, cores)
  else:
    _in_process(jx, tv, paired, repeats, skip_torch)
  _print_table(jx, tv, paired)


def _in_process(jx, tv, paired, repeats, skip_torch):
  """Both frameworks in this process, taking turns run by run (``--rounds 0``)."""

  def measure(key, jax_run, torch_runs=()):
    """Times the JAX run and the torchvision runs, ``(tv key, run)`` pairs, in turns (see
    ``_median_times``)."""
    times, walls = _median_times([jax_run] + [run for _, run in torch_runs], repeats)
    jx[key] = times[0]
    for (tk, _), t, w in zip(torch_runs, times[1:], walls[1:]):
      tv[tk] = t
      # Each JAX run over the torchvision run right after it.
      paired[tk] = statistics.median(a / b for a, b in zip(walls[0], w))
    print(key, "JAX:", jx[key], "torchvision:", {tk: tv[tk] for tk, _ in torch_runs}, flush=True)

  if not _SKIP_TRAIN.value:
    jax_run = jax_train(jx)
    print("JAX train compile:", jx["train_compile"], flush=True)
    measure("train", jax_run, () if skip_torch else [("train", torch_train(matched=True))])
    if not skip_torch:
      # Our step against torchvision's builder default, again in turns.
      measure("train_vs_builder_default", jax_run,
              [("train_builder_default", torch_train(matched=False))])
  for key, h, w in (("infer_512", 512, 512), ("infer_800", 800, 1216)):
    jax_run = jax_infer(jx, key, h, w, h, w)
    measure(key, jax_run,
            () if skip_torch else list(zip((key, key + "_full"), torch_infer(tv, key, h, w))))
  measure("infer_512_plain", jax_infer(jx, "infer_512_plain", 512, 512, 512, 512, prepare=False))
  print("JAX:", jx, flush=True)
  print("torchvision:", tv, flush=True)


def _print_table(jx, tv, paired):
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
    # In one process (--rounds 0) our step was timed again beside that variant.
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
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
