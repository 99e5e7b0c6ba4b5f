"""Stable Diffusion U-Net weights: diffusers ``unet/`` directories and original LDM single files.

Our ``UNet2DConditionModel`` carries diffusers' module names, so the diffusers key of a
parameter is its path, dotted (``unet_key``): ``down_blocks_0/attentions_1/transformer_blocks_0/
attn2/to_k/kernel`` -> ``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight``.

The original latent-diffusion layout (CompVis / Stability single-file checkpoints,
``model.diffusion_model.input_blocks.1.1.transformer_blocks.0...``) numbers the down path's
layers consecutively (``input_blocks.{i}``), the up path's likewise (``output_blocks.{i}``),
and names the resnet layers by position (``in_layers.0`` = ``norm1``). ``ldm_key`` maps a
diffusers key onto it by index arithmetic, the inverse of diffusers'
``loaders/single_file_utils.py: convert_ldm_unet_checkpoint``:

==============================================  ===============================================
diffusers                                       LDM (``model.diffusion_model.`` stripped)
==============================================  ===============================================
``conv_in``, ``conv_norm_out``, ``conv_out``    ``input_blocks.0.0``, ``out.0``, ``out.2``
``time_embedding.linear_{1,2}``                 ``time_embed.{0,2}``
``add_embedding.linear_{1,2}`` (SDXL)           ``label_emb.0.{0,2}``
``down_blocks.{b}.resnets.{j}``                 ``input_blocks.{s_b + j}.0``,
                                                ``s_b = 1 + sum_{k<b} (L_k + 1)``
``down_blocks.{b}.attentions.{j}``              ``input_blocks.{s_b + j}.1``
``down_blocks.{b}.downsamplers.0.conv``         ``input_blocks.{s_b + L_b}.0.op``
``mid_block.resnets.{0,1}``                     ``middle_block.{0,2}``
``mid_block.attentions.0``                      ``middle_block.1``
``up_blocks.{b}.resnets.{j}``                   ``output_blocks.{u_b + j}.0``,
                                                ``u_b = sum_{k<b} (L'_k + 1)``
``up_blocks.{b}.attentions.{j}``                ``output_blocks.{u_b + j}.1``
``up_blocks.{b}.upsamplers.0.conv``             ``output_blocks.{u_b + L'_b}.{2 if attention,
                                                else 1}.conv``
resnet ``norm1``, ``conv1``, ``time_emb_proj``  ``in_layers.0``, ``in_layers.2``, ``emb_layers.1``
resnet ``norm2``, ``conv2``, ``conv_shortcut``  ``out_layers.0``, ``out_layers.3``,
                                                ``skip_connection``
==============================================  ===============================================

(``L_k``: ``layers_per_block`` of level k; ``L'_b``: that of up block b's mirrored level.) The
transformers' inner names are the same in both layouts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from diffusion_jax.models import sd_blocks
from diffusion_jax.models import unet_2d_condition
from diffusion_jax.weights import core

PyTree = Any
UNet2DConditionModel = unet_2d_condition.UNet2DConditionModel

LDM_PREFIX = 'model.diffusion_model.'
_LDM_TOP = {
    'conv_in': 'input_blocks.0.0',
    'conv_norm_out': 'out.0',
    'conv_out': 'out.2',
    'time_embedding.linear_1': 'time_embed.0',
    'time_embedding.linear_2': 'time_embed.2',
    'add_embedding.linear_1': 'label_emb.0.0',
    'add_embedding.linear_2': 'label_emb.0.2',
}
_LDM_RESNET = {
    'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_emb_proj': 'emb_layers.1',
    'norm2': 'out_layers.0', 'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection',
}
_BLOCK_KEY = re.compile(r'^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|'
                        r'upsamplers)\.(\d+)\.(.*)$')
_MID_KEY = re.compile(r'^mid_block\.(resnets|attentions)\.(\d+)\.(.*)$')


def unet_key(path: tuple[str, ...]) -> str:
  """The diffusers key of our parameter ``path`` (``conv_in/kernel`` -> ``conv_in.weight``)."""
  return core.torch_key(path, lists=sd_blocks.MODULE_LISTS)


def unet_shapes(module: UNet2DConditionModel) -> PyTree:
  """The parameter tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``).

  Traced on the smallest input the U-Net accepts; no memory, no FLOPs.
  """
  module.check_config()
  n = len(module.block_out_channels)
  size = 2 ** (n - 1)
  context_dim = module._levels()['context_dim'][0]  # pylint: disable=protected-access
  zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731  (tiny; only traced)
  kwargs = {}
  if module.addition_embed_type == 'text_time':
    pooled = module.projection_class_embeddings_input_dim - 6 * module.addition_time_embed_dim
    kwargs['added_cond_kwargs'] = {'text_embeds': zeros(1, pooled), 'time_ids': zeros(1, 6)}
  return core.shapes_of(module, zeros(1, size, size, module.in_channels), zeros(1),
                        zeros(1, 1, context_dim), **kwargs)


def _read_config(directory: epath.Path) -> dict[str, Any]:
  return core.read_config(directory, component='U-Net', layout='a diffusers unet/ directory',
                          class_name='UNet2DConditionModel')


def load_unet(directory: str | epath.PathLike, *, variant: str | None = None,
              dtype: Any = None, **overrides: Any) -> tuple[UNet2DConditionModel, PyTree]:
  """The U-Net of a diffusers ``unet/`` directory: ``(module, params)``.

  Args:
    directory: holds ``config.json`` and ``diffusion_pytorch_model[.{variant}].safetensors``
      (or its sharded ``.index.json`` form).
    variant: e.g. ``'fp16'``.
    dtype: the module's computation dtype and the parameters' dtype (e.g. ``jnp.bfloat16``);
      None: float32 for both, whatever the file's dtype.
    **overrides: module fields to set, e.g. ``attention='cudnn'``.

  Returns:
    ``(module, params)``: ``module.apply({'params': params}, sample, t, context, ...)``;
    ``params`` is a nested dict of arrays on the default device (``jax.device_put`` them with
    a sharding to spread them).

  Raises:
    FileNotFoundError: no config or no safetensors file.
    ValueError: an unsupported configuration (naming the key), or a missing, extra or
      mis-shaped tensor (naming the key and both shapes).
  """
  directory = epath.Path(directory)
  config = _read_config(directory)
  if dtype is not None:
    overrides = {'dtype': dtype, **overrides}
  module = UNet2DConditionModel.from_config(config, **overrides)
  state = core.read_component(directory, variant=variant)
  params = core.tree_from_state(state, unet_shapes(module), unet_key, dtype=dtype,
                                component='unet')
  return module, params


def unet_state(params: PyTree, *, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our parameters in diffusers' layout and names (for ``safetensors.numpy.save_file``)."""
  return core.state_from_tree(params, unet_key, dtype=dtype)


