"""Mask R-CNN (He et al., "Mask R-CNN", 2017): ResNet-FPN, RPN, box and mask heads.

One Flax module with two entry points, both static-shape and jit-able:

* :meth:`MaskRCNN.losses` (training): ``batch`` (see the batch contract) -> (losses, stats).
  Needs the ``'sampling'`` rng stream; with ``config.norm == 'bn'`` call it with
  ``mutable=['batch_stats']``.
* :meth:`MaskRCNN.predict` (inference): uint8 images -> fixed-size detections with ``valid``.

The config selects torchvision's ``maskrcnn_resnet50_fpn`` layout (v1, the defaults) or, per
part, its ``maskrcnn_resnet50_fpn_v2`` one: FPN norms, a 2-conv RPN head, a 4conv1fc box head
and mask-head norms (``modeling.heads_v2``; ``convert_torchvision_maskrcnn_v2`` sets them all).

Sub-module names follow torchvision's ``MaskRCNN`` (``backbone`` is torchvision's
``backbone.body``, ``fpn`` its ``backbone.fpn``, ``rpn_head`` its ``rpn.head``, the rest its
``roi_heads.*``) so a weight converter is a table of renames and transposes.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.modeling import batch_parallel
from mrcnn_jax.modeling import conv as conv_lib
from mrcnn_jax.modeling import heads_v2
from mrcnn_jax.modeling import losses as loss_lib
from mrcnn_jax.modeling import resnet as resnet_lib
from mrcnn_jax.modeling import roi_heads as roi_lib
from mrcnn_jax.modeling import rpn as rpn_lib
from mrcnn_jax.modeling.fpn import FPN
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops.masks import mask_targets
from mrcnn_jax.ops.roi_align import multilevel_roi_align

Batch = Dict[str, jax.Array]
NUM_POOLED_LEVELS = 4  # the RoI heads pool from P2..P5; P6 feeds only the RPN


def mask_chunk_bounds(num_slots: int, first: int) -> List[Tuple[int, int]]:
  """Slot ranges ``[start, stop)`` of the mask head's chunks: sizes first, first, 2 first, ...

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


