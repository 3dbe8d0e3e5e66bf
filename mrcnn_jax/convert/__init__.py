"""mrcnn_jax.convert."""
