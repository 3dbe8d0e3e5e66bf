"""Mask R-CNN (He et al., "Mask R-CNN", 2017): ResNet-FPN, RPN, box, mask and keypoint heads.

One Flax module with two entry points, both static-shape and jit-able:

* :meth:`MaskRCNN.losses` (training): ``batch`` (see the batch contract) -> (losses, stats).
  Needs the ``'sampling'`` rng stream; with ``config.norm == 'bn'`` call it with
  ``mutable=['batch_stats']``.
* :meth:`MaskRCNN.predict` (inference): uint8 images -> fixed-size detections with ``valid``.

The config selects torchvision's ``maskrcnn_resnet50_fpn`` layout (v1, the defaults) or, per
part, its ``maskrcnn_resnet50_fpn_v2`` one: FPN norms, a 2-conv RPN head, a 4conv1fc box head
and mask-head norms (``modeling.heads_v2``; ``convert_torchvision_maskrcnn_v2`` sets them all).
``config.mask.enabled`` and ``config.keypoint.enabled`` switch the two RoI branches on top of
the box branch: the defaults are Mask R-CNN; the paper's pose model (sec. 5) and torchvision's
``keypointrcnn_resnet50_fpn`` are masks off, keypoints on (``modeling.keypoint_head``); both on
trains them in the same step.

Sub-module names follow torchvision's ``MaskRCNN`` (``backbone`` is torchvision's
``backbone.body``, ``fpn`` its ``backbone.fpn``, ``rpn_head`` its ``rpn.head``, the rest its
``roi_heads.*``) so a weight converter is a table of renames and transposes.

Layers are plain Flax / ``lax`` unless ``kernels`` (a ``KernelSet``, see ``kernel_set.py``)
names platform-specific forms of the convs, mask predictor and RoI pooling; ``mesh`` runs the
per-image parts shard-locally under data parallelism (``batch_parallel.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mrcnn_jax.modeling import batch_parallel
from mrcnn_jax.modeling import heads_v2
from mrcnn_jax.modeling import keypoint_head as keypoint_lib
from mrcnn_jax.modeling import losses as loss_lib
from mrcnn_jax.modeling import resnet as resnet_lib
from mrcnn_jax.modeling import roi_heads as roi_lib
from mrcnn_jax.modeling import rpn as rpn_lib
from mrcnn_jax.modeling.fpn import FPN
from mrcnn_jax.modeling.kernel_set import KernelSet
from mrcnn_jax.modeling.kernel_set import PLAIN
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops.keypoints import heatmaps_to_keypoints
from mrcnn_jax.ops.keypoints import keypoint_targets
from mrcnn_jax.ops.masks import mask_targets
from mrcnn_jax.ops.roi_align import multilevel_roi_align

Batch = Dict[str, jax.Array]
NUM_POOLED_LEVELS = 4  # the RoI heads pool from P2..P5; P6 feeds only the RPN


def mask_chunk_bounds(num_slots: int, first: int) -> List[Tuple[int, int]]:
  """Slot ranges ``[start, stop)`` of the mask (and keypoint) head's chunks: sizes first, first,
  2 first, ...

  The chunks end at ``first * 2**k``, so running the chunks up to the one holding the last
  valid slot costs less than twice the valid slots (or ``first``), and 128 slots take 5 chunks
  at ``first`` = 8 (8, 8, 16, 32, 64): few enough that the per-chunk overhead (and, on a mesh,
  one gradient partial per chunk) stays small. The last chunk is cut at ``num_slots``.
  """
  if first < 1:
    raise ValueError(f"first chunk size must be >= 1, got {first}")
  bounds, start, stop = [], 0, first
  while start < num_slots:
    bounds.append((start, min(stop, num_slots)))
    start, stop = stop, 2 * stop
  return bounds


class GroundTruth(NamedTuple):
  """A batch's ground truth, padded to G instances per image."""

  boxes: jax.Array    # [B, G, 4] float32 xyxy network-input pixels
  classes: jax.Array  # [B, G] int32, 1..K
  masks: Optional[jax.Array]  # [B, G, S, S] float32 {0, 1}, each cropped to its box
  valid: jax.Array    # [B, G] bool
  # [B, G, K, 3] float32 (x, y, visibility 0/1/2) network-input pixels, or None
  keypoints: Optional[jax.Array] = None

  @classmethod
  def from_batch(cls, batch: Batch) -> "GroundTruth":
    optional = lambda key: (jnp.asarray(batch[key], jnp.float32) if key in batch  # noqa: E731
                            else None)
    return cls(boxes=jnp.asarray(batch["gt_boxes"], jnp.float32),
               classes=jnp.asarray(batch["gt_classes"], jnp.int32),
               masks=optional("gt_masks"),
               valid=jnp.asarray(batch["gt_valid"], bool),
               keypoints=optional("gt_keypoints"))


