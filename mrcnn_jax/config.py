"""The base experiment config: one ``ml_collections.ConfigDict`` with a section per package.

Each section is defined next to the code that reads it (``modeling/config.py``,
``data/config.py``, ``training/config.py``); the run-level sections (``checkpoint``, ``eval``,
``log``) and the starting-point fields (``resume``, ``init_weights``) are defined here, since the
loop (``training/loop.py``) reads them. Experiments in ``experiments/`` call
:func:`get_base_config` and override what differs. Defaults are torchvision's Mask R-CNN
R50-FPN values.
"""

from __future__ import annotations

import ml_collections

from mrcnn_jax.data.config import data_config
from mrcnn_jax.modeling.config import model_config
from mrcnn_jax.training.config import train_config


def checkpoint_config() -> ml_collections.ConfigDict:
  """``config.checkpoint``: orbax checkpoints under ``<workdir>/checkpoints``."""
  c = ml_collections.ConfigDict()
  c.every_steps = 5000  # a checkpoint at each multiple of this step, and at the end
  c.max_to_keep = 3
  c.async_save = True  # write in the background while training goes on
  return c


def eval_config() -> ml_collections.ConfigDict:
  """``config.eval``: COCO evaluation on ``config.data.eval_*`` during and after training."""
  c = ml_collections.ConfigDict()
  c.every_steps = 0  # 0: only at the end of training
  c.at_end = True
  c.iou_types = ("bbox", "segm")  # and/or "keypoints" (OKS AP; needs a keypoint model and GT)
  c.mask_threshold = 0.5  # pasted mask probability above which a pixel is foreground
  c.num_images_to_draw = 4  # prediction overlays written to TensorBoard and <workdir>/eval/
  c.draw_score_threshold = 0.5
  # One OKS sigma per keypoint (pycocotools' kpt_oks_sigmas), for every category with keypoints
  # not listed below: COCO's 17 person keypoints (nose, eyes, ears, shoulders, elbows, wrists,
  # hips, knees, ankles), divided by 10 as pycocotools does, so they equal its own bit for bit.
  c.keypoint_oks_sigmas = tuple(s / 10.0 for s in (
      .26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89))
  # Category name -> its own K sigmas (each category is scored with its own, then averaged).
  c.keypoint_oks_sigmas_per_category = ml_collections.ConfigDict()
  # Overlays draw a keypoint whose score (its heatmap logit) is above this: Detectron's kp_thresh.
  c.keypoint_draw_threshold = 2.0
  return c


def log_config() -> ml_collections.ConfigDict:
  """``config.log``: how often metrics come back to the host and go to TensorBoard."""
  c = ml_collections.ConfigDict()
  # Metrics stay on device between fetches: one transfer per this many steps, never per step.
  c.every_steps = 50
  c.tensorboard = True  # <workdir>/tensorboard, written by process 0 only
  return c


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the full default config (model, data, train sections plus run-level sections)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Devices of the data-parallel mesh: 0 = every device of every host.
  config.num_devices = 0
  # Platform kernels (mrcnn_jax.kernels.select): 'auto' (CPU ones on CPU), 'plain' or 'cpu'.
  config.kernels = "auto"
  config.model = model_config()
  config.data = data_config()
  config.train = train_config()
  config.checkpoint = checkpoint_config()
  config.eval = eval_config()
  config.log = log_config()
  # Starting point when the workdir has no checkpoint of its own (a workdir's checkpoint always
  # wins, so a restarted run continues itself): `resume` is another run's checkpoint (workdir,
  # checkpoints/ folder or step folder), restored whole; `init_weights` gives parameters only
  # (orbax checkpoint, .msgpack or .npz), e.g. converted torchvision weights.
  config.resume = ""
  config.init_weights = ""
  return config


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file, loaded by path.

  Experiment files are loaded by path (``--config experiments/x.py``), not imported, so one
  experiment builds on another with
  ``load_config_file(os.path.join(os.path.dirname(__file__), "coco_r50_fpn_1x.py"))``.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  name = "experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