class MaskRCNN(nn.Module):
  """Mask R-CNN with a ResNet-FPN backbone.

  Attributes:
    config: ``config.model`` (see ``modeling/config.py``).
  """

  config: Any

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    _check_head_norms(cfg)
    self.backbone = resnet_lib.ResNet(cfg)
    self.fpn = FPN(cfg.fpn.channels, dtype, norm=cfg.fpn.get("norm", "none"))
    num_anchors = anchor_ops.num_anchors_per_location(cfg.anchors.sizes, cfg.anchors.aspect_ratios)
    if len(set(num_anchors)) != 1:
      raise ValueError(f"the shared RPN head needs the same anchors per level, got {num_anchors}")
    # v1 layouts (and parameter names) unless the config selects maskrcnn_resnet50_fpn_v2's
    # heads; the ``.get`` defaults keep configs written before these fields loading as v1.
    head_convs = cfg.rpn.get("head_convs", 1)
    if head_convs > 1:
      self.rpn_head = heads_v2.RPNHeadV2(num_anchors[0], head_convs, dtype)
    else:
      self.rpn_head = rpn_lib.RPNHead(num_anchors[0], dtype)
    ro = cfg.roi
    if ro.get("box_head_convs", 0) > 0:
      self.box_head = heads_v2.FastRCNNConvFCHead(
          (ro.box_head_conv_channels,) * ro.box_head_convs, (ro.representation_size,),
          ro.box_head_norm, dtype)
    else:
      self.box_head = roi_lib.TwoMLPHead(ro.representation_size, dtype)
    self.box_predictor = roi_lib.FastRCNNPredictor(cfg.num_classes, dtype)
    if cfg.mask.get("norm", "none") != "none":
      self.mask_head = heads_v2.MaskRCNNHeadsNorm(tuple(cfg.mask.conv_channels), cfg.mask.norm,
                                                  dtype)
    else:
      self.mask_head = roi_lib.MaskRCNNHead(tuple(cfg.mask.conv_channels), dtype)
    self.mask_predictor = roi_lib.MaskRCNNPredictor(cfg.num_classes, dtype)

  def _head(self, module: nn.Module, x: jax.Array, train: bool,
            valid: Optional[jax.Array] = None) -> jax.Array:
    """Calls a box/mask head, passing ``train`` and the RoI slots' ``valid`` mask to the v2
    heads (their trainable BatchNorm takes batch statistics over the valid slots only)."""
    if isinstance(module, (heads_v2.FastRCNNConvFCHead, heads_v2.MaskRCNNHeadsNorm)):
      return module(x, train=train, valid=valid)
    return module(x)

  # ------------------------------------------------------------------ shared pieces

  def _features(self, images: jax.Array, train: bool, valid_size: Optional[jax.Array] = None):
    """uint8 [B, H, W, 3] -> [P2..P6] in the compute dtype.

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
                                            round_to_pixels=a.get("round", True))
    return jnp.asarray(rpn_lib.concat_anchors(per_level)), rpn_lib.level_sizes(per_level)

  def _proposals(self, objectness, deltas, anchors, level_sizes, valid_size, train: bool):
    r = self.config.rpn
    fn = functools.partial(
        rpn_lib.generate_proposals, level_sizes=level_sizes,
        pre_nms_top_k=r.pre_nms_top_k_train if train else r.pre_nms_top_k_test,
        post_nms_top_k=r.post_nms_top_k_train if train else r.post_nms_top_k_test,
        nms_threshold=r.nms_threshold, min_size=r.min_size, score_threshold=r.score_threshold,
        weights=tuple(r.box_weights))
    return batch_parallel.vmap(fn, in_axes=(0, 0, None, 0))(objectness, deltas, anchors,
                                                            valid_size)

  def _pool(self, feats, boxes, output_size: int, sampling_ratio: int):
    """[B, N, 4] boxes -> [B, N, s, s, C] pooled from P2..P5."""
    cfg = self.config
    pool = functools.partial(
        multilevel_roi_align, output_size=output_size,
        strides=tuple(cfg.anchors.strides[:NUM_POOLED_LEVELS]), sampling_ratio=sampling_ratio,
        aligned=cfg.roi.aligned, canonical_scale=cfg.roi.canonical_scale,
        canonical_level=cfg.roi.canonical_level)
    # Shard-local under data parallelism: each device pools its own images' RoIs.
    return batch_parallel.per_example(pool, list(feats[:NUM_POOLED_LEVELS]), boxes)

  def _box_branch(self, feats, rois, train: bool = False, valid=None):
    """rois [B, R, 4] -> class logits [B, R, K+1], deltas [B, R, K+1, 4] (float32).

    ``valid`` [B, R] bool (optional, training) marks the real RoI slots (see ``_head``)."""
    r = self.config.roi
    pooled = self._pool(feats, rois, r.pooler_size, r.sampling_ratio)
    return self.box_predictor(self._head(self.box_head, pooled, train, valid))

  def _mask_branch(self, feats, rois, classes, train: bool = False, valid=None):
    """rois [B, M, 4], classes [B, M] -> [B, M, 28, 28] float32 logits of those classes.

    ``valid`` [B, M] bool (optional) marks the slots whose logits are used. The slots come
    valid-first (the sampler puts positives first, detections are sorted), so the M slots are
    run in chunks (:func:`mask_chunk_bounds`: c, c, 2c, 4c, ... slots for
    ``config.mask.chunk_size`` = c) and a chunk with no valid slot in any image is skipped
    (``lax.cond``; its logits are zero). The values that are used, and every gradient, are the
    same; the cost follows the actual positives (a few per image early in training, or on
    sparse images) instead of always M: at most about twice them, in log2(M / c) + 1 chunks.
    """
    m = self.config.mask
    pooled = self._pool(feats, rois, m.pooler_size, m.sampling_ratio)
    b, n = pooled.shape[:2]
    classes = classes.astype(jnp.int32)

    def run(module, x, cls, ok):
      # Only each RoI's own class channel is computed (not all K+1, then a gather).
      k = x.shape[1]
      heads = module._head(module.mask_head, x.reshape((b * k,) + x.shape[2:]), train,
                           None if ok is None else ok.reshape(b * k))
      logits = module.mask_predictor(heads, cls.reshape(b * k))
      return logits.reshape((b, k) + logits.shape[1:])  # [B, k, 28, 28]

    chunk = int(m.get("chunk_size", 0) or 0)
    # Trainable BatchNorm in the mask head (v2 'bn') updates statistics, which a skipped
    # branch could not; initialisation must create the parameters; values sown into
    # 'intermediates' (stage-by-stage inspection) or stored by prepare_inference would differ
    # between the two branches.
    mutable_stats = train and m.get("norm", "none") == "bn"
    if (valid is None or not chunk or n <= chunk or mutable_stats or self.is_initializing()
        or self.is_mutable_collection("intermediates")
        or self.is_mutable_collection(conv_lib.TRANSFORMED_KERNELS)):
      return run(self, pooled, classes, valid)
    res = 2 * m.pooler_size  # the predictor's 2x2 stride-2 transposed conv: 14 -> 28
    outs = []
    for start, stop in mask_chunk_bounds(n, chunk):
      part = slice(start, stop)
      k = stop - start
      zero = lambda module, x, cls, ok, k=k: jnp.zeros((b, k, res, res), jnp.float32)
      outs.append(nn.cond(jnp.any(valid[:, part]), run, zero, self, pooled[:, part],
                          classes[:, part], valid[:, part]))
    return jnp.concatenate(outs, axis=1)

  @staticmethod
  def _valid_size(images, valid_size):
    if valid_size is None:
      b, h, w = images.shape[:3]
      return jnp.broadcast_to(jnp.asarray([h, w], jnp.int32), (b, 2))
    return jnp.asarray(valid_size)

  # ------------------------------------------------------------------ training

  def losses(self, batch: Batch) -> Tuple[Dict[str, jax.Array], Dict[str, jax.Array]]:
    """Training forward pass.

    Args:
      batch: the batch contract's dict: ``image`` uint8 [B, H, W, 3], ``gt_boxes`` [B, G, 4],
        ``gt_classes`` [B, G], ``gt_masks`` uint8 [B, G, S, S], ``gt_valid`` [B, G] and
        optionally ``valid_size`` [B, 2] (default: the full padded size).

    Returns:
      losses: float32 scalars ``rpn_objectness``, ``rpn_box``, ``roi_class``, ``roi_box``,
        ``roi_mask`` (the training objective is their sum).
      stats: float32 scalars, per-image means: ``rpn_num_fg``, ``rpn_num_bg``,
        ``roi_num_fg``, ``roi_num_bg``, ``num_proposals``.
    """
    cfg = self.config
    if conv_lib.TRANSFORMED_KERNELS in self.variables:
      raise ValueError("these variables come from prepare_inference (precomputed Winograd "
                       "kernels, which would not follow the parameters): train on the plain "
                       "variables instead")
    images = batch["image"]
    b, h, w = images.shape[:3]
    gt_boxes = jnp.asarray(batch["gt_boxes"], jnp.float32)
    gt_classes = jnp.asarray(batch["gt_classes"], jnp.int32)
    gt_valid = jnp.asarray(batch["gt_valid"], bool)
    valid_size = self._valid_size(images, batch.get("valid_size"))
    rpn_keys, roi_keys = jnp.split(jax.random.split(self.make_rng("sampling"), 2 * b), 2)

    feats = self._features(images, train=True, valid_size=valid_size)
    objectness, deltas = self.rpn_head(feats)
    anchors, level_sizes = self._anchors((h, w))

    # ---- RPN losses over sampled anchors.
    r = cfg.rpn
    t = batch_parallel.vmap(functools.partial(
        rpn_lib.rpn_targets, fg_iou_threshold=r.fg_iou_threshold,
        bg_iou_threshold=r.bg_iou_threshold, batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction, weights=tuple(r.box_weights)),
        in_axes=(None, 0, 0, 0))(anchors, gt_boxes, gt_valid, rpn_keys)
    rpn_obj, rpn_box = loss_lib.rpn_losses(
        jnp.take_along_axis(objectness, t["index"], axis=1),
        jnp.take_along_axis(deltas, t["index"][..., None], axis=1),
        t["label"], t["target"], t["positive"], t["valid"], beta=r.box_loss_beta)

    # ---- Proposals, then RoI sampling with the GT boxes appended.
    proposals, _, proposal_valid = self._proposals(objectness, deltas, anchors, level_sizes,
                                                   valid_size, train=True)
    ro = cfg.roi
    s = batch_parallel.vmap(functools.partial(
        roi_lib.sample_rois, fg_iou_threshold=ro.fg_iou_threshold,
        bg_iou_threshold=ro.bg_iou_threshold, batch_size_per_image=ro.batch_size_per_image,
        positive_fraction=ro.positive_fraction, weights=tuple(ro.box_weights)))(
            proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, roi_keys)
    class_logits, box_deltas = self._box_branch(feats, s["rois"], train=True, valid=s["valid"])
    roi_cls, roi_box = loss_lib.fast_rcnn_losses(class_logits, box_deltas, s["labels"],
                                                 s["target"], s["valid"], beta=ro.box_loss_beta)

    # ---- Mask loss on a fixed number of foreground RoIs. The sampler puts positives first and
    # takes at most batch_size_per_image * positive_fraction of them, so with the default
    # rois_per_image the leading slots hold every sampled positive.
    m = cfg.mask.rois_per_image
    m_rois, m_labels, m_matched = s["rois"][:, :m], s["labels"][:, :m], s["matched"][:, :m]
    m_valid = s["valid"][:, :m] & (m_labels > 0)
    # A trainable-BatchNorm mask head (v2 with 'bn') takes its batch statistics over the
    # positives only (m_valid), as torchvision's, which sees no other RoI.
    m_logits = self._mask_branch(feats, m_rois, m_labels, train=True, valid=m_valid)
    resolution = m_logits.shape[-1]
    m_targets = batch_parallel.vmap(functools.partial(mask_targets, size=resolution))(
        jnp.asarray(batch["gt_masks"], jnp.float32), gt_boxes, m_rois, m_matched)
    roi_mask = loss_lib.mask_loss(m_logits, jax.lax.stop_gradient(m_targets), m_valid)

    losses = dict(rpn_objectness=rpn_obj, rpn_box=rpn_box, roi_class=roi_cls, roi_box=roi_box,
                  roi_mask=roi_mask)
    per_image = lambda x: jnp.sum(x.astype(jnp.float32)) / b
    stats = dict(
        rpn_num_fg=per_image(t["positive"]),
        rpn_num_bg=per_image(t["valid"] & ~t["positive"]),
        roi_num_fg=per_image(s["valid"] & (s["labels"] > 0)),
        roi_num_bg=per_image(s["valid"] & (s["labels"] == 0)),
        num_proposals=per_image(proposal_valid))
    return losses, stats

  # ------------------------------------------------------------------ inference

  def predict(self, images: jax.Array, valid_size: Optional[jax.Array] = None) -> Batch:
    """Detections for a batch of images.

    Args:
      images: uint8 [B, H, W, 3] RGB, zero-padded at bottom/right.
      valid_size: [B, 2] int (h, w) of each image before padding; default (H, W).

    Returns:
      dict, D = config.detections_per_image: ``boxes`` [B, D, 4] float32 xyxy network-input
      pixels, ``scores`` [B, D] float32, ``classes`` [B, D] int32 (1..K), ``masks``
      [B, D, 28, 28] float32 probabilities of the predicted class, ``valid`` [B, D] bool
      (best first; padding rows are zero).
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
        class_logits, box_deltas, proposals, proposal_valid, valid_size)
    mask_logits = self._mask_branch(feats, det["boxes"], det["classes"], valid=det["valid"])
    masks = jnp.where(det["valid"][:, :, None, None], jax.nn.sigmoid(mask_logits), 0.0)
    return dict(boxes=det["boxes"], scores=det["scores"], classes=det["classes"], masks=masks,
                valid=det["valid"])

  # ------------------------------------------------------------------ initialisation

  def _init_all(self, images: jax.Array):
    """Touches every sub-module once on small inputs (parameter shapes do not depend on the
    image size), so ``init`` is cheap even outside ``jit``."""
    feats = self._features(images, train=False)
    self.rpn_head(feats)
    b = images.shape[0]
    c = feats[0].shape[-1]
    r, m = self.config.roi.pooler_size, self.config.mask.pooler_size
    self.box_predictor(self._head(self.box_head, jnp.zeros((b, r, r, c), feats[0].dtype), False))
    return self.mask_predictor(
        self._head(self.mask_head, jnp.zeros((b, m, m, c), feats[0].dtype), False))


