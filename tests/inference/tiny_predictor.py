"""The untrained tiny model's ``inference.Predictor`` that the predictor tests share."""

from __future__ import annotations

import jax

from mrcnn_jax import config as config_lib
from mrcnn_jax import inference
from mrcnn_jax import modeling
from mrcnn_jax.modeling.config import tiny_model_config


def tiny_predictor(batch_size: int = 1) -> inference.Predictor:
  """64 x 64 input, two classes named "square" (id 1) and "circle" (id 7)."""
  c = config_lib.get_base_config()
  c.data.image_size = (64, 64)
  c.model = tiny_model_config(num_classes=3)
  variables = modeling.init_variables(modeling.MaskRCNN(c.model), jax.random.PRNGKey(0), (64, 64))
  # Score threshold 0: an untrained model's detections are all kept, so there is output to check.
  return inference.Predictor(c, variables, class_names=["square", "circle"],
                             category_ids=[1, 7], score_threshold=0.0, batch_size=batch_size)
