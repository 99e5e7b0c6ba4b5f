"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): new rows of a token table.

A learned concept is ``n`` new token embeddings ``v_1..v_n [n, D]`` appended to the CLIP text
encoder's token table (``params['embeddings']['token_embedding']['embedding'] [V, D]``); the
tokenizer gets the matching placeholder tokens. Everything else stays frozen: training optimizes
the ``[n, D]`` rows alone, concatenated to the frozen table inside the jitted loss
(``with_rows``), which is Gal et al.'s objective (their eq. 2) with only ``v`` trained::

  rows = initial_rows(te_params, tokenizer.convert_tokens_to_ids(['digit</w>']))  # [1, D]
  module = text_encoder.clone(vocab_size=V + 1); tokenizer.add_tokens(['<new>'])
  def loss_fn(rows, frozen, batch, key):
    te = with_rows(frozen['text_encoder'], rows)            # [V + n, D] table, traced
    ...

Files (``read_embeddings``):

- diffusers' ``learned_embeds.safetensors``: one key, the token, holding ``[D]`` or ``[n, D]``;
- other tools' single-key files: ``emb_params`` (A1111 safetensors embeddings) or
  ``string_to_param.*`` / ``*``, the token then ``token=`` or the file's stem (A1111 names a
  concept by its file name);
- SDXL embeddings: ``clip_l`` ``[n, 768]`` and ``clip_g`` ``[n, 1280]``, one per text encoder.

