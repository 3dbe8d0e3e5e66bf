"""Training settings (``config.train``).

Defaults follow torchvision's detection reference recipe for Mask R-CNN R50-FPN on COCO
(``train.py --lr 0.02 -b 2 x 8 GPUs``, 26 epochs ~ 90k iterations at batch 16): SGD momentum 0.9,
weight decay 1e-4, a 1000-iteration linear warm-up from 0.001x, then x0.1 at fixed steps.
"""

from __future__ import annotations

import ml_collections


def train_config() -> ml_collections.ConfigDict:
  """Returns the ``config.train`` section with torchvision's 1x-schedule defaults."""
  c = ml_collections.ConfigDict()
  c.batch_size = 16  # global batch over all hosts and devices
  c.num_steps = 90_000

  # Learning rate. ``base_learning_rate`` is for ``base_batch_size`` images per step; the actual
  # peak rate scales linearly with ``batch_size`` (the linear scaling rule, Goyal et al. 2017).
  c.base_learning_rate = 0.02
  c.base_batch_size = 16
  c.warmup_steps = 1000
  c.warmup_factor = 0.001  # the rate at step 0 is peak * warmup_factor, then rises linearly
  c.decay_steps = (60_000, 80_000)  # multiply the rate by decay_factor at each of these steps
  c.decay_factor = 0.1

  # Optimizer: SGD with heavy-ball momentum (PyTorch's formulation) and L2 weight decay that
  # skips biases and normalisation parameters (every parameter with fewer than 2 dims).
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.grad_clip_norm = 0.0  # global-norm clipping threshold; 0 disables clipping
  return c