class MaskRCNN(nn.Module):
  """Mask R-CNN with a ResNet-FPN backbone; the mask and keypoint branches as the config says.

  Attributes:
    config: ``config.model`` (see ``modeling/config.py``).
    kernels: implementations of the convs, mask predictor and RoI pooling (``PLAIN``: Flax and
      ``lax``; ``mrcnn_jax.kernels.select()`` picks per platform). Parameters are the same.
    mesh: the data-parallel mesh whose ``'data'`` axis splits the batch, or None.
  """

  config: Any
  kernels: KernelSet = PLAIN
  mesh: Optional[Mesh] = None

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    conv = self.kernels.conv
    _check_head_norms(cfg)
    self.backbone = resnet_lib.ResNet(cfg, conv)
    self.fpn = FPN(cfg.fpn.channels, dtype, norm=cfg.fpn.norm, conv=conv)
    num_anchors = anchor_ops.num_anchors_per_location(cfg.anchors.sizes, cfg.anchors.aspect_ratios)
    if len(set(num_anchors)) != 1:
      raise ValueError(f"the shared RPN head needs the same anchors per level, got {num_anchors}")
    # v1 layouts (and parameter names) unless the config selects maskrcnn_resnet50_fpn_v2's.
    if cfg.rpn.head_convs > 1:
      self.rpn_head = heads_v2.RPNHeadV2(num_anchors[0], cfg.rpn.head_convs, dtype, conv)
    else:
      self.rpn_head = rpn_lib.RPNHead(num_anchors[0], dtype, conv)
    # Every box / mask head is called as ``head(x, train, valid)``: the v2 heads' trainable
    # BatchNorm takes its statistics over the valid RoI slots only; v1 heads ignore both.
    ro = cfg.roi
    if ro.box_head_convs > 0:
      self.box_head = heads_v2.FastRCNNConvFCHead(
          (ro.box_head_conv_channels,) * ro.box_head_convs, (ro.representation_size,),
          ro.box_head_norm, dtype, conv)
    else:
      self.box_head = roi_lib.TwoMLPHead(ro.representation_size, dtype)
    self.box_predictor = roi_lib.FastRCNNPredictor(cfg.num_classes, dtype)
    with_masks, with_keypoints = branches(cfg)
    if with_masks:
      if cfg.mask.norm != "none":
        self.mask_head = heads_v2.MaskRCNNHeadsNorm(tuple(cfg.mask.conv_channels),
                                                    cfg.mask.norm, dtype, conv)
      else:
        self.mask_head = roi_lib.MaskRCNNHead(tuple(cfg.mask.conv_channels), dtype, conv)
      self.mask_predictor = self.kernels.mask_predictor(cfg.num_classes, dtype)
    if with_keypoints:
      self.keypoint_head = keypoint_lib.KeypointRCNNHeads(tuple(cfg.keypoint.conv_channels),
                                                          dtype, conv)
      self.keypoint_predictor = keypoint_lib.KeypointRCNNPredictor(cfg.keypoint.num_keypoints,
                                                                   dtype)

  # ------------------------------------------------------------------ shared pieces

  def _features(self, images: jax.Array, train: bool, valid_size: Optional[jax.Array] = None):
    """[B, H, W, 3] RGB, uint8 or float32 in 0..255 -> [P2..P6] in the compute dtype.

    ``valid_size`` [B, 2] int (h, w): pixels outside each image's valid region (its padding)
    are 0 after normalising, as torchvision pads its normalised batch with zeros. Normalising
    the zero padding instead makes it the mean-subtracted black (about -2), which changes what
    the convolutions see near the border and with it the detections of any padded image.
    """
    cfg = self.config
    x = images.astype(jnp.float32)
    x = (x - jnp.asarray(cfg.pixel_mean, jnp.float32)) / jnp.asarray(cfg.pixel_std, jnp.float32)
    if valid_size is not None:
      vs = jnp.asarray(valid_size, jnp.int32)
      rows = jnp.arange(x.shape[1])[None, :, None] < vs[:, 0, None, None]  # [B, H, 1]
      cols = jnp.arange(x.shape[2])[None, None, :] < vs[:, 1, None, None]  # [B, 1, W]
      x = jnp.where((rows & cols)[..., None], x, 0.0)
    x = x.astype(jnp.dtype(cfg.compute_dtype))
    return self.fpn(self.backbone(x, train=train), train=train)

  def _anchors(self, image_size: Tuple[int, int]):
    """Static anchors: ([N, 4] float32 array, anchors per level)."""
    a = self.config.anchors
    per_level = anchor_ops.generate_anchors(image_size, a.strides, a.sizes, a.aspect_ratios,
                                            round_to_pixels=a.round,
                                            strides_from_grid=a.strides_from_grid)
    return jnp.asarray(rpn_lib.concat_anchors(per_level)), rpn_lib.level_sizes(per_level)

  def _proposals(self, objectness, deltas, anchors, level_sizes, valid_size, train: bool):
    r = self.config.rpn
    fn = functools.partial(
        rpn_lib.generate_proposals, level_sizes=level_sizes,
        pre_nms_top_k=r.pre_nms_top_k_train if train else r.pre_nms_top_k_test,
        post_nms_top_k=r.post_nms_top_k_train if train else r.post_nms_top_k_test,
        nms_threshold=r.nms_threshold, min_size=r.min_size, score_threshold=r.score_threshold,
        weights=tuple(r.box_weights))
    return batch_parallel.vmap(fn, in_axes=(0, 0, None, 0), mesh=self.mesh)(
        objectness, deltas, anchors, valid_size)

  def _pool(self, feats, boxes, output_size: int, sampling_ratio: int):
    """[B, N, 4] boxes -> [B, N, s, s, C] pooled from P2..P5."""
    cfg = self.config
    pool = functools.partial(
        multilevel_roi_align, output_size=output_size,
        strides=tuple(cfg.anchors.strides[:NUM_POOLED_LEVELS]), sampling_ratio=sampling_ratio,
        aligned=cfg.roi.aligned, canonical_scale=cfg.roi.canonical_scale,
        canonical_level=cfg.roi.canonical_level, pool_rois=self.kernels.pool_rois)
    # Shard-local under data parallelism: each device pools its own images' RoIs.
    return batch_parallel.per_example(pool, list(feats[:NUM_POOLED_LEVELS]), boxes,
                                      mesh=self.mesh)

  def _box_branch(self, feats, rois, train: bool = False, valid=None):
    """rois [B, R, 4] -> class logits [B, R, K+1], deltas [B, R, K+1, 4] (float32).

    ``valid`` [B, R] bool (optional, training) marks the real RoI slots."""
    r = self.config.roi
    pooled = self._pool(feats, rois, r.pooler_size, r.sampling_ratio)
    return self.box_predictor(self.box_head(pooled, train, valid))

  def _mask_branch(self, feats, rois, classes, train: bool = False, valid=None):
    """rois [B, M, 4], classes [B, M] -> [B, M, 28, 28] float32 logits of those classes.

    ``valid`` [B, M] bool (optional) marks the slots whose logits are used; chunks of slots
    with none valid are skipped (:meth:`_by_chunks`, ``config.mask.chunk_size``).
    """
    m = self.config.mask
    pooled = self._pool(feats, rois, m.pooler_size, m.sampling_ratio)
    b = pooled.shape[0]

    def run(module, x, cls, ok):
      # Only each RoI's own class channel is computed (not all K+1, then a gather).
      k = x.shape[1]
      heads = module.mask_head(x.reshape((b * k,) + x.shape[2:]), train,
                               None if ok is None else ok.reshape(b * k))
      logits = module.mask_predictor(heads, cls.reshape(b * k))
      return logits.reshape((b, k) + logits.shape[1:])  # [B, k, 28, 28]

    res = 2 * m.pooler_size  # the predictor's 2x2 stride-2 transposed conv: 14 -> 28
    # Trainable BatchNorm in the mask head (v2 'bn') updates statistics, which a skipped
    # chunk could not: then every slot runs.
    return self._by_chunks(run, (res, res), m.chunk_size, valid, pooled,
                           classes.astype(jnp.int32), valid, whole=train and m.norm == "bn")

  def _keypoint_branch(self, feats, rois, valid=None):
    """rois [B, M, 4] -> [B, M, K, 56, 56] float32 heatmap logits, one per keypoint (sec. 5).

    ``valid`` [B, M] bool (optional) marks the slots whose heatmaps are used; chunks of slots
    with none valid are skipped (:meth:`_by_chunks`, ``config.keypoint.chunk_size``).
    """
    kp = self.config.keypoint
    pooled = self._pool(feats, rois, kp.pooler_size, kp.sampling_ratio)
    b = pooled.shape[0]

    def run(module, x):
      k = x.shape[1]
      maps = module.keypoint_predictor(module.keypoint_head(x.reshape((b * k,) + x.shape[2:])))
      return jnp.moveaxis(maps.reshape((b, k) + maps.shape[1:]), -1, 2)  # [B, k, K, 56, 56]

    res = 4 * kp.pooler_size  # stride-2 transposed conv, then 2x upsampling: 14 -> 56
    return self._by_chunks(run, (kp.num_keypoints, res, res), kp.chunk_size, valid, pooled)

  def _by_chunks(self, run, out_shape, chunk_size, valid, *slots, whole: bool = False):
    """``run(self, *slots)`` -> [B, M, *out_shape] float32 for RoI-slot arrays [B, M, ...].

    The slots come valid-first (the sampler puts positives first, detections are sorted), so
    with ``valid`` [B, M] the M slots run in chunks (:func:`mask_chunk_bounds`: c, c, 2c, 4c,
    ... slots for ``chunk_size`` = c) and a chunk with no valid slot in any image is skipped
    (``lax.cond``; its outputs are zero). The outputs that are used, and every gradient, are
    the same; the cost follows the actual positives (a few per image early in training, or on
    sparse images) instead of always M: at most about twice them, in log2(M / c) + 1 chunks.
    ``whole`` runs every slot at once.
    """
    b, n = slots[0].shape[:2]
    chunk = int(chunk_size or 0)
    # Initialisation must create the parameters; values sown into 'intermediates' (stage-by-
    # stage inspection) or stored by the kernels' inference collections
    # (kernels.prepare_inference) would differ between the two branches of a cond.
    if (whole or valid is None or not chunk or n <= chunk or self.is_initializing()
        or any(self.is_mutable_collection(c)
               for c in ("intermediates",) + self.kernels.inference_collections)):
      return run(self, *slots)
    outs = []
    for start, stop in mask_chunk_bounds(n, chunk):
      part = [x[:, start:stop] for x in slots]
      zero = lambda module, *_, k=stop - start: jnp.zeros((b, k) + tuple(out_shape), jnp.float32)
      outs.append(nn.cond(jnp.any(valid[:, start:stop]), run, zero, self, *part))
    return jnp.concatenate(outs, axis=1)

  @staticmethod
  def _valid_size(images, valid_size):
    if valid_size is None:
      b, h, w = images.shape[:3]
      return jnp.broadcast_to(jnp.asarray([h, w], jnp.int32), (b, 2))
    return jnp.asarray(valid_size)

  # ------------------------------------------------------------------ training

  def losses(self, batch: Batch) -> Tuple[Dict[str, jax.Array], Dict[str, jax.Array]]:
    """Training forward pass: the multi-task loss of eq. 1 of the paper, L = L_cls + L_box +
    L_mask (+ the keypoint loss of sec. 5), plus the RPN's two losses (Faster R-CNN's joint
    training).

    Args:
      batch: the batch contract's dict: ``image`` uint8 [B, H, W, 3], ``gt_boxes`` [B, G, 4],
        ``gt_classes`` [B, G], ``gt_masks`` uint8 [B, G, S, S] (with ``mask.enabled``),
        ``gt_keypoints`` float32 [B, G, K, 3] (with ``keypoint.enabled``), ``gt_valid``
        [B, G] and optionally ``valid_size`` [B, 2] (default: the full padded size).

    Returns:
      losses: float32 scalars ``rpn_objectness``, ``rpn_box``, ``roi_class``, ``roi_box``,
        ``roi_mask`` (with ``mask.enabled``) and ``roi_keypoint`` (with ``keypoint.enabled``,
        which needs ``gt_keypoints`` [B, G, K, 3] in the batch); the training objective is
        their sum.
      stats: float32 scalars, per-image means: ``rpn_num_fg``, ``rpn_num_bg``,
        ``roi_num_fg``, ``roi_num_bg``, ``num_proposals``.
    """
    self._refuse_inference_state()
    images = batch["image"]
    b, h, w = images.shape[:3]
    gt = GroundTruth.from_batch(batch)
    valid_size = self._valid_size(images, batch.get("valid_size"))
    rpn_keys, roi_keys = jnp.split(jax.random.split(self.make_rng("sampling"), 2 * b), 2)

    feats = self._features(images, train=True, valid_size=valid_size)
    objectness, deltas = self.rpn_head(feats)
    anchors, level_sizes = self._anchors((h, w))
    rpn_losses, rpn_stats = self._rpn_losses(objectness, deltas, anchors, gt, rpn_keys)
    # Proposals are constants for the second stage (stop-gradient inside generate_proposals).
    proposals, _, proposal_valid = self._proposals(objectness, deltas, anchors, level_sizes,
                                                   valid_size, train=True)
    rois = self._sample_rois(proposals, proposal_valid, gt, roi_keys)
    box_losses = self._box_losses(feats, rois)
    with_masks, with_keypoints = branches(self.config)
    mask_losses = self._mask_losses(feats, rois, gt) if with_masks else {}
    keypoint_losses = self._keypoint_losses(feats, rois, gt) if with_keypoints else {}

    per_image = lambda x: jnp.sum(x.astype(jnp.float32)) / b
    stats = dict(
        **rpn_stats,
        roi_num_fg=per_image(rois["valid"] & (rois["labels"] > 0)),
        roi_num_bg=per_image(rois["valid"] & (rois["labels"] == 0)),
        num_proposals=per_image(proposal_valid))
    return {**rpn_losses, **box_losses, **mask_losses, **keypoint_losses}, stats

  def _refuse_inference_state(self) -> None:
    for collection in self.kernels.inference_collections:
      if collection in self.variables:
        raise ValueError(f"these variables carry {collection!r} from prepare_inference "
                         "(precomputed kernel state, which would not follow the parameters): "
                         "train on the plain variables instead")

  def _rpn_losses(self, objectness, deltas, anchors, gt: "GroundTruth", keys):
    """RPN losses over a balanced sample of anchors (Faster R-CNN, sec. 3.1.3).

    Args:
      objectness: [B, A] logits; deltas: [B, A, 4]; anchors: [A, 4] float32 xyxy.
      gt: the batch's ground truth; keys: [B] sampling keys.

    Returns:
      ({``rpn_objectness``, ``rpn_box``}, {``rpn_num_fg``, ``rpn_num_bg``}) float32 scalars.
    """
    r = self.config.rpn
    t = batch_parallel.vmap(functools.partial(
        rpn_lib.rpn_targets, fg_iou_threshold=r.fg_iou_threshold,
        bg_iou_threshold=r.bg_iou_threshold, batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction, weights=tuple(r.box_weights)),
        in_axes=(None, 0, 0, 0), mesh=self.mesh)(anchors, gt.boxes, gt.valid, keys)
    objectness_loss, box_loss = loss_lib.rpn_losses(
        jnp.take_along_axis(objectness, t["index"], axis=1),
        jnp.take_along_axis(deltas, t["index"][..., None], axis=1),
        t["label"], t["target"], t["positive"], t["valid"], beta=r.box_loss_beta)
    b = objectness.shape[0]
    per_image = lambda x: jnp.sum(x.astype(jnp.float32)) / b
    return (dict(rpn_objectness=objectness_loss, rpn_box=box_loss),
            dict(rpn_num_fg=per_image(t["positive"]),
                 rpn_num_bg=per_image(t["valid"] & ~t["positive"])))

  def _sample_rois(self, proposals, proposal_valid, gt: "GroundTruth", keys) -> Batch:
    """Training RoIs: proposals plus the GT boxes, matched at IoU 0.5, a fixed sample per image
    with at most 25% foreground (``roi_heads.sample_rois``'s dict, batched)."""
    ro = self.config.roi
    return batch_parallel.vmap(functools.partial(
        roi_lib.sample_rois, fg_iou_threshold=ro.fg_iou_threshold,
        bg_iou_threshold=ro.bg_iou_threshold, batch_size_per_image=ro.batch_size_per_image,
        positive_fraction=ro.positive_fraction, weights=tuple(ro.box_weights)),
        mesh=self.mesh)(proposals, proposal_valid, gt.boxes, gt.classes, gt.valid, keys)

  def _box_losses(self, feats, rois: Batch) -> Dict[str, jax.Array]:
    """L_cls and L_box of the sampled RoIs (Fast R-CNN): {``roi_class``, ``roi_box``}."""
    class_logits, box_deltas = self._box_branch(feats, rois["rois"], train=True,
                                                valid=rois["valid"])
    class_loss, box_loss = loss_lib.fast_rcnn_losses(
        class_logits, box_deltas, rois["labels"], rois["target"], rois["valid"],
        beta=self.config.roi.box_loss_beta)
    return dict(roi_class=class_loss, roi_box=box_loss)

  def _mask_losses(self, feats, rois: Batch, gt: "GroundTruth") -> Dict[str, jax.Array]:
    """L_mask (sec. 3 of the paper): per-pixel BCE of the GT class's 28x28 mask on the
    foreground RoIs: {``roi_mask``}.

    A fixed number of leading RoI slots: the sampler puts positives first and takes at most
    ``batch_size_per_image * positive_fraction`` of them, so with the default
    ``mask.rois_per_image`` these slots hold every sampled positive.
    """
    if gt.masks is None:
      raise ValueError("config.model.mask.enabled needs the batch's gt_masks [B, G, S, S]")
    m = self.config.mask.rois_per_image
    boxes, labels, matched = rois["rois"][:, :m], rois["labels"][:, :m], rois["matched"][:, :m]
    # Only positives count; a trainable-BatchNorm mask head (v2 'bn') also takes its batch
    # statistics over them only, as torchvision's, which sees no other RoI.
    valid = rois["valid"][:, :m] & (labels > 0)
    logits = self._mask_branch(feats, boxes, labels, train=True, valid=valid)
    targets = batch_parallel.vmap(functools.partial(
        mask_targets, size=logits.shape[-1],
        sampling_ratio=self.config.mask.target_sampling_ratio,
        aligned=self.config.mask.aligned),
        mesh=self.mesh)(gt.masks, gt.boxes, boxes, matched)
    return dict(roi_mask=loss_lib.mask_loss(logits, jax.lax.stop_gradient(targets), valid))

  def _keypoint_losses(self, feats, rois: Batch, gt: "GroundTruth") -> Dict[str, jax.Array]:
    """The keypoint loss (sec. 5 of the paper): each visible GT keypoint is a one-hot 56x56
    mask in its RoI, and each heatmap a softmax over its pixels; cross-entropy, mean over the
    visible keypoints of every foreground RoI in the batch: {``roi_keypoint``}.

    The leading ``keypoint.rois_per_image`` RoI slots, as :meth:`_mask_losses`.
    """
    kp = self.config.keypoint
    if gt.keypoints is None or gt.keypoints.shape[2:] != (kp.num_keypoints, 3):
      raise ValueError(f"config.model.keypoint.enabled needs the batch's gt_keypoints "
                       f"[B, G, {kp.num_keypoints}, 3], got "
                       f"{None if gt.keypoints is None else gt.keypoints.shape}")
    n = kp.rois_per_image
    boxes, labels, matched = rois["rois"][:, :n], rois["labels"][:, :n], rois["matched"][:, :n]
    valid = rois["valid"][:, :n] & (labels > 0)
    logits = self._keypoint_branch(feats, boxes, valid)  # [B, n, K, S, S]
    targets, visible = batch_parallel.vmap(
        functools.partial(keypoint_targets, heatmap_size=logits.shape[-1]), mesh=self.mesh)(
            gt.keypoints, boxes, matched)  # [B, n, K]: pixel index; labelled, inside the RoI
    loss = loss_lib.keypoint_loss(logits, targets, visible & valid[:, :, None])
    return dict(roi_keypoint=kp.loss_weight * loss)

  # ------------------------------------------------------------------ inference

  def predict(self, images: jax.Array, valid_size: Optional[jax.Array] = None) -> Batch:
    """Detections for a batch of images.

    Args:
      images: [B, H, W, 3] RGB, uint8 or float32 in 0..255 (e.g. an unrounded float resize),
        zero-padded at bottom/right.
      valid_size: [B, 2] int (h, w) of each image before padding; default (H, W).

    Returns:
      dict, D = config.detections_per_image: ``boxes`` [B, D, 4] float32 xyxy network-input
      pixels, ``scores`` [B, D] float32, ``classes`` [B, D] int32 (1..K), ``valid`` [B, D]
      bool (best first; padding rows are zero); with ``mask.enabled`` ``masks`` [B, D, 28, 28]
      float32 probabilities of the predicted class; with ``keypoint.enabled`` ``keypoints``
      [B, D, K, 2] float32 (x, y) network-input pixels and ``keypoint_scores`` [B, D, K]
      float32 (each heatmap's logit at its peak).
    """
    cfg = self.config
    h, w = images.shape[1:3]
    valid_size = self._valid_size(images, valid_size)
    feats = self._features(images, train=False, valid_size=valid_size)
    objectness, deltas = self.rpn_head(feats)
    anchors, level_sizes = self._anchors((h, w))
    proposals, _, proposal_valid = self._proposals(objectness, deltas, anchors, level_sizes,
                                                   valid_size, train=False)
    class_logits, box_deltas = self._box_branch(feats, proposals)
    ro = cfg.roi
    det = batch_parallel.per_example(functools.partial(
        roi_lib.detect_batch, weights=tuple(ro.box_weights), score_threshold=ro.score_threshold,
        nms_threshold=ro.nms_threshold, min_size=ro.min_size,
        detections=cfg.detections_per_image, pre_nms_top_k=ro.pre_nms_top_k),
        class_logits, box_deltas, proposals, proposal_valid, valid_size, mesh=self.mesh)
    out = dict(boxes=det["boxes"], scores=det["scores"], classes=det["classes"],
               valid=det["valid"])
    with_masks, with_keypoints = branches(cfg)
    if with_masks:
      mask_logits = self._mask_branch(feats, det["boxes"], det["classes"], valid=det["valid"])
      out["masks"] = jnp.where(det["valid"][:, :, None, None], jax.nn.sigmoid(mask_logits), 0.0)
    if with_keypoints:
      out.update(self._detect_keypoints(feats, det))
    return out

  def _detect_keypoints(self, feats, det: Batch) -> Batch:
    """Each detection's keypoints: the peak of each heatmap, upsampled to the box (bicubic),
    in network-input pixels: {``keypoints`` [B, D, K, 2], ``keypoint_scores`` [B, D, K]}."""
    maps = self._keypoint_branch(feats, det["boxes"], det["valid"])
    xy, scores = batch_parallel.vmap(functools.partial(
        heatmaps_to_keypoints, max_resize=self.config.keypoint.max_resize),
        mesh=self.mesh)(maps, det["boxes"])
    ok = det["valid"][:, :, None]
    return dict(keypoints=jnp.where(ok[..., None], xy, 0.0),
                keypoint_scores=jnp.where(ok, scores, 0.0))

  # ------------------------------------------------------------------ initialisation

  def _init_all(self, images: jax.Array):
    """Touches every sub-module once on small inputs (parameter shapes do not depend on the
    image size), so ``init`` is cheap even outside ``jit``."""
    cfg = self.config
    feats = self._features(images, train=False)
    self.rpn_head(feats)
    roi_features = lambda size: jnp.zeros((images.shape[0], size, size, feats[0].shape[-1]),
                                          feats[0].dtype)
    self.box_predictor(self.box_head(roi_features(cfg.roi.pooler_size)))
    with_masks, with_keypoints = branches(cfg)
    if with_masks:
      self.mask_predictor(self.mask_head(roi_features(cfg.mask.pooler_size)))
    if with_keypoints:
      self.keypoint_predictor(self.keypoint_head(roi_features(cfg.keypoint.pooler_size)))


