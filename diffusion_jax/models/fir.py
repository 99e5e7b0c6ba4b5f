"""FIR resampling for NHWC feature maps (the ``fir=True`` path of NCSN++).

Resampling with a separable low-pass FIR filter instead of nearest-neighbour / box filters, as in
StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN", Sec. 2 and
their ``upfirdn_2d``), adopted for NCSN++ by Song et al. (2021), "Score-Based Generative Modeling
through Stochastic Differential Equations", Appendix H. Everything is one
``lax.conv_general_dilated`` per call, so it fuses and runs on any backend without custom kernels.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def setup_kernel(kernel: Sequence[float]) -> np.ndarray:
  """Returns the normalized 2-D FIR kernel (outer product of a 1-D kernel), summing to 1.

  Args:
    kernel: 1-D taps, e.g. ``(1, 3, 3, 1)``, or an already 2-D kernel.

  Returns:
    ``[K, K]`` float32 NumPy array (a compile-time constant, not a parameter).
  """
  k = np.asarray(kernel, dtype=np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  return k / k.sum()


def upfirdn_2d(x: jax.Array, kernel: np.ndarray, *, up: int = 1, down: int = 1,
               pad: tuple[int, int] = (0, 0)) -> jax.Array:
  """Upsample by zero insertion, pad, convolve with a FIR kernel, then subsample.

  Same semantics as StyleGAN2's ``upfirdn_2d_ref`` (true convolution, zeros inserted *after* each
  sample), applied depthwise.

  Args:
    x: ``[B, H, W, C]`` input.
    kernel: ``[K, K]`` FIR kernel.
    up: upsampling factor.
    down: downsampling factor.
    pad: ``(before, after)`` padding applied to both spatial axes after upsampling.

  Returns:
    ``[B, H', W', C]`` with ``H' = (H * up + pad[0] + pad[1] - K) // down + 1``.
  """
  channels = x.shape[-1]
  # Flip: upfirdn is a convolution, lax.conv is a cross-correlation.
  k = jnp.asarray(kernel[::-1, ::-1], dtype=x.dtype)
  w = jnp.tile(k[:, :, None, None], (1, 1, 1, channels))  # [K, K, 1, C], depthwise.
  # lhs_dilation inserts up-1 zeros *between* samples; the extra up-1 after the last sample
  # go into the trailing pad so the layout matches zero insertion after every sample.
  padding = ((pad[0], pad[1] + up - 1),) * 2
  return lax.conv_general_dilated(
      x, w, window_strides=(down, down), padding=padding, lhs_dilation=(up, up),
      dimension_numbers=_NHWC, feature_group_count=channels)


def upsample_2d(x: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1),
                factor: int = 2) -> jax.Array:
  """FIR-filtered upsampling: ``[B, H, W, C] -> [B, H*factor, W*factor, C]``."""
  k = setup_kernel(kernel) * factor**2  # Gain factor**2 keeps the mean after zero insertion.
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1),
                  factor: int = 2) -> jax.Array:
  """FIR-filtered downsampling: ``[B, H, W, C] -> [B, H/factor, W/factor, C]``."""
  k = setup_kernel(kernel)
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: jax.Array, w: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1),
                     factor: int = 2) -> jax.Array:
  """Fused transposed convolution + FIR filter (StyleGAN2 ``upsample_conv_2d``).

  Args:
    x: ``[B, H, W, C_in]``.
    w: ``[k, k, C_in, C_out]`` convolution weights.
    kernel: 1-D FIR taps.
    factor: upsampling factor.

  Returns:
    ``[B, H*factor, W*factor, C_out]``.
  """
  conv = w.shape[0]
  k = setup_kernel(kernel) * factor**2
  p = (k.shape[0] - factor) - (conv - 1)
  x = lax.conv_transpose(x, w, strides=(factor, factor), padding='VALID',
                         dimension_numbers=_NHWC)
  return upfirdn_2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: jax.Array, w: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1),
                       factor: int = 2) -> jax.Array:
  """Fused FIR filter + strided convolution (StyleGAN2 ``conv_downsample_2d``).

  Args:
    x: ``[B, H, W, C_in]``.
    w: ``[k, k, C_in, C_out]`` convolution weights.
    kernel: 1-D FIR taps.
    factor: downsampling factor.

  Returns:
    ``[B, H/factor, W/factor, C_out]``.
  """
  conv = w.shape[0]
  k = setup_kernel(kernel)
  p = (k.shape[0] - factor) + (conv - 1)
  x = upfirdn_2d(x, k, pad=((p + 1) // 2, p // 2))
  return lax.conv_general_dilated(x, w, window_strides=(factor, factor), padding='VALID',
                                  dimension_numbers=_NHWC)
