"""Non-maximum suppression with static shapes: ``nms`` and class-aware ``batched_nms``.

Greedy NMS (keep the best box, drop every later box that overlaps it by IoU > threshold,
repeat) is sequential by nature; the usual implementations loop over boxes with a data-dependent
trip count and return a variable-length result. Here the same greedy result is computed in
fixed-size tiles so that it compiles once under ``jax.jit`` (CPU, GPU, TPU) and batches with
``jax.vmap``:

1. Sort the boxes by score, descending (``-inf`` scores, i.e. padding, sort last and are
   never candidates), and cut the sorted list into blocks of ``B`` boxes.
2. For block ``j`` (a ``lax.while_loop`` over blocks): drop the boxes suppressed by the boxes
   kept so far, which are appended in order to a compacted buffer and read back ``B`` at a
   time (``ceil(kept / B)`` tiles of ``[B, B]`` IoUs; the tile loop ends as soon as the whole
   block is suppressed); then, unless nothing survived, resolve the block against itself.
   Within a block, "box ``k`` is kept iff no *kept* earlier box of the block suppresses it"
   is a triangular system whose unique solution is the greedy one; iterating ``keep <-
   candidates & ~any(keep & suppresses)`` from ``keep = candidates`` fixes one more leading
   entry per pass, so a small ``while_loop`` to the fixed point reaches it (at most ``B``
   passes, in practice a handful).
3. The loop stops early once ``max_output_size`` boxes are kept or the next block holds only
   ``-inf`` scores, so proposal NMS (a few thousand boxes, ~1000 kept) does not pay for
   the tail.

Memory is ``O(N + B^2)`` (never the ``N x N`` IoU matrix: 1.6 GB at 20,000 boxes); work is
``O(K N)`` IoUs for ``K`` kept boxes, the same as the CPU kernel of torchvision.

The IoU is computed exactly as ``torchvision.ops.nms``'s kernel does (float32, areas
``(x2 - x1) (y2 - y1)``, ``inter / (area_i + area_j - inter)``, suppress when ``> threshold``),
so kept sets agree with torchvision except where scores tie.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mrcnn_jax.ops._checks import check_shape

ArrayLike = jax.typing.ArrayLike

# Sorted boxes per tile. 512 keeps a tile's [B, B] IoU work large enough to amortise the loop
# overhead while its intermediates (1 MB) stay in cache.
DEFAULT_BLOCK_SIZE = 512


def _overlaps(src, dst, thr) -> jax.Array:
  """[B, B] bool: IoU(src box a, dst box b) > ``thr``, as torchvision's NMS kernel computes it.

  Args:
    src: (x1, y1, x2, y2, area) of the source boxes, each [B] float32.
    dst: (x1, y1, x2, y2, area) of the destination boxes, each [B] float32.
    thr: scalar float32 IoU threshold.
  """
  sx1, sy1, sx2, sy2, sa = (v[:, None] for v in src)
  dx1, dy1, dx2, dy2, da = (v[None, :] for v in dst)
  w = jnp.maximum(jnp.minimum(sx2, dx2) - jnp.maximum(sx1, dx1), 0.0)
  h = jnp.maximum(jnp.minimum(sy2, dy2) - jnp.maximum(sy1, dy1), 0.0)
  inter = w * h
  # Same association as torchvision's kernel; a zero union gives NaN, which never exceeds
  # the threshold (no suppression), also as in torchvision.
  return inter / ((sa + da) - inter) > thr


def _greedy_keep(coords, groups, candidate, iou_threshold, max_output_size, block):
  """Greedy NMS over score-sorted boxes laid out as blocks.

  Args:
    coords: (x1, y1, x2, y2, area), each [nb, B] float32, in descending score order.
    groups: [nb, B] int32 class ids, or None for plain NMS.
    candidate: [nb, B] bool, False for padding (-inf scores, always sorted last).
    iou_threshold: scalar float32.
    max_output_size: static int; the loop may stop once this many are kept.
    block: static int B.

  Returns:
    [nb, B] bool, the greedy keep mask in sorted order.
  """
  nb = candidate.shape[0]
  capacity = nb * block
  tri = jnp.arange(block)[:, None] < jnp.arange(block)[None, :]  # earlier suppresses later
  thr = jnp.asarray(iou_threshold, jnp.float32)
  lane = jnp.arange(block, dtype=jnp.int32)
  # Features stored per box: x1, y1, x2, y2, area (float32), and the group id (int32: as a
  # float32, ids beyond 2**24 would round and compare equal). One buffer per feature.
  feats = list(coords) + ([groups] if groups is not None else [])

  def suppression(src, dst):
    """[B, B] bool: src box (row) would suppress dst box (column) if src is kept."""
    hit = _overlaps(src[:5], dst[:5], thr)
    if groups is not None:
      hit = hit & (src[5][:, None] == dst[5][None, :])
    return hit

  def outer_cond(state):
    j, _, _, count = state
    # Sorted order puts padding last: a block whose first entry is padding ends the work.
    first_valid = candidate[jnp.minimum(j, nb - 1), 0]
    return (j < nb) & first_valid & (count < max_output_size)

  def outer_body(state):
    j, keep, kept_buf, count = state
    dst = tuple(f[j] for f in feats)

    # Suppression by the boxes kept so far, read from the compacted buffer one tile at a
    # time: O(kept) tiles per block rather than O(blocks), so heavy suppression is cheap.
    n_tiles = (count + block - 1) // block

    def inner_cond(s):
      t, alive = s
      return (t < n_tiles) & jnp.any(alive)

    def inner_body(s):
      t, alive = s
      src = tuple(lax.dynamic_slice_in_dim(f, t * block, block) for f in kept_buf)
      src_valid = t * block + lane < count
      hit = suppression(src, dst) & src_valid[:, None]
      return t + 1, alive & ~jnp.any(hit, axis=0)

    _, alive = lax.while_loop(inner_cond, inner_body, (jnp.int32(0), candidate[j]))

    # Resolve the block against itself: fixed point of the triangular system.
    def resolve(alive):
      sup = suppression(dst, dst) & tri  # [B, B]: row suppresses column if row is kept

      def fp_cond(s):
        prev, cur = s
        return jnp.any(prev != cur)

      def fp_body(s):
        _, cur = s
        return cur, alive & ~jnp.any(sup & cur[:, None], axis=0)

      first = alive & ~jnp.any(sup & alive[:, None], axis=0)
      return lax.while_loop(fp_cond, fp_body, (alive, first))[1]

    # A block wiped out by earlier boxes (common under heavy overlap) skips the [B, B] work.
    kept_j = lax.cond(jnp.any(alive), resolve, lambda a: a, alive)

    # Append the block's kept boxes to the buffers, in order (dropped ones scatter nowhere).
    rank = jnp.cumsum(kept_j, dtype=jnp.int32) - 1
    dest = jnp.where(kept_j, count + rank, capacity)
    kept_buf = tuple(f.at[dest].set(v, mode="drop") for f, v in zip(kept_buf, dst))
    keep = keep.at[j].set(kept_j)
    return j + 1, keep, kept_buf, count + jnp.sum(kept_j, dtype=jnp.int32)

  kept_buf = tuple(jnp.zeros((capacity,), f.dtype) for f in feats)  # kept boxes, in order
  init = (jnp.int32(0), jnp.zeros_like(candidate), kept_buf, jnp.int32(0))
  _, keep, _, _ = lax.while_loop(outer_cond, outer_body, init)
  return keep


def _nms_impl(boxes, scores, groups, iou_threshold, max_output_size, block_size):
  n = boxes.shape[0]
  if n == 0:
    return jnp.full((max_output_size,), -1, jnp.int32)
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  # Block size: the default, or the input rounded up to a multiple of 8 when it is smaller.
  block = min(block_size, -(-n // 8) * 8)
  nb = -(-n // block)
  padded = nb * block

  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
  sorted_boxes = boxes[order]
  sorted_scores = scores[order]
  pad = padded - n
  sorted_boxes = jnp.pad(sorted_boxes, ((0, pad), (0, 0)))
  sorted_scores = jnp.pad(sorted_scores, (0, pad), constant_values=-jnp.inf)
  x1, y1, x2, y2 = (sorted_boxes[:, k].reshape(nb, block) for k in range(4))
  area = (x2 - x1) * (y2 - y1)
  candidate = (sorted_scores > -jnp.inf).reshape(nb, block)
  sorted_groups = None
  if groups is not None:
    sorted_groups = jnp.pad(jnp.asarray(groups, jnp.int32)[order], (0, pad)).reshape(nb, block)

  keep = _greedy_keep((x1, y1, x2, y2, area), sorted_groups, candidate, iou_threshold,
                      max_output_size, block).reshape(padded)
  (pos,) = jnp.nonzero(keep, size=max_output_size, fill_value=padded)
  order_padded = jnp.pad(order, (0, pad + 1), constant_values=-1)
  return order_padded[pos]


@functools.partial(jax.jit, static_argnames=("max_output_size", "block_size"))
def _nms_jit(boxes, scores, iou_threshold, max_output_size, block_size):
  return _nms_impl(boxes, scores, None, iou_threshold, max_output_size, block_size)


@functools.partial(jax.jit, static_argnames=("max_output_size", "block_size"))
def _batched_nms_jit(boxes, scores, classes, iou_threshold, max_output_size, block_size):
  return _nms_impl(boxes, scores, classes, iou_threshold, max_output_size, block_size)


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float, max_output_size: int,
        *, block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
  """Greedy non-maximum suppression with a static output size (``torchvision.ops.nms``).

  Args:
    boxes: [N, 4] float32, xyxy pixels.
    scores: [N] float32; ``-inf`` marks padding, which is never kept.
    iou_threshold: a box is dropped when its IoU with a kept, higher-scored box is
      ``> iou_threshold``. May be a traced scalar.
    max_output_size: static int, the output length.
    block_size: static int, sorted boxes per tile (performance only).

  Returns:
    [max_output_size] int32: indices into ``boxes`` of the kept boxes, highest score first,
    padded with -1. Equal to ``torchvision.ops.nms(boxes, scores, iou_threshold)[:max_output_size]``
    when scores are distinct.
  """
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  check_shape("boxes", boxes, 2, (4,))
  check_shape("scores", scores, 1)
  if scores.shape[0] != boxes.shape[0]:
    raise ValueError(f"scores {scores.shape} and boxes {boxes.shape} disagree in N")
  return _nms_jit(boxes, scores, iou_threshold, int(max_output_size), int(block_size))


def batched_nms(boxes: ArrayLike, scores: ArrayLike, classes: ArrayLike, iou_threshold: float,
                max_output_size: int, *, block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
  """Class-aware NMS: boxes of different classes never suppress each other.

  Same as ``torchvision.ops.batched_nms``. Rather than torchvision's coordinate-offset trick
  (shifting each class's boxes apart, which costs float32 precision for large offsets) the
  IoU test itself is masked by class equality, which is exact and adds one compare per pair.

  Args:
    boxes: [N, 4] float32, xyxy pixels.
    scores: [N] float32; ``-inf`` marks padding, which is never kept.
    classes: [N] int, the class (or any int32 group id) of each box; ids are compared
      exactly.
    iou_threshold: suppression when IoU ``> iou_threshold`` within a class.
    max_output_size: static int, the output length.
    block_size: static int, sorted boxes per tile (performance only).

  Returns:
    [max_output_size] int32 kept indices, highest score first (over all classes), padded
    with -1.
  """
  boxes, scores, classes = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes)
  check_shape("boxes", boxes, 2, (4,))
  check_shape("scores", scores, 1)
  check_shape("classes", classes, 1)
  if scores.shape[0] != boxes.shape[0] or classes.shape[0] != boxes.shape[0]:
    raise ValueError(f"boxes {boxes.shape}, scores {scores.shape} and classes "
                     f"{classes.shape} disagree in N")
  return _batched_nms_jit(boxes, scores, classes, iou_threshold, int(max_output_size),
                          int(block_size))
