"""End to end: the tiny MaskRCNN over-fits two synthetic images with the real train step.

The total loss must fall at least 10x, and ``predict`` must then find every ground-truth object
(IoU >= 0.8, right class) with its mask. This exercises the whole chain: losses, gradients
through every head, the optimizer, the sharded step and inference.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mrcnn_jax import config as config_lib
from mrcnn_jax import modeling
from mrcnn_jax.modeling.config import tiny_model_config
from mrcnn_jax.run import sharding as sharding_lib
from mrcnn_jax.training import train_state as train_state_lib
from mrcnn_jax.training import train_step as train_step_lib
from tests.training import synthetic

IMAGE_SIZE = (64, 64)
NUM_STEPS = 200  # the loss falls ~28x by then (10x needed), every IoU >= 0.95


def _iou(a, b):
  """IoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M] (numpy reference)."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
  return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@pytest.mark.slow
def test_overfits_two_images_and_predict_recovers_them():
  config = config_lib.get_base_config()
  config.model = tiny_model_config(num_classes=4)  # background + 3 shape classes
  config.data.image_size = IMAGE_SIZE
  config.data.max_instances = 4
  config.data.mask_size = 28
  config.train.batch_size = 2
  config.train.base_learning_rate = 0.02 * 8  # 0.02 at batch 2
  config.train.warmup_steps = NUM_STEPS // 15
  config.train.decay_steps = (NUM_STEPS * 3 // 4,)
  config.train.grad_clip_norm = 10.0
  model = modeling.MaskRCNN(config.model)
  mesh = sharding_lib.make_mesh(jax.devices()[:2])
  state = train_state_lib.create_train_state(config, model, jax.random.PRNGKey(0), mesh)
  step_fn = train_step_lib.make_train_step(config, model, mesh, state)

  host_batch = synthetic.make_batch(np.random.default_rng(0), 2, IMAGE_SIZE, max_instances=4,
                                    mask_size=28, min_size=20)
  batch = sharding_lib.make_global_batch(host_batch, mesh)
  history = []
  for _ in range(NUM_STEPS):
    state, metrics = step_fn(state, batch)
    history.append(metrics["total_loss"])  # stays on device; fetched once below
  losses = np.asarray(jax.device_get(history))
  assert np.all(np.isfinite(losses))
  first, last = losses[:5].mean(), losses[-10:].mean()
  assert last <= first / 10, f"loss {first:.3f} -> {last:.3f}"

  predict = jax.jit(lambda v, im: model.apply(v, im, method=modeling.MaskRCNN.predict))
  out = jax.device_get(predict(state.variables(), host_batch["image"]))
  for b in range(2):
    gt_valid = host_batch["gt_valid"][b]
    gt_boxes = host_batch["gt_boxes"][b][gt_valid]
    gt_classes = host_batch["gt_classes"][b][gt_valid]
    keep = out["valid"][b] & (out["scores"][b] >= 0.5)
    boxes, classes = out["boxes"][b][keep], out["classes"][b][keep]
    masks = out["masks"][b][keep]
    assert len(boxes) > 0, f"image {b}: no confident detection"
    ious = _iou(gt_boxes, boxes)
    for g in range(len(gt_boxes)):
      j = int(np.argmax(ious[g]))
      assert ious[g, j] >= 0.8, f"image {b} object {g}: best IoU {ious[g, j]:.2f}"
      assert classes[j] == gt_classes[g], f"image {b} object {g}: class {classes[j]}"
      # The mask (28x28 inside the predicted box) agrees with the GT shape's box-cropped mask.
      gt_mask = host_batch["gt_masks"][b][gt_valid][g]
      agree = np.mean((masks[j] >= 0.5) == (gt_mask >= 1))
      assert agree >= 0.8, f"image {b} object {g}: mask agreement {agree:.2f}"
