"""diffusion_jax: diffusion models in JAX/Flax.

See ../README.md. Modules: processes (discrete noise schedules), sde (continuous SDEs),
losses, preconditioning, models, sampling, likelihood, and the trainer (train, main).
"""

__version__ = "0.1.0"
