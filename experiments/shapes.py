"""The embedded default: Mask R-CNN on the synthetic shapes data set, trained on a laptop CPU.

Launch (the README's main job runs this, after generating the data set)::

  python -m mrcnn_jax.data.shapes --out data_cache/shapes --num_train 1000
  python scripts/train.py --config experiments/shapes.py --workdir workdirs/shapes
  # or all of it, plus evaluation and drawn predictions:
  python scripts/main_job.py --workdir workdirs/shapes

Hardware and time: any CPU; on an idle 2-core machine 1200 steps at about 0.15 s/step, about
4 min end to end (data, training, evaluation, drawing). Known result (1000 train images, the
50-image val split): mask AP 0.872, AP50 0.973, AP75 0.942; box AP 0.816, AP50 0.974
(docs/benchmarks.md, "Main job").

The model is a narrow ResNet-FPN (same code paths as R50-FPN: all five FPN levels, RPN, box and
mask branches) sized for 128-pixel images of 3 shape classes; anchors are scaled down with the
images. Objects here are 20-60 px, where half a pixel counts: RoIAlign and the masks use the
half-pixel-exact conventions (``roi.aligned``, ``mask.aligned``; torchvision's would cap a
perfect mask's IoU, ``mrcnn_jax/ops/masks.py``), and the mask head has the paper's four convs.
``get_config('DIR')`` points the data paths at another shapes folder.
The global batch (4) is split over all processes and devices (4 / process_count per process);
the README's multi-process example runs it as 2 processes on one machine.
"""

from __future__ import annotations

from mrcnn_jax.config import get_base_config
from mrcnn_jax.data import shapes
from mrcnn_jax.modeling.config import tiny_model_config

DEFAULT_DATA_DIR = "data_cache/shapes"


def get_config(arg: str | None = None):
  config = get_base_config()
  config.data.update(shapes.data_paths(arg or DEFAULT_DATA_DIR))
  config.data.image_size = (128, 128)
  config.data.max_instances = 16
  config.data.mask_size = 56
  config.data.scale_range = (0.8, 1.2)
  config.data.eval_batch_size = 10

  m = tiny_model_config(num_classes=4)  # square, circle, triangle + background
  m.backbone.width = 16
  m.backbone.trainable_layers = 5  # from scratch: nothing is frozen
  m.norm = "gn"
  m.fpn.channels = 64
  m.anchors.sizes = ((16,), (32,), (64,), (128,), (256,))
  m.roi.representation_size = 128
  m.roi.aligned = True
  m.mask.aligned = True
  m.mask.conv_channels = (64, 64, 64, 64)
  m.detections_per_image = 20
  config.model = m

  t = config.train
  t.batch_size = 4
  t.num_steps = 1200  # 4800 images, about 5 epochs of the 1000-image train split
  t.base_learning_rate = 0.02
  t.base_batch_size = 8  # peak rate 0.01 at batch 4
  t.warmup_steps = 100
  t.decay_steps = (960, 1120)
  t.grad_clip_norm = 10.0

  config.checkpoint.every_steps = 200
  config.checkpoint.max_to_keep = 2
  config.eval.every_steps = 0
  config.log.every_steps = 25
  return config
