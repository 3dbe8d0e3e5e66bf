"""COCO evaluation with pycocotools: result formatting and COCOeval.

The evaluator (``mrcnn_jax.evaluation.evaluator``) is given a batched predict function
(``mrcnn_jax.inference.make_batch_predict``); mask pasting and RLE encoding, shared with the
predictor, are ``mrcnn_jax.inference.paste_mask`` and ``encode_mask``.
"""

from mrcnn_jax.evaluation.coco_eval import (
    STAT_NAMES,
    detections_to_coco,
    evaluate_coco,
    format_metrics,
)

__all__ = ["STAT_NAMES", "detections_to_coco", "evaluate_coco", "format_metrics"]
