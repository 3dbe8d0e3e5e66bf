"""mrcnn_jax.inference: prediction on images of any size, one or a static batch at a time.

  predictor = Predictor.from_workdir(config, workdir)
  result = predictor(image)   # boxes, scores, classes, labels, category_ids, masks (original px)
                              # (+ keypoints, keypoint_scores for a keypoint model)
  results = Predictor.from_workdir(config, workdir, batch_size=8).predict_batch(images)
  overlay = draw_instances(image, result["boxes"], result["scores"], result["labels"],
                           result["masks"])   # or predictor.draw(image, result)

Batched over a mesh (what evaluators are given): ``make_batch_predict(model, mesh)``.
"""

from mrcnn_jax.inference.batch_predict import make_batch_predict
from mrcnn_jax.inference.masks import encode_mask
from mrcnn_jax.inference.masks import paste_mask

from mrcnn_jax.inference.predictor import expand_image_paths
from mrcnn_jax.inference.predictor import load_image
from mrcnn_jax.inference.predictor import predict_files
from mrcnn_jax.inference.predictor import Predictor
from mrcnn_jax.inference.predictor import preprocess
from mrcnn_jax.inference.predictor import to_coco_results
from mrcnn_jax.inference.visualize import draw_instances
from mrcnn_jax.inference.visualize import save_png

__all__ = [
    "Predictor", "draw_instances", "encode_mask", "expand_image_paths", "load_image",
    "make_batch_predict", "paste_mask", "predict_files", "preprocess", "save_png",
    "to_coco_results",
]
