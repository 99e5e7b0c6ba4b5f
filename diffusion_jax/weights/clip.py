"""CLIP text encoder weights: transformers directories and the text parts of LDM single files.

Our ``diffusion_jax.models.clip`` parameter paths map one-to-one onto transformers' keys
(``core.torch_key`` with ``layers`` as the only module list). Key layouts found in the wild:

- published SD checkpoints, transformers < 5, and transformers 5's ``...WithProjection``:
  ``text_model.embeddings.token_embedding.weight``,
  ``text_model.encoder.layers.0.self_attn.q_proj.weight``, ...;
- transformers 5's ``CLIPTextModel``: the same without ``text_model.``;
- the projection of ``...WithProjection``: ``text_projection.weight`` (top level, no bias);
- SD 1.x single file: ``cond_stage_model.transformer.text_model.*``;
- SDXL single file, CLIP ViT-L: ``conditioner.embedders.0.transformer.text_model.*``;
- SDXL single file, OpenCLIP bigG: ``conditioner.embedders.1.model.*`` in OpenCLIP's own names
  (``_OPEN_CLIP`` below); SD 2.x single file, OpenCLIP ViT-H: ``cond_stage_model.model.*``, the
  same names.

The ``position_ids`` buffer that old transformers versions saved is ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax.models import clip as clip_models
from diffusion_jax.weights import core

PyTree = Any

TEXT_MODEL_PREFIX = 'text_model.'
SD1_PREFIX = 'cond_stage_model.transformer.'
SDXL_CLIP_L_PREFIX = 'conditioner.embedders.0.transformer.'
SDXL_OPEN_CLIP_PREFIX = 'conditioner.embedders.1.model.'
SD2_OPEN_CLIP_PREFIX = 'cond_stage_model.model.'

# OpenCLIP (open_clip ``transformer.py``) names -> transformers' names; the fused attention input
# projection ``attn.in_proj_{weight,bias}`` [3D, D] is split into q, k, v (in that order).
_OPEN_CLIP = (
    ('token_embedding.weight', 'embeddings.token_embedding.weight'),
    ('positional_embedding', 'embeddings.position_embedding.weight'),
    ('ln_final.', 'final_layer_norm.'),
    ('transformer.resblocks.', 'encoder.layers.'),
    ('.ln_1.', '.layer_norm1.'),
    ('.ln_2.', '.layer_norm2.'),
    ('.attn.out_proj.', '.self_attn.out_proj.'),
    ('.mlp.c_fc.', '.mlp.fc1.'),
    ('.mlp.c_proj.', '.mlp.fc2.'),
)
_IN_PROJ = re.compile(r'^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$')


def text_encoder_key(path: tuple[str, ...], *, prefix: str = TEXT_MODEL_PREFIX) -> str:
  """transformers' key of our parameter ``path``; ``prefix`` before all but ``text_projection``."""
  key = core.torch_key(path, lists=('layers',))
  return key if key.startswith('text_projection.') else prefix + key


def _ignored(key: str) -> bool:
  return key.endswith('position_ids')


def input_shapes(module: clip_models.CLIPTextModel) -> PyTree:
  """``jax.eval_shape`` of the module's parameters (no memory)."""
  return core.shapes_of(module, jnp.zeros((1, module.max_position_embeddings), jnp.int32))


def text_encoder_params(module: clip_models.CLIPTextModel, state: Mapping[str, np.ndarray], *,
                        dtype: Any = None, component: str = 'text_encoder') -> PyTree:
  """Our parameter tree for ``module`` from a transformers state dict, either key layout.

  Args:
    module: the ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` the weights are for.
    state: key -> array, with or without the ``text_model.`` prefix (module docstring).
    dtype: dtype of the leaves; default float32 (the module's ``param_dtype``).
    component: name for error messages.

  Raises:
    ValueError: a missing tensor, a tensor of another shape (naming the key and both shapes), or
      tensors no parameter uses (e.g. ``text_projection.weight`` for a plain ``CLIPTextModel``).
  """
  prefixed = any(k.startswith(TEXT_MODEL_PREFIX) for k in state)
  prefix = TEXT_MODEL_PREFIX if prefixed else ''
  return core.tree_from_state(state, input_shapes(module),
                              lambda p: text_encoder_key(p, prefix=prefix), dtype=dtype,
                              ignore=_ignored, component=component)


def text_encoder_state(params: PyTree, *, prefix: str = TEXT_MODEL_PREFIX,
                       dtype: Any = None) -> dict[str, np.ndarray]:
  """transformers' state dict of ``params`` (PyTorch layout), keys under ``prefix``.

  The default prefix is the layout of published SD checkpoints, which every transformers
  version loads; ``prefix=''`` is what transformers 5 writes for ``CLIPTextModel``.
  """
  return core.state_from_tree(params, lambda p: text_encoder_key(p, prefix=prefix), dtype=dtype)


def read_config(directory: str | epath.PathLike) -> dict[str, Any]:
  """``config.json`` of a transformers text-encoder directory.

  Raises:
    FileNotFoundError: no ``config.json`` there.
  """
  path = epath.Path(directory) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} is missing: a text encoder directory (text_encoder/, '
                            'text_encoder_2/) holds config.json and model.safetensors.')
  return json.loads(path.read_text())


