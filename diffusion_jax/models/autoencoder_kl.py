"""Stable Diffusion's VAE: diffusers' ``AutoencoderKL`` in Flax Linen, NHWC.

The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3 and App. G): a convolutional encoder to the mean
and log-variance of a diagonal Gaussian posterior over ``latent_channels`` maps at
``1 / 2 ** (len(block_out_channels) - 1)`` of the image size, and a decoder back to pixels.
Module and parameter names are diffusers' (``diffusers/models/autoencoders/autoencoder_kl.py``,
``vae.py``; blocks from ``unets/unet_2d_blocks.py``), so that
``weights.core.torch_key(path, lists=sd_blocks.MODULE_LISTS)`` is the diffusers key of every
parameter (``diffusion_jax.weights.vae``).

The latent-diffusion models see ``scaling_factor * (z - shift_factor)``; a pipeline decodes
``decode(z_model / scaling_factor + shift_factor)``. Both factors are fields; the network itself
never applies them.

Precision, measured on one H200 (jax 0.11.2, 2026-11-29) against the same program on CPU: float32
at JAX's default matmul precision runs its convolutions in TF32 there (max abs difference 2.5e-3 on
decode of the tiny test VAE); under ``jax.default_matmul_precision('highest')`` 4e-6. SD's VAE
decoding 64x64 latents (512x512 images): float32 10.5 ms, bfloat16 7.1 ms (relative max
difference 0.018 from float32), bfloat16 at batch 4 21.4 ms; about 6 s to compile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import layers
from diffusion_jax.models import sd_blocks

Dtype = Any

# diffusers' clamp of the posterior's log-variance (``DiagonalGaussianDistribution``).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

DOWN_BLOCK_TYPES = ('DownEncoderBlock2D',)
UP_BLOCK_TYPES = ('UpDecoderBlock2D',)
ACTIVATIONS = ('silu', 'swish')


class DiagonalGaussian(NamedTuple):
  """The encoder's posterior ``N(mean, exp(logvar))``, elementwise (diffusers'
  ``DiagonalGaussianDistribution``).

  Attributes:
    mean: ``[B, h, w, C]``.
    logvar: ``[B, h, w, C]``, already clipped to ``[LOGVAR_MIN, LOGVAR_MAX]``.
  """
  mean: jax.Array
  logvar: jax.Array

  def sample(self, key: jax.Array) -> jax.Array:
    """``mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` drawn from ``key``; float32."""
    eps = jax.random.normal(key, self.mean.shape, jnp.float32)
    return self.mean + jnp.exp(0.5 * self.logvar) * eps

  def mode(self) -> jax.Array:
    """The mean (the posterior's mode)."""
    return self.mean

  def kl(self) -> jax.Array:
    """``KL(q || N(0, I))`` per example, summed over h, w, C (nats): ``[B]``.

    ``0.5 * sum(mean^2 + var - 1 - logvar)``, as diffusers and the LDM code.
    """
    return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar,
                         axis=(1, 2, 3))


class DownEncoderBlock2D(nn.Module):
  """diffusers' ``DownEncoderBlock2D``: ``num_layers`` resnets, then a stride-2 conv."""
  out_channels: int
  num_layers: int
  groups: int
  eps: float = 1e-6
  add_downsample: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = sd_blocks.ResnetBlock2D(out_channels=self.out_channels, groups=self.groups,
                                  eps=self.eps, dtype=self.dtype, name=f'resnets_{i}')(x)
    if self.add_downsample:
      x = sd_blocks.Downsample2D(out_channels=self.out_channels, padding=0, dtype=self.dtype,
                                 name='downsamplers_0')(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """diffusers' ``UpDecoderBlock2D``: ``num_layers`` resnets, then nearest x2 and a conv."""
  out_channels: int
  num_layers: int
  groups: int
  eps: float = 1e-6
  add_upsample: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = sd_blocks.ResnetBlock2D(out_channels=self.out_channels, groups=self.groups,
                                  eps=self.eps, dtype=self.dtype, name=f'resnets_{i}')(x)
    if self.add_upsample:
      x = sd_blocks.Upsample2D(out_channels=self.out_channels, dtype=self.dtype,
                               name='upsamplers_0')(x)
    return x


class UNetMidBlock2D(nn.Module):
  """diffusers' ``UNetMidBlock2D`` as the VAE uses it: resnet, [attention], resnet.

  The attention is one head over all channels with a GroupNorm first and a residual connection
  (the LDM ``AttnBlock``).
  """
  groups: int
  eps: float = 1e-6
  add_attention: bool = True
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    resnet = lambda name: sd_blocks.ResnetBlock2D(  # noqa: E731
        out_channels=c, groups=self.groups, eps=self.eps, dtype=self.dtype, name=name)
    x = resnet('resnets_0')(x)
    if self.add_attention:
      x = sd_blocks.Attention(heads=1, dim_head=c, bias=True, group_norm=self.groups,
                              eps=self.eps, residual_connection=True, attention=self.attention,
                              dtype=self.dtype, name='attentions_0')(x)
    return resnet('resnets_1')(x)


class Encoder(nn.Module):
  """diffusers' VAE ``Encoder``: image ``[B, H, W, C]`` -> ``[B, h, w, 2 * latent_channels]``."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  norm_num_groups: int
  latent_channels: int
  mid_block_add_attention: bool = True
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dt, g = self.dtype, self.norm_num_groups
    chans = tuple(self.block_out_channels)
    x = nn.Conv(chans[0], (3, 3), padding=1, dtype=dt, param_dtype=jnp.float32,
                name='conv_in')(x.astype(dt))
    for i, ch in enumerate(chans):
      x = DownEncoderBlock2D(out_channels=ch, num_layers=self.layers_per_block, groups=g,
                             add_downsample=i < len(chans) - 1, dtype=dt,
                             name=f'down_blocks_{i}')(x)
    x = UNetMidBlock2D(groups=g, add_attention=self.mid_block_add_attention,
                       attention=self.attention, dtype=dt, name='mid_block')(x)
    x = layers.GroupNorm(num_groups=g, epsilon=1e-6, dtype=dt, name='conv_norm_out')(x)
    return nn.Conv(2 * self.latent_channels, (3, 3), padding=1, dtype=dt,
                   param_dtype=jnp.float32, name='conv_out')(nn.swish(x))


class Decoder(nn.Module):
  """diffusers' VAE ``Decoder``: latents ``[B, h, w, latent_channels]`` -> ``[B, H, W, out]``."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  norm_num_groups: int
  out_channels: int
  mid_block_add_attention: bool = True
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    dt, g = self.dtype, self.norm_num_groups
    chans = tuple(reversed(tuple(self.block_out_channels)))
    x = nn.Conv(chans[0], (3, 3), padding=1, dtype=dt, param_dtype=jnp.float32,
                name='conv_in')(z.astype(dt))
    x = UNetMidBlock2D(groups=g, add_attention=self.mid_block_add_attention,
                       attention=self.attention, dtype=dt, name='mid_block')(x)
    for i, ch in enumerate(chans):
      x = UpDecoderBlock2D(out_channels=ch, num_layers=self.layers_per_block + 1, groups=g,
                           add_upsample=i < len(chans) - 1, dtype=dt, name=f'up_blocks_{i}')(x)
    x = layers.GroupNorm(num_groups=g, epsilon=1e-6, dtype=dt, name='conv_norm_out')(x)
    return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=dt, param_dtype=jnp.float32,
                   name='conv_out')(nn.swish(x))


class AutoencoderKL(nn.Module):
  """The VAE of Stable Diffusion 1.x / 2.x / XL (and any diffusers ``AutoencoderKL`` config).

  Fields are diffusers' config names (``vae/config.json``; ``from_config`` reads it) plus
  ``dtype`` and ``attention``. The default values are diffusers' defaults; SD's VAE is
  ``block_out_channels=(128, 256, 512, 512)``, four ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``,
  ``layers_per_block=2`` (83,653,863 parameters).

  Attributes:
    in_channels: image channels in.
    out_channels: image channels out.
    down_block_types: ``'DownEncoderBlock2D'`` per level (the only type supported).
    up_block_types: ``'UpDecoderBlock2D'`` per level.
    block_out_channels: channels per level; the latents are ``2 ** (levels - 1)`` times smaller.
    layers_per_block: resnets per encoder level (the decoder has one more).
    act_fn: ``'silu'`` (the only activation supported).
    latent_channels: channels of the latents.
    norm_num_groups: GroupNorm groups throughout.
    sample_size: the training image size (metadata; any size runs).
    scaling_factor: the latents' scale for the diffusion model (0.18215 SD 1/2, 0.13025 SDXL).
    shift_factor: the latents' shift (SD3 / Flux); None: 0.
    latents_mean, latents_std: per-channel latent statistics some configs carry (metadata).
    force_upcast: the config's advice to run this VAE in float32 even when the rest of a
      pipeline runs in 16-bit (SDXL's VAE overflows in float16); pipelines read it.
    use_quant_conv: a 1x1 ``quant_conv`` on the encoder's moments.
    use_post_quant_conv: a 1x1 ``post_quant_conv`` on the latents before decoding.
    mid_block_add_attention: the mid blocks' attention layer.
    dtype: computation dtype (params stay float32); outputs are float32.
    attention: implementation of the mid blocks' attention
      (``diffusion_jax.models.attention``); at 512x512 its 4,096 tokens make ``'chunked'`` the
      memory-frugal choice on CPU. Not ``'cudnn'``: the one head is 512 wide in SD's VAE, and
      cuDNN's fused attention takes at most 256.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Sequence[str] = ('DownEncoderBlock2D',)
  up_block_types: Sequence[str] = ('UpDecoderBlock2D',)
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  act_fn: str = 'silu'
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | Sequence[int] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: Sequence[float] | None = None
  latents_std: Sequence[float] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32
  attention: str = 'auto'

  def check_config(self) -> None:
    """Raises ValueError naming the field when the configuration is not one this module builds."""
    n = len(self.block_out_channels)
    if n < 1:
      raise ValueError('AutoencoderKL block_out_channels must have at least one level.')
    for field, types, allowed in (('down_block_types', self.down_block_types, DOWN_BLOCK_TYPES),
                                  ('up_block_types', self.up_block_types, UP_BLOCK_TYPES)):
      if len(types) != n:
        raise ValueError(f'AutoencoderKL {field} has {len(types)} entries but block_out_channels '
                         f'has {n}; give one block type per level.')
      bad = [t for t in types if t not in allowed]
      if bad:
        raise ValueError(f'AutoencoderKL {field} contains {bad}; only {allowed} are supported.')
    if self.act_fn not in ACTIVATIONS:
      raise ValueError(f'AutoencoderKL act_fn={self.act_fn!r} is not supported; use one of '
                       f'{ACTIVATIONS}.')
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f'AutoencoderKL block_out_channels {bad} are not divisible by '
                       f'norm_num_groups={self.norm_num_groups}.')
    attention_lib.check_implementation(self.attention)
    if self.attention == 'cudnn' and self.mid_block_add_attention and (
        self.block_out_channels[-1] > 256 or self.block_out_channels[-1] % 8):
      # The mid blocks attend with one head as wide as the channels (512 in SD's VAE); cuDNN's
      # fused attention takes head dims <= 256, multiples of 8 (jax 0.11 on an H200 refuses 512).
      raise ValueError(f'AutoencoderKL attention=\'cudnn\' cannot run the mid blocks\' single '
                       f'{self.block_out_channels[-1]}-wide attention head (cuDNN takes head dims '
                       "<= 256, multiples of 8); use attention='xla' (or 'chunked').")

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> AutoencoderKL:
    """The module of a diffusers ``vae/config.json`` (as a dict).

    diffusers' bookkeeping keys (those starting with ``_``: ``_class_name``,
    ``_diffusers_version``, ``_name_or_path``) are ignored.

    Args:
      config: the config's entries.
      **overrides: fields to set, e.g. ``dtype=jnp.bfloat16``, ``attention='cudnn'``.

    Raises:
      ValueError: a ``_class_name`` other than AutoencoderKL, a key this module does not know, or
        a value it does not support (naming the key).
    """
    name = config.get('_class_name', 'AutoencoderKL')
    if name != 'AutoencoderKL':
      raise ValueError(f'the config describes a {name}, not an AutoencoderKL.')
    fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name', 'dtype', 'attention'}
    kwargs = {}
    for key, value in config.items():
      if key.startswith('_'):
        continue
      if key not in fields:
        raise ValueError(f'AutoencoderKL config key {key!r} (= {value!r}) is not supported; the '
                         f'supported keys are {sorted(fields)}.')
      kwargs[key] = tuple(value) if isinstance(value, list) else value
    module = cls(**{**kwargs, **overrides})
    module.check_config()
    return module

  def setup(self):
    self.check_config()
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention,
                  attention=self.attention, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    conv1x1 = lambda ch: nn.Conv(ch, (1, 1), dtype=self.dtype,  # noqa: E731
                                 param_dtype=jnp.float32)
    if self.use_quant_conv:
      self.quant_conv = conv1x1(2 * self.latent_channels)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv1x1(self.latent_channels)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The posterior's parameters for images ``x``.

    Args:
      x: ``[B, H, W, in_channels]`` images in [-1, 1].

    Returns:
      ``(mean, logvar)``, each ``[B, ceil(H / f), ceil(W / f), latent_channels]`` float32 with
      ``f = 2 ** (len(block_out_channels) - 1)``; logvar clipped to [-30, 20] as diffusers.

    Raises:
      ValueError: on images with another channel count than ``in_channels``.
    """
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'AutoencoderKL.encode expects [B, H, W, {self.in_channels}] images (NHWC); '
                       f'got shape {tuple(x.shape)}.')
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def posterior(self, x: jax.Array) -> DiagonalGaussian:
    """``DiagonalGaussian(*encode(x))``."""
    return DiagonalGaussian(*self.encode(x))

  def decode(self, z: jax.Array) -> jax.Array:
    """Images from latents (unscaled: divide a diffusion model's latents by ``scaling_factor``
    and add ``shift_factor`` first).

    Args:
      z: ``[B, h, w, latent_channels]``.

    Returns:
      ``[B, h * f, w * f, out_channels]`` float32, nominally in [-1, 1].

    Raises:
      ValueError: on latents with another channel count than ``latent_channels``.
    """
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f'AutoencoderKL.decode expects [B, h, w, {self.latent_channels}] latents '
                       f'(NHWC); got shape {tuple(z.shape)}.')
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None,
               sample_posterior: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reconstruction for training: encode, take the posterior's mode or a sample, decode.

    Args:
      x: ``[B, H, W, in_channels]`` images in [-1, 1].
      key: PRNG key of the posterior sample (required with ``sample_posterior``).
      sample_posterior: decode a sample of the posterior instead of its mean.

    Returns:
      ``(reconstruction [B, H', W', out_channels], mean, logvar)``, float32; ``H' = H`` when
      ``H`` is a multiple of the downsampling factor.

    Raises:
      ValueError: ``sample_posterior`` without ``key``.
    """
    mean, logvar = self.encode(x)
    if sample_posterior:
      if key is None:
        raise ValueError('AutoencoderKL: sample_posterior=True needs a key.')
      z = DiagonalGaussian(mean, logvar).sample(key)
    else:
      z = mean
    return self.decode(z), mean, logvar


__all__ = ['ACTIVATIONS', 'AutoencoderKL', 'DOWN_BLOCK_TYPES', 'Decoder', 'DiagonalGaussian',
           'DownEncoderBlock2D', 'Encoder', 'LOGVAR_MAX', 'LOGVAR_MIN', 'UNetMidBlock2D',
           'UP_BLOCK_TYPES', 'UpDecoderBlock2D']
