"""mrcnn_jax.modeling."""
