"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of a Stable Diffusion U-Net's encoder (``conv_in``, the time embedding, the down
blocks and the middle block) reads the noisy latents plus an embedding of a conditioning image
(edges, depth, pose, ...), and returns one residual per skip connection of the U-Net and one for
its middle block, each through a 1x1 "zero convolution" (initialized to zero, so that a fresh
ControlNet leaves the frozen U-Net's output unchanged). The U-Net adds them to its skips
(``UNet2DConditionModel(..., down_block_additional_residuals=, mid_block_additional_residual=)``).

The module mirrors diffusers' ``ControlNetModel`` (``diffusers/models/controlnets/controlnet.py``):
its fields are diffusers' config keys (``from_config`` takes a ControlNet ``config.json``) and its
submodules carry diffusers' names, so a parameter path maps onto the PyTorch key by
``diffusion_jax.weights.controlnet.controlnet_key``:

=========================================================  =======================================
our parameter path                                         diffusers key
=========================================================  =======================================
``controlnet_cond_embedding/conv_in/kernel``               ``controlnet_cond_embedding.conv_in.
                                                           weight``
``controlnet_cond_embedding/blocks_3/bias``                ``controlnet_cond_embedding.blocks.3.
                                                           bias``
``down_blocks_1/attentions_0/proj_in/kernel``              ``down_blocks.1.attentions.0.proj_in.
                                                           weight``
``controlnet_down_blocks_4/kernel`` (a zero conv)          ``controlnet_down_blocks.4.weight``
``controlnet_mid_block/bias``                              ``controlnet_mid_block.bias``
=========================================================  =======================================

The encoder's blocks are the U-Net's own (``unet_2d_condition.DownBlock`` / ``MidBlock`` /
``TimestepEmbedding``), so ``from_unet`` copies a U-Net's parameters into a ControlNet by path.
Full-size parameter counts (``jax.eval_shape``, equal to diffusers' on its meta device): the SD 1.5
ControlNets (lllyasviel/sd-controlnet-*, 1.45 GB in float32) 361,279,120; the SDXL ones
(diffusers/controlnet-*-sdxl-1.0, 2.5 GB in float16) 1,251,014,160.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import unet_2d_condition as unet_lib

Dtype = Any
PyTree = Any

CHANNEL_ORDERS = ('rgb', 'bgr')

# Config keys of diffusers' ControlNetModel that select architectures we do not build, with the
# values we do build (those of every SD 1.x / 2.x / XL ControlNet).
_UNSUPPORTED_KEYS = {
    'act_fn': ('silu', 'swish'),
    'class_embed_type': (None,),
    'encoder_hid_dim': (None,),
    'encoder_hid_dim_type': (None,),
    'mid_block_scale_factor': (1, 1.0),
    'num_class_embeds': (None, 0),
}
# Keys that carry no architecture for us (the head count of the 'text' addition embedding).
_IGNORED_KEYS = ('addition_embed_type_num_heads',)

# U-Net fields a ControlNet made by ``from_unet`` copies (diffusers' ``ControlNetModel.from_unet``).
_FROM_UNET = ('in_channels', 'flip_sin_to_cos', 'freq_shift', 'down_block_types', 'mid_block_type',
              'block_out_channels', 'layers_per_block', 'downsample_padding', 'norm_num_groups',
              'norm_eps', 'cross_attention_dim', 'transformer_layers_per_block',
              'attention_head_dim', 'num_attention_heads', 'use_linear_projection',
              'upcast_attention', 'addition_embed_type', 'addition_time_embed_dim',
              'projection_class_embeddings_input_dim', 'resnet_time_scale_shift', 'attention')
# The parameter subtrees that are the U-Net's (copied by ``from_unet``); the rest is ControlNet's.
UNET_SUBTREES = ('conv_in', 'time_embedding', 'add_embedding', 'mid_block')


def _zeros_conv(features: int, name: str, dtype: Dtype) -> nn.Conv:
  """A 1x1 convolution initialized to zero (the paper's "zero convolution", Sec. 3.1)."""
  return nn.Conv(features, (1, 1), dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, name=name)


class ControlNetConditioningEmbedding(nn.Module):
  """diffusers' ``ControlNetConditioningEmbedding``: the conditioning image to latent resolution.

  ``conv_in`` (3x3) then per step ``blocks[2 i]`` (3x3, same width) and ``blocks[2 i + 1]``
  (3x3, stride 2, the next width), each followed by SiLU, then ``conv_out`` (3x3, zero-initialized)
  to the U-Net's first width. With ``len(block_out_channels) = n`` the image is downsampled by
  ``2 ** (n - 1)`` (8, SD's VAE factor, for the published (16, 32, 96, 256)). The paper's E(.)
  (Zhang et al. 2023, Sec. 3.2).

  Attributes:
    conditioning_embedding_channels: output channels (``block_out_channels[0]`` of the U-Net).
    block_out_channels: widths of the embedding's levels (``conditioning_embedding_out_channels``).
    dtype: computation dtype; parameters float32.
  """
  conditioning_embedding_channels: int
  block_out_channels: Sequence[int] = (16, 32, 96, 256)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, cond: jax.Array) -> jax.Array:
    """``cond: [B, H, W, C]`` -> ``[B, H / 2^(n-1), W / 2^(n-1), conditioning_embedding_channels]``."""
    conv = lambda features, name, stride=1: nn.Conv(  # noqa: E731
        features, (3, 3), strides=stride, padding=1, dtype=self.dtype, param_dtype=jnp.float32,
        name=name)
    channels = tuple(self.block_out_channels)
    h = nn.silu(conv(channels[0], 'conv_in')(cond))
    for i in range(len(channels) - 1):
      h = nn.silu(conv(channels[i], f'blocks_{2 * i}')(h))
      h = nn.silu(conv(channels[i + 1], f'blocks_{2 * i + 1}', 2)(h))
    return nn.Conv(self.conditioning_embedding_channels, (3, 3), padding=1, dtype=self.dtype,
                   param_dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros, name='conv_out')(h)


def _per_level(name: str, value: Any, num_levels: int) -> tuple:
  if isinstance(value, (int, float)) or value is None:
    return (value,) * num_levels
  value = tuple(value)
  if len(value) != num_levels:
    raise ValueError(f'ControlNetModel: {name}={value} has {len(value)} entries, the model has '
                     f'{num_levels} levels (down_block_types): give one per level or one int.')
  return value


class ControlNetModel(nn.Module):
  """diffusers' ``ControlNetModel`` for SD 1.x / 2.x / XL U-Nets, NHWC.

  Fields are diffusers' config keys (``from_config`` reads a ControlNet ``config.json``), plus
  ``dtype`` and ``attention``; the U-Net-like ones mean what they mean in
  ``UNet2DConditionModel``, whose encoder this copies.

  Attributes:
    in_channels: latent channels (4).
    conditioning_channels: channels of the conditioning image (3).
    flip_sin_to_cos, freq_shift: the sinusoidal timestep embedding (True, 0 in SD).
    down_block_types: per level ``'CrossAttnDownBlock2D'`` or ``'DownBlock2D'``.
    mid_block_type: ``'UNetMidBlock2DCrossAttn'`` or ``'UNetMidBlock2D'``.
    block_out_channels: channels per level.
    layers_per_block: residual blocks per level (int or per level).
    downsample_padding: padding of the stride-2 convs.
    norm_num_groups, norm_eps: GroupNorm of the resnets.
    cross_attention_dim: width of ``encoder_hidden_states`` (int or per level).
    transformer_layers_per_block: transformer blocks per spatial transformer (int or per level).
    attention_head_dim: heads per level when ``num_attention_heads`` is None (diffusers' quirk).
    num_attention_heads: heads per level.
    use_linear_projection: Linear ``proj_in`` / ``proj_out`` (SD 2.x, XL) instead of 1x1 convs.
    upcast_attention: attention logits in float32 (ours always are).
    addition_embed_type: None, or ``'text_time'`` (SDXL, ``added_cond_kwargs`` as the U-Net).
    addition_time_embed_dim: sinusoidal width per ``time_ids`` entry (SDXL: 256).
    projection_class_embeddings_input_dim: input width of ``add_embedding`` (SDXL: 2816).
    resnet_time_scale_shift: ``'default'`` only.
    controlnet_conditioning_channel_order: ``'rgb'``, or ``'bgr'`` (the image's channels are
      reversed first, as diffusers).
    conditioning_embedding_out_channels: widths of ``controlnet_cond_embedding``.
    global_pool_conditions: average every residual over space (diffusers' shuffle ControlNets;
      diffusers' pipelines then run it in guess mode).
    dtype: computation dtype; parameters float32; residuals float32.
    attention: attention implementation (``diffusion_jax.models.attention``).
  """
  in_channels: int = 4
  conditioning_channels: int = 3
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: Sequence[str] = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                     'CrossAttnDownBlock2D', 'DownBlock2D')
  mid_block_type: str = 'UNetMidBlock2DCrossAttn'
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
  controlnet_conditioning_channel_order: str = 'rgb'
  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)
  global_pool_conditions: bool = False
  dtype: Dtype = jnp.float32
  attention: str = 'auto'

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> ControlNetModel:
    """The module for a diffusers ControlNet ``config.json`` (as a mapping); ``overrides`` win.

    Keys starting with ``_`` are ignored; lists become tuples; ``upcast_attention: null`` and
    ``only_cross_attention: false`` are accepted.

    Raises:
      ValueError: naming a key whose value selects an architecture we do not build
        (``class_embed_type``, ``encoder_hid_dim_type``, ``only_cross_attention``, ...), or a
        key we do not know.
    """
    fields = {f for f in cls.__dataclass_fields__ if f not in ('parent', 'name')}
    kwargs = {}
    for key, value in config.items():
      if key.startswith('_') or key in _IGNORED_KEYS or key in overrides:
        continue
      if key in _UNSUPPORTED_KEYS:
        if value not in _UNSUPPORTED_KEYS[key]:
          raise ValueError(f'ControlNetModel config: {key}={value!r} is not supported (only '
                           f'{" or ".join(repr(a) for a in _UNSUPPORTED_KEYS[key])}); this '
                           'ControlNet builds the SD 1.x / 2.x / XL architectures.')
        continue
      if key == 'only_cross_attention':
        if any(v for v in (value if isinstance(value, (list, tuple)) else [value])):
          raise ValueError(f'ControlNetModel config: only_cross_attention={value!r} is not '
                           'supported (only False).')
        continue
      if key not in fields:
        raise ValueError(f'ControlNetModel config: unknown key {key!r}={value!r}; a newer '
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

  @classmethod
  def from_unet(cls, unet: unet_lib.UNet2DConditionModel, unet_params: PyTree | None = None, *,
                key: jax.Array | None = None,
                conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                conditioning_channels: int = 3, controlnet_conditioning_channel_order: str = 'rgb',
                **overrides: Any) -> tuple[ControlNetModel, PyTree | None]:
    """A ControlNet for ``unet``, initialized from its weights (diffusers' ``from_unet``).

    The encoder (``conv_in``, ``time_embedding``, SDXL's ``add_embedding``, ``down_blocks``,
    ``mid_block``) is a copy of the U-Net's; the zero convolutions and the conditioning
    embedding's ``conv_out`` are zero; the rest of the conditioning embedding is Flax's default
    initialization drawn from ``key``. So the fresh ControlNet's residuals are exactly zero and the
    U-Net's output is unchanged until training moves the zero convolutions (Zhang et al. 2023,
    Sec. 3.1).

    Args:
      unet: the U-Net module (its configuration is copied).
      unet_params: its parameters; None returns ``(module, None)`` (the module only).
      key: PRNG key of the conditioning embedding's initialization; default ``key(0)``.
      conditioning_embedding_out_channels: widths of the conditioning embedding; its length n
        sets the image / latent size ratio ``2 ** (n - 1)``.
      conditioning_channels: channels of the conditioning image.
      controlnet_conditioning_channel_order: ``'rgb'`` or ``'bgr'``.
      **overrides: other fields (``dtype``, ``attention``).

    Returns:
      ``(module, params)``: float32 parameters (jnp arrays).

    Raises:
      ValueError: a U-Net without a middle block (a ControlNet needs one) or an unsupported
        configuration.
    """
    fields = {name: getattr(unet, name) for name in _FROM_UNET}
    fields['dtype'] = unet.dtype
    if fields['mid_block_type'] is None:
      raise ValueError('ControlNetModel.from_unet: the U-Net has no middle block '
                       '(mid_block_type=None); a ControlNet needs one.')
    fields.update(conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                  conditioning_channels=conditioning_channels,
                  controlnet_conditioning_channel_order=controlnet_conditioning_channel_order)
    fields.update(overrides)
    module = cls(**fields)
    module.check_config()
    if unet_params is None:
      return module, None
    params = jax.jit(module.init_params)(jax.random.key(0) if key is None else key)
    copied = dict(params)
    for name in params:
      if name in UNET_SUBTREES or name.startswith('down_blocks_'):
        if name not in unet_params:
          raise ValueError(f'ControlNetModel.from_unet: the U-Net parameters have no {name!r}.')
        # Fresh buffers: the trainer donates the ControlNet's, never the frozen U-Net's.
        copied[name] = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True),
                                    unet_params[name])
    want = jax.tree.structure(params)
    if jax.tree.structure(copied) != want or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(copied), jax.tree.leaves(params))):
      raise ValueError('ControlNetModel.from_unet: the U-Net parameters do not match the U-Net '
                       'configuration given.')
    return module, copied

  def check_config(self) -> None:
    """Raises ValueError naming the field when the configuration cannot be built."""
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n:
      raise ValueError(f'ControlNetModel: down_block_types ({len(self.down_block_types)}) and '
                       f'block_out_channels ({n}) must have one entry per level.')
    bad = [t for t in self.down_block_types if t not in unet_lib.DOWN_BLOCK_TYPES]
    if bad:
      raise ValueError(f'ControlNetModel: down_block_types contains {bad}; supported: '
                       f'{tuple(unet_lib.DOWN_BLOCK_TYPES)}.')
    if self.mid_block_type not in ('UNetMidBlock2DCrossAttn', 'UNetMidBlock2D'):
      raise ValueError(f'ControlNetModel: mid_block_type={self.mid_block_type!r} is not supported;'
                       " use 'UNetMidBlock2DCrossAttn' or 'UNetMidBlock2D'.")
    if self.addition_embed_type not in unet_lib.ADDITION_EMBED_TYPES:
      raise ValueError(f'ControlNetModel: addition_embed_type={self.addition_embed_type!r} is not '
                       f'supported; use one of {unet_lib.ADDITION_EMBED_TYPES}.')
    if self.addition_embed_type == 'text_time' and (
        not self.addition_time_embed_dim or not self.projection_class_embeddings_input_dim):
      raise ValueError('ControlNetModel: addition_embed_type="text_time" needs '
                       'addition_time_embed_dim and projection_class_embeddings_input_dim.')
    if self.resnet_time_scale_shift != 'default':
      raise ValueError(f'ControlNetModel: resnet_time_scale_shift={self.resnet_time_scale_shift!r}'
                       ' is not supported (only "default").')
    if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
      raise ValueError('ControlNetModel: controlnet_conditioning_channel_order='
                       f'{self.controlnet_conditioning_channel_order!r}; use one of '
                       f'{CHANNEL_ORDERS}.')
    if not self.conditioning_embedding_out_channels:
      raise ValueError('ControlNetModel: conditioning_embedding_out_channels must name at least '
                       'one width.')
    for name in ('layers_per_block', 'cross_attention_dim', 'transformer_layers_per_block',
                 'attention_head_dim', 'num_attention_heads'):
      if any(isinstance(v, tuple) for v in _per_level(name, getattr(self, name), n)):
        raise ValueError(f'ControlNetModel: {name}={getattr(self, name)} nests per-layer values, '
                         'which are not supported (one value per level).')
    attention_lib.check_implementation(self.attention)

  @property
  def image_factor(self) -> int:
    """Conditioning-image pixels per latent cell: ``2 ** (len(conditioning_embedding_out_channels)
    - 1)`` (8 for the published ControlNets, SD's VAE factor)."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  @property
  def num_residuals(self) -> int:
    """Number of down residuals: the U-Net's skip connections (12 for SD 1.x / 2.x, 9 for SDXL)."""
    n = len(self.block_out_channels)
    layers = _per_level('layers_per_block', self.layers_per_block, n)
    return 1 + sum(layers) + n - 1

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

  def example_inputs(self, batch: int = 1, latent_size: int | None = None
                     ) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
    """Zero inputs of the smallest (or given) size, ``(args, kwargs)``, for ``init`` / shapes."""
    n = len(self.block_out_channels)
    size = latent_size or 2 ** (n - 1)
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    context_dim = self._levels()['context_dim'][0]
    pixels = size * self.image_factor
    args = (zeros(batch, size, size, self.in_channels), zeros(batch),
            zeros(batch, 1, context_dim), zeros(batch, pixels, pixels, self.conditioning_channels))
    kwargs = {}
    if self.addition_embed_type == 'text_time':
      pooled = self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim
      kwargs['added_cond_kwargs'] = {'text_embeds': zeros(batch, pooled),
                                     'time_ids': zeros(batch, 6)}
    return args, kwargs

  def init_params(self, key: jax.Array) -> PyTree:
    """Freshly initialized parameters (zero convolutions zero), traced on the smallest input."""
    args, kwargs = self.example_inputs()
    return self.init(key, *args, **kwargs)['params']

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               controlnet_cond: jax.Array, *, conditioning_scale: float | jax.Array = 1.0,
               added_cond_kwargs: Mapping[str, jax.Array] | None = None,
               guess_mode: bool = False) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The residuals for the U-Net's skip connections and middle block.

    Follows diffusers' ``ControlNetModel.forward``: the time embedding as the U-Net's,
    ``conv_in(sample) + controlnet_cond_embedding(controlnet_cond)``, the down and middle blocks,
    a zero convolution on every skip and on the middle output, times ``conditioning_scale``.

    Args:
      sample: ``[B, h, w, in_channels]`` noisy latents (NHWC).
      timesteps: ``[B]`` (or a scalar) on diffusers' scale (0..999 for SD); may be fractional.
      encoder_hidden_states: ``[B, L, cross_attention_dim]`` text-encoder hidden states.
      controlnet_cond: ``[B, h * f, w * f, conditioning_channels]`` conditioning image in [0, 1]
        (not normalized, as diffusers' control image processor leaves it), with
        ``f = image_factor``.
      conditioning_scale: weight of the residuals (a float or a traced scalar).
      added_cond_kwargs: SDXL's ``{'text_embeds': [B, P], 'time_ids': [B, K]}`` for
        ``addition_embed_type='text_time'``.
      guess_mode: scale the residuals geometrically from 0.1 (the first skip) to 1 (the middle),
        times ``conditioning_scale``, as diffusers' guess mode.

    Returns:
      ``(down_block_res_samples, mid_block_res_sample)``: ``num_residuals`` arrays
      ``[B, h_i, w_i, C_i]`` (the U-Net's skip shapes, shallowest first) and
      ``[B, h_m, w_m, C_m]``, float32.

    Raises:
      ValueError: inputs of the wrong rank, width or size (the conditioning image must be
        ``image_factor`` times the latents), missing ``added_cond_kwargs`` for SDXL, or an
        unsupported configuration.
    """
    self.check_config()
    levels = self._levels()
    dt = self.dtype
    if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
      raise ValueError(f'ControlNetModel: sample must be [B, h, w, {self.in_channels}] (NHWC), got '
                       f'shape {sample.shape}.')
    batch, height, width = sample.shape[:3]
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
      raise ValueError(f'ControlNetModel: encoder_hidden_states must be [B={batch}, L, D], got '
                       f'shape {encoder_hidden_states.shape}.')
    f = self.image_factor
    want = (batch, height * f, width * f, self.conditioning_channels)
    if tuple(controlnet_cond.shape) != want:
      raise ValueError(f'ControlNetModel: controlnet_cond has shape {tuple(controlnet_cond.shape)}'
                       f'; for latents {tuple(sample.shape)} it must be {want} (NHWC, {f}x the '
                       'latent size, the conditioning embedding\'s downsampling).')

    # 1. Time (and SDXL's added) embedding, as the U-Net's.
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
    t_emb = unet_lib.timestep_embedding(timesteps, self.block_out_channels[0],
                                        flip_sin_to_cos=self.flip_sin_to_cos,
                                        freq_shift=self.freq_shift)
    time_embed_dim = 4 * self.block_out_channels[0]
    emb = unet_lib.TimestepEmbedding(time_embed_dim, dtype=dt, name='time_embedding')(
        t_emb.astype(dt))
    if self.addition_embed_type == 'text_time':
      emb = emb + self._text_time_embedding(added_cond_kwargs, batch, time_embed_dim)
    context = encoder_hidden_states.astype(dt)

    # 2. Latents plus the embedded conditioning image.
    cond = controlnet_cond.astype(dt)
    if self.controlnet_conditioning_channel_order == 'bgr':
      cond = cond[..., ::-1]
    h = nn.Conv(self.block_out_channels[0], (3, 3), padding=1, dtype=dt, param_dtype=jnp.float32,
                name='conv_in')(sample.astype(dt))
    h = h + ControlNetConditioningEmbedding(
        self.block_out_channels[0], tuple(self.conditioning_embedding_out_channels), dtype=dt,
        name='controlnet_cond_embedding')(cond)

    # 3. Down and middle blocks: the U-Net's encoder.
    skips = [h]
    n = len(self.block_out_channels)
    common = dict(groups=self.norm_num_groups, eps=self.norm_eps,
                  use_linear_projection=self.use_linear_projection,
                  upcast_attention=self.upcast_attention, attention=self.attention, dtype=dt)
    for i, block_type in enumerate(self.down_block_types):
      h, level_skips = unet_lib.DownBlock(
          cross_attention=unet_lib.DOWN_BLOCK_TYPES[block_type], num_heads=levels['heads'][i],
          transformer_layers=levels['depth'][i], cross_attention_dim=levels['context_dim'][i],
          out_channels=self.block_out_channels[i], num_layers=levels['layers'][i],
          add_downsample=i < n - 1, downsample_padding=self.downsample_padding, **common,
          name=f'down_blocks_{i}')(h, emb, context)
      skips.extend(level_skips)
    h = unet_lib.MidBlock(
        cross_attention=self.mid_block_type == 'UNetMidBlock2DCrossAttn',
        num_heads=levels['heads'][-1], transformer_layers=levels['depth'][-1],
        cross_attention_dim=levels['context_dim'][-1], **common, name='mid_block')(h, emb, context)

    # 4. Zero convolutions and scaling.
    down = [_zeros_conv(s.shape[-1], f'controlnet_down_blocks_{k}', dt)(s).astype(jnp.float32)
            for k, s in enumerate(skips)]
    mid = _zeros_conv(h.shape[-1], 'controlnet_mid_block', dt)(h).astype(jnp.float32)
    scale = jnp.asarray(conditioning_scale, jnp.float32)
    if guess_mode and not self.global_pool_conditions:
      scales = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32) * scale
      down = [d * scales[k] for k, d in enumerate(down)]
      mid = mid * scales[-1]
    else:
      down = [d * scale for d in down]
      mid = mid * scale
    if self.global_pool_conditions:
      down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return tuple(down), mid

  def _text_time_embedding(self, added_cond_kwargs: Mapping[str, jax.Array] | None, batch: int,
                           features: int) -> jax.Array:
    """SDXL's added embedding ``add_embedding([text_embeds, sinusoids(time_ids)])``, ``[B, T]``."""
    if not added_cond_kwargs or 'text_embeds' not in added_cond_kwargs or (
        'time_ids' not in added_cond_kwargs):
      raise ValueError('ControlNetModel with addition_embed_type="text_time" (SDXL) needs '
                       "added_cond_kwargs={'text_embeds': [B, P], 'time_ids': [B, K]}.")
    text_embeds = jnp.asarray(added_cond_kwargs['text_embeds'])
    time_ids = jnp.asarray(added_cond_kwargs['time_ids'])
    if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != batch or (
        time_ids.shape[0] != batch):
      raise ValueError(f'ControlNetModel: text_embeds must be [B={batch}, P] and time_ids [B, K], '
                       f'got {text_embeds.shape} and {time_ids.shape}.')
    width = text_embeds.shape[1] + time_ids.shape[1] * self.addition_time_embed_dim
    if width != self.projection_class_embeddings_input_dim:
      raise ValueError(f'ControlNetModel: text_embeds {text_embeds.shape} and time_ids '
                       f'{time_ids.shape} give {width} features; the model expects '
                       'projection_class_embeddings_input_dim='
                       f'{self.projection_class_embeddings_input_dim}.')
    time_embeds = unet_lib.timestep_embedding(
        time_ids.reshape(-1), self.addition_time_embed_dim, flip_sin_to_cos=self.flip_sin_to_cos,
        freq_shift=self.freq_shift).reshape(batch, -1)
    add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
    return unet_lib.TimestepEmbedding(features, dtype=self.dtype, name='add_embedding')(
        add_embeds.astype(self.dtype))


def sum_residuals(outputs: Sequence[tuple[Sequence[jax.Array], jax.Array]]
                  ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """Several ControlNets' ``(down, mid)`` residuals summed, as diffusers' ``MultiControlNetModel``.

  Raises:
    ValueError: no outputs, or outputs with different numbers of residuals.
  """
  if not outputs:
    raise ValueError('sum_residuals: no ControlNet outputs to sum.')
  down, mid = outputs[0]
  down = list(down)
  for k, (d, m) in enumerate(outputs[1:], start=1):
    if len(d) != len(down):
      raise ValueError(f'sum_residuals: ControlNet {k} gives {len(d)} residuals, ControlNet 0 '
                       f'{len(down)}: they are for different U-Nets.')
    down = [a + b for a, b in zip(down, d)]
    mid = mid + m
  return tuple(down), mid


__all__ = ['CHANNEL_ORDERS', 'ControlNetConditioningEmbedding', 'ControlNetModel',
           'UNET_SUBTREES', 'sum_residuals']
