"""mrcnn_jax.inference."""
