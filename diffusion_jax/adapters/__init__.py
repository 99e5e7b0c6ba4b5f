"""Adapters as transformations of parameter trees (STYLE.md 17): LoRA and textual inversion.

``lora``: low-rank updates merged as ``W + (alpha / r) B A`` into a frozen base, trained as their
own tree, read and written in the diffusers / PEFT and kohya file layouts.
``textual_inversion``: new token embeddings appended to a CLIP text encoder's table, trained as
their own rows, read from diffusers' ``learned_embeds.safetensors`` and other tools' files.
"""

from diffusion_jax.adapters import lora
from diffusion_jax.adapters import textual_inversion

__all__ = ['lora', 'textual_inversion']
