"""The U-Net of DDPM and its DDPM++ / NCSN++ variants, as one configurable Flax Linen module.

One module covers:

- DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Appendix B): the defaults.
  CIFAR-10: ``UNet()`` -> 35,746,307 parameters, the published 35.7M.
- DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
  Equations", Appendix H; score_sde ``configs/vp/cifar10_ddpmpp_continuous.py``):
  ``resblock_type='biggan', skip_rescale=True, num_res_blocks=4, up_attn_every_block=False``.
- NCSN++ (same paper; ``configs/ve/cifar10_ncsnpp_continuous.py``): DDPM++ plus ``fir=True``,
  ``embedding_type='fourier'`` and a progressive input and/or output pyramid.

The network returns the raw ``F(x, c_noise)``; what F means (eps, x0, v, score) is decided by
``diffusion_jax.preconditioning``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import layers

Dtype = Any

RESBLOCK_TYPES = ('ddpm', 'biggan')
EMBEDDING_TYPES = ('sinusoidal', 'fourier')
PROGRESSIVE = ('none', 'output_skip', 'residual')
PROGRESSIVE_INPUT = ('none', 'input_skip', 'residual')
PROGRESSIVE_COMBINE = ('sum', 'cat')
# Names of ``remat_policy`` -> policy for ``nn.remat`` (None: save nothing, recompute everything).
REMAT_POLICIES = {
    'none': None,
    'full': None,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_SQRT2 = math.sqrt(2.0)


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f'UNet {field}={value!r} is not known; use one of {tuple(choices)}.')


def validate_unet_config(*, image_size: int, ch_mult: Sequence[int],
                         attn_resolutions: Sequence[int]) -> None:
  """Checks a U-Net configuration against the image size before anything is compiled.

  Args:
    image_size: height (= width) of the training images.
    ch_mult: per-level channel multipliers; the U-Net downsamples ``len(ch_mult) - 1`` times.
    attn_resolutions: spatial sizes at which self-attention is applied.

  Raises:
    ValueError: naming ``image_size`` when it is not divisible by ``2 ** (len(ch_mult) - 1)``, or
      ``attn_resolutions`` when one of its entries is not a resolution of the U-Net.
  """
  if not ch_mult:
    raise ValueError('ch_mult must have at least one level.')
  factor = 2 ** (len(ch_mult) - 1)
  if image_size % factor:
    raise ValueError(
        f'image_size={image_size} is not divisible by 2**(len(ch_mult)-1)={factor} '
        f'(ch_mult={tuple(ch_mult)} downsamples {len(ch_mult) - 1} times). Resize or pad the '
        f'images to a multiple of {factor}, or use fewer levels in ch_mult.')
  resolutions = [image_size // 2**i for i in range(len(ch_mult))]
  bad = [r for r in attn_resolutions if r not in resolutions]
  if bad:
    raise ValueError(
        f'attn_resolutions={tuple(attn_resolutions)} contains {bad}, which are not resolutions of '
        f'this U-Net (image_size={image_size}, ch_mult={tuple(ch_mult)} gives {resolutions}).')


class UNet(nn.Module):
  """Noise-conditional U-Net ``F(x, c_noise[, label])`` (DDPM, DDPM++, NCSN++).

  Layout: a 3x3 input conv; per level ``num_res_blocks`` residual blocks (+ attention where the
  spatial size is in ``attn_resolutions``) and a 2x downsampling; a middle of res-attn-res; the
  mirrored upsampling path with ``num_res_blocks + 1`` blocks per level fed by skip connections;
  GroupNorm, swish and a 3x3 output conv. The noise embedding passes through a 2-layer MLP to
  width ``4 * ch`` and is added (per channel) inside every residual block.

  Attributes:
    ch: base channel count (``nf`` in score_sde).
    ch_mult: channel multiplier per resolution level; ``len(ch_mult) - 1`` downsamplings.
    num_res_blocks: residual blocks per level on the way down (one more per level going up).
    attn_resolutions: spatial sizes (height) at which self-attention follows the res blocks.
    dropout: dropout rate inside the residual blocks (active only with ``train=True``).
    resamp_with_conv: learned (conv) resampling layers for ``resblock_type='ddpm'``.
    resblock_type: ``'ddpm'`` (Ho et al. 2020, separate resampling layers) or ``'biggan'``
      (resampling inside residual blocks; DDPM++ / NCSN++).
    skip_rescale: divide every residual sum by sqrt(2) (DDPM++ / NCSN++).
    embedding_type: ``'sinusoidal'`` (DDPM; score_sde's 'positional'; c_noise is e.g. a step
      index or 999 t) or ``'fourier'`` (Gaussian Fourier features of NCSN++; c_noise is log sigma).
    fourier_scale: standard deviation of the Fourier frequencies.
    num_heads: attention heads (1 in DDPM/NCSN++).
    num_head_channels: channels per head; overrides ``num_heads`` when set.
    num_classes: number of classes for class conditioning (0: unconditional). The embedding table
      has ``num_classes + 1`` rows; label ``num_classes`` is the null class of classifier-free
      guidance (Ho & Salimans 2022), and ``label=None`` means all-null.
    out_channels: output channels; None: same as the input.
    conditional: condition on ``c_noise`` at all (False: a plain denoiser, c_noise is ignored).
    fir: FIR up/downsampling (StyleGAN2 / NCSN++) instead of nearest / box filters.
    fir_kernel: 1-D FIR taps.
    progressive: output pyramid: ``'none'``, ``'output_skip'`` (sum of per-level RGB outputs, as
      StyleGAN2's skip generator) or ``'residual'``.
    progressive_input: input pyramid: ``'none'``, ``'input_skip'`` or ``'residual'``.
    progressive_combine: how ``'input_skip'`` merges the pyramid: ``'sum'`` or ``'cat'``.
    init_scale: init scale of the last conv of each residual block, of the attention output
      projection and of the output conv; 0 zero-initializes them so every block starts as the
      identity and the network outputs 0, as DDPM.
    up_attn_every_block: attention after every residual block of an upsampling level, as DDPM
      (True); False puts one attention block at the end of the level, as score_sde's ncsnpp.py
      (DDPM++ / NCSN++). The two differ by parameters, not only by function.
    dtype: computation dtype (float32 or bfloat16); parameters stay float32, the output is float32.
    remat_policy: rematerialization of the residual blocks: ``'none'``, ``'full'`` (save nothing),
      ``'dots_saveable'`` or ``'dots_with_no_batch_dims_saveable'`` (``jax.checkpoint_policies``).
    attention: implementation of the self-attention (``diffusion_jax.models.attention``):
      ``'auto'`` (the per-backend default), ``'xla'``, ``'cudnn'``, ``'einsum'`` or
      ``'chunked'`` (memory-efficient, for long sequences). The same function and parameters.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  resblock_type: str = 'ddpm'
  skip_rescale: bool = False
  embedding_type: str = 'sinusoidal'
  fourier_scale: float = 16.0
  num_heads: int = 1
  num_head_channels: int | None = None
  num_classes: int = 0
  out_channels: int | None = None
  conditional: bool = True
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  progressive: str = 'none'
  progressive_input: str = 'none'
  progressive_combine: str = 'sum'
  init_scale: float = 0.0
  up_attn_every_block: bool = True
  dtype: Dtype = jnp.float32
  remat_policy: str = 'none'
  attention: str = 'auto'

  def _check_fields(self) -> None:
    _check_choice('resblock_type', self.resblock_type, RESBLOCK_TYPES)
    _check_choice('embedding_type', self.embedding_type, EMBEDDING_TYPES)
    _check_choice('progressive', self.progressive, PROGRESSIVE)
    _check_choice('progressive_input', self.progressive_input, PROGRESSIVE_INPUT)
    _check_choice('progressive_combine', self.progressive_combine, PROGRESSIVE_COMBINE)
    _check_choice('remat_policy', self.remat_policy, tuple(REMAT_POLICIES))
    _check_choice('attention', self.attention, attention_lib.IMPLEMENTATIONS)

  @nn.compact
  def __call__(self, x: jax.Array, c_noise: jax.Array, label: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Evaluates ``F(x, c_noise, label)``.

    Args:
      x: ``[B, H, W, C]`` noisy images (NHWC); H and W divisible by ``2 ** (len(ch_mult) - 1)``.
      c_noise: ``[B]`` noise-conditioning input (a scalar is broadcast to ``[B]``).
      label: optional ``[B]`` int class labels in ``[0, num_classes]``; ``num_classes`` is the
        null class. Only with ``num_classes > 0``. Conditioning arrives as keywords named like
        the keys of the cond dict: ``apply(variables, x, c_noise, **{'label': labels})``.
      train: enables dropout (then pass ``rngs={'dropout': key}``).

    Returns:
      ``[B, H, W, out_channels or C]`` float32.

    Raises:
      ValueError: on an image size the U-Net cannot halve ``len(ch_mult) - 1`` times, on labels
        given to an unconditional network, or on an unknown option name.
    """
    self._check_fields()
    batch, height, width, in_channels = x.shape
    factor = 2 ** (len(self.ch_mult) - 1)
    if height % factor or width % factor:
      raise ValueError(
          f'UNet input of size {height}x{width} is not divisible by 2**(len(ch_mult)-1)={factor} '
          f'(ch_mult={tuple(self.ch_mult)}). Resize or pad the images to a multiple of {factor}, '
          f'or use fewer levels in ch_mult.')
    out_channels = self.out_channels or in_channels
    num_levels = len(self.ch_mult)
    dt = self.dtype
    c_noise = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (batch,))

    # Noise (and class) embedding, computed in float32 and projected in ``dtype``.
    temb = None
    if self.conditional:
      if self.embedding_type == 'fourier':
        temb = layers.GaussianFourierProjection(embedding_size=self.ch, scale=self.fourier_scale)(
            c_noise)
      else:
        temb = layers.sinusoidal_embedding(c_noise, self.ch)
      dense = lambda: nn.Dense(4 * self.ch, kernel_init=layers.default_init(),  # noqa: E731
                               dtype=dt, param_dtype=jnp.float32)
      temb = dense()(temb)
      temb = dense()(nn.swish(temb))
    if self.num_classes > 0:
      if label is None:
        label = jnp.full((batch,), self.num_classes, jnp.int32)
      cemb = nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dt, param_dtype=jnp.float32,
                      name='class_embed')(jnp.asarray(label, jnp.int32))
      temb = cemb if temb is None else temb + cemb
    elif label is not None:
      raise ValueError('class labels (label=) were given but num_classes=0; set num_classes > 0.')

    # Residual blocks carry ``deterministic`` as a field so that remat only sees arrays.
    block_cls = (layers.ResnetBlockDDPM if self.resblock_type == 'ddpm'
                 else layers.ResnetBlockBigGAN)
    if self.remat_policy != 'none':
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat_policy])
    common = dict(dropout=self.dropout, skip_rescale=self.skip_rescale,
                  init_scale=self.init_scale, deterministic=not train, dtype=dt)
    if self.resblock_type == 'biggan':
      common.update(fir=self.fir, fir_kernel=tuple(self.fir_kernel))

    block_ids = itertools.count()

    def res_block(h, out_ch=None, **kw):
      # Explicit names: nn.remat renames the class (Checkpoint...), and checkpoints must not
      # depend on the remat policy they were trained with.
      name = f'ResnetBlock_{next(block_ids)}'
      return block_cls(out_ch=out_ch, **common, **kw, name=name)(h, temb)

    def attn(h):
      return layers.AttnBlock(num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                              skip_rescale=self.skip_rescale, init_scale=self.init_scale,
                              attention=self.attention, dtype=dt)(h)

    def to_image(h, features, init_scale):
      # The per-level output head of the progressive (StyleGAN2-style) output pyramid.
      h = nn.swish(layers.group_norm(h.shape[-1], dt)(h))
      return layers.conv3x3(features, dt, init_scale=init_scale)(h)

    resample = dict(fir=self.fir, fir_kernel=tuple(self.fir_kernel), dtype=dt)
    x = x.astype(dt)

    # Downsampling path.
    input_pyramid = x if self.progressive_input != 'none' else None
    hs = [layers.conv3x3(self.ch, dt)(x)]
    for level in range(num_levels):
      for _ in range(self.num_res_blocks):
        h = res_block(hs[-1], self.ch * self.ch_mult[level])
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
        hs.append(h)
      if level != num_levels - 1:
        if self.resblock_type == 'ddpm':
          h = layers.Downsample(with_conv=self.resamp_with_conv, **resample)(hs[-1])
        else:
          h = res_block(hs[-1], down=True)
        if self.progressive_input == 'input_skip':
          input_pyramid = layers.Downsample(with_conv=False, **resample)(input_pyramid)
          h = layers.Combine(method=self.progressive_combine, dtype=dt)(input_pyramid, h)
        elif self.progressive_input == 'residual':
          input_pyramid = layers.Downsample(out_ch=h.shape[-1], with_conv=True,
                                            **resample)(input_pyramid)
          input_pyramid = input_pyramid + h
          if self.skip_rescale:
            input_pyramid = input_pyramid / _SQRT2
          h = input_pyramid
        hs.append(h)

    # Middle.
    h = res_block(hs[-1])
    h = attn(h)
    h = res_block(h)

    # Upsampling path.
    pyramid = None
    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), self.ch * self.ch_mult[level])
        if self.up_attn_every_block and h.shape[1] in self.attn_resolutions:
          h = attn(h)
      if not self.up_attn_every_block and h.shape[1] in self.attn_resolutions:
        h = attn(h)

      if self.progressive != 'none':
        if level == num_levels - 1:
          if self.progressive == 'output_skip':
            pyramid = to_image(h, out_channels, self.init_scale)
          else:
            pyramid = to_image(h, h.shape[-1], 1.0)
        elif self.progressive == 'output_skip':
          pyramid = layers.Upsample(with_conv=False, **resample)(pyramid)
          pyramid = pyramid + to_image(h, out_channels, self.init_scale)
        else:
          pyramid = layers.Upsample(out_ch=h.shape[-1], with_conv=True, **resample)(pyramid)
          pyramid = pyramid + h
          if self.skip_rescale:
            pyramid = pyramid / _SQRT2
          h = pyramid

      if level != 0:
        if self.resblock_type == 'ddpm':
          h = layers.Upsample(with_conv=self.resamp_with_conv, **resample)(h)
        else:
          h = res_block(h, up=True)
    assert not hs, 'every skip connection is consumed'

    if self.progressive == 'output_skip':
      h = pyramid
    else:
      h = nn.swish(layers.group_norm(h.shape[-1], dt)(h))
      h = layers.conv3x3(out_channels, dt, init_scale=self.init_scale)(h)
    return h.astype(jnp.float32)
