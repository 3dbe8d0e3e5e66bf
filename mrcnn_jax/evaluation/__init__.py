"""mrcnn_jax.evaluation."""
