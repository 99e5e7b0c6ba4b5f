"""diffusion_jax: diffusion models in JAX/Flax.

See ../README.md. Modules: processes (discrete noise schedules), sde (continuous SDEs),
losses, preconditioning, models, sampling, likelihood, and the trainer (train, main).
"""

from diffusion_jax import _xla_flags

# Before any JAX computation: XLA reads its flags once, when the first backend starts.
_xla_flags.apply_defaults()

__version__ = "0.1.0"
