"""mrcnn_jax.run: what training, evaluation and inference share.

* :mod:`~mrcnn_jax.run.sharding`: the mesh (``make_mesh``, ``make_run_mesh`` from the config),
  the batch and replicated shardings, and ``make_global_batch`` (host batch -> global arrays).
* :mod:`~mrcnn_jax.run.paths`: local or ``gs://`` paths and their one-line errors.
* :mod:`~mrcnn_jax.run.checks`: path and config checks run before any device work.
* :mod:`~mrcnn_jax.run.checkpoint`: orbax checkpoints, the resume order, weights loading.
* :mod:`~mrcnn_jax.run.distributed`: multi-process start-up (``initialize``) and
  ``compile_together``.

A notebook builds its mesh and global batch with::

  mesh = run.make_mesh()                      # one 'data' axis over every device
  batch = run.make_global_batch(numpy_batch, mesh)

Multi-host: call ``run.distributed.initialize()`` before anything else touches JAX's devices.
"""

from mrcnn_jax.run import checkpoint
from mrcnn_jax.run import distributed
from mrcnn_jax.run import paths
from mrcnn_jax.run.checks import check_data_paths
from mrcnn_jax.run.checks import check_num_classes
from mrcnn_jax.run.sharding import batch_sharding
from mrcnn_jax.run.sharding import check_batch_size
from mrcnn_jax.run.sharding import DATA_AXIS
from mrcnn_jax.run.sharding import make_global_batch
from mrcnn_jax.run.sharding import make_mesh
from mrcnn_jax.run.sharding import make_run_mesh
from mrcnn_jax.run.sharding import replicated
from mrcnn_jax.run.sharding import replicated_shardings

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "check_batch_size",
    "check_data_paths",
    "check_num_classes",
    "checkpoint",
    "distributed",
    "make_global_batch",
    "make_mesh",
    "make_run_mesh",
    "paths",
    "replicated",
    "replicated_shardings",
]
