"""diffusion_jax: diffusion models in JAX/Flax.

See ../README.md. Importing the package has no side effects: it sets no XLA flags and leaves the
allocator alone; the CPU process settings are opt-in (``cpu_runtime.configure()``, which
``diffusion_jax.main`` calls).
"""

__version__ = "0.1.0"
