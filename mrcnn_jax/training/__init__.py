"""mrcnn_jax.training."""
