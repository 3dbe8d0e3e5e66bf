r"""Our training against torchvision's: the same initial weights, data, order and recipe, the
same learning curve and the same AP within the spread over seeds (issue 28).

For each seed:

1. torchvision's ``MaskRCNN`` is built to :func:`model_config` (a narrow ResNet-(1,1,1,1)-FPN,
   FrozenBatchNorm2d body calibrated on training images, three trainable stages; see
   ``torchvision_reference.narrow_maskrcnn``) with random weights, and converted to our variables
   (``convert.convert_torchvision_maskrcnn``): both start from the same numbers.
2. Both train ``steps`` SGD steps on the same batches in the same order, with torchvision's
   detection recipe (SGD momentum 0.9, weight decay 1e-4, linear warm-up from 0.001x, x0.1 step
   decay, no clipping): ours with ``training.make_train_step``, torchvision with
   ``torchvision_reference.train_steps``. One deviation from torchvision's reference, on its side:
   weight decay skips parameters of fewer than 2 dims (biases), as ours does (two torch
   parameter groups); so the two recipes are the same function.
3. Both predict on the validation split; their detections become COCO results the same way
   (``evaluation.detections_to_coco``: masks pasted as torchvision pastes them, thresholded at
   0.5, RLE) and pycocotools scores them (``evaluation.evaluate_coco``).

The data: the synthetic shapes set (``data.shapes``: 128-px images of three aspect ratios, up to
five overlapping shapes each, crowd regions), written as PNG and read back by ``data.CocoSource``
(crowd regions leave the training targets and stay in the evaluation ground truth; images
without instances leave the training split, as in torchvision's reference). No augmentation:
torchvision gets each image unresized and unpadded (its transform pads the batch to
``image_size`` squared); we get it zero-padded to ``image_size`` squared with its ``valid_size``,
and its masks cropped to their boxes at ``image_size`` (the batch contract: binary, the nearest
pixel, as the data pipeline crops). Our mask targets, read from those crops, are sharper at the
shapes' edges than torchvision's bilinear read of the full mask (docs/benchmarks.md).

The seed sets the initial weights, the batch order (a permutation per epoch), torch's global RNG
(its samplers) and our train state's key (ours). The samplers draw differently on the two sides,
so the curves agree in distribution, not step for step: the comparison is of means over seeds
against the spread over seeds.
"""

from __future__ import annotations

# torchvision segfaults if imported after TensorFlow (which the evaluation code imports):
# torchvision_reference, the module that imports torch, comes first.
from mrcnn_jax.benchmarks import torchvision_reference as tv_ref  # noqa: I001

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from mrcnn_jax import config as config_lib
from mrcnn_jax import convert
from mrcnn_jax import kernels
from mrcnn_jax import modeling
from mrcnn_jax import run as run_lib
from mrcnn_jax import training
from mrcnn_jax.data import coco as coco_lib
from mrcnn_jax.data import shapes
from mrcnn_jax.evaluation import coco_eval
from mrcnn_jax.evaluation.evaluator import coco_from_dataset
from mrcnn_jax.inference import batch_predict
from mrcnn_jax.training.train_step import LOSS_KEYS