def ldm_key(key: str, module: UNet2DConditionModel) -> str:
  """The original LDM key (without ``model.diffusion_model.``) of diffusers U-Net key ``key``.

  Raises:
    ValueError: a key that is no parameter of this U-Net's layout.
  """
  module_name, _, leaf = key.rpartition('.')
  if module_name in _LDM_TOP:
    return f'{_LDM_TOP[module_name]}.{leaf}'
  layers = module._levels()['layers']  # pylint: disable=protected-access
  m = _MID_KEY.match(key)
  if m:
    kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == 'attentions':
      return f'middle_block.{2 * j + 1}.{rest}'
    return f'middle_block.{2 * j}.{_ldm_resnet(rest)}'
  m = _BLOCK_KEY.match(key)
  if not m:
    raise ValueError(f'{key!r} is not a parameter of a UNet2DConditionModel.')
  path, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
  if path == 'down_blocks':
    start = 1 + sum(n + 1 for n in layers[:b])
    if kind == 'downsamplers':
      return f'input_blocks.{start + layers[b]}.0.op.{rest.removeprefix("conv.")}'
    sub = 0 if kind == 'resnets' else 1
    return (f'input_blocks.{start + j}.{sub}.'
            f'{_ldm_resnet(rest) if kind == "resnets" else rest}')
  up_layers = [n + 1 for n in reversed(layers)]  # per up block
  start = sum(up_layers[:b])
  if kind == 'upsamplers':
    has_attention = unet_2d_condition.UP_BLOCK_TYPES[module.up_block_types[b]]
    return f'output_blocks.{start + up_layers[b] - 1}.{2 if has_attention else 1}.{rest}'
  sub = 0 if kind == 'resnets' else 1
  return f'output_blocks.{start + j}.{sub}.{_ldm_resnet(rest) if kind == "resnets" else rest}'


def _ldm_resnet(rest: str) -> str:
  name, _, leaf = rest.partition('.')
  return f'{_LDM_RESNET[name]}.{leaf}'


def unet_params_from_ldm(state: Mapping[str, np.ndarray], module: UNet2DConditionModel, *,
                         dtype: Any = None) -> PyTree:
  """Our U-Net parameters from an original LDM single-file checkpoint's tensors (SD 1.x, 2.x, XL).

  Args:
    state: every tensor of the checkpoint (``core.read_safetensors(path)``): the U-Net's are
      those under ``model.diffusion_model.`` (or, if no key has that prefix, all of them); the
      VAE's and text encoders' are left alone.
    module: the U-Net they are for (e.g. ``UNet2DConditionModel.from_config`` of the matching
      diffusers config).
    dtype: dtype of the parameters; None: float32.

  Returns:
    The parameter tree of ``module``.

  Raises:
    ValueError: a missing, extra or mis-shaped tensor, named by its LDM key.
  """
  if any(k.startswith(LDM_PREFIX) for k in state):
    state = core.strip_prefix(state, LDM_PREFIX)
  return core.tree_from_state(state, unet_shapes(module), lambda p: ldm_key(unet_key(p), module),
                              dtype=dtype, component='unet (LDM single file)')


def ldm_state(params: PyTree, module: UNet2DConditionModel, *,
              dtype: Any = None) -> dict[str, np.ndarray]:
  """Our parameters in the original LDM layout, keys prefixed ``model.diffusion_model.``."""
  return core.state_from_tree(params, lambda p: LDM_PREFIX + ldm_key(unet_key(p), module),
                              dtype=dtype)


__all__ = ['LDM_PREFIX', 'ldm_key', 'ldm_state', 'load_unet', 'unet_key', 'unet_params_from_ldm',
           'unet_shapes', 'unet_state']
