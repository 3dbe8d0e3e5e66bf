"""COCO evaluation with pycocotools: result formatting, mask pasting, COCOeval."""

from mrcnn_jax.evaluation.coco_eval import (
    STAT_NAMES,
    detections_to_coco,
    encode_mask,
    evaluate_coco,
    format_metrics,
    paste_mask,
)

__all__ = [
    "STAT_NAMES", "detections_to_coco", "encode_mask", "evaluate_coco", "format_metrics",
    "paste_mask",
]
