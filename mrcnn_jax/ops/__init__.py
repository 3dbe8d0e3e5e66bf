"""Pure, static-shape detection ops in ``jax.numpy`` (no Flax), each checked against torchvision.

Conventions: boxes are ``xyxy`` float32 in pixels; features are NHWC; every op has a fixed
output shape (NMS pads with -1, the sampler returns a ``valid`` mask) so it compiles once under
``jax.jit``; per-image ops batch with ``jax.vmap``; shapes are checked eagerly and a wrong rank
raises ``ValueError``.

    from mrcnn_jax.ops import roi_align, nms
"""

from mrcnn_jax.ops.anchors import cell_anchors, generate_anchors, num_anchors_per_location
from mrcnn_jax.ops.boxes import (
    box_area,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    decode_boxes,
    encode_boxes,
    small_box_mask,
    xyxy_to_cxcywh,
)
from mrcnn_jax.ops.keypoints import heatmaps_to_keypoints, keypoint_targets
from mrcnn_jax.ops.masks import mask_targets, paste_masks
from mrcnn_jax.ops.matching import match_boxes
from mrcnn_jax.ops.nms import batched_nms, nms
from mrcnn_jax.ops.roi_align import assign_fpn_levels, multilevel_roi_align, roi_align
from mrcnn_jax.ops.sampling import sample_balanced

__all__ = [
    "assign_fpn_levels", "batched_nms", "box_area", "box_iou", "cell_anchors", "clip_boxes",
    "cxcywh_to_xyxy", "decode_boxes", "encode_boxes", "generate_anchors",
    "heatmaps_to_keypoints", "keypoint_targets", "mask_targets", "match_boxes",
    "multilevel_roi_align", "nms", "num_anchors_per_location", "paste_masks", "roi_align",
    "sample_balanced", "small_box_mask", "xyxy_to_cxcywh",
]
