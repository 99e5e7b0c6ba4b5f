"""A noise-conditional MLP for low-dimensional data (toy 2-D sets, tabular data, tests)."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any


class MLP(nn.Module):
  """``F(x, c_noise[, label])`` for vectors: SiLU MLP with the noise embedding added in every layer.

  The noise input gets the sinusoidal embedding of DDPM (Ho et al. 2020; Vaswani et al. 2017)
  followed by a 2-layer SiLU MLP; each hidden layer adds a learned projection of it (a per-layer
  bias, as the U-Net's residual blocks do). The output layer is zero-initialized, so the network
  starts at ``F = 0``.

  Attributes:
    hidden_dim: width of every hidden layer.
    num_layers: number of hidden layers.
    embed_dim: width of the sinusoidal noise embedding.
    num_classes: classes for conditioning (0: unconditional); the table has ``num_classes + 1``
      rows, label ``num_classes`` being the null class of classifier-free guidance;
      ``label=None`` means all-null.
    dtype: computation dtype; parameters stay float32, the output is float32.
  """
  hidden_dim: int = 256
  num_layers: int = 4
  embed_dim: int = 128
  num_classes: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c_noise: jax.Array, label: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Evaluates ``F(x, c_noise, label)``.

    Args:
      x: ``[B, D]`` or ``[B, ...]`` (flattened internally, reshaped back).
      c_noise: ``[B]`` noise-conditioning input (a scalar is broadcast).
      label: optional ``[B]`` int labels in ``[0, num_classes]``; only with ``num_classes > 0``.
      train: unused (no dropout); part of the shared network signature.

    Returns:
      float32 array of ``x``'s shape.
    """
    del train  # Same signature as UNet; nothing here behaves differently in training.
    shape = x.shape
    batch = shape[0]
    dim = math.prod(shape[1:])
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)

    c_noise = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (batch,))
    emb = layers.sinusoidal_embedding(c_noise, self.embed_dim)
    emb = dense(self.hidden_dim)(nn.silu(dense(self.hidden_dim)(emb)))
    if self.num_classes > 0:
      if label is None:
        label = jnp.full((batch,), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, self.hidden_dim, dtype=self.dtype,
                           param_dtype=jnp.float32,
                           name='class_embed')(jnp.asarray(label, jnp.int32))
    elif label is not None:
      raise ValueError('class labels (label=) were given but num_classes=0; set num_classes > 0.')

    h = x.reshape(batch, dim).astype(self.dtype)
    emb = nn.silu(emb)
    for _ in range(self.num_layers):
      h = nn.silu(dense(self.hidden_dim)(h) + dense(self.hidden_dim, use_bias=False)(emb))
    out = dense(dim, kernel_init=nn.initializers.zeros)(h)
    return out.reshape(shape).astype(jnp.float32)