def branches(cfg: Any) -> Tuple[bool, bool]:
  """``(masks, keypoints)``: which RoI branches ``config.model`` switches on. A config from
  before the switches (no ``mask.enabled``, no ``keypoint`` section) is Mask R-CNN."""
  keypoint = cfg.get("keypoint") or {}
  return bool(cfg.mask.get("enabled", True)), bool(keypoint.get("enabled", False))


def _check_head_norms(cfg: Any) -> None:
  """Trainable BatchNorm in the FPN or heads needs ``config.norm == 'bn'``: only then do the
  trainer and ``init_variables`` users carry the mutable ``batch_stats`` collection."""
  heads = {"fpn.norm": cfg.fpn.norm, "roi.box_head_norm": cfg.roi.box_head_norm,
           "mask.norm": cfg.mask.norm}
  bn = [k for k, v in heads.items() if v == "bn"]
  if bn and cfg.norm != "bn":
    raise ValueError(f"{', '.join(bn)} = 'bn' (trainable BatchNorm) needs config.norm = 'bn' "
                     f"as well, got {cfg.norm!r}")


def init_variables(model: MaskRCNN, key: jax.Array, image_size: Tuple[int, int]) -> Dict[str, Any]:
  """The model's variables, a pure function of ``key``.

  Parameters are drawn with ``key`` as given, or with ``model.kernels.init_key(key)`` where the
  kernel set has one (the CPU set's draws compile faster). ``image_size`` is accepted for the
  contract; parameter shapes do not depend on it, so a small dummy image is used and the call
  stays cheap eagerly or under ``jax.jit``.

  Returns:
    ``{'params': ...}`` plus ``'batch_stats'`` with trainable BatchNorm.
  """
  del image_size
  if model.kernels.init_key is not None:
    key = model.kernels.init_key(key)
  images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
  return dict(model.init({"params": key}, images, method=MaskRCNN._init_all))


def trainable_mask(params: Any, config: Any) -> Any:
  """Pytree of bools over ``params``: False for frozen parameters.

  Frozen: every FrozenBatchNorm array (the backbone's with ``config.norm == 'frozen_bn'``, the
  FPN's and v2 heads' with their ``norm == 'frozen_bn'``) and the backbone modules outside
  ``config.backbone.trainable_layers`` (stem and layer1 by default).
  """

  def trainable(path, _):
    keys = [str(getattr(p, "key", p)) for p in path]
    if keys and keys[0] == "backbone":
      return resnet_lib.backbone_trainable(keys[1:], config)
    return not heads_v2.is_frozen_norm_path(keys, config)

  return jax.tree_util.tree_map_with_path(trainable, params)
