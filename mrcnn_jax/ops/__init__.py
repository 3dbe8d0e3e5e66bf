"""mrcnn_jax.ops."""