def _check_head_norms(cfg: Any) -> None:
  """Trainable BatchNorm in the FPN or heads needs ``config.norm == 'bn'``: only then do the
  trainer and ``init_variables`` users carry the mutable ``batch_stats`` collection."""
  heads = {"fpn.norm": cfg.fpn.get("norm", "none"),
           "roi.box_head_norm": cfg.roi.get("box_head_norm", "none"),
           "mask.norm": cfg.mask.get("norm", "none")}
  bn = [k for k, v in heads.items() if v == "bn"]
  if bn and cfg.norm != "bn":
    raise ValueError(f"{', '.join(bn)} = 'bn' (trainable BatchNorm) needs config.norm = 'bn' "
                     f"as well, got {cfg.norm!r}")


def init_variables(model: MaskRCNN, key: jax.Array, image_size: Tuple[int, int]) -> Dict[str, Any]:
  """The model's variables, a pure function of ``key``.

  ``image_size`` is accepted for the contract; parameter shapes do not depend on it, so a small
  dummy image is used and the call stays cheap eagerly or under ``jax.jit``.

  Returns:
    ``{'params': ...}`` plus ``'batch_stats'`` with trainable BatchNorm.
  """
  del image_size
  images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
  return dict(model.init({"params": init_key(key)}, images, method=MaskRCNN._init_all))


