"""Pipelines over loaded parameter trees: Stable Diffusion 1.x / 2.x / XL from diffusers directories.

``load_pretrained(path)`` -> ``StableDiffusionPipeline`` with ``text_to_image`` and
``encode_prompt``; ``schedulers.from_config`` maps a diffusers scheduler config onto our process
and samplers.
"""

from diffusion_jax.pipelines import schedulers
from diffusion_jax.pipelines import controlnet
from diffusion_jax.pipelines.stable_diffusion import PIPELINE_CLASSES
from diffusion_jax.pipelines.stable_diffusion import StableDiffusionPipeline
from diffusion_jax.pipelines.stable_diffusion import load_pretrained
from diffusion_jax.pipelines.stable_diffusion import load_single_file

__all__ = ['PIPELINE_CLASSES', 'StableDiffusionPipeline', 'controlnet', 'load_pretrained',
           'load_single_file', 'schedulers']
