"""The CLIP text transformer of Stable Diffusion: ``CLIPTextModel`` and its projection variant.

Radford et al. (2021, "Learning Transferable Visual Models From Natural Language Supervision",
Sec. 2.4): a causal (GPT-2 style, pre-LayerNorm) transformer over BPE tokens; the text feature is
the final-normed hidden state at the end-of-text token. Layer for layer the model of transformers'
``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (``models/clip/modeling_clip.py``), with the
same field names as its ``CLIPTextConfig`` and parameter paths that map one-to-one onto its keys
(``embeddings/token_embedding/embedding`` <-> ``embeddings.token_embedding.weight``,
``encoder/layers_3/self_attn/q_proj/kernel`` <-> ``encoder.layers.3.self_attn.q_proj.weight``);
``diffusion_jax.weights.clip`` holds the table.

Stable Diffusion uses:

- SD 1.x: OpenAI CLIP ViT-L/14's text model, ``last_hidden_state`` as context.
- SD 2.x: OpenCLIP ViT-H's text model (``hidden_act='gelu'``, 23 of its 24 layers),
  ``last_hidden_state`` of the 23 layers, i.e. the penultimate layer of OpenCLIP, final-normed.
- SDXL: CLIP ViT-L ``hidden_states[-2]`` and OpenCLIP bigG (``CLIPTextModelWithProjection``)
  ``hidden_states[-2]`` as context (neither final-normed), bigG's ``text_embeds`` as pooled text.

The causal mask is applied here (``attention`` below) rather than in
``diffusion_jax.models.attention``, whose functions are unmasked: at 77 tokens every
implementation is the same small computation, and the shared module stays as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attention_lib

Dtype = Any

HIDDEN_ACTS = ('quick_gelu', 'gelu')
ARCHITECTURES = ('CLIPTextModel', 'CLIPTextModelWithProjection')


def quick_gelu(x: jax.Array) -> jax.Array:
  """``x * sigmoid(1.702 x)``, OpenAI CLIP's approximation of GELU (Hendrycks & Gimpel 2016)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
  if name == 'quick_gelu':
    return quick_gelu
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)  # erf form, as torch's nn.GELU()
  raise ValueError(f'CLIP hidden_act={name!r} is not supported; use one of {HIDDEN_ACTS}.')


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     key_mask: jax.Array | None = None, implementation: str = 'auto') -> jax.Array:
  """Causal multi-head softmax attention ``softmax(q k^T / sqrt(d) + mask) v``.

  Query ``i`` attends to keys ``j <= i`` (and, with ``key_mask``, only to keys marked valid).
  Logits and softmax in float32, as ``diffusion_jax.models.attention``.

  Args:
    q: ``[B, T, N, d]`` queries.
    k: ``[B, T, N, d]`` keys.
    v: ``[B, T, N, d]`` values.
    key_mask: optional ``[B, T]`` bool/int, 1 where a key may be attended to (transformers'
      ``attention_mask``).
    implementation: a name of ``attention.IMPLEMENTATIONS``; ``'xla'`` and ``'cudnn'`` run
      ``jax.nn.dot_product_attention(is_causal=True)`` (cuDNN: bfloat16/float16, no ``key_mask``),
      ``'einsum'`` and ``'chunked'`` two masked einsums (at CLIP's 77 tokens there is nothing to
      chunk).

  Returns:
    ``[B, T, N, d]`` in ``v.dtype``.

  Raises:
    ValueError: on an unknown implementation name.
  """
  attention_lib.check_implementation(implementation)
  if implementation == 'auto':
    implementation = attention_lib.default_implementation()
  t = q.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, T, S]
  if key_mask is not None:
    mask = mask & key_mask.astype(bool)[:, None, None, :]
  if implementation in ('xla', 'cudnn'):
    if key_mask is None:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  logits = jnp.einsum('btnd,bsnd->bnts', q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask, logits * (q.shape[-1] ** -0.5), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bsnd->btnd', probs, v)


class CLIPAttention(nn.Module):
  """Causal self-attention with separate q/k/v/out projections (all with bias)."""
  hidden_size: int
  num_attention_heads: int
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """``x: [B, T, D]`` -> ``[B, T, D]``."""
    b, t, d = x.shape
    heads = self.num_attention_heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q, k, v = (dense(n)(x).reshape(b, t, heads, d // heads) for n in ('q_proj', 'k_proj', 'v_proj'))
    out = causal_attention(q, k, v, key_mask=key_mask, implementation=self.attention)
    return dense('out_proj')(out.reshape(b, t, d))


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + fc2(act(fc1(ln2(x))))``."""
  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """``x: [B, T, D]`` -> ``[B, T, D]``."""
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    x = x + CLIPAttention(self.hidden_size, self.num_attention_heads, attention=self.attention,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name='self_attn')(norm('layer_norm1')(x), key_mask)
    x = x + CLIPMLP(self.hidden_size, self.intermediate_size, hidden_act=self.hidden_act,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    name='mlp')(norm('layer_norm2')(x))
    return x


class CLIPMLP(nn.Module):
  """``fc2(act(fc1(x)))``: ``[B, T, D]`` -> ``[B, T, intermediate]`` -> ``[B, T, D]``."""
  hidden_size: int
  intermediate_size: int
  hidden_act: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 name='fc1')(x)
    h = _activation(self.hidden_act)(h)
    return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                    name='fc2')(h)


class CLIPTextEmbeddings(nn.Module):
  """Token embedding plus learned absolute position embedding (positions ``0 .. T-1``)."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """``input_ids: [B, T]`` int -> ``[B, T, D]``."""
    embed = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    tokens = embed(self.vocab_size, 'token_embedding')(input_ids)
    positions = embed(self.max_position_embeddings, 'position_embedding')(
        jnp.arange(input_ids.shape[1]))
    return tokens + positions[None]


class CLIPEncoder(nn.Module):
  """``num_hidden_layers`` blocks; returns every block's input and the last output."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.layers = [
        CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
                         attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype)
        for _ in range(self.num_hidden_layers)]

  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None
               ) -> tuple[jax.Array, ...]:
    """``x: [B, T, D]`` -> ``num_hidden_layers + 1`` states ``[B, T, D]`` (input first)."""
    states = [x]
    for layer in self.layers:
      x = layer(x, key_mask)
      states.append(x)
    return tuple(states)


