"""mrcnn_jax.inference: single-image prediction at any size, and overlays.

  predictor = Predictor.from_workdir(config, workdir)
  result = predictor(image)   # boxes, scores, classes, labels, category_ids, masks (original px)
  overlay = draw_instances(image, result["boxes"], result["scores"], result["labels"],
                           result["masks"])
"""

from mrcnn_jax.inference.predictor import expand_image_paths
from mrcnn_jax.inference.predictor import load_image
from mrcnn_jax.inference.predictor import predict_files
from mrcnn_jax.inference.predictor import Predictor
from mrcnn_jax.inference.predictor import preprocess
from mrcnn_jax.inference.predictor import to_coco_results
from mrcnn_jax.inference.visualize import draw_instances
from mrcnn_jax.inference.visualize import save_png

__all__ = [
    "Predictor", "draw_instances", "expand_image_paths", "load_image", "predict_files",
    "preprocess", "save_png", "to_coco_results",
]
