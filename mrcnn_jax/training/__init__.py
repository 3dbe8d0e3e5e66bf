"""mrcnn_jax.training: train state, optimizer and schedule, the train step, the loop.

``train_and_evaluate(config, workdir)`` is the whole run (what ``scripts/train.py`` calls).
A notebook trains one step with::

  config = mrcnn_jax.config.get_base_config()
  model = MaskRCNN(config.model)
  mesh = run.make_mesh()
  state = training.create_train_state(config, model, jax.random.PRNGKey(0), mesh)
  step_fn = training.make_train_step(config, model, mesh, state)
  state, metrics = step_fn(state, run.make_global_batch(numpy_batch, mesh))

The mesh, shardings, checkpoints and multi-host start-up are shared with evaluation and
inference, in :mod:`mrcnn_jax.run` (call ``run.distributed.initialize()`` before anything
else touches JAX on a multi-host job).

The pure, un-jitted step is ``mrcnn_jax.training.train_step.train_step`` (the submodule keeps
the name, so the function is not re-exported here).

``train_and_evaluate`` (the loop, with its tf.data input) is imported on first use, so the
model, the step and the benchmarks built on them run where TensorFlow is not installed.
"""

from mrcnn_jax.training.config import train_config
from mrcnn_jax.training.optimizer import learning_rate_schedule
from mrcnn_jax.training.optimizer import make_optimizer
from mrcnn_jax.training.optimizer import peak_learning_rate
from mrcnn_jax.training.optimizer import weight_decay_mask
from mrcnn_jax.training.train_state import create_train_state
from mrcnn_jax.training.train_state import default_optimizer
from mrcnn_jax.training.train_state import TrainState
from mrcnn_jax.training.train_step import make_train_step

__all__ = [
    "TrainState",
    "create_train_state",
    "default_optimizer",
    "learning_rate_schedule",
    "make_optimizer",
    "make_train_step",
    "peak_learning_rate",
    "train_and_evaluate",
    "train_config",
    "weight_decay_mask",
]


def __getattr__(name):
  if name == "train_and_evaluate":
    from mrcnn_jax.training.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
    return train_and_evaluate
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
