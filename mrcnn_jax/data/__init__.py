"""mrcnn_jax.data: the tf.data input pipeline (COCO JSON / record files / TFDS / synthetic shapes).

Public API::

  build_train_dataset(config, *, global_batch_size=None, seed=None, start_step=0,
                      process_index=None, process_count=None, source=None) -> InputPipeline
  build_eval_dataset(config, *, global_batch_size=None, process_index=None,
                     process_count=None, source=None) -> InputPipeline
  generate_shapes(out_dir, num_train=200, num_val=50, size=128, seed=0,
                  image_format='mixed', keypoints=False) -> dict of config.data paths
  shapes_data_paths(out_dir) -> the same paths, for a folder already written
  train_batch_specs(config, batch_size) -> {(h, w): {key: (shape, dtype)}}, one per training
                                            input shape (config.data.buckets or image_size)
  write_records(annotation_file, image_dir, output_prefix, num_shards, *, num_workers=8)
      -> ConversionReport: TFRecord shards + index for pod input (config.data.train_records)
  CocoSource, RecordSource, CategoryMap, DataStats, BadExampleError, data_config

Iterating an :class:`InputPipeline` yields host batches in the format of the batch contract
(image, gt_boxes, gt_classes, gt_masks, gt_valid, image_id, original_size, image_scale,
valid_size, example_valid; gt_keypoints with config.model.keypoint.enabled). See
:mod:`mrcnn_jax.data.pipeline` for ordering, sharding and resume,
:mod:`mrcnn_jax.data.transforms` for the geometry. Host batches become global arrays with
``mrcnn_jax.run.make_global_batch`` (data sits below run and never imports it).
"""

import importlib

# Attributes load lazily (PEP 562) so that `python -m mrcnn_jax.data.shapes` and the shapes
# generator do not pay for importing TensorFlow and JAX.
_EXPORTS = {
    "BadExampleError": "coco", "CategoryMap": "coco", "CocoSource": "coco", "DataStats": "coco",
    "data_config": "config", "build_eval_dataset": "pipeline", "build_train_dataset": "pipeline",
    "InputPipeline": "batching", "train_batch_specs": "buckets",
    "generate_shapes": "shapes", "shapes_data_paths": "shapes",
    "RecordSource": "records", "write_records": "records",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'mrcnn_jax.data' has no attribute {name!r}")
  module = importlib.import_module(f"mrcnn_jax.data.{_EXPORTS[name]}")
  value = getattr(module, {"generate_shapes": "generate",
                           "shapes_data_paths": "data_paths"}.get(name, name))
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
