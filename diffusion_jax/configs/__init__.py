"""Config builders shipped with the package: ``default`` names every field.

The experiment configs live in the repository's top-level ``configs/`` and start from
``diffusion_jax.configs.default.get_config()``; builders shared by several of them (``cifar10``)
live here, so that no config file imports a sibling by path. Nothing here imports JAX.
"""
