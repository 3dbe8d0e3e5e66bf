"""mrcnn_jax.data."""
