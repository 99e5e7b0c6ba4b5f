"""Weights from files people share: diffusers / transformers directories and single-file checkpoints.

``core`` reads safetensors (NumPy API, never pickle) and converts PyTorch-layout tensors to our
parameter trees by a key table; one module per network holds its table.
"""

from diffusion_jax.weights import core

__all__ = ['core']
