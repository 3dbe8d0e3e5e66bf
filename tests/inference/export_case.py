"""The tiny model, weights and two-image batch the export tests share (the second image padded)."""

from __future__ import annotations

import jax
import numpy as np

from mrcnn_jax import config as config_lib
from mrcnn_jax import modeling
from mrcnn_jax.inference import export
from mrcnn_jax.modeling.config import tiny_model_config

SIZE, BATCH = (64, 64), 2


def tiny_case() -> dict:
  """``config``, ``variables``, ``images`` [2, 64, 64, 3] uint8, ``valid_size`` [2, 2] and
  ``predict`` (the plain-kernel ``MaskRCNN.predict``, unjitted) with ``ref``, its jitted
  outputs on the batch."""
  c = config_lib.get_base_config()
  c.data.image_size = SIZE
  c.model = tiny_model_config(num_classes=3)
  variables = export.random_variables(c)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (BATCH,) + SIZE + (3,), dtype=np.uint8)
  images[1, 48:], images[1, :, 40:] = 0, 0  # the second image is 48 x 40, zero-padded
  valid_size = np.array([SIZE, (48, 40)], np.int32)
  model = modeling.MaskRCNN(c.model, kernels=modeling.PLAIN)
  predict = lambda v, im, vs: model.apply(v, im, vs, method=modeling.MaskRCNN.predict)
  ref = jax.device_get(jax.jit(predict)(variables, images, valid_size))
  assert ref["valid"].sum() > 2, "no detections to compare: pick another seed"
  return dict(config=c, variables=variables, images=images, valid_size=valid_size,
              predict=predict, ref=ref)
