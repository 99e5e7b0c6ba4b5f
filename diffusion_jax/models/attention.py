"""Softmax attention ``softmax(q k^T / sqrt(d)) v`` over ``[B, T, N, d]``, by implementation name.

The U-Nets take the implementation as a field (``UNet(attention=...)``, config field
``model.unet.attention``); every name computes the same function, in the precision of
``jax.nn.dot_product_attention``'s XLA path (logits and softmax in float32, probabilities cast to
the dtype of ``v``):

- ``'xla'``, ``'cudnn'``: ``jax.nn.dot_product_attention(implementation=...)``. cuDNN (fused
  flash attention) needs an NVIDIA GPU and float16 / bfloat16 inputs.
- ``'einsum'``: the same function as two einsums, whose backward XLA:CPU compiles without the
  layout copies of the library's XLA path.
- ``'chunked'``: memory-efficient: the queries are processed ``chunk_size`` at a time
  (``lax.map``), each chunk against all keys with an exact softmax, and each chunk is
  rematerialized in the backward pass, so neither pass holds the whole ``[T, T]`` score matrix:
  temporaries grow as ``chunk_size * T`` rather than ``T^2``. This is the query chunking of Rabe &
  Staats (2021, "Self-attention Does Not Need O(n^2) Memory", Sec. 2-3) without their key
  chunking and running log-sum-exp: with a full row of keys per chunk the softmax is the plain
  one, and ``chunk_size * T`` floats fit easily at the 4,096-16,384 tokens of image U-Nets.
- ``'auto'``: ``default_implementation(T)``: on CPU ``'chunked'`` from ``CPU_CHUNKED_MIN_TOKENS``
  queries (SD 1.5's 64x64 latents at 512x512), ``'einsum'`` below; ``'xla'`` elsewhere.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'einsum', 'chunked')
# Queries per chunk of 'chunked': at T = 4096 tokens one chunk's float32 scores are 8 MiB per
# example and head, against 64 MiB for the whole matrix.
DEFAULT_CHUNK_SIZE = 512


# From this many queries 'auto' is 'chunked' on CPU: at 4,096 tokens (SD 1.5 at 512x512) the
# einsum form's float32 scores are 64 MiB per example and head, 4 GiB for the U-Net's batch of 8
# (classifier-free guidance for 4 images) with 8 heads, in every self-attention layer.
CPU_CHUNKED_MIN_TOKENS = 4096


def default_implementation(num_queries: int | None = None) -> str:
  """The implementation ``'auto'`` stands for on JAX's default backend: the one place it is chosen.

  CPU: ``'chunked'`` (the memory-efficient form) for ``num_queries >= CPU_CHUNKED_MIN_TOKENS``,
  else ``'einsum'``, whose backward pass XLA:CPU compiles without the extra layout copies of the
  library's XLA path. Elsewhere: ``'xla'``, which is what
  ``jax.nn.dot_product_attention(implementation=None)`` runs in this JAX (0.10); choose
  ``'cudnn'`` explicitly for flash attention on an NVIDIA GPU with bfloat16 compute.

  Args:
    num_queries: the sequence length T of the queries (static); None: a short sequence.
  """
  if jax.default_backend() != 'cpu':
    return 'xla'
  if num_queries is not None and num_queries >= CPU_CHUNKED_MIN_TOKENS:
    return 'chunked'
  return 'einsum'


def check_implementation(implementation: str) -> None:
  """Raises ValueError naming the known implementations when ``implementation`` is not one."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not known; use one of '
                     f'{IMPLEMENTATIONS}.')


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """``softmax(q k^T / sqrt(d)) v`` as two einsums; ``q, k, v: [B, T, N, d]`` -> ``[B, T, N, d]``.

  Logits and softmax in float32 (as ``jax.nn.dot_product_attention``'s XLA path), probabilities
  cast to ``v.dtype``.
  """
  logits = jnp.einsum('btnd,bsnd->bnts', q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bsnd->btnd', probs, v)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """``einsum_attention`` over ``chunk_size`` queries at a time; never forms all ``[T, S]`` scores.

  The queries are zero-padded to a multiple of ``chunk_size`` (padded rows are computed and
  dropped; the keys are never padded, so every softmax is over exactly the ``S`` real keys).
  ``jax.checkpoint`` around the chunk makes the backward pass recompute each chunk's
  probabilities instead of storing them for all chunks.

  Args:
    q: ``[B, T, N, d]`` queries.
    k: ``[B, S, N, d]`` keys.
    v: ``[B, S, N, d]`` values.
    chunk_size: queries per chunk; ``T <= chunk_size`` is ``einsum_attention`` itself.

  Returns:
    ``[B, T, N, d]`` in ``v.dtype``.
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}.')
  b, t, n, d = q.shape
  if t <= chunk_size:
    return einsum_attention(q, k, v)
  num_chunks = -(-t // chunk_size)
  q = jnp.pad(q, ((0, 0), (0, num_chunks * chunk_size - t), (0, 0), (0, 0)))
  chunks = jnp.moveaxis(q.reshape(b, num_chunks, chunk_size, n, d), 1, 0)

  @jax.checkpoint
  def one_chunk(q_chunk):
    return einsum_attention(q_chunk, k, v)

  out = jax.lax.map(one_chunk, chunks)  # [num_chunks, B, chunk_size, N, d]
  return jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * chunk_size, n, d)[:, :t]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          implementation: str = 'auto') -> jax.Array:
  """Multi-head softmax attention by ``implementation`` (module docstring), no mask or bias.

  Args:
    q: ``[B, T, N, d]`` queries.
    k: ``[B, S, N, d]`` keys.
    v: ``[B, S, N, d]`` values.
    implementation: one of ``IMPLEMENTATIONS``.

  Returns:
    ``[B, T, N, d]``.

  Raises:
    ValueError: on an unknown implementation name.
  """
  check_implementation(implementation)
  if implementation == 'auto':
    implementation = default_implementation(q.shape[1])
  if implementation == 'einsum':
    return einsum_attention(q, k, v)
  if implementation == 'chunked':
    return chunked_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


__all__ = ['CPU_CHUNKED_MIN_TOKENS', 'DEFAULT_CHUNK_SIZE', 'IMPLEMENTATIONS',
           'check_implementation', 'chunked_attention', 'default_implementation',
           'dot_product_attention', 'einsum_attention']