A multi-vector concept ``<tok>`` of n rows becomes the tokens ``<tok>, <tok>_1, .. <tok>_{n-1}``
(diffusers' names); a prompt's ``<tok>`` is expanded to all n before tokenizing
(diffusers' ``maybe_convert_prompt``), by ``ExpandingTokenizer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import numpy as st_numpy

from diffusion_jax.weights import core

PyTree = Any

WEIGHT_NAME = 'learned_embeds.safetensors'
_TABLE = ('embeddings', 'token_embedding', 'embedding')
_SINGLE_KEYS = ('emb_params', 'string_to_param.*', 'string_to_param', '*')
_SDXL_KEYS = ('clip_l', 'clip_g')


def token_names(token: str, num_vectors: int) -> list[str]:
  """``[token, token_1, ..., token_{n-1}]``: the tokens of an n-vector concept (diffusers)."""
  return [token] + [f'{token}_{i}' for i in range(1, num_vectors)]


def table(params: PyTree) -> jax.Array:
  """The token table ``[V, D]`` of a CLIP text encoder's parameters."""
  return params[_TABLE[0]][_TABLE[1]][_TABLE[2]]


def with_rows(params: PyTree, rows: jax.Array) -> PyTree:
  """``params`` whose token table has ``rows [n, D]`` appended (traceable; ids ``V .. V+n-1``).

  Raises:
    ValueError: rows of another width than the table.
  """
  base = table(params)
  if rows.ndim != 2 or rows.shape[1] != base.shape[1]:
    raise ValueError(f'embedding rows have shape {tuple(rows.shape)}; the token table is '
                     f'{tuple(base.shape)}, so rows must be [n, {base.shape[1]}].')
  new = jnp.concatenate([base, rows.astype(base.dtype)], axis=0)
  return _replace_table(params, new)


def _replace_table(params: PyTree, new: jax.Array) -> PyTree:
  embeddings = dict(params[_TABLE[0]])
  embeddings[_TABLE[1]] = {**embeddings[_TABLE[1]], _TABLE[2]: new}
  return {**params, _TABLE[0]: embeddings}


def initial_rows(params: PyTree, ids: Sequence[int]) -> jax.Array:
  """``[n, D]`` rows copied from existing tokens (Gal et al. start from a coarse word: 'digit')."""
  return jnp.asarray(table(params))[jnp.asarray(list(ids), jnp.int32)]


def read_embeddings(path: str | epath.PathLike, *, token: str | None = None
                    ) -> tuple[str, dict[str, np.ndarray]]:
  """The token and ``[n, D]`` vectors of a textual-inversion ``.safetensors`` file.

  Args:
    path: the file, or a directory holding ``learned_embeds.safetensors``.
    token: the placeholder token; overrides the file's (diffusers' ``token=``).

  Returns:
    ``(token, vectors)``: ``vectors`` is ``{'': [n, D]}`` for a one-encoder file and
    ``{'clip_l': [n, 768], 'clip_g': [n, 1280]}`` for an SDXL file; float32.

  Raises:
    FileNotFoundError: no such file; pickle files (``.pt``, ``.bin``) are never read.
    ValueError: a file of several keys that is not an SDXL embedding, or vectors that are not
      ``[D]`` / ``[n, D]``.
  """
  path = epath.Path(path)
  if path.is_dir():
    path = path / WEIGHT_NAME
  if not path.exists():
    raise FileNotFoundError(f'no textual-inversion file {path}.')
  if not path.name.endswith('.safetensors'):
    raise FileNotFoundError(f'{path} is not a .safetensors file; pickle files (.pt, .bin) are '
                            'never loaded: convert it to safetensors first.')
  state = core.read_safetensors(path)
  stem = path.name.removesuffix('.safetensors')
  if set(state) == set(_SDXL_KEYS):
    vectors, file_token = dict(state), None
  elif len(state) == 1:
    key, value = next(iter(state.items()))
    vectors = {'': value}
    file_token = None if key in _SINGLE_KEYS else key
  else:
    raise ValueError(f'{path} holds {sorted(state)[:6]}: a textual-inversion file has one tensor '
                     "(the token's embedding, or emb_params / string_to_param.*) or SDXL's "
                     f'{_SDXL_KEYS}.')
  token = token or file_token or stem
  out = {}
  for name, v in vectors.items():
    v = np.asarray(v, np.float32)
    v = v[None] if v.ndim == 1 else v
    if v.ndim != 2 or v.shape[0] < 1:
      raise ValueError(f'{path}: the embedding {name or token!r} has shape {v.shape}; expected '
                       '[D] or [n, D].')
    out[name] = v
  return token, out


def save_embeddings(path: str | epath.PathLike, token: str, vectors: jax.Array | np.ndarray
                    ) -> epath.Path:
  """Writes diffusers' ``learned_embeds.safetensors`` layout: ``{token: [n, D]}`` float32.

  Args:
    path: a ``.safetensors`` file, or a directory (created) that gets ``WEIGHT_NAME``.
    token: the placeholder token.
    vectors: ``[n, D]`` (or ``[D]``).
  """
  path = epath.Path(path)
  if not path.name.endswith('.safetensors'):
    path.mkdir(parents=True, exist_ok=True)
    path = path / WEIGHT_NAME
  v = np.asarray(jax.device_get(vectors), np.float32)
  path.write_bytes(st_numpy.save({token: np.ascontiguousarray(v.reshape(-1, v.shape[-1]))},
                                 metadata={'format': 'pt'}))
  return path


def add_embeddings(module: Any, params: PyTree, tokenizer: Any, token: str,
                   vectors: np.ndarray | jax.Array) -> tuple[Any, PyTree, list[int]]:
  """Adds an n-vector concept to one tokenizer and text encoder.

  Args:
    module: the CLIP text module (a frozen Flax dataclass; a clone with the new ``vocab_size``
      is returned).
    params: its parameters.
    tokenizer: a ``tokenization.CLIPTokenizer`` (changed in place: ``add_tokens``).
    token: the placeholder; n > 1 vectors use ``token_names(token, n)``.
    vectors: ``[n, D]``.

  Returns:
    ``(module, params, ids)``: the module with ``vocab_size`` covering the new ids, the params
    with the rows set at the ids (the table grown as needed), and the new ids.

  Raises:
    ValueError: a token already in the tokenizer (or its multi-vector names), or vectors of
      another width than the table.
  """
  vectors = jnp.asarray(vectors, jnp.float32)
  base = table(params)
  if vectors.ndim != 2 or vectors.shape[1] != base.shape[1]:
    raise ValueError(f'the embedding of {token!r} has shape {tuple(vectors.shape)}, the text '
                     f'encoder has width {base.shape[1]}: it was trained for another text encoder.')
  names = token_names(token, vectors.shape[0])
  taken = [t for t in names if tokenizer.convert_tokens_to_ids(t) is not None]
  if taken:
    raise ValueError(f'token {taken[0]!r} is already in the tokenizer vocabulary; pass another '
                     'token= (a placeholder string such as "<my-concept>").')
  ids = tokenizer.add_tokens(names)
  size = max(int(base.shape[0]), max(ids) + 1)
  new = jnp.concatenate([base, jnp.zeros((size - base.shape[0], base.shape[1]), base.dtype)])
  new = new.at[jnp.asarray(ids)].set(vectors.astype(base.dtype))
  sharding = getattr(base, 'sharding', None)
  if sharding is not None and isinstance(base, jax.Array):
    new = jax.device_put(new, sharding)
  return module.clone(vocab_size=size), _replace_table(params, new), ids


class ExpandingTokenizer:
  """A tokenizer that writes each multi-vector placeholder as all its tokens before encoding.

  ``'a <cat> toy'`` -> ``'a <cat> <cat>_1 <cat>_2 toy'`` (diffusers' ``maybe_convert_prompt``:
  a placeholder among the prompt's tokens is replaced in the prompt text), then the wrapped
  tokenizer. Every other attribute is the wrapped tokenizer's.

  Attributes:
    tokenizer: the wrapped ``CLIPTokenizer``.
    expansions: ``{placeholder: 'placeholder placeholder_1 ...'}``.
  """

  def __init__(self, tokenizer: Any, expansions: Mapping[str, str] | None = None):
    self.tokenizer = tokenizer
    self.expansions = dict(expansions or {})

  def expand(self, prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = []
    for p in prompts:
      for token in set(self.tokenizer.tokenize(p)) if isinstance(p, str) else ():
        if token in self.expansions:
          p = p.replace(token, self.expansions[token])
      out.append(p)
    return out

  def encode(self, prompts, **kwargs):
    return self.tokenizer.encode(self.expand(prompts), **kwargs)

  def __call__(self, prompts, **kwargs):
    return self.tokenizer(self.expand(prompts), **kwargs)

  def __len__(self) -> int:
    return len(self.tokenizer)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.tokenizer, name)


def load_textual_inversion(pipe: Any, path: str | epath.PathLike, *,
                           token: str | None = None) -> list[str]:
  """Adds a textual-inversion concept to a ``StableDiffusionPipeline`` (diffusers' method).

  Updates ``pipe.tokenizers`` (placeholder tokens; an ``ExpandingTokenizer`` when n > 1),
  ``pipe.text_encoders`` (clones with the grown ``vocab_size``) and the text encoders'
  ``pipe.params`` tables (new rows at the new ids). A one-encoder file goes to the first text
  encoder whose width matches (diffusers' default, ``pipe.text_encoder``); an SDXL file's
  ``clip_l`` / ``clip_g`` to the first / second.

  Args:
    pipe: a ``pipelines.StableDiffusionPipeline``.
    path: the ``.safetensors`` file (or a directory holding ``learned_embeds.safetensors``).
    token: the placeholder; default the file's (``read_embeddings``).

  Returns:
    The tokens added (the placeholder and, for n > 1, ``placeholder_1 ..``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a token already in a tokenizer (nothing is changed then), no text encoder of the
      embedding's width, or an SDXL file for a one-encoder pipeline.
  """
  token, vectors = read_embeddings(path, token=token)
  names = ('text_encoder', 'text_encoder_2')[:len(pipe.text_encoders)]
  widths = [int(table(pipe.params[n]).shape[1]) for n in names]
  if '' in vectors:
    width = vectors[''].shape[1]
    if width not in widths:
      raise ValueError(f'the embedding of {token!r} is {width} wide; the text encoders are '
                       f'{widths} wide: it was trained for another model.')
    targets = {widths.index(width): vectors['']}
  else:
    if len(names) < 2:
      raise ValueError(f'{path} is an SDXL embedding (clip_l, clip_g); the pipeline has one text '
                       'encoder.')
    targets = {0: vectors['clip_l'], 1: vectors['clip_g']}
  for i, v in targets.items():  # check every tokenizer before changing any
    for t in token_names(token, v.shape[0]):
      if pipe.tokenizers[i].convert_tokens_to_ids(t) is not None:
        raise ValueError(f'token {t!r} is already in the vocabulary of tokenizer {i + 1}; pass '
                         'another token= (a placeholder string such as "<my-concept>").')
  modules, tokenizers = list(pipe.text_encoders), list(pipe.tokenizers)
  params = dict(pipe.params)
  added: list[str] = []
  for i, v in targets.items():
    tok = tokenizers[i]
    inner = tok.tokenizer if isinstance(tok, ExpandingTokenizer) else tok
    modules[i], params[names[i]], _ = add_embeddings(modules[i], params[names[i]], inner, token, v)
    if v.shape[0] > 1:
      tok = tok if isinstance(tok, ExpandingTokenizer) else ExpandingTokenizer(tok)
      tok.expansions[token] = ' '.join(token_names(token, v.shape[0]))
      tokenizers[i] = tok
    added = token_names(token, v.shape[0])
  pipe.text_encoders, pipe.tokenizers, pipe.params = tuple(modules), tuple(tokenizers), params
  return added


__all__ = ['ExpandingTokenizer', 'WEIGHT_NAME', 'add_embeddings', 'initial_rows',
           'load_textual_inversion', 'read_embeddings', 'save_embeddings', 'table',
           'token_names', 'with_rows']