def prepare_inference(model: MaskRCNN, variables: Dict[str, Any], image_size: Tuple[int, int],
                      batch_size: int = 1) -> Dict[str, Any]:
  """``variables`` plus the Winograd kernel transforms ``predict`` needs, computed once (CPU).

  On CPU the large 3x3 convolutions run as Winograd (``modeling/winograd.py``), which
  transforms each kernel [3, 3, C, O] into [(m+2)^2, C, O] on every call: a pass writing 4-5x
  the kernel's bytes into fresh memory, 68 of ~980 ms of op time in a profiled 512x512
  ``predict`` (the mask head's once per chunk). With fixed weights that work can be done
  ahead, as inference engines pre-pack weights: this runs ``predict``'s layers at
  ``image_size`` x ``batch_size`` once with the ``conv.TRANSFORMED_KERNELS`` collection mutable
  and returns the variables with it added (R50-FPN at 512x512: +138 MiB of variables; its
  ``predict`` 4% faster, see docs/benchmarks.md). ``predict`` reads them instead of
  transforming again; at another size or batch, layers without a stored transform for their
  tile compute it as before, so results never depend on it (beyond float32 rounding order).
  Not for training: ``losses`` refuses these variables, since the stored transforms would not
  follow parameter updates. Where the default backend is not a CPU (no Winograd there), or no
  layer takes Winograd, the variables come back without the collection.
  """
  plain = {k: v for k, v in variables.items() if k != conv_lib.TRANSFORMED_KERNELS}
  if jax.default_backend() != "cpu":
    return plain
  images = jnp.zeros((batch_size,) + tuple(image_size) + (3,), jnp.uint8)

  def transforms(v):
    _, state = model.apply(v, images, method=MaskRCNN.predict,
                           mutable=[conv_lib.TRANSFORMED_KERNELS])
    return state.get(conv_lib.TRANSFORMED_KERNELS, {})

  # Only the transforms are outputs, so XLA drops the rest of the network from this program.
  stored = jax.jit(transforms)(plain)
  if not stored:  # no layer runs Winograd here (bfloat16, small maps, xla_convolutions())
    return plain
  return {**plain, conv_lib.TRANSFORMED_KERNELS: stored}


def init_key(key: jax.Array) -> jax.Array:
  """An ``unsafe_rbg`` key derived from ``key`` (raw uint32 data or a typed key of any impl).

  XLA compiles every threefry draw separately and slowly on CPU (seconds each on a busy
  machine), and initialisation makes one draw per parameter array; RngBitGenerator draws
  compile an order of magnitude faster. The result is still a pure function of ``key``.
  """
  if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = jnp.asarray(key, jnp.uint32).reshape(-1)
  if words.shape[0] < 4:
    words = jnp.concatenate([words, words ^ jnp.uint32(0x9E3779B9)])
  return jax.random.wrap_key_data(words[:4], impl="unsafe_rbg")


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
