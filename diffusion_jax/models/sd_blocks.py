"""The building blocks of diffusers' Stable Diffusion networks, in Flax Linen, NHWC.

Each module mirrors the diffusers module of the same name (diffusers ``models/resnet.py``,
``downsampling.py``, ``upsampling.py``, ``attention_processor.py``, ``attention.py``,
``activations.py``, ``transformers/transformer_2d.py``) so that a parameter's path maps onto the
diffusers key by ``diffusion_jax.weights.core.torch_key``: submodules carry diffusers' attribute
names, and module lists are attributes ``name_i`` listed in ``MODULE_LISTS``
(``transformer_blocks_0`` -> ``transformer_blocks.0``, ``to_out_0`` -> ``to_out.0``, ``net_0`` ->
``net.0``). The converter is then a table: ``torch_key(path, lists=MODULE_LISTS)``.

Only what Stable Diffusion 1.x / 2.x / XL and their VAE use is implemented: swish activations,
``time_embedding_norm='default'``, layer norms in the transformer blocks, no dropout (the
published models use none), no attention masks.

Parameters are float32 (``param_dtype``); computation runs in each module's ``dtype`` (float32 or
bfloat16); normalization statistics and attention logits / softmax are always float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import layers

Dtype = Any

# Module-list attributes of the diffusers networks: ``torch_key(path, lists=MODULE_LISTS)``.
MODULE_LISTS = ('down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers',
                'upsamplers', 'transformer_blocks', 'to_out', 'net')

FF_ACTIVATIONS = ('geglu', 'gelu', 'gelu-approximate')


def _conv(features: int, kernel: int, dtype: Dtype, name: str, *, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  """A ``torch.nn.Conv2d(kernel, stride, padding=kernel // 2)`` with bias, NHWC."""
  if padding is None:
    pad = kernel // 2
    padding = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype: Dtype, name: str, *, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers' ``ResnetBlock2D`` (``time_embedding_norm='default'``, swish).

  ``y = (shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x))) + proj(swish(temb)))))) / s``
  with ``shortcut`` a 1x1 conv when the channel count changes (else the identity) and ``s`` the
  ``output_scale_factor``.

  Attributes:
    out_channels: output channels; None: the input's.
    groups: GroupNorm groups of ``norm1``.
    groups_out: GroupNorm groups of ``norm2``; None: ``groups``.
    eps: GroupNorm epsilon (the U-Nets' ``norm_eps``, 1e-5; 1e-6 in the VAE).
    output_scale_factor: the output is divided by it.
    use_in_shortcut: force (True) or drop (False) the 1x1 ``conv_shortcut``; None: only when the
      channel count changes.
    conv_shortcut_bias: bias of ``conv_shortcut``.
    dtype: computation dtype.

  Parameters (diffusers names): ``norm1``, ``conv1`` (3x3), ``time_emb_proj`` (Linear, only when
  ``temb`` is given), ``norm2``, ``conv2`` (3x3), ``conv_shortcut`` (1x1).
  """
  out_channels: int | None = None
  groups: int = 32
  groups_out: int | None = None
  eps: float = 1e-6
  output_scale_factor: float = 1.0
  use_in_shortcut: bool | None = None
  conv_shortcut_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """``x: [B, H, W, C_in]``, ``temb: [B, T]`` or None -> ``[B, H, W, out_channels]``."""
    dt = self.dtype
    in_channels = x.shape[-1]
    out_channels = self.out_channels or in_channels
    h = layers.GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=dt, name='norm1')(x)
    h = _conv(out_channels, 3, dt, 'conv1')(nn.swish(h))
    if temb is not None:
      t = _dense(out_channels, dt, 'time_emb_proj')(nn.swish(temb.astype(dt)))
      h = h + t[:, None, None, :]
    h = layers.GroupNorm(num_groups=self.groups_out or self.groups, epsilon=self.eps, dtype=dt,
                         name='norm2')(h)
    h = _conv(out_channels, 3, dt, 'conv2')(nn.swish(h))
    shortcut = x.astype(dt)
    use_shortcut = (in_channels != out_channels if self.use_in_shortcut is None
                    else self.use_in_shortcut)
    if use_shortcut:
      shortcut = nn.Conv(out_channels, (1, 1), use_bias=self.conv_shortcut_bias, dtype=dt,
                         param_dtype=jnp.float32, name='conv_shortcut')(shortcut)
    out = shortcut + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """diffusers' ``Downsample2D(use_conv=True)``: a 3x3 conv of stride 2, named ``conv``.

  Attributes:
    out_channels: output channels; None: the input's.
    padding: 1 (the U-Nets: symmetric padding 1); 0 (the VAE encoder: diffusers pads the right
      and bottom by one, ``F.pad(x, (0, 1, 0, 1))``, then convolves without padding).
    dtype: computation dtype.
  """
  out_channels: int | None = None
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x: [B, H, W, C]`` -> ``[B, ceil(H / 2), ceil(W / 2), out_channels]`` (H, W even: H / 2)."""
    p = self.padding
    padding = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
    return _conv(self.out_channels or x.shape[-1], 3, self.dtype, 'conv', stride=2,
                 padding=padding)(x.astype(self.dtype))


class Upsample2D(nn.Module):
  """diffusers' ``Upsample2D(use_conv=True)``: nearest x2 (or to ``output_size``), 3x3 ``conv``.

  Attributes:
    out_channels: output channels; None: the input's.
    dtype: computation dtype.
  """
  out_channels: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """``x: [B, H, W, C]`` -> ``[B, 2H, 2W, out_channels]`` or ``[B, *output_size, out_channels]``.

    ``output_size`` (height, width) follows ``F.interpolate(size=..., mode='nearest')``: output
    pixel ``i`` reads input pixel ``floor(i * H / H_out)``; the SD U-Net passes it when a skip
    connection's size is odd.
    """
    x = x.astype(self.dtype)
    if output_size is None:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    else:
      (h, w), (oh, ow) = x.shape[1:3], output_size
      x = x[:, (np.arange(oh) * h) // oh][:, :, (np.arange(ow) * w) // ow]
    return _conv(self.out_channels or x.shape[-1], 3, self.dtype, 'conv')(x)


class Attention(nn.Module):
  """diffusers' ``Attention`` with its default processor (``AttnProcessor2_0``).

  Self-attention over ``x`` or, given ``context``, cross-attention with keys and values from it::

      h = group_norm(x)                                  # when group_norm is set (VAE)
      q, k, v = to_q(h), to_k(context or h), to_v(context or h)       # split into heads
      out = to_out_0(softmax(q k^T / sqrt(dim_head)) v)
      out = (out + x if residual_connection else out) / rescale_output_factor

  Attributes:
    heads: number of heads.
    dim_head: channels per head; the projections have ``heads * dim_head`` features.
    out_dim: output channels of ``to_out_0``; None: the input's channels (diffusers' query_dim).
    cross_attention_dim: expected channels of ``context`` (checked when given; diffusers'
      ``cross_attention_dim``). The key and value projections take their input size from
      ``context`` itself.
    bias: bias of ``to_q`` / ``to_k`` / ``to_v`` (False in the U-Nets' transformers, True in the
      VAE's mid block).
    out_bias: bias of ``to_out_0``.
    group_norm: GroupNorm groups applied to the input first (diffusers' ``norm_num_groups``; the
      VAE mid block); None: no norm.
    eps: that GroupNorm's epsilon.
    residual_connection: add the input to the output (the VAE mid block).
    rescale_output_factor: the output is divided by it.
    upcast: compute q, k, v and the attention in float32 whatever ``dtype`` (diffusers'
      ``upcast_attention``; logits and softmax are float32 in every case).
    attention: implementation of ``diffusion_jax.models.attention.dot_product_attention``.
    dtype: computation dtype.

  Parameters (diffusers names): ``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out_0``
  (diffusers ``to_out.0``).
  """
  heads: int = 8
  dim_head: int = 64
  out_dim: int | None = None
  cross_attention_dim: int | None = None
  bias: bool = False
  out_bias: bool = True
  group_norm: int | None = None
  eps: float = 1e-5
  residual_connection: bool = False
  rescale_output_factor: float = 1.0
  upcast: bool = False
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """Attention over the tokens of ``x``.

    Args:
      x: ``[B, T, C]`` tokens or ``[B, H, W, C]`` map (attended as ``H * W`` tokens).
      context: optional ``[B, L, D]`` (diffusers' ``encoder_hidden_states``).

    Returns:
      The shape of ``x`` with ``out_dim`` (default C) channels.

    Raises:
      ValueError: on an unknown attention implementation or a context of other width than
        ``cross_attention_dim``.
    """
    attention_lib.check_implementation(self.attention)
    if (context is not None and self.cross_attention_dim is not None
        and context.shape[-1] != self.cross_attention_dim):
      raise ValueError(f'Attention: context has {context.shape[-1]} channels, the layer expects '
                       f'cross_attention_dim={self.cross_attention_dim}.')
    dt = self.dtype
    shape = x.shape
    b, c = shape[0], shape[-1]
    residual = x
    h = x.reshape(b, -1, c).astype(dt)
    if self.group_norm is not None:
      h = layers.GroupNorm(num_groups=self.group_norm, epsilon=self.eps, dtype=dt,
                           name='group_norm')(h)
    src = h if context is None else context.astype(dt)
    inner = self.heads * self.dim_head
    q = _dense(inner, dt, 'to_q', use_bias=self.bias)(h)
    k = _dense(inner, dt, 'to_k', use_bias=self.bias)(src)
    v = _dense(inner, dt, 'to_v', use_bias=self.bias)(src)
    split = lambda t: t.reshape(b, t.shape[1], self.heads, self.dim_head)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    if self.upcast:
      q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = attention_lib.dot_product_attention(q, k, v, implementation=self.attention)
    out = out.reshape(b, -1, inner).astype(dt)
    out = _dense(self.out_dim or c, dt, 'to_out_0', use_bias=self.out_bias)(out)
    out = out.reshape(shape[:-1] + (out.shape[-1],))
    if self.residual_connection:
      out = out + residual.astype(dt)
    if self.rescale_output_factor != 1.0:
      out = out / self.rescale_output_factor
    return out


class GEGLU(nn.Module):
  """diffusers' ``GEGLU`` (Shazeer 2020, "GLU Variants Improve Transformer"): ``a * gelu(b)``.

  ``[a, b] = proj(x)`` split in halves along the channels; exact (erf) GELU as ``F.gelu``.

  Attributes:
    dim_out: output channels (``proj`` has ``2 * dim_out``).
    dtype: computation dtype.
  """
  dim_out: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x: [..., D]`` -> ``[..., dim_out]``."""
    h = _dense(2 * self.dim_out, self.dtype, 'proj')(x)
    a, gate = jnp.split(h, 2, axis=-1)
    return a * nn.gelu(gate, approximate=False)


class GELU(nn.Module):
  """diffusers' ``GELU`` module: ``gelu(proj(x))`` (erf, or tanh when ``approximate``)."""
  dim_out: int
  approximate: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x: [..., D]`` -> ``[..., dim_out]``."""
    return nn.gelu(_dense(self.dim_out, self.dtype, 'proj')(x), approximate=self.approximate)


class FeedForward(nn.Module):
  """diffusers' ``FeedForward``: ``net_2(act(x))`` with ``act`` = ``net_0`` (GEGLU by default).

  Keys: ``net.0.proj``, ``net.2`` (``net.1`` is diffusers' dropout, which has no parameters).

  Attributes:
    dim_out: output channels; None: the input's.
    mult: hidden width as a multiple of the input's (when ``inner_dim`` is None).
    inner_dim: hidden width.
    activation_fn: ``'geglu'`` (SD), ``'gelu'`` or ``'gelu-approximate'``.
    dtype: computation dtype.
  """
  dim_out: int | None = None
  mult: int = 4
  inner_dim: int | None = None
  activation_fn: str = 'geglu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x: [..., D]`` -> ``[..., dim_out or D]``."""
    if self.activation_fn not in FF_ACTIVATIONS:
      raise ValueError(f'FeedForward activation_fn={self.activation_fn!r} is not supported; use '
                       f'one of {FF_ACTIVATIONS}.')
    d = x.shape[-1]
    inner = self.inner_dim or int(d * self.mult)
    if self.activation_fn == 'geglu':
      h = GEGLU(inner, dtype=self.dtype, name='net_0')(x)
    else:
      h = GELU(inner, approximate=self.activation_fn == 'gelu-approximate', dtype=self.dtype,
               name='net_0')(x)
    return _dense(self.dim_out or d, self.dtype, 'net_2')(h)


class BasicTransformerBlock(nn.Module):
  """diffusers' ``BasicTransformerBlock`` with ``norm_type='layer_norm'`` (pre-norm residuals).

  ``x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))``; ``attn2`` and
  ``norm2`` exist only when ``cross_attention_dim`` is set (diffusers' rule).

  Attributes:
    num_attention_heads: heads of both attentions.
    attention_head_dim: channels per head.
    cross_attention_dim: width of the context; None: no cross-attention.
    activation_fn: feed-forward activation (``FeedForward``).
    attention_bias: bias of the q/k/v projections.
    upcast_attention: ``Attention.upcast``.
    norm_eps: LayerNorm epsilon.
    ff_inner_dim: hidden width of the feed-forward; None: 4x.
    attention: attention implementation.
    dtype: computation dtype.
  """
  num_attention_heads: int
  attention_head_dim: int
  cross_attention_dim: int | None = None
  activation_fn: str = 'geglu'
  attention_bias: bool = False
  upcast_attention: bool = False
  norm_eps: float = 1e-5
  ff_inner_dim: int | None = None
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """``x: [B, T, D]``, ``context: [B, L, cross_attention_dim]`` -> ``[B, T, D]``."""
    dt = self.dtype
    norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, dtype=dt,  # noqa: E731
                                     param_dtype=jnp.float32, name=name)
    attn = lambda name, cross: Attention(  # noqa: E731
        heads=self.num_attention_heads, dim_head=self.attention_head_dim,
        cross_attention_dim=cross, bias=self.attention_bias, upcast=self.upcast_attention,
        attention=self.attention, dtype=dt, name=name)
    x = x.astype(dt)
    x = attn('attn1', None)(norm('norm1')(x)) + x
    if self.cross_attention_dim is not None:
      if context is None:
        raise ValueError('BasicTransformerBlock with cross_attention_dim='
                         f'{self.cross_attention_dim} needs a context [B, L, D].')
      x = attn('attn2', self.cross_attention_dim)(norm('norm2')(x), context) + x
    x = FeedForward(activation_fn=self.activation_fn, inner_dim=self.ff_inner_dim, dtype=dt,
                    name='ff')(norm('norm3')(x)) + x
    return x


class Transformer2DModel(nn.Module):
  """diffusers' ``Transformer2DModel`` on continuous inputs (the SD U-Nets' spatial transformer).

  ``y = x + proj_out(blocks(proj_in(norm(x))))`` over the ``H * W`` tokens of the map; the
  projections are 1x1 convs (SD 1.x) or Linear layers (``use_linear_projection``: SD 2.x, SDXL).

  Attributes:
    num_attention_heads: heads.
    attention_head_dim: channels per head; the transformer width is their product.
    out_channels: output channels; None: the input's (must then equal the inner width, as in SD).
    num_layers: transformer blocks (SDXL's ``transformer_layers_per_block``).
    cross_attention_dim: width of the context; None: self-attention only.
    norm_num_groups: GroupNorm groups of ``norm`` (eps 1e-6, as diffusers).
    use_linear_projection: Linear ``proj_in`` / ``proj_out`` instead of 1x1 convs.
    upcast_attention: ``Attention.upcast``.
    attention_bias: bias of the q/k/v projections.
    activation_fn: feed-forward activation.
    norm_eps: LayerNorm epsilon of the blocks.
    attention: attention implementation.
    dtype: computation dtype.

  Parameters (diffusers names): ``norm``, ``proj_in``, ``transformer_blocks_{i}``
  (``transformer_blocks.{i}``), ``proj_out``.
  """
  num_attention_heads: int = 16
  attention_head_dim: int = 88
  out_channels: int | None = None
  num_layers: int = 1
  cross_attention_dim: int | None = None
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  upcast_attention: bool = False
  attention_bias: bool = False
  activation_fn: str = 'geglu'
  norm_eps: float = 1e-5
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """``x: [B, H, W, C]``, ``context: [B, L, D]`` or None -> ``[B, H, W, out_channels or C]``."""
    dt = self.dtype
    b, height, width, c = x.shape
    inner = self.num_attention_heads * self.attention_head_dim
    out_channels = self.out_channels or c
    h = layers.GroupNorm(num_groups=self.norm_num_groups, epsilon=1e-6, dtype=dt, name='norm')(x)
    if self.use_linear_projection:
      h = _dense(inner, dt, 'proj_in')(h.reshape(b, height * width, c))
    else:
      h = _conv(inner, 1, dt, 'proj_in')(h).reshape(b, height * width, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(
          num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
          cross_attention_dim=self.cross_attention_dim, activation_fn=self.activation_fn,
          attention_bias=self.attention_bias, upcast_attention=self.upcast_attention,
          norm_eps=self.norm_eps, attention=self.attention, dtype=dt,
          name=f'transformer_blocks_{i}')(h, context)
    if self.use_linear_projection:
      h = _dense(out_channels, dt, 'proj_out')(h).reshape(b, height, width, out_channels)
    else:
      h = _conv(out_channels, 1, dt, 'proj_out')(h.reshape(b, height, width, inner))
    return h + x.astype(dt)


__all__ = ['Attention', 'BasicTransformerBlock', 'Downsample2D', 'FF_ACTIVATIONS', 'FeedForward',
           'GEGLU', 'GELU', 'MODULE_LISTS', 'ResnetBlock2D', 'Transformer2DModel', 'Upsample2D']
