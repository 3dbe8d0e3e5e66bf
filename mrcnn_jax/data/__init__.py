"""mrcnn_jax.data: the tf.data input pipeline (COCO JSON / TFDS / synthetic shapes).

Public API::

  build_train_dataset(config, *, global_batch_size=None, seed=None, start_step=0,
                      process_index=None, process_count=None, source=None) -> InputPipeline
  build_eval_dataset(config, *, global_batch_size=None, process_index=None,
                     process_count=None, source=None) -> InputPipeline
  make_global_batch(host_batch, mesh, axis='data') -> dict of jax.Array
  generate_shapes(out_dir, num_train=200, num_val=50, size=128, seed=0,
                  image_format='mixed') -> dict of config.data paths
  CocoSource, CategoryMap, DataStats, BadExampleError, data_config

Iterating an :class:`InputPipeline` yields host batches in the format of the batch contract
(image, gt_boxes, gt_classes, gt_masks, gt_valid, image_id, original_size, image_scale,
valid_size, example_valid). See :mod:`mrcnn_jax.data.pipeline` for ordering, sharding and
resume, :mod:`mrcnn_jax.data.transforms` for the geometry.
"""

from mrcnn_jax.data.coco import BadExampleError
from mrcnn_jax.data.coco import CategoryMap
from mrcnn_jax.data.coco import CocoSource
from mrcnn_jax.data.coco import DataStats
from mrcnn_jax.data.config import data_config
from mrcnn_jax.data.pipeline import build_eval_dataset
from mrcnn_jax.data.pipeline import build_train_dataset
from mrcnn_jax.data.pipeline import InputPipeline
from mrcnn_jax.data.sharding import batch_sharding
from mrcnn_jax.data.sharding import make_global_batch
from mrcnn_jax.data.shapes import generate as generate_shapes
