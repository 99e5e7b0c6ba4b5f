"""Stable Diffusion's conditional U-Net (diffusers' ``UNet2DConditionModel``) in Flax Linen.

One module covers the denoisers of Stable Diffusion 1.x, 2.x and XL (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models"; Podell et al. 2023, "SDXL"), as
diffusers builds them (``diffusers/models/unets/unet_2d_condition.py``,
``unet_2d_blocks.py``). Its fields are diffusers' config keys, so ``from_config`` takes a
``unet/config.json`` as it is, and its submodules carry diffusers' names, so that a parameter's
path maps onto the PyTorch key by ``diffusion_jax.weights.unet.unet_key`` (a table, no search):

=====================================================  ===========================================
our parameter path                                     diffusers key
=====================================================  ===========================================
``down_blocks_0/attentions_1/transformer_blocks_0/``   ``down_blocks.0.attentions.1.``
``attn2/to_k/kernel``                                  ``transformer_blocks.0.attn2.to_k.weight``
``time_embedding/linear_1/kernel``                     ``time_embedding.linear_1.weight``
``add_embedding/linear_2/bias`` (SDXL)                 ``add_embedding.linear_2.bias``
``up_blocks_1/upsamplers_0/conv/kernel``               ``up_blocks.1.upsamplers.0.conv.weight``
=====================================================  ===========================================

Full-size parameter counts (``jax.eval_shape``, equal to diffusers'): SD 1.5 859,520,964;
SD 2 865,910,724; SDXL 2,567,463,684.

The residual, attention and resampling blocks are the shared ones of
``diffusion_jax.models.sd_blocks``; this module holds what only the U-Net has: the sinusoidal
timestep embedding, the ``TimestepEmbedding`` MLP, SDXL's ``text_time`` added conditioning and
the down / mid / up block structure with its skip connections and ControlNet residuals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import layers
from diffusion_jax.models import sd_blocks
from diffusion_jax.models import unet as unet_lib

Dtype = Any

# diffusers' block type -> whether the block holds Transformer2DModels (cross-attention).
DOWN_BLOCK_TYPES = {'CrossAttnDownBlock2D': True, 'DownBlock2D': False}
UP_BLOCK_TYPES = {'CrossAttnUpBlock2D': True, 'UpBlock2D': False}
MID_BLOCK_TYPES = ('UNetMidBlock2DCrossAttn', 'UNetMidBlock2D', None)
ADDITION_EMBED_TYPES = (None, 'text_time')

# Config keys of diffusers' UNet2DConditionModel that select architectures we do not build, with
# the values we do build (the defaults, which every SD 1.x / 2.x / XL config has).
_UNSUPPORTED_KEYS = {
    'act_fn': ('silu', 'swish'),
    'attention_type': ('default',),
    'class_embed_type': (None,),
    'class_embeddings_concat': (False,),
    'conv_in_kernel': (3,),
    'conv_out_kernel': (3,),
    'cross_attention_norm': (None,),
    'dropout': (0.0,),
    'dual_cross_attention': (False,),
    'encoder_hid_dim': (None,),
    'encoder_hid_dim_type': (None,),
    'mid_block_only_cross_attention': (None, False),
    'mid_block_scale_factor': (1.0,),
    'num_class_embeds': (None,),
    'resnet_out_scale_factor': (1.0,),
    'resnet_skip_time_act': (False,),
    'reverse_transformer_layers_per_block': (None,),
    'time_cond_proj_dim': (None,),
    'time_embedding_act_fn': (None,),
    'time_embedding_dim': (None,),
    'time_embedding_type': ('positional',),
    'timestep_post_act': (None,),
}
# Keys that carry no architecture for us: bookkeeping, and the head count of the 'text' addition
# embedding (Kandinsky), which we do not build.
_IGNORED_KEYS = ('addition_embed_type_num_heads',)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, diffusers' ``get_timestep_embedding``.

  Frequencies ``exp(-log(max_period) * i / (dim / 2 - freq_shift))`` for ``i < dim / 2``;
  ``[sin, cos]`` of ``t * freq``, or ``[cos, sin]`` with ``flip_sin_to_cos`` (SD); an odd ``dim``
  gets a zero last column. The transformer's positional encoding (Vaswani et al. 2017) as
  DDPM uses it for noise levels (Ho et al. 2020).

  Args:
    timesteps: ``[N]`` timesteps (diffusers' discrete scale, 0..999 for SD; may be fractional).
    dim: embedding width.
    flip_sin_to_cos: cosines first.
    freq_shift: ``downscale_freq_shift`` (0 for SD; 1 is DDPM's original spacing).
    max_period: the longest period.

  Returns:
    ``[N, dim]`` float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers' ``TimestepEmbedding``: ``linear_2(silu(linear_1(x)))``, ``[B, D] -> [B, features]``.

  Attributes:
    features: output (and hidden) width: ``4 * block_out_channels[0]`` in the U-Net.
    dtype: computation dtype; parameters are float32.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(self.features, dtype=self.dtype,  # noqa: E731
                                  param_dtype=jnp.float32, name=name)
    return dense('linear_2')(nn.silu(dense('linear_1')(x)))


class _BlockOptions(nn.Module):
  """Options shared by the down, mid and up blocks (a base class holding fields only)."""
  groups: int = 32
  eps: float = 1e-5
  cross_attention: bool = True
  num_heads: int = 8
  transformer_layers: int = 1
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  attention: str = 'auto'
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32

  def _maybe_remat(self, cls):
    if self.remat_policy == 'none':
      return cls
    return nn.remat(cls, policy=unet_lib.REMAT_POLICIES[self.remat_policy])

  def resnet(self, out_channels: int, name: str) -> nn.Module:
    return self._maybe_remat(sd_blocks.ResnetBlock2D)(
        out_channels=out_channels, groups=self.groups, eps=self.eps, dtype=self.dtype, name=name)

  def transformer(self, channels: int, name: str) -> nn.Module:
    if channels % self.num_heads:
      raise ValueError(f'{channels} channels cannot be split into {self.num_heads} attention heads '
                       '(attention_head_dim / num_attention_heads of the U-Net config).')
    return self._maybe_remat(sd_blocks.Transformer2DModel)(
        num_attention_heads=self.num_heads, attention_head_dim=channels // self.num_heads,
        num_layers=self.transformer_layers, cross_attention_dim=self.cross_attention_dim,
        norm_num_groups=self.groups,
        use_linear_projection=self.use_linear_projection,
        upcast_attention=self.upcast_attention, attention=self.attention, dtype=self.dtype,
        name=name)


class DownBlock(_BlockOptions):
  """diffusers' ``CrossAttnDownBlock2D`` (``cross_attention=True``) or ``DownBlock2D``.

  ``num_layers`` times a ``ResnetBlock2D`` (then a ``Transformer2DModel``), then a stride-2 conv
  unless this is the last level. Every intermediate output is a skip connection of the up path.

  Attributes:
    out_channels: channels of the level.
    num_layers: ``layers_per_block`` of the level.
    add_downsample: False on the last level.
    downsample_padding: padding of the stride-2 conv (1 in SD).
  """
  out_channels: int = 320
  num_layers: int = 2
  add_downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array | None
               ) -> tuple[jax.Array, list[jax.Array]]:
    """``h: [B, H, W, C]``, ``temb: [B, T]``, ``context: [B, L, D]`` -> (h, skips)."""
    skips = []
    for i in range(self.num_layers):
      h = self.resnet(self.out_channels, f'resnets_{i}')(h, temb)
      if self.cross_attention:
        h = self.transformer(self.out_channels, f'attentions_{i}')(h, context)
      skips.append(h)
    if self.add_downsample:
      h = sd_blocks.Downsample2D(out_channels=self.out_channels, padding=self.downsample_padding,
                                 dtype=self.dtype, name='downsamplers_0')(h)
      skips.append(h)
    return h, skips


class MidBlock(_BlockOptions):
  """diffusers' ``UNetMidBlock2DCrossAttn`` (resnet, transformer, resnet) or ``UNetMidBlock2D``
  with ``num_layers=0`` as the U-Net builds it (``cross_attention=False``: one resnet)."""

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array | None) -> jax.Array:
    """``h: [B, H, W, C]`` -> same shape."""
    channels = h.shape[-1]
    h = self.resnet(channels, 'resnets_0')(h, temb)
    if self.cross_attention:
      h = self.transformer(channels, 'attentions_0')(h, context)
      h = self.resnet(channels, 'resnets_1')(h, temb)
    return h


class UpBlock(_BlockOptions):
  """diffusers' ``CrossAttnUpBlock2D`` (``cross_attention=True``) or ``UpBlock2D``.

  ``num_layers`` (``layers_per_block + 1``) times: concatenate the last skip connection along
  the channels, a ``ResnetBlock2D`` (then a ``Transformer2DModel``); then nearest 2x upsampling
  and a conv unless this is the last level.

  Attributes:
    out_channels: channels of the level.
    num_layers: ``layers_per_block + 1`` of the mirrored down level.
    add_upsample: False on the last (full-resolution) level.
  """
  out_channels: int = 320
  num_layers: int = 3
  add_upsample: bool = True

  @nn.compact
  def __call__(self, h: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
               context: jax.Array | None, upsample_size: tuple[int, int] | None = None
               ) -> jax.Array:
    """``h: [B, H, W, C]``, ``skips``: the level's ``num_layers`` skips, used last first.

    ``upsample_size``: (height, width) after upsampling, the next level's skips' size, when it
    is not 2x (an input size not divisible by the U-Net's total downsampling factor); None: 2x.
    """
    skips = list(skips)
    for i in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = self.resnet(self.out_channels, f'resnets_{i}')(h, temb)
      if self.cross_attention:
        h = self.transformer(self.out_channels, f'attentions_{i}')(h, context)
    if self.add_upsample:
      h = sd_blocks.Upsample2D(out_channels=self.out_channels, dtype=self.dtype,
                               name='upsamplers_0')(h, output_size=upsample_size)
    return h


def _per_level(name: str, value: Any, num_levels: int) -> tuple:
  if isinstance(value, (int, float)) or value is None:
    return (value,) * num_levels
  value = tuple(value)
  if len(value) != num_levels:
    raise ValueError(f'UNet2DConditionModel: {name}={value} has {len(value)} entries, the U-Net '
                     f'has {num_levels} levels (down_block_types): give one per level or one int.')
  return value


class UNet2DConditionModel(nn.Module):
  """The conditional U-Net of Stable Diffusion 1.x / 2.x / XL, ``eps``/``v`` = F(x, t, text).

  Fields are diffusers' config keys (``from_config`` reads a ``unet/config.json``), plus ``dtype``
  and ``attention``. Layout: ``conv_in``; per level (``down_block_types``) ``layers_per_block``
  residual blocks, each followed by a spatial transformer (self-attention, cross-attention to
  ``encoder_hidden_states``, GEGLU feed-forward) in cross-attention levels, and a stride-2 conv
  except on the last level; a middle block (resnet, transformer, resnet); the mirrored up path
  with ``layers_per_block + 1`` blocks per level fed by the skip connections; GroupNorm, SiLU
  and ``conv_out``. The timestep embedding (sinusoidal, then a 2-layer MLP to width
  ``4 * block_out_channels[0]``), plus SDXL's added embedding, is added inside every resnet.

  Attributes:
    sample_size: latent size the model was trained at (informational; any size runs).
    in_channels: channels of the latent input (4).
    out_channels: channels of the output (4).
    center_input_sample: map the input ``x -> 2 x - 1`` first.
    flip_sin_to_cos: cosines first in the timestep embedding (True in SD).
    freq_shift: frequency shift of the timestep embedding (0 in SD).
    down_block_types: per level ``'CrossAttnDownBlock2D'`` or ``'DownBlock2D'``.
    mid_block_type: ``'UNetMidBlock2DCrossAttn'``, ``'UNetMidBlock2D'`` or None (no middle).
    up_block_types: per level, top (lowest resolution) first: ``'CrossAttnUpBlock2D'`` or
      ``'UpBlock2D'``.
    block_out_channels: channels per level.
    layers_per_block: residual blocks per down level (int or per level).
    downsample_padding: padding of the stride-2 convs.
    norm_num_groups: GroupNorm groups everywhere.
    norm_eps: GroupNorm epsilon of the resnets and the output norm (the transformers' GroupNorm
      uses 1e-6 and their LayerNorms 1e-5, as diffusers).
    cross_attention_dim: width ``D`` of ``encoder_hidden_states`` (int or per level).
    transformer_layers_per_block: transformer blocks per spatial transformer (int or per level;
      the middle uses the last level's).
    attention_head_dim: diffusers' name for the number of heads when ``num_attention_heads`` is
      None (int or per level; a naming quirk of diffusers kept for config compatibility: SD 1.x
      has 8 heads, SD 2.x (5, 10, 20, 20) heads of 64 channels).
    num_attention_heads: heads per level (int or per level); None: ``attention_head_dim``.
    use_linear_projection: ``proj_in`` / ``proj_out`` of the transformers as Linear (SD 2.x, XL)
      instead of 1x1 convs (SD 1.x).
    upcast_attention: attention logits in float32 (ours always are).
    addition_embed_type: None, or ``'text_time'`` (SDXL): ``added_cond_kwargs`` holds the pooled
      text embedding and the six size/crop ids, embedded and added to the timestep embedding.
    addition_time_embed_dim: sinusoidal width per id of ``time_ids`` (256 in SDXL).
    projection_class_embeddings_input_dim: input width of ``add_embedding``: pooled width +
      6 * ``addition_time_embed_dim`` (2816 in SDXL).
    resnet_time_scale_shift: ``'default'`` (the timestep embedding added, not FiLM); only this.
    dtype: computation dtype (float32 or bfloat16); parameters float32; output float32.
    attention: attention implementation (``diffusion_jax.models.attention``): ``'auto'``,
      ``'xla'``, ``'cudnn'``, ``'einsum'`` or ``'chunked'``; the same function and parameters.
      ``'cudnn'`` runs inference (bf16; measured on an H200, SD 1.5 and SDXL), but JAX 0.11's
      cuDNN gradient rejects the cross-attention's 77 keys ("Unsupported sequence length Q
      4096, KV 77"): train with ``'xla'``.
    remat_policy: rematerialization (gradient checkpointing) of every resnet and spatial
      transformer for training: ``'none'``, ``'full'`` (save nothing), ``'dots_saveable'`` or
      ``'dots_with_no_batch_dims_saveable'`` (``jax.checkpoint_policies``); the same function
      and parameter paths. SD 1.5's gradient at 64x64 latents, batch 4, bf16, one H200:
      ``'full'`` cuts XLA's temporary memory from 20.7 to 5.2 GiB, the step from 69 to 105 ms.
  """
  sample_size: int | Sequence[int] | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: Sequence[str] = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                     'CrossAttnDownBlock2D', 'DownBlock2D')
  mid_block_type: str | None = 'UNetMidBlock2DCrossAttn'
  up_block_types: Sequence[str] = ('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                                   'CrossAttnUpBlock2D')
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int | Sequence[int] = 2
  downsample_padding: int = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | Sequence[int] = 1280
  transformer_layers_per_block: int | Sequence[int] = 1
  attention_head_dim: int | Sequence[int] = 8
  num_attention_heads: int | Sequence[int] | None = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  resnet_time_scale_shift: str = 'default'
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  remat_policy: str = 'none'

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> UNet2DConditionModel:
    """The module for a diffusers ``unet/config.json`` (as a mapping), e.g. ``dtype=`` overrides.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are ignored; lists become
    tuples; ``upcast_attention: null`` is False.

    Raises:
      ValueError: naming a key whose value selects an architecture we do not build
        (``class_embed_type``, ``encoder_hid_dim_type``, ``time_cond_proj_dim``, ...), or a key
        we do not know.
    """
    fields = {f for f in cls.__dataclass_fields__ if f not in ('parent', 'name')}
    kwargs = {}
    for key, value in config.items():
      if key.startswith('_') or key in _IGNORED_KEYS:
        continue
      if key in _UNSUPPORTED_KEYS:
        allowed = _UNSUPPORTED_KEYS[key]
        if value not in allowed:
          raise ValueError(f'UNet2DConditionModel config: {key}={value!r} is not supported (only '
                           f'{" or ".join(repr(a) for a in allowed)}); this U-Net builds the SD '
                           '1.x / 2.x / XL architectures.')
        continue
      if key == 'only_cross_attention':
        if any(_per_level(key, value, len(config.get('down_block_types', ())) or 1)):
          raise ValueError(f'UNet2DConditionModel config: only_cross_attention={value!r} is not '
                           'supported (only False); this U-Net builds the SD 1.x / 2.x / XL '
                           'architectures.')
        continue
      if key not in fields:
        raise ValueError(f'UNet2DConditionModel config: unknown key {key!r}={value!r}; a newer '
                         'diffusers option or another model class (_class_name '
                         f'{config.get("_class_name")!r}).')
      if key == 'upcast_attention' and value is None:
        value = False
      if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      kwargs[key] = value
    kwargs.update(overrides)
    module = cls(**kwargs)
    module.check_config()
    return module

  def check_config(self) -> None:
    """Raises ValueError naming the field when the configuration cannot be built."""
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f'UNet2DConditionModel: down_block_types ({len(self.down_block_types)}), '
                       f'up_block_types ({len(self.up_block_types)}) and block_out_channels ({n}) '
                       'must have one entry per level.')
    for name, types, known in (('down_block_types', self.down_block_types, DOWN_BLOCK_TYPES),
                               ('up_block_types', self.up_block_types, UP_BLOCK_TYPES)):
      bad = [t for t in types if t not in known]
      if bad:
        raise ValueError(f'UNet2DConditionModel: {name} contains {bad}; supported: {tuple(known)}.')
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f'UNet2DConditionModel: mid_block_type={self.mid_block_type!r} is not '
                       f'supported; use one of {MID_BLOCK_TYPES}.')
    if self.addition_embed_type not in ADDITION_EMBED_TYPES:
      raise ValueError(f'UNet2DConditionModel: addition_embed_type={self.addition_embed_type!r} is '
                       f'not supported; use one of {ADDITION_EMBED_TYPES}.')
    if self.addition_embed_type == 'text_time' and (
        not self.addition_time_embed_dim or not self.projection_class_embeddings_input_dim):
      raise ValueError('UNet2DConditionModel: addition_embed_type="text_time" needs '
                       'addition_time_embed_dim and projection_class_embeddings_input_dim.')
    if self.resnet_time_scale_shift != 'default':
      raise ValueError(f'UNet2DConditionModel: resnet_time_scale_shift='
                       f'{self.resnet_time_scale_shift!r} is not supported (only "default").')
    if not self.norm_num_groups:
      raise ValueError('UNet2DConditionModel: norm_num_groups must be a positive int (None, no '
                       'output norm, is not supported).')
    for name in ('layers_per_block', 'cross_attention_dim', 'transformer_layers_per_block',
                 'attention_head_dim', 'num_attention_heads'):
      levels = _per_level(name, getattr(self, name), n)
      if any(isinstance(v, tuple) for v in levels):
        raise ValueError(f'UNet2DConditionModel: {name}={getattr(self, name)} nests per-layer '
                         'values, which are not supported (one value per level).')
    attention_lib.check_implementation(self.attention)
    if self.remat_policy not in unet_lib.REMAT_POLICIES:
      raise ValueError(f'UNet2DConditionModel: remat_policy={self.remat_policy!r} is not known; '
                       f'use one of {tuple(unet_lib.REMAT_POLICIES)}.')

  def _levels(self) -> dict[str, tuple]:
    n = len(self.block_out_channels)
    heads = self.num_attention_heads
    if heads is None:
      heads = self.attention_head_dim  # diffusers' naming quirk (issue 2011): these are heads
    return {
        'layers': _per_level('layers_per_block', self.layers_per_block, n),
        'context_dim': _per_level('cross_attention_dim', self.cross_attention_dim, n),
        'depth': _per_level('transformer_layers_per_block', self.transformer_layers_per_block, n),
        'heads': _per_level('num_attention_heads', heads, n),
    }

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array,
               encoder_hidden_states: jax.Array, *,
               added_cond_kwargs: Mapping[str, jax.Array] | None = None,
               down_block_additional_residuals: Sequence[jax.Array] | None = None,
               mid_block_additional_residual: jax.Array | None = None) -> jax.Array:
    """The U-Net's output for noisy latents at ``timesteps`` given text embeddings.

    Args:
      sample: ``[B, h, w, in_channels]`` noisy latents (NHWC).
      timesteps: ``[B]`` (or a scalar) on diffusers' scale (0..999 for SD); may be fractional.
      encoder_hidden_states: ``[B, L, cross_attention_dim]`` text-encoder hidden states.
      added_cond_kwargs: for ``addition_embed_type='text_time'`` (SDXL):
        ``{'text_embeds': [B, P], 'time_ids': [B, K]}``: the pooled text embedding and the
        micro-conditioning ids (SDXL base: K = 6, original size, crop top-left, target size;
        the refiner: K = 5, with an aesthetic score in place of the target size), with
        ``P + K * addition_time_embed_dim = projection_class_embeddings_input_dim``.
      down_block_additional_residuals: ControlNet residuals, one per skip connection
        (``conv_in``'s output, each down resnet/transformer output, each downsampling), each of
        its skip's shape ``[B, h_i, w_i, C_i]``; added to the skips as diffusers does. Given
        together with ``mid_block_additional_residual``.
      mid_block_additional_residual: ControlNet residual ``[B, h_m, w_m, C_m]`` added to the
        middle block's output.

    Returns:
      ``[B, h, w, out_channels]`` float32 (eps, or v for v-prediction models).

    Raises:
      ValueError: on inputs of the wrong rank or width, missing ``added_cond_kwargs`` for SDXL,
        ControlNet residuals of the wrong number or shape, or an unsupported configuration.
    """
    self.check_config()
    levels = self._levels()
    dt = self.dtype
    if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
      raise ValueError(f'UNet2DConditionModel: sample must be [B, h, w, {self.in_channels}] (NHWC),'
                       f' got shape {sample.shape}.')
    batch = sample.shape[0]
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
      raise ValueError(f'UNet2DConditionModel: encoder_hidden_states must be [B={batch}, L, D], got'
                       f' shape {encoder_hidden_states.shape}.')
    widths = {d for d, t in zip(levels['context_dim'], self.down_block_types)
              if DOWN_BLOCK_TYPES[t]}
    if self.mid_block_type == 'UNetMidBlock2DCrossAttn':
      widths.add(levels['context_dim'][-1])
    if any(encoder_hidden_states.shape[-1] != d for d in widths):
      raise ValueError(f'UNet2DConditionModel: encoder_hidden_states has width '
                       f'{encoder_hidden_states.shape[-1]}, the model cross-attends to width '
                       f'{sorted(widths)} (cross_attention_dim): text states of another encoder?')
    if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
      raise ValueError('UNet2DConditionModel: ControlNet residuals come as both '
                       'down_block_additional_residuals and mid_block_additional_residual (or '
                       'neither); T2I-Adapter residuals are not supported.')

    # 1. Time (and SDXL's added) embedding: sinusoids in float32, the MLPs in ``dtype``.
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
    t_emb = timestep_embedding(timesteps, self.block_out_channels[0],
                               flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
    time_embed_dim = 4 * self.block_out_channels[0]
    emb = TimestepEmbedding(time_embed_dim, dtype=dt, name='time_embedding')(t_emb.astype(dt))
    if self.addition_embed_type == 'text_time':
      emb = emb + self._text_time_embedding(added_cond_kwargs, batch, time_embed_dim)

    context = encoder_hidden_states.astype(dt)
    h = sample.astype(dt)
    if self.center_input_sample:
      h = 2 * h - 1.0

    # 2. Down path; every intermediate output is a skip connection.
    h = nn.Conv(self.block_out_channels[0], (3, 3), padding=1, dtype=dt,
                param_dtype=jnp.float32, name='conv_in')(h)
    skips = [h]
    num_levels = len(self.block_out_channels)
    common = dict(groups=self.norm_num_groups, eps=self.norm_eps,
                  use_linear_projection=self.use_linear_projection,
                  upcast_attention=self.upcast_attention, attention=self.attention,
                  remat_policy=self.remat_policy, dtype=dt)
    for i, block_type in enumerate(self.down_block_types):
      h, level_skips = DownBlock(
          cross_attention=DOWN_BLOCK_TYPES[block_type], num_heads=levels['heads'][i],
          transformer_layers=levels['depth'][i], cross_attention_dim=levels['context_dim'][i],
          out_channels=self.block_out_channels[i],
          num_layers=levels['layers'][i], add_downsample=i < num_levels - 1,
          downsample_padding=self.downsample_padding, **common,
          name=f'down_blocks_{i}')(h, emb, context)
      skips.extend(level_skips)

    if down_block_additional_residuals is not None:
      residuals = tuple(down_block_additional_residuals)
      if len(residuals) != len(skips):
        raise ValueError(f'UNet2DConditionModel: {len(residuals)} down_block_additional_residuals '
                         f'for {len(skips)} skip connections (shapes '
                         f'{[tuple(s.shape) for s in skips]}).')
      for k, (s, r) in enumerate(zip(skips, residuals)):
        if tuple(r.shape) != tuple(s.shape):
          raise ValueError(f'UNet2DConditionModel: down_block_additional_residuals[{k}] has shape '
                           f'{tuple(r.shape)}, its skip connection {tuple(s.shape)}.')
      skips = [s + r.astype(dt) for s, r in zip(skips, residuals)]

    # 3. Middle.
    if self.mid_block_type is not None:
      h = MidBlock(cross_attention=self.mid_block_type == 'UNetMidBlock2DCrossAttn',
                   num_heads=levels['heads'][-1], transformer_layers=levels['depth'][-1],
                   cross_attention_dim=levels['context_dim'][-1],
                   **common, name='mid_block')(h, emb, context)
    if mid_block_additional_residual is not None:
      if tuple(mid_block_additional_residual.shape) != tuple(h.shape):
        raise ValueError(f'UNet2DConditionModel: mid_block_additional_residual has shape '
                         f'{tuple(mid_block_additional_residual.shape)}, the middle block\'s '
                         f'output {tuple(h.shape)}.')
      h = h + mid_block_additional_residual.astype(dt)

    # 4. Up path, consuming the skips last first.
    reversed_channels = tuple(reversed(self.block_out_channels))
    for i, block_type in enumerate(self.up_block_types):
      level = num_levels - 1 - i
      num_layers = levels['layers'][level] + 1
      level_skips, skips = skips[-num_layers:], skips[:-num_layers]
      is_final = i == num_levels - 1
      upsample_size = None
      if not is_final and tuple(skips[-1].shape[1:3]) != (2 * h.shape[1], 2 * h.shape[2]):
        # An odd size on the way down: upsample to the skip's size, as diffusers' upsample_size.
        upsample_size = tuple(skips[-1].shape[1:3])
      h = UpBlock(
          cross_attention=UP_BLOCK_TYPES[block_type], num_heads=levels['heads'][level],
          transformer_layers=levels['depth'][level],
          cross_attention_dim=levels['context_dim'][level], out_channels=reversed_channels[i],
          num_layers=num_layers, add_upsample=not is_final, **common,
          name=f'up_blocks_{i}')(h, level_skips, emb, context, upsample_size)

    # 5. Output.
    h = layers.GroupNorm(num_groups=self.norm_num_groups, epsilon=self.norm_eps, dtype=dt,
                         name='conv_norm_out')(h)
    h = nn.silu(h)
    h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=dt, param_dtype=jnp.float32,
                name='conv_out')(h)
    return h.astype(jnp.float32)

  def _text_time_embedding(self, added_cond_kwargs: Mapping[str, jax.Array] | None, batch: int,
                           features: int) -> jax.Array:
    """SDXL's added embedding: ``add_embedding([text_embeds, sinusoids(time_ids)])``, ``[B, T]``."""
    if not added_cond_kwargs or 'text_embeds' not in added_cond_kwargs or (
        'time_ids' not in added_cond_kwargs):
      raise ValueError('UNet2DConditionModel with addition_embed_type="text_time" (SDXL) needs '
                       "added_cond_kwargs={'text_embeds': [B, P], 'time_ids': [B, K]}.")
    text_embeds = jnp.asarray(added_cond_kwargs['text_embeds'])
    time_ids = jnp.asarray(added_cond_kwargs['time_ids'])
    if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != batch or (
        time_ids.shape[0] != batch):
      raise ValueError(f'UNet2DConditionModel: text_embeds must be [B={batch}, P] and time_ids '
                       f'[B, K], got {text_embeds.shape} and {time_ids.shape}.')
    width = text_embeds.shape[1] + time_ids.shape[1] * self.addition_time_embed_dim
    if width != self.projection_class_embeddings_input_dim:
      raise ValueError(f'UNet2DConditionModel: text_embeds {text_embeds.shape} and time_ids '
                       f'{time_ids.shape} give {width} features; the model expects '
                       'projection_class_embeddings_input_dim='
                       f'{self.projection_class_embeddings_input_dim}.')
    time_embeds = timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                     flip_sin_to_cos=self.flip_sin_to_cos,
                                     freq_shift=self.freq_shift).reshape(batch, -1)
    add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
    return TimestepEmbedding(features, dtype=self.dtype, name='add_embedding')(
        add_embeds.astype(self.dtype))


__all__ = ['DOWN_BLOCK_TYPES', 'MID_BLOCK_TYPES', 'UP_BLOCK_TYPES', 'TimestepEmbedding',
           'UNet2DConditionModel', 'timestep_embedding']