class CLIPTextModel(nn.Module):
  """CLIP's text transformer (transformers' ``CLIPTextModel``).

  Attributes (as transformers' ``CLIPTextConfig``; defaults are CLIP ViT-L/14's, SD 1.x):
    vocab_size: BPE vocabulary size (49408).
    hidden_size: width ``D``.
    intermediate_size: MLP width.
    projection_dim: width of ``text_projection`` (``CLIPTextModelWithProjection`` only).
    num_hidden_layers: transformer blocks.
    num_attention_heads: heads; ``hidden_size`` must be a multiple.
    max_position_embeddings: rows of the position table, the longest input (77).
    hidden_act: ``'quick_gelu'`` (OpenAI CLIP) or ``'gelu'`` (exact erf form; OpenCLIP).
    layer_norm_eps: LayerNorm epsilon.
    bos_token_id, eos_token_id, pad_token_id: special ids. ``eos_token_id == 2`` is the legacy
      value of old configs, for which the pooled token is the position of the largest id (the
      end-of-text token has the largest id of CLIP's vocabulary), as transformers does.
    attention: implementation name (``diffusion_jax.models.attention.IMPLEMENTATIONS``).
    dtype: computation dtype (float32, or bfloat16 for speed).
    param_dtype: parameter dtype.
  """
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'CLIP hidden_size={self.hidden_size} is not a multiple of '
                       f'num_attention_heads={self.num_attention_heads}.')
    _activation(self.hidden_act)  # validates the name
    attention_lib.check_implementation(self.attention)
    self.embeddings = CLIPTextEmbeddings(self.vocab_size, self.hidden_size,
                                         self.max_position_embeddings, dtype=self.dtype,
                                         param_dtype=self.param_dtype)
    self.encoder = CLIPEncoder(self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                               self.num_attention_heads, hidden_act=self.hidden_act,
                               layer_norm_eps=self.layer_norm_eps, attention=self.attention,
                               dtype=self.dtype, param_dtype=self.param_dtype)
    self.final_layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                         param_dtype=self.param_dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
               ) -> dict[str, Any]:
    """Encodes token ids.

    Args:
      input_ids: ``[B, L]`` integer ids, ``L <= max_position_embeddings`` (SD: ``L = 77``, from
        ``diffusion_jax.tokenization.CLIPTokenizer``).
      attention_mask: optional ``[B, L]``, 1 for tokens to attend to (SD pipelines pass none).

    Returns:
      A dict with ``last_hidden_state [B, L, D]`` (after ``final_layer_norm``), ``pooler_output
      [B, D]`` (``last_hidden_state`` at the end-of-text token: the first ``eos_token_id``, or the
      largest id when ``eos_token_id == 2``) and ``hidden_states``, a tuple of
      ``num_hidden_layers + 1`` states ``[B, L, D]`` before the final norm (the embeddings first;
      SD 2.x / SDXL's "penultimate layer" is ``hidden_states[-2]``).

    Raises:
      ValueError: ``input_ids`` not 2-D or longer than ``max_position_embeddings``.
    """
    if input_ids.ndim != 2:
      raise ValueError(f'input_ids must be [batch, length], got shape {input_ids.shape}.')
    if input_ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f'input_ids has {input_ids.shape[1]} tokens, more than '
                       f'max_position_embeddings={self.max_position_embeddings}: truncate the '
                       'prompts (CLIPTokenizer does, to model_max_length).')
    input_ids = input_ids.astype(jnp.int32)
    hidden_states = self.encoder(self.embeddings(input_ids), attention_mask)
    last = self.final_layer_norm(hidden_states[-1])
    if self.eos_token_id == 2:
      eos_index = jnp.argmax(input_ids, axis=-1)
    else:
      eos_index = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # first occurrence
    pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]
    return {'last_hidden_state': last, 'pooler_output': pooled, 'hidden_states': hidden_states}

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> CLIPTextModel:
    """The module for a transformers ``config.json`` (a ``CLIPTextConfig`` as a dict).

    Reads the fields of ``CLIPTextConfig`` this module has; a full ``CLIPModel`` config's
    ``text_config`` is used when present. ``overrides`` (``dtype``, ``attention``, ...) win.

    Raises:
      ValueError: an unsupported ``hidden_act`` or a missing size field.
    """
    return cls(**{**_fields_from_config(cls, config), **overrides})


