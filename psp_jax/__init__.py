"""psp-jax: PSPNet (Pyramid Scene Parsing Network) in JAX/Flax with exact PyTorch parity."""

__version__ = '0.1.0'