FRAMEWORKS = ("torchvision", "jax")
CURVES = LOSS_KEYS + ("total_loss",)
Example = Mapping[str, np.ndarray]  # data.CocoSource.load's dict, original pixels
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What both frameworks train on, and how (the script's flags)."""
  steps: int = 300
  batch_size: int = 4
  learning_rate: float = 0.02  # peak, after the warm-up
  warmup_steps: int = 50
  decay_at: Tuple[float, ...] = (0.75, 0.9)  # fractions of ``steps``: x0.1 at each
  image_size: int = 128
  num_train: int = 200
  num_val: int = 50
  data_seed: int = 0  # the data set; the seeds of the runs are separate
  calibration_images: int = 16  # training images that set the frozen BN statistics
  eval_batch_size: int = 10

  def decay_steps(self) -> Tuple[int, ...]:
    return tuple(int(round(f * self.steps)) for f in self.decay_at)


def model_config(num_classes: int, image_size: int = 128) -> ml_collections.ConfigDict:
  """The matched model: torchvision's v1 layout and defaults (``torchvision_maskrcnn_config``)
  made narrow for ``image_size``-px images: ResNet-(1,1,1,1) of stem width 16 with frozen BN
  and torchvision's three trainable stages, FPN 64, box head 128, two mask convs of 64,
  anchors 16-256, fewer proposals and sampled RoIs; mask targets sampled as torchvision
  samples them for any RoI up to the image's size."""
  c = convert.torchvision_maskrcnn_config(num_classes=num_classes)
  c.backbone.stage_blocks = (1, 1, 1, 1)
  c.backbone.width = 16
  c.backbone.trainable_layers = 3
  c.fpn.channels = 64
  c.anchors.sizes = ((16,), (32,), (64,), (128,), (256,))
  c.rpn.pre_nms_top_k_train = c.rpn.post_nms_top_k_train = 300
  c.rpn.pre_nms_top_k_test = c.rpn.post_nms_top_k_test = 300
  c.roi.batch_size_per_image = 128
  c.roi.representation_size = 128
  c.mask.conv_channels = (64, 64)
  c.mask.rois_per_image = 32  # 128 x 0.25: every sampled positive
  # torchvision takes ceil(side / 28) samples per target bin; 5 for a 128-px RoI.
  c.mask.target_sampling_ratio = math.ceil(image_size / (2 * c.mask.pooler_size))
  return c


def run_config(recipe: Recipe, num_classes: int, max_instances: int) -> ml_collections.ConfigDict:
  """The full config of our side: :func:`model_config` and the recipe's schedule."""
  config = config_lib.get_base_config()
  config.model = model_config(num_classes, recipe.image_size)
  config.data.image_size = (recipe.image_size, recipe.image_size)
  config.data.max_instances = max_instances
  config.data.mask_size = recipe.image_size
  t = config.train
  t.batch_size = t.base_batch_size = recipe.batch_size
  t.base_learning_rate = recipe.learning_rate
  t.num_steps = recipe.steps
  t.warmup_steps = recipe.warmup_steps
  t.warmup_factor = 0.001
  t.decay_steps = recipe.decay_steps()
  t.decay_factor = 0.1
  t.momentum = 0.9
  t.weight_decay = 1e-4
  t.grad_clip_norm = 0.0
  return config


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  train: List[Example]   # training examples (images with instances), in the split's order
  val: List[Example]     # every validation image
  ground_truth: Any      # pycocotools COCO of the validation split (crowd regions included)
  class_to_category: Dict[int, int]
  num_classes: int       # background included


def make_data(recipe: Recipe, out_dir: str) -> Data:
  """Writes the shapes set to ``out_dir`` (PNG, lossless) and loads it back into memory."""
  paths = shapes.generate(out_dir, recipe.num_train, recipe.num_val, recipe.image_size,
                          recipe.data_seed, image_format="png")
  train = coco_lib.CocoSource(paths["train_annotations"], paths["train_images"], training=True,
                              on_bad_example="raise")
  val = coco_lib.CocoSource(paths["eval_annotations"], paths["eval_images"], training=False,
                            on_bad_example="raise")
  categories = train.categories
  return Data(train=[train.load(i) for i in range(len(train))],
              val=[val.load(i) for i in range(len(val))],
              ground_truth=coco_from_dataset(val.ground_truth()),
              class_to_category={i + 1: c for i, c in enumerate(categories.category_ids)},
              num_classes=categories.num_classes)


def batch_order(num_examples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """[steps, batch_size] example indices: a fresh permutation each epoch, epochs concatenated."""
  rng = np.random.default_rng(seed)
  need = steps * batch_size
  order = np.concatenate([rng.permutation(num_examples)
                          for _ in range(-(-need // num_examples))])
  return order[:need].reshape(steps, batch_size)


def crop_masks(masks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
  """Full-image masks [N, h, w] -> each cropped to its xyxy box [N, 4] at [N, size, size]: the
  pixel under the centre of each cell of a size x size grid over the box (nearest pixel)."""
  out = np.zeros((len(masks), size, size), np.uint8)
  cells = (np.arange(size) + 0.5) / size
  for i, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes)):
    ys = np.clip(np.floor(y0 + cells * (y1 - y0)), 0, mask.shape[0] - 1).astype(int)
    xs = np.clip(np.floor(x0 + cells * (x1 - x0)), 0, mask.shape[1] - 1).astype(int)
    out[i] = mask[ys[:, None], xs[None, :]]
  return out


def jax_batch(examples: Sequence[Example], image_size: int, max_instances: int) -> dict:
  """Examples -> our batch contract: images zero-padded to ``image_size`` squared with their
  ``valid_size``, ground truth padded to ``max_instances``, masks cropped at ``image_size``."""
  b, s, g = len(examples), image_size, max_instances
  batch = {"image": np.zeros((b, s, s, 3), np.uint8),
           "valid_size": np.zeros((b, 2), np.int32),
           "gt_boxes": np.zeros((b, g, 4), np.float32),
           "gt_classes": np.zeros((b, g), np.int32),
           "gt_masks": np.zeros((b, g, s, s), np.uint8),
           "gt_valid": np.zeros((b, g), bool)}
  for i, e in enumerate(examples):
    h, w = e["image"].shape[:2]
    n = len(e["classes"])
    if n > g or h > s or w > s:
      raise ValueError(f"example {i}: {n} instances in {h}x{w}, the batch holds {g} in {s}x{s}")
    batch["image"][i, :h, :w] = e["image"]
    batch["valid_size"][i] = (h, w)
    batch["gt_boxes"][i, :n] = e["boxes"]
    batch["gt_classes"][i, :n] = e["classes"]
    batch["gt_masks"][i, :n] = crop_masks(e["masks"], e["boxes"], s)
    batch["gt_valid"][i, :n] = True
  return batch


def eval_info(examples: Sequence[Example]) -> dict:
  """What ``detections_to_coco`` needs of a batch: ids, original sizes, scale 1."""
  return {"image_id": np.array([e["image_id"] for e in examples], np.int64),
          "original_size": np.array([e["image"].shape[:2] for e in examples], np.int32),
          "image_scale": np.ones((len(examples), 2), np.float32)}


# ------------------------------------------------------------------------------------------------
# The two sides
# ------------------------------------------------------------------------------------------------


def evaluate_torchvision(model: Any, data: Data, recipe: Recipe,
                         detections: int) -> List[dict]:
  """COCO result records of torchvision's model on the validation split."""
  records = []
  for start in range(0, len(data.val), recipe.eval_batch_size):
    examples = data.val[start:start + recipe.eval_batch_size]
    det = tv_ref.detect_arrays(model, [e["image"] for e in examples], detections)
    records += coco_eval.detections_to_coco(det, eval_info(examples), data.class_to_category)
  return records


class JaxSide:
  """Our model, train step and batched predict on one device, each compiled once per run."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.mesh = run_lib.make_mesh(jax.devices()[:1])
    self.model = modeling.MaskRCNN(config.model, mesh=self.mesh,
                                   kernels=kernels.select(config.kernels, mesh=self.mesh))
    self.predict = batch_predict.make_batch_predict(self.model, self.mesh)
    self._step = None

  def train(self, variables: dict, data: Data, order: np.ndarray,
            seed: int) -> Tuple[dict, Dict[str, List[float]]]:
    """``len(order)`` steps from ``variables``; returns the trained variables and per-step
    losses (fetched once, at the end)."""
    c = self.config
    state = training.create_train_state(c, self.model, jax.random.PRNGKey(seed), self.mesh,
                                        init_fn=lambda *_: variables)
    if self._step is None:  # the state's structure is the same for every seed
      self._step = training.make_train_step(c, self.model, self.mesh, state)
    size, g = c.data.image_size[0], c.data.max_instances
    metrics = []
    for idx in order:
      batch = jax_batch([data.train[i] for i in idx], size, g)
      state, m = self._step(state, run_lib.make_global_batch(batch, self.mesh))
      metrics.append({k: m[k] for k in CURVES + ("learning_rate",)})
    metrics = jax.device_get(metrics)
    curves = {k: [float(m[k]) for m in metrics] for k in metrics[0]}
    return jax.device_get(state.variables()), curves

  def evaluate(self, variables: dict, data: Data, recipe: Recipe) -> List[dict]:
    """COCO result records of our model on the validation split (padded last batch)."""
    records, s = [], recipe.image_size
    for start in range(0, len(data.val), recipe.eval_batch_size):
      examples = data.val[start:start + recipe.eval_batch_size]
      padded = [np.pad(e["image"], ((0, s - e["image"].shape[0]), (0, s - e["image"].shape[1]),
                                    (0, 0))) for e in examples]
      images, valid_size = batch_predict.stack_padded(
          padded, [e["image"].shape[:2] for e in examples], recipe.eval_batch_size)
      batch = run_lib.make_global_batch({"image": images, "valid_size": valid_size}, self.mesh)
      det = jax.device_get(self.predict(variables, batch["image"], batch["valid_size"]))
      det = {k: v[:len(examples)] for k, v in det.items()}
      records += coco_eval.detections_to_coco(det, eval_info(examples), data.class_to_category)
    return records


def average_precision(data: Data, records: List[dict]) -> Dict[str, Any]:
  """pycocotools' numbers of ``records`` on the validation split, per IoU type."""
  metrics = coco_eval.evaluate_coco(data.ground_truth, records)
  return {t: {k: v for k, v in m.items() if k != "summary"} for t, m in metrics.items()}


def run_seed(data: Data, recipe: Recipe, seed: int, jax_side: JaxSide, evaluate: bool = True,
             log: Log = print) -> Dict[str, Any]:
  """One seed: the matched pair built, converted, trained and (with ``evaluate``) scored."""
  config = jax_side.config
  tv_model = tv_ref.narrow_maskrcnn(
      config.model, recipe.image_size,
      [e["image"] for e in data.train[:recipe.calibration_images]], seed)
  variables, _ = convert.convert_torchvision_maskrcnn(tv_model.state_dict(), config=config.model)
  order = batch_order(len(data.train), recipe.steps, recipe.batch_size, seed)
  out = {"seed": seed, "jax": {}, "torchvision": {}}

  t0 = time.perf_counter()
  trained, out["jax"]["losses"] = jax_side.train(variables, data, order, seed)
  out["jax"]["train_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  out["torchvision"]["losses"] = tv_ref.train_steps(
      tv_model, ([data.train[i] for i in idx] for idx in order), config.train, seed)
  out["torchvision"]["train_s"] = time.perf_counter() - t0
  log(f"seed {seed}: {recipe.steps} steps in {out['jax']['train_s']:.0f} s (jax; the first seed "
      f"compiles), {out['torchvision']['train_s']:.0f} s (torchvision)")
  if not evaluate:
    return out
  t0 = time.perf_counter()
  out["jax"]["ap"] = average_precision(data, jax_side.evaluate(trained, data, recipe))
  out["jax"]["eval_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  out["torchvision"]["ap"] = average_precision(data, evaluate_torchvision(
      tv_model, data, recipe, config.model.detections_per_image))
  out["torchvision"]["eval_s"] = time.perf_counter() - t0
  for fw in FRAMEWORKS:
    log(f"seed {seed}: {fw} box AP {out[fw]['ap']['bbox']['AP']:.3f}, mask AP "
        f"{out[fw]['ap']['segm']['AP']:.3f}")
  return out


def run(recipe: Recipe = Recipe(), seeds: Sequence[int] = (0, 1, 2), evaluate: bool = True,
        data_dir: Optional[str] = None, log: Log = print) -> Dict[str, Any]:
  """Every seed of the comparison, and :func:`summarize`'s verdict.

  Args:
    recipe: data, schedule and sizes.
    seeds: one run of each framework per seed.
    evaluate: also score both on the validation split (pycocotools box and mask AP).
    data_dir: where the shapes set is written (default: a temporary folder).
    log: progress lines.

  Returns:
    ``{'recipe', 'config', 'runs': [per seed: {'seed', 'jax', 'torchvision'}], 'summary',
    'versions'}``; each framework's entry has ``losses`` (per step: the five losses,
    ``total_loss``, ``learning_rate``), ``train_s`` and, with ``evaluate``, ``ap``
    (``evaluate_coco``'s numbers per IoU type) and ``eval_s``.
  """
  with contextlib.ExitStack() as stack:
    if data_dir is None:
      data_dir = stack.enter_context(tempfile.TemporaryDirectory())
    data = make_data(recipe, data_dir)
  log(f"data: {len(data.train)} training images with instances, {len(data.val)} validation")
  config = run_config(recipe, data.num_classes, max(len(e["classes"]) for e in data.train))
  jax_side = JaxSide(config)
  runs = [run_seed(data, recipe, seed, jax_side, evaluate, log) for seed in seeds]
  return {"recipe": dataclasses.asdict(recipe), "config": config.to_dict(), "runs": runs,
          "summary": summarize(runs),
          "versions": dict(tv_ref.versions(), jax=jax.__version__,
                           device=jax.devices()[0].device_kind)}


# ------------------------------------------------------------------------------------------------
# Verdict, plot
# ------------------------------------------------------------------------------------------------


def window_mean(values: Sequence[float], fraction: float = 0.2) -> float:
  """Mean of the last ``fraction`` of a curve (at least one value)."""
  n = max(1, int(round(len(values) * fraction)))
  return float(np.mean(values[-n:]))


def summarize(runs: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Per figure (final loss: the mean of each loss over the last 20% of steps; box and mask AP)
  and framework: the per-seed values, their mean and spread (max - min over seeds); ``agree``:
  the two means differ by at most the larger of the two spreads (None with one seed)."""
  figures: Dict[str, Dict[str, List[float]]] = {}
  for r in runs:
    for fw in FRAMEWORKS:
      values = {f"final_{k}": window_mean(r[fw]["losses"][k]) for k in CURVES}
      if "ap" in r[fw]:
        values.update(box_ap=r[fw]["ap"]["bbox"]["AP"], mask_ap=r[fw]["ap"]["segm"]["AP"])
      for k, v in values.items():
        figures.setdefault(k, {f: [] for f in FRAMEWORKS})[fw].append(v)
  out = {}
  for k, per_fw in figures.items():
    entry = {fw: {"per_seed": v, "mean": float(np.mean(v)), "spread": float(np.ptp(v))}
             for fw, v in per_fw.items()}
    entry["difference"] = entry["jax"]["mean"] - entry["torchvision"]["mean"]
    entry["spread"] = max(entry[fw]["spread"] for fw in FRAMEWORKS)
    entry["agree"] = (bool(abs(entry["difference"]) <= entry["spread"]) if len(runs) > 1
                      else None)
    out[k] = entry
  return out


def format_summary(summary: Mapping[str, Any]) -> str:
  lines = [f"{'figure':22s} {'torchvision':>24s} {'jax':>24s} {'diff':>8s} {'spread':>7s}  agree"]
  for k, e in summary.items():
    cells = [" ".join(f"{v:.3f}" for v in e[fw]["per_seed"]) + f" ({e[fw]['mean']:.3f})"
             for fw in FRAMEWORKS]
    lines.append(f"{k:22s} {cells[0]:>24s} {cells[1]:>24s} {e['difference']:+8.3f} "
                 f"{e['spread']:7.3f}  {({True: 'yes', False: 'NO'}).get(e['agree'], 'n/a')}")
  return "\n".join(lines)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  """Trailing moving average (the first points average what there is)."""
  c = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
  n = np.minimum(np.arange(1, len(values) + 1), window)
  return (c[1:] - c[np.arange(1, len(values) + 1) - n]) / n


def plot(results: Mapping[str, Any], path: str, window: int = 20) -> None:
  """Both frameworks' total loss per seed (left) and the five losses, mean over seeds (right),
  smoothed over ``window`` steps; the APs in the title."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  styles = {"torchvision": dict(color="tab:blue"), "jax": dict(color="tab:orange", ls="--")}
  fig, (ax_total, ax_parts) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in results["runs"]:
    for fw in FRAMEWORKS:
      ax_total.plot(smooth(r[fw]["losses"]["total_loss"], window), lw=1.2, alpha=0.8,
                    label=f"{fw}, seed {r['seed']}", **styles[fw])
  for k, colour in zip(LOSS_KEYS, ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:gray")):
    for fw in FRAMEWORKS:
      mean = np.mean([r[fw]["losses"][k] for r in results["runs"]], axis=0)
      ax_parts.plot(smooth(mean, window), color=colour, ls=styles[fw].get("ls", "-"), lw=1.2,
                    label=f"{k} ({fw})" if fw == "jax" else k)
  ax_total.set_title(f"total loss, moving average of {window} steps")
  ax_parts.set_title("the five losses, mean over seeds (solid torchvision, dashed jax)")
  ax_parts.set_yscale("log")
  for ax in (ax_total, ax_parts):
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
  ax_total.legend(fontsize=8)
  ax_parts.legend(fontsize=7, ncol=2, handles=ax_parts.get_lines()[::2])
  s = results["summary"]
  if "box_ap" in s:
    fig.suptitle("final box / mask AP (mean over seeds): torchvision "
                 f"{s['box_ap']['torchvision']['mean']:.3f} / "
                 f"{s['mask_ap']['torchvision']['mean']:.3f}, jax {s['box_ap']['jax']['mean']:.3f}"
                 f" / {s['mask_ap']['jax']['mean']:.3f}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(results: Mapping[str, Any], out_dir: str) -> Tuple[str, str]:
  """``out_dir/training_vs_torchvision.json`` and ``.png``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "training_vs_torchvision.json")
  png_path = os.path.join(out_dir, "training_vs_torchvision.png")
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1)
  plot(results, png_path)
  return json_path, png_path

