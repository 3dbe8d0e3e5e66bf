"""COCO evaluation with pycocotools: result formatting and COCOeval (bbox, segm, keypoints).

The evaluator (``mrcnn_jax.evaluation.evaluator``) is given a batched predict function
(``mrcnn_jax.inference.make_batch_predict``); mask pasting and RLE encoding, shared with the
predictor, are ``mrcnn_jax.inference.paste_mask`` and ``encode_mask``.
"""

from mrcnn_jax.evaluation.coco_eval import (
    IOU_TYPES,
    KEYPOINT_STAT_NAMES,
    STAT_NAMES,
    detections_to_coco,
    evaluate_coco,
    format_metrics,
    oks_sigmas_by_category,
    stat_names,
    summary_scalars,
)

__all__ = ["IOU_TYPES", "KEYPOINT_STAT_NAMES", "STAT_NAMES", "detections_to_coco",
           "evaluate_coco", "format_metrics", "oks_sigmas_by_category", "stat_names",
           "summary_scalars"]
