"""Flax Linen networks ``F(x, c_noise, label=None, *, train=False)``: U-Nets and an MLP.

The networks return raw outputs; ``diffusion_jax.preconditioning`` turns them into eps / x0 / v /
score. Conditioning inputs are keyword arguments named like the keys of the ``cond`` dict
(``module.apply(variables, x, c_noise, **cond)`` with ``cond = {'label': int32 [B]}``).
``MODELS`` maps the ``model.name`` of a config to the class.
"""

from diffusion_jax.models import attention
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.param_count import count_params
from diffusion_jax.models.unet import UNet, validate_unet_config

MODELS = {'unet': UNet, 'mlp': MLP}

__all__ = ['MLP', 'MODELS', 'UNet', 'attention', 'count_params', 'validate_unet_config']