def load_text_encoder(directory: str | epath.PathLike, *, dtype: Any = None,
                      variant: str | None = None, attention: str = 'auto'
                      ) -> tuple[clip_models.CLIPTextModel, PyTree]:
  """A CLIP text encoder and its parameters from a transformers directory.

  Args:
    directory: holds ``config.json`` (``architectures`` picks ``CLIPTextModel`` or
      ``CLIPTextModelWithProjection``) and ``model[.variant].safetensors`` (or its sharded
      ``.index.json`` form).
    dtype: parameter and compute dtype (default float32; ``jnp.bfloat16`` for both in bf16).
    variant: e.g. ``'fp16'`` for ``model.fp16.safetensors``.
    attention: attention implementation name of the module.

  Returns:
    ``(module, params)``; ``module.apply({'params': params}, input_ids)``.

  Raises:
    FileNotFoundError: no config or no safetensors file.
    ValueError: an unsupported config, or weights that do not match it (naming the key and both
      shapes).
  """
  config = read_config(directory)
  dtype = jnp.dtype(dtype or jnp.float32)
  module = clip_models.from_config(config, dtype=dtype, param_dtype=dtype, attention=attention)
  state = core.read_component(directory, variant=variant, names=('model',))
  params = text_encoder_params(module, state, dtype=dtype,
                               component=f'text encoder {epath.Path(directory).name}')
  return module, params


def from_ldm_clip(module: clip_models.CLIPTextModel, checkpoint: Mapping[str, np.ndarray], *,
                  prefix: str = SD1_PREFIX, dtype: Any = None) -> PyTree:
  """Parameters of a transformers-named CLIP inside an LDM single-file checkpoint.

  SD 1.x: ``prefix=SD1_PREFIX``; SDXL's first encoder: ``prefix=SDXL_CLIP_L_PREFIX``. Keys of
  ``checkpoint`` outside ``prefix`` (U-Net, VAE, other encoders) are not looked at.

  Raises:
    ValueError: no key under ``prefix``, or tensors that do not match ``module``.
  """
  state = core.strip_prefix(checkpoint, prefix)
  if not state:
    raise ValueError(f'the checkpoint has no tensor under {prefix!r}: it is not in the LDM layout '
                     'expected (SD 1.x: cond_stage_model.transformer., SDXL: '
                     'conditioner.embedders.0.transformer.).')
  return text_encoder_params(module, state, dtype=dtype, component=f'text encoder {prefix}')


def open_clip_to_transformers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """OpenCLIP text-tower names -> transformers' (``text_model.``-less) names.

  ``attn.in_proj_weight [3D, D]`` / ``attn.in_proj_bias [3D]`` become ``q_proj``, ``k_proj``,
  ``v_proj``; ``text_projection [D, P]`` (applied as ``x @ P`` by OpenCLIP) becomes
  ``text_projection.weight [P, D]``; ``logit_scale`` and ``attn_mask`` (image-text and buffer
  entries) are dropped. Follows diffusers' ``convert_open_clip_checkpoint``.
  """
  out = {}
  for key, value in state.items():
    if key in ('logit_scale', 'attn_mask'):
      continue
    m = _IN_PROJ.match(key)
    if m:
      layer, kind = m.groups()
      for name, part in zip(('q_proj', 'k_proj', 'v_proj'), np.split(np.asarray(value), 3)):
        out[f'encoder.layers.{layer}.self_attn.{name}.{kind}'] = part
      continue
    if key == 'text_projection':
      out['text_projection.weight'] = np.asarray(value).T
      continue
    new = key
    for old, repl in _OPEN_CLIP:
      new = new.replace(old, repl)
    out[new] = value
  return out


def from_ldm_open_clip(module: clip_models.CLIPTextModel, checkpoint: Mapping[str, np.ndarray],
                       *, prefix: str = SDXL_OPEN_CLIP_PREFIX, dtype: Any = None,
                       drop_unused: bool = False) -> PyTree:
  """Parameters of an OpenCLIP text tower inside an LDM single-file checkpoint (SDXL's bigG).

  Args:
    module: a ``CLIPTextModelWithProjection`` (``hidden_act='gelu'``) for SDXL's
      ``conditioner.embedders.1.model.*``.
    checkpoint: the whole single-file state dict.
    prefix: where the OpenCLIP tower's keys start (SD 2.x: ``SD2_OPEN_CLIP_PREFIX``).
    dtype: dtype of the leaves.
    drop_unused: drop the tower's layers from ``module.num_hidden_layers`` on, and its
      projection when ``module`` has none. SD 2.x files hold all 24 layers of OpenCLIP ViT-H and
      its projection; SD 2's text encoder is the first 23 layers without projection (diffusers
      skips the same tensors). Otherwise such tensors are an error.

  Raises:
    ValueError: no key under ``prefix``, or tensors that do not match ``module`` (naming the key
      in transformers' names and both shapes).
  """
  state = core.strip_prefix(checkpoint, prefix)
  if not state:
    raise ValueError(f'the checkpoint has no tensor under {prefix!r}: it holds no OpenCLIP text '
                     'tower there (SDXL: conditioner.embedders.1.model.).')
  state = open_clip_to_transformers(state)
  if drop_unused:
    has_projection = isinstance(module, clip_models.CLIPTextModelWithProjection)
    state = {k: v for k, v in state.items()
             if not (k.startswith('text_projection') and not has_projection)
             and not (k.startswith('encoder.layers.')
                      and int(k.split('.')[2]) >= module.num_hidden_layers)}
  return text_encoder_params(module, state, dtype=dtype,
                             component=f'OpenCLIP text encoder {prefix}')


__all__ = ['SD1_PREFIX', 'SD2_OPEN_CLIP_PREFIX', 'SDXL_CLIP_L_PREFIX', 'SDXL_OPEN_CLIP_PREFIX',
           'TEXT_MODEL_PREFIX', 'from_ldm_clip', 'from_ldm_open_clip', 'input_shapes',
           'load_text_encoder', 'open_clip_to_transformers', 'read_config', 'text_encoder_key',
           'text_encoder_params', 'text_encoder_state']
