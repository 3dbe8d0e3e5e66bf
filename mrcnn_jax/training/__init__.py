"""mrcnn_jax.training: train state, optimizer and schedule, mesh and shardings, the train step.

``train_and_evaluate(config, workdir)`` is the whole run (what ``scripts/train.py`` calls).
A notebook trains one step with::

  config = mrcnn_jax.config.get_base_config()
  model = MaskRCNN(config.model)
  mesh = training.make_mesh()
  state = training.create_train_state(config, model, jax.random.PRNGKey(0), mesh)
  step_fn = training.make_train_step(config, model, mesh, state)
  state, metrics = step_fn(state, training.shard_batch(numpy_batch, mesh))

Multi-host: call ``training.distributed.initialize()`` before anything else touches JAX (it
detects SLURM / Open MPI / Cloud TPU jobs, or takes an explicit coordinator), then the same code
runs on every process.

The pure, un-jitted step is ``mrcnn_jax.training.train_step.train_step`` (the submodule keeps
the name, so the function is not re-exported here).
"""

from mrcnn_jax.training import distributed
from mrcnn_jax.training.config import train_config
from mrcnn_jax.training.loop import train_and_evaluate
from mrcnn_jax.training.optimizer import learning_rate_schedule
from mrcnn_jax.training.optimizer import make_optimizer
from mrcnn_jax.training.optimizer import peak_learning_rate
from mrcnn_jax.training.optimizer import weight_decay_mask
from mrcnn_jax.training.sharding import batch_sharding
from mrcnn_jax.training.sharding import DATA_AXIS
from mrcnn_jax.training.sharding import make_mesh
from mrcnn_jax.training.sharding import replicated
from mrcnn_jax.training.sharding import shard_batch
from mrcnn_jax.training.train_state import create_train_state
from mrcnn_jax.training.train_state import default_optimizer
from mrcnn_jax.training.train_state import TrainState
from mrcnn_jax.training.train_step import make_train_step

__all__ = [
    "DATA_AXIS",
    "TrainState",
    "batch_sharding",
    "create_train_state",
    "default_optimizer",
    "distributed",
    "learning_rate_schedule",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "peak_learning_rate",
    "replicated",
    "shard_batch",
    "train_and_evaluate",
    "train_config",
    "weight_decay_mask",
]
