"""Input-pipeline settings (``config.data``).

Sources (``source``):
  * ``'coco'``: a COCO instances JSON plus an image folder, for training (``train_annotations``,
    ``train_images``) and evaluation (``eval_annotations``, ``eval_images``). The synthetic
    shapes set (``python -m mrcnn_jax.data.shapes --out DIR``) writes this layout:
    ``DIR/annotations/instances_{train,val}.json`` and ``DIR/{train,val}/``.
  * ``'tfds'``: a TFDS builder with ``coco/2017``'s features (``tfds_name``, ``tfds_data_dir``,
    ``train_split``, ``eval_split``); see :mod:`mrcnn_jax.data.tfds_source` for where masks
    come from. COCO metrics (the evaluator, evaluation during training) need an instances
    JSON as ground truth, so they take ``'coco'``; ``eval_split`` feeds
    ``tfds_source.build_tfds_eval_dataset`` (predictions without metrics).

Records (``train_records``, ``eval_records``, with ``source = 'coco'``): TFRecord shards and
an index written by ``scripts/make_records.py`` from a COCO JSON and its images, read by offset
instead of one file per image (for pods reading from a bucket); see
:mod:`mrcnn_jax.data.records`. Paths may be local or ``gs://`` throughout.

Training input shape: ``image_size``, or with ``buckets`` one of several (h, w) shapes, chosen
per image by its aspect ratio (:mod:`mrcnn_jax.data.buckets`); each global batch holds one
bucket's images, and the train step is compiled once per bucket before the first step.
Evaluation keeps the single ``image_size`` (one predict program; the COCO recipes pad to
1344 x 1344 there, which holds max_size 1333 in either orientation).

Keypoints: with ``config.model.keypoint.enabled`` (the 'coco' source; TFDS ``coco/2017`` has
none) the JSON must be person_keypoints-style (categories name ``num_keypoints`` keypoints;
``python -m mrcnn_jax.data.shapes --keypoints`` writes such a set) and batches carry
``gt_keypoints`` [B, G, K, 3] float32 (x, y, v) in network-input pixels.

Batch sizes are global (over all hosts): training uses ``config.train.batch_size``, evaluation
``eval_batch_size``; each host reads ``global / jax.process_count()`` examples per step.
"""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
  """Returns the default ``config.data`` section (1024x1024 padded input, COCO JSON source)."""
  c = ml_collections.ConfigDict()
  c.image_size = (1024, 1024)  # (height, width) of the padded network input
  # How an image is scaled (before the jitter below), in training and evaluation alike:
  # min_size = max_size = 0 fits it into image_size (TF's TPU Mask R-CNN); min_size > 0 scales
  # its shorter side to min_size unless its longer side would pass max_size (torchvision /
  # Detectron2: 800 and 1333), and image_size must hold max_size on both sides.
  c.min_size = 0
  c.max_size = 0
  # Aspect-ratio buckets for training, ((h, w), ...): () pads every training image to
  # image_size; e.g. ((832, 1344), (1344, 832)) pads landscape images to 832 x 1344 and
  # portrait ones to 1344 x 832 (squares: the first). Each image is scaled as above (min_size /
  # max_size, or fit into its bucket), then padded (and cropped for jitter > 1) to its bucket.
  # Multiples of 32; with min_size > 0 each bucket must hold the images it gets unscaled by
  # jitter (for the pair above: max_size on the long side, min_size on the short).
  c.buckets = ()
  c.max_instances = 100
  c.mask_size = 112  # GT masks carried cropped to their box at this resolution

  # --- source ---
  c.source = "coco"  # 'coco' (instances JSON + image folder) | 'tfds'
  c.train_annotations = ""  # path of instances_train*.json
  c.train_images = ""  # folder holding the JSON's file_name entries
  c.eval_annotations = ""
  c.eval_images = ""
  # Record files made by scripts/make_records.py from such a JSON + folder (local or gs://):
  # their index (PREFIX.index.json), the shards' pattern (PREFIX-*-of-*.tfrecord) or the shards
  # comma-separated. When set, read instead of the annotations + images, with the same batches.
  c.train_records = ""
  c.eval_records = ""
  c.tfds_name = "coco/2017"
  c.tfds_data_dir = ""  # '' = TFDS' default data_dir
  c.train_split = "train"
  c.eval_split = "validation"
  # TFDS coco/2017 carries boxes only. 'panoptic' reads instance masks from a panoptic PNG
  # (coco/2017_panoptic-style builders), 'boxes' fills each box (box-supervised masks, an
  # explicit opt-in), 'auto' picks 'panoptic' when the builder has it and raises otherwise.
  c.tfds_masks = "auto"

  # --- training augmentation ---
  # The image is scaled as above, times a factor drawn uniformly from scale_range; an image
  # larger than image_size (factors above 1) is randomly cropped to it.
  # Large-scale jitter (Ghiasi et al. 2021): scale_range = (0.1, 2.0).
  c.scale_range = (0.8, 1.0)
  c.random_flip = True  # horizontal, p = 0.5
  c.skip_empty_train = True  # training skips images with no usable (non-crowd) instance
  # Keypoints (with config.model.keypoint.enabled, the 'coco' source): the (a, b) pairs of
  # keypoint names (or 0-based indices) that swap under the horizontal flip; () derives them
  # from the categories' keypoint names, "left<x>" <-> "right<x>" (COCO's person keypoints,
  # the shapes set's "left" <-> "right").
  c.keypoint_flip_pairs = ()

  # --- robustness ---
  # 'skip': a bad example (unreadable/missing image, image size not matching the JSON, bad
  # polygon/RLE/bbox/keypoints, unknown image or category id) is counted and logged, then
  # dropped from training (evaluation keeps the image slot, marked example_valid=False or
  # without the bad annotation). 'raise': the first one raises BadExampleError naming the file
  # and the reason.
  c.on_bad_example = "skip"

  # --- performance ---
  c.num_parallel_calls = -1  # tf.data.AUTOTUNE
  c.prefetch = 2  # batches
  c.eval_batch_size = 8  # global
  return c