class CLIPTextModelWithProjection(CLIPTextModel):
  """``CLIPTextModel`` plus ``text_embeds = pooler_output @ W`` (``text_projection``, no bias).

  SDXL's second text encoder (OpenCLIP bigG); ``text_embeds [B, projection_dim]`` is the pooled
  text conditioning of the SDXL U-Net.
  """

  def setup(self):
    super().setup()
    self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
               ) -> dict[str, Any]:
    """``CLIPTextModel.__call__``'s dict plus ``text_embeds [B, projection_dim]``."""
    out = super().__call__(input_ids, attention_mask)
    out['text_embeds'] = self.text_projection(out['pooler_output'])
    return out


_REQUIRED = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
             'num_attention_heads', 'max_position_embeddings')
_OPTIONAL = ('projection_dim', 'hidden_act', 'layer_norm_eps', 'bos_token_id', 'eos_token_id',
             'pad_token_id')


def _fields_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
  config = config.get('text_config') or config
  missing = [k for k in _REQUIRED if k not in config]
  if missing:
    raise ValueError(f'the CLIP text config lacks {missing}: is it a transformers '
                     f'CLIPTextConfig config.json? It has {sorted(config)}.')
  fields = {k: config[k] for k in _REQUIRED}
  fields.update({k: config[k] for k in _OPTIONAL if config.get(k) is not None})
  _activation(fields.get('hidden_act', cls.hidden_act))
  return fields


def from_config(config: Mapping[str, Any], **overrides) -> CLIPTextModel:
  """``CLIPTextModel`` or ``CLIPTextModelWithProjection``, as the config's ``architectures`` says.

  Args:
    config: a transformers ``config.json`` as a dict (the text config at the top level).
    **overrides: module fields that win over the config (``dtype``, ``attention``).

  Raises:
    ValueError: an architecture other than the two (naming it), or a bad field.
  """
  architectures = list(config.get('architectures') or ['CLIPTextModel'])
  known = [a for a in architectures if a in ARCHITECTURES]
  if not known:
    raise ValueError(f'config architectures {architectures} name no CLIP text encoder; '
                     f'expected one of {ARCHITECTURES}.')
  cls = CLIPTextModelWithProjection if known[0] == 'CLIPTextModelWithProjection' else CLIPTextModel
  return cls.from_config(config, **overrides)


__all__ = ['ARCHITECTURES', 'CLIPTextModel', 'CLIPTextModelWithProjection', 'HIDDEN_ACTS',
           'causal_attention', 'from_config', 'quick_gelu']
