"""Building blocks of the U-Nets: embeddings, residual blocks, attention, resampling.

Layouts are NHWC throughout. Parameters are created in float32 (``param_dtype``) and the
computation runs in the module's ``dtype``. Block structure follows DDPM (Ho et al. 2020,
``diffusion_tf/models/unet.py``) and DDPM++/NCSN++ (Song et al. 2021, score_sde
``models/layerspp.py``), so parameter counts match the published networks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import fir as fir_lib

Dtype = Any
Initializer = Callable[..., jax.Array]

_SQRT2 = math.sqrt(2.0)


def default_init(scale: float = 1.0) -> Initializer:
  """DDPM's initializer ``variance_scaling(scale, 'fan_avg', 'uniform')``; zeros for ``scale == 0``.

  DDPM zero-initializes (scale 1e-10) the last conv of every residual branch, the attention output
  projection and the output conv, so that every block starts as the identity (Ho et al. 2020,
  ``diffusion_tf/nn.py``). Exact zeros do the same without denormals.
  """
  if scale == 0.0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def num_groups(channels: int) -> int:
  """GroupNorm groups: ``min(channels // 4, 32)`` as score_sde, lowered until it divides channels.

  This is 32 for every width of the published networks (DDPM's GroupNorm(32)); the fallback only
  matters for the tiny widths of tests and smoke runs.
  """
  g = max(1, min(channels // 4, 32))
  while channels % g:
    g -= 1
  return g


class GroupNorm(nn.Module):
  """Group normalization (Wu & He 2018) over the channels of an NHWC array, eps 1e-6 as DDPM.

  Same function and parameters (``scale``, ``bias``, shape [C]) as ``flax.linen.GroupNorm`` with
  its default fast variance ``E[x^2] - E[x]^2``, reduced in float32; only the order of the
  reductions differs. Flax reshapes to ``[B, HW, G, C/G]`` and reduces axes (1, 3), whose minor
  axis of 4 channels vectorizes badly on CPU; here each channel is first summed over the spatial
  axes (a reduction over a major axis, vectorized across channels) and the [B, C] sums are then
  added up per group, which is faster on CPU (``docs/benchmarks.md``); the group statistics are
  then expanded to channels by a matrix product (see the code).

  Attributes:
    num_groups: number of channel groups; must divide the channels.
    epsilon: added to the variance.
    dtype: output dtype (statistics are always float32).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x: [B, ..., C]`` -> same shape, normalized per (example, group)."""
    c = x.shape[-1]
    g = self.num_groups
    if c % g:
      raise ValueError(f'GroupNorm: {c} channels cannot be split into {g} groups.')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    b = x.shape[0]
    xf = x.reshape(b, -1, c).astype(jnp.float32)
    count = xf.shape[1] * (c // g)
    mean = xf.sum(axis=1).reshape(b, g, c // g).sum(axis=-1) / count
    mean_sq = jnp.square(xf).sum(axis=1).reshape(b, g, c // g).sum(axis=-1) / count
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    inv = jax.lax.rsqrt(var + self.epsilon)
    # Per-channel affine map y = x * a + b, with the group statistics folded into a and b. The
    # [B, G] statistics go to channels through a product with the 0/1 matrix of group membership
    # (exact at HIGHEST precision): XLA fuses a jnp.repeat into the elementwise map and then
    # recomputes it per element, with an integer division for each element's group, which XLA:CPU
    # does not vectorize.
    member = jnp.repeat(jnp.eye(g, dtype=jnp.float32), c // g, axis=1)  # [G, C]
    stats = jnp.dot(jnp.concatenate([inv, mean]), member, precision=jax.lax.Precision.HIGHEST)
    a = stats[:b] * scale
    shift = bias - stats[b:] * a
    expand = (b,) + (1,) * (x.ndim - 2) + (c,)
    y = xf.reshape(x.shape) * a.reshape(expand) + shift.reshape(expand)
    return y.astype(self.dtype)


class Dropout(nn.Module):
  """Inverted dropout (Srivastava et al. 2014) drawing 16 random bits per element, not 32.

  ``flax.linen.Dropout`` draws a 32-bit uniform per element; generating the random bits was the
  costliest elementwise work of the CPU training step. Here each 32-bit threefry word gives two
  independent 16-bit uniforms, and an element is kept when its draw is ``>= round(rate * 2^16)``.
  The kept fraction is thus ``1 - round(rate * 2^16) / 2^16`` (0.899994 for rate 0.1) and kept
  values are divided by exactly that, so ``E[output] = input`` holds exactly: half the random
  bits, and faster than Flax's on CPU (``docs/benchmarks.md``). Uses the ``'dropout'`` RNG stream.

  Attributes:
    rate: probability of dropping an element, in [0, 1).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f'dropout rate must be in [0, 1), got {self.rate}.')
    threshold = round(self.rate * 65536)
    if deterministic or threshold == 0:
      return x
    n = x.size
    words = jax.random.bits(self.make_rng('dropout'), ((n + 1) // 2,), jnp.uint32)
    draws = jnp.concatenate([words & 0xFFFF, words >> 16])[:n].reshape(x.shape)
    keep_prob = 1.0 - threshold / 65536
    # Scaled in float32: 0.899994 rounds to 0.898 in bfloat16, which would bias the output.
    kept = (x.astype(jnp.float32) / keep_prob).astype(x.dtype)
    return jnp.where(draws >= threshold, kept, jnp.zeros_like(x))


def group_norm(channels: int, dtype: Dtype, name: str | None = None) -> GroupNorm:
  """GroupNorm with eps 1e-6 (DDPM, score_sde), ``num_groups(channels)`` groups."""
  return GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, dtype=dtype, name=name)


def conv3x3(features: int, dtype: Dtype, *, init_scale: float = 1.0,
            name: str | None = None) -> nn.Conv:
  """3x3 'SAME' convolution with DDPM's initializer (``init_scale=0``: zero-initialized)."""
  return nn.Conv(features, (3, 3), padding='SAME', kernel_init=default_init(init_scale),
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def nin(features: int, dtype: Dtype, *, init_scale: float = 1.0,
        name: str | None = None) -> Callable[[jax.Array], jax.Array]:
  """A 1x1 convolution ("network in network"): a Dense over the channel axis of NHWC.

  Returns a function of ``x: [..., C]`` that applies an ``nn.Dense`` (created here, so it is
  named ``Dense_<i>`` in the calling module as before) to ``x`` flattened to ``[N, C]``. The
  flattening changes no value or parameter; it changes the weight gradient that autodiff emits
  from a contraction over the three axes B, H, W, which XLA:CPU prepares by writing the output
  gradient transposed, to a plain ``[N, C_in]^T [N, C_out]`` matrix product without that copy
  (``docs/benchmarks.md``).
  """
  dense = nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype,
                   param_dtype=jnp.float32, name=name)

  def apply(x: jax.Array) -> jax.Array:
    return dense(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)

  return apply


def sinusoidal_embedding(c_noise: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
  """Transformer sinusoidal embedding of a scalar per example.

  Implements ``get_timestep_embedding`` of DDPM (Ho et al. 2020, Sec. 4 / Appendix B), i.e. the
  positional encoding of Vaswani et al. (2017, Sec. 3.5): ``[sin(c w_i), cos(c w_i)]`` with
  ``w_i = max_period ** (-i / (dim/2 - 1))``. Always computed in float32: DDPM step indices up to
  1000 would lose the high frequencies in bfloat16.

  Args:
    c_noise: ``[B]`` noise-conditioning input.
    dim: embedding width (even; an odd width is zero-padded by one as DDPM).

  Returns:
    ``[B, dim]`` float32.
  """
  c = jnp.asarray(c_noise, jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = c[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features of log sigma (Song et al. 2021, NCSN++; Tancik et al. 2020).

  ``[sin(2 pi c W), cos(2 pi c W)]`` with ``W ~ N(0, scale^2)`` drawn at init and never trained.
  ``W`` is kept in ``params`` (as score_sde does) so that published checkpoints convert one to one;
  ``stop_gradient`` keeps it fixed, but exclude it from decoupled weight decay
  (path ``.../GaussianFourierProjection_0/W``).

  Attributes:
    embedding_size: number of frequencies; the output has ``2 * embedding_size`` features.
    scale: standard deviation of the frequencies (16 in NCSN++).
  """
  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, c_noise: jax.Array) -> jax.Array:
    """``c_noise: [B]`` (log sigma) -> ``[B, 2 * embedding_size]`` float32."""
    w = self.param('W', nn.initializers.normal(stddev=self.scale), (self.embedding_size,),
                   jnp.float32)
    w = jax.lax.stop_gradient(w)
    proj = jnp.asarray(c_noise, jnp.float32)[:, None] * w[None, :] * (2 * np.pi)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class AttnBlock(nn.Module):
  """Spatial self-attention with a residual connection (DDPM ``attn_block``, ``AttnBlockpp``).

  The attention itself runs by the implementation named in ``attention``
  (``diffusion_jax.models.attention``: ``'auto'`` is the per-backend default; ``'chunked'`` keeps
  the ``[HW, HW]`` scores out of memory at large resolutions). With one head the parameters and
  function are exactly DDPM's; the implementation changes neither.

  Attributes:
    num_heads: attention heads (ignored when ``num_head_channels`` is set).
    num_head_channels: channels per head; heads = channels // num_head_channels.
    skip_rescale: divide the residual sum by sqrt(2) (NCSN++).
    init_scale: init scale of the output projection (0: zero, the block starts as identity).
    attention: attention implementation, one of ``attention.IMPLEMENTATIONS``.
    dtype: computation dtype.
  """
  num_heads: int = 1
  num_head_channels: int | None = None
  skip_rescale: bool = False
  init_scale: float = 0.0
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x: [B, H, W, C]`` -> ``[B, H, W, C]``."""
    b, height, width, c = x.shape
    heads = c // self.num_head_channels if self.num_head_channels else self.num_heads
    if heads < 1 or c % heads:
      raise ValueError(f'attention over {c} channels cannot be split into {heads} heads; set '
                       'num_heads / num_head_channels to divide every attended width.')
    h = group_norm(c, self.dtype)(x)
    q = nin(c, self.dtype)(h)
    k = nin(c, self.dtype)(h)
    v = nin(c, self.dtype)(h)
    split = lambda t: t.reshape(b, height * width, heads, c // heads)  # noqa: E731
    h = attention_lib.dot_product_attention(split(q), split(k), split(v),
                                            implementation=self.attention)
    h = nin(c, self.dtype, init_scale=self.init_scale)(h.reshape(b, height, width, c))
    return (x + h) / _SQRT2 if self.skip_rescale else x + h


def _naive_upsample(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _naive_downsample(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class FIRConv(nn.Module):
  """3x3 convolution fused with FIR up- or downsampling (score_sde ``up_or_down_sampling.Conv2d``).

  Attributes:
    features: output channels.
    up: upsample by 2 (transposed conv + FIR).
    down: downsample by 2 (FIR + strided conv).
    fir_kernel: 1-D FIR taps.
    dtype: computation dtype.
  """
  features: int
  up: bool = False
  down: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', default_init(), (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if self.up:
      h = fir_lib.upsample_conv_2d(x, kernel, self.fir_kernel)
    elif self.down:
      h = fir_lib.conv_downsample_2d(x, kernel, self.fir_kernel)
    else:
      raise ValueError('FIRConv needs up=True or down=True.')
    return h + bias.astype(self.dtype)


class Upsample(nn.Module):
  """2x upsampling: nearest (+ 3x3 conv) as DDPM, or FIR (+ fused conv) as NCSN++.

  Attributes:
    out_ch: output channels (default: input channels); only with ``with_conv``.
    with_conv: follow with a learned 3x3 convolution.
    fir: FIR filter instead of nearest neighbour.
    fir_kernel: 1-D FIR taps.
    dtype: computation dtype.
  """
  out_ch: int | None = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, 2H, 2W, out_ch]``."""
    out_ch = self.out_ch or x.shape[-1]
    if self.fir:
      if self.with_conv:
        return FIRConv(out_ch, up=True, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
      return fir_lib.upsample_2d(x, self.fir_kernel)
    h = _naive_upsample(x)
    return conv3x3(out_ch, self.dtype)(h) if self.with_conv else h


class Downsample(nn.Module):
  """2x downsampling: strided 3x3 conv or 2x2 average as DDPM, or FIR (+ fused conv) as NCSN++.

  Attributes:
    out_ch: output channels (default: input channels); only with ``with_conv``.
    with_conv: a learned strided 3x3 convolution instead of fixed filtering.
    fir: FIR filter instead of box filter.
    fir_kernel: 1-D FIR taps.
    dtype: computation dtype.
  """
  out_ch: int | None = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H/2, W/2, out_ch]``."""
    out_ch = self.out_ch or x.shape[-1]
    if self.fir:
      if self.with_conv:
        return FIRConv(out_ch, down=True, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
      return fir_lib.downsample_2d(x, self.fir_kernel)
    if self.with_conv:
      # Pad bottom/right only, as TF's 'SAME' for stride 2 in DDPM (and score_sde's F.pad).
      return nn.Conv(out_ch, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                     kernel_init=default_init(), dtype=self.dtype, param_dtype=jnp.float32)(x)
    return _naive_downsample(x)


class Combine(nn.Module):
  """Merges the input-pyramid image into the features (NCSN++ ``progressive_input='input_skip'``).

  Attributes:
    method: ``'cat'`` (concatenate the projected pyramid before the features) or ``'sum'``.
    dtype: computation dtype.
  """
  method: str = 'cat'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pyramid: jax.Array, h: jax.Array) -> jax.Array:
    p = nin(h.shape[-1], self.dtype)(pyramid)
    if self.method == 'cat':
      return jnp.concatenate([p, h], axis=-1)
    if self.method == 'sum':
      return p + h
    raise ValueError(f"progressive_combine={self.method!r} is not known; use 'sum' or 'cat'.")


class ResnetBlockDDPM(nn.Module):
  """DDPM residual block (Ho et al. 2020; score_sde ``ResnetBlockDDPMpp``).

  ``GN -> swish -> conv3x3 -> + Dense(swish(temb)) -> GN -> swish -> dropout -> conv3x3``, with a
  1x1 projection of the shortcut when the width changes.

  Attributes:
    out_ch: output channels (default: input channels).
    dropout: dropout rate before the last conv.
    skip_rescale: divide the residual sum by sqrt(2).
    init_scale: init scale of the last conv (0: the block starts as the identity).
    deterministic: disable dropout (``not train``); a field so ``nn.remat`` sees only arrays.
    dtype: computation dtype.
  """
  out_ch: int | None = None
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
    """``x: [B, H, W, C]``, ``temb: [B, E]`` or None -> ``[B, H, W, out_ch]``."""
    out_ch = self.out_ch or x.shape[-1]
    h = nn.swish(group_norm(x.shape[-1], self.dtype)(x))
    h = conv3x3(out_ch, self.dtype)(h)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype,
                       param_dtype=jnp.float32)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(group_norm(out_ch, self.dtype)(h))
    h = Dropout(self.dropout)(h, deterministic=self.deterministic)
    h = conv3x3(out_ch, self.dtype, init_scale=self.init_scale)(h)
    if x.shape[-1] != out_ch:
      x = nin(out_ch, self.dtype)(x)
    return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGAN(nn.Module):
  """BigGAN-style residual block that can resample (Brock et al. 2019; ``ResnetBlockBigGANpp``).

  As ``ResnetBlockDDPM`` but up/downsampling happens inside the block, on both the residual branch
  (after the first norm) and the shortcut, which then gets a 1x1 conv. Used by DDPM++ and NCSN++
  (Song et al. 2021, Appendix H) in place of separate resampling layers.

  Attributes:
    out_ch: output channels (default: input channels).
    up: upsample by 2.
    down: downsample by 2.
    dropout: dropout rate before the last conv.
    fir: FIR resampling instead of nearest / box.
    fir_kernel: 1-D FIR taps.
    skip_rescale: divide the residual sum by sqrt(2).
    init_scale: init scale of the last conv.
    deterministic: disable dropout (``not train``).
    dtype: computation dtype.
  """
  out_ch: int | None = None
  up: bool = False
  down: bool = False
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
    """``x: [B, H, W, C]``, ``temb: [B, E]`` or None -> ``[B, H', W', out_ch]``."""
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    h = nn.swish(group_norm(in_ch, self.dtype)(x))
    if self.up:
      resample = functools.partial(fir_lib.upsample_2d, kernel=self.fir_kernel)
      resample = resample if self.fir else _naive_upsample
    elif self.down:
      resample = functools.partial(fir_lib.downsample_2d, kernel=self.fir_kernel)
      resample = resample if self.fir else _naive_downsample
    else:
      resample = None
    if resample is not None:
      h, x = resample(h), resample(x)
    h = conv3x3(out_ch, self.dtype)(h)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype,
                       param_dtype=jnp.float32)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(group_norm(out_ch, self.dtype)(h))
    h = Dropout(self.dropout)(h, deterministic=self.deterministic)
    h = conv3x3(out_ch, self.dtype, init_scale=self.init_scale)(h)
    if in_ch != out_ch or self.up or self.down:
      x = nin(out_ch, self.dtype)(x)
    return (x + h) / _SQRT2 if self.skip_rescale else x + h
