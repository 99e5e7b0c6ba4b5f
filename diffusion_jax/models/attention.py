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
  queries (a 32x32 latent), ``'einsum'`` below; ``'xla'`` elsewhere.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'einsum', 'chunked')
# Queries per chunk of 'chunked': at T = 4096 tokens one chunk's float32 scores are 8 MiB per
# example and head, against 64 MiB for the whole matrix.
DEFAULT_CHUNK_SIZE = 512


# From this many queries 'auto' is 'chunked' on CPU. At 4,096 tokens (SD 1.5 at 512x512) the
# einsum form's float32 scores are 64 MiB per example and head, 4 GiB for the U-Net's batch of 8
# (classifier-free guidance for 4 images) with 8 heads, in every self-attention layer. Measured on
# 2 cores, 8 heads of 40, forward: 1,024 tokens at batch 8 0.11 s chunked vs 0.33 s einsum,
# 4,096 tokens 1.46 s vs 6.77 s; gradients at 1,024 (batch 4) 0.26 s vs 0.41 s.
CPU_CHUNKED_MIN_TOKENS = 1024


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

  Loops over the examples and heads, and within each over its query chunks (``lax.map``), so
  one chunk's scores stay in cache through both products and the softmax: on 2 CPU cores at
  B = 8, T = S = 4,096, 8 heads of 40 (SD 1.5's first level) 1.5 s against 6.6 s for
  ``einsum_attention`` (``experiments/bench_attention.py``; PyTorch's fused kernel 1.2 s). The
  queries are zero-padded to a multiple of ``chunk_size`` (padded rows are computed and dropped;
  the keys are never padded, so every softmax is over exactly the ``S`` real keys).
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
  s = k.shape[1]
  q = jnp.pad(q, ((0, 0), (0, num_chunks * chunk_size - t), (0, 0), (0, 0)))
  # One (example, head) at a time, its queries chunk by chunk: a chunk's [chunk_size, S] scores
  # (8 MiB at 512 x 4,096) stay in cache from the first product through the softmax to the second.
  q = jnp.transpose(q, (0, 2, 1, 3)).reshape(b * n, num_chunks, chunk_size, d)
  k = jnp.transpose(k, (0, 2, 1, 3)).reshape(b * n, s, d)
  v = jnp.transpose(v, (0, 2, 1, 3)).reshape(b * n, s, v.shape[-1])
  scale = d ** -0.5

  # einsum_attention's function on 2-D operands: calling it on [1, c, 1, d] views instead took
  # twice as long (3.3 s vs 1.5 s at 4,096 tokens, bench_attention.py), layout copies per chunk.
  @jax.checkpoint
  def one_chunk(q_chunk, k_head, v_head):  # [chunk_size, d], [S, d], [S, d_v]
    logits = jnp.einsum('td,sd->ts', q_chunk, k_head, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1).astype(v_head.dtype)
    return probs @ v_head

  def one_head(qkv):
    q_head, k_head, v_head = qkv
    return jax.lax.map(lambda q_chunk: one_chunk(q_chunk, k_head, v_head), q_head)

  out = jax.lax.map(one_head, (q, k, v))  # [B * N, num_chunks, chunk_size, d_v]
  out = out.reshape(b, n, num_chunks * chunk_size, -1)[:, :, :t]
  return jnp.transpose(out, (0, 2, 1, 3))


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
