"""Stable Diffusion VAE weights: diffusers ``vae/`` directories and original LDM single files.

Our ``AutoencoderKL`` carries diffusers' module names, so the diffusers key of a parameter is its
path, dotted (``vae_key``): ``encoder/down_blocks_0/resnets_1/conv1/kernel`` ->
``encoder.down_blocks.0.resnets.1.conv1.weight``.

The original latent-diffusion layout (CompVis / Stability single files, under
``first_stage_model.``; ``vae.`` in some) is mapped by ``ldm_vae_key``, the inverse of diffusers'
``loaders/single_file_utils.py: convert_ldm_vae_checkpoint``:

=================================================  ================================================
diffusers                                          LDM (prefix stripped)
=================================================  ================================================
``{encoder,decoder}.conv_norm_out``                ``{encoder,decoder}.norm_out``
``encoder.down_blocks.{i}.resnets.{j}``            ``encoder.down.{i}.block.{j}``
``encoder.down_blocks.{i}.downsamplers.0.conv``    ``encoder.down.{i}.downsample.conv``
``decoder.up_blocks.{i}.resnets.{j}``              ``decoder.up.{n - 1 - i}.block.{j}`` (n levels)
``decoder.up_blocks.{i}.upsamplers.0.conv``        ``decoder.up.{n - 1 - i}.upsample.conv``
``*.mid_block.resnets.{0,1}``                      ``*.mid.block_{1,2}``
``*.mid_block.attentions.0.group_norm``            ``*.mid.attn_1.norm``
``*.mid_block.attentions.0.to_{q,k,v}``            ``*.mid.attn_1.{q,k,v}`` (1x1 convs)
``*.mid_block.attentions.0.to_out.0``              ``*.mid.attn_1.proj_out`` (1x1 conv)
resnet ``conv_shortcut``                           ``nin_shortcut``
=================================================  ================================================

(conv_in, conv_out, quant_conv, post_quant_conv and the resnets' norm1/conv1/norm2/conv2 keep their
names.) The 1x1-conv attention projections load into our Linear layers (``weights.core``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax.models import autoencoder_kl
from diffusion_jax.models import sd_blocks
from diffusion_jax.weights import core

PyTree = Any
AutoencoderKL = autoencoder_kl.AutoencoderKL

LDM_PREFIXES = ('first_stage_model.', 'vae.')
# Names of diffusers' old attention blocks (``_from_deprecated_attn_block``), still found in
# some diffusers-format files; diffusers renames them on load, and so do we.
_DEPRECATED_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
                         'proj_attn': 'to_out.0'}
_DEPRECATED_KEY = re.compile(r'^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$')
_BLOCK_KEY = re.compile(r'^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.'
                        r'(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.*)$')
_MID_KEY = re.compile(r'^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$')
_LDM_ATTENTION = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v',
                  'to_out.0': 'proj_out'}


def vae_key(path: tuple[str, ...]) -> str:
  """The diffusers key of our parameter ``path`` (``conv_in/kernel`` -> ``conv_in.weight``)."""
  return core.torch_key(path, lists=sd_blocks.MODULE_LISTS)


def vae_shapes(module: AutoencoderKL) -> PyTree:
  """The parameter tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (no memory, no FLOPs)."""
  module.check_config()
  size = 2 ** (len(module.block_out_channels) - 1)
  x = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)['params']


def _read_config(directory: epath.Path) -> dict[str, Any]:
  return core.read_config(directory, component='VAE', layout='a diffusers vae/ directory')


def _rename_deprecated(state: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
  def rename(key: str) -> str:
    m = _DEPRECATED_KEY.match(key)
    return f'{m.group(1)}.{_DEPRECATED_ATTENTION[m.group(2)]}.{m.group(3)}' if m else key
  return core.renamed(state, rename)


def load_vae(directory: str | epath.PathLike, *, variant: str | None = None,
             dtype: Any = None, **overrides: Any) -> tuple[AutoencoderKL, PyTree]:
  """The VAE of a diffusers ``vae/`` directory: ``(module, params)``.

  Args:
    directory: holds ``config.json`` and ``diffusion_pytorch_model[.{variant}].safetensors``
      (or its sharded ``.index.json`` form).
    variant: e.g. ``'fp16'`` for ``diffusion_pytorch_model.fp16.safetensors``.
    dtype: the module's computation dtype and the parameters' dtype (e.g. ``jnp.bfloat16``);
      None: float32 for both, whatever the file's dtype.
    **overrides: module fields to set, e.g. ``attention='chunked'``.

  Returns:
    ``(module, params)``: ``module.apply({'params': params}, x, method=module.encode)`` and
    ``method=module.decode``; ``params`` is a nested dict of arrays on the default device.

  Raises:
    FileNotFoundError: no config or no safetensors file.
    ValueError: an unsupported configuration (naming the key), or a missing, extra or
      mis-shaped tensor (naming the key and both shapes).
  """
  directory = epath.Path(directory)
  config = _read_config(directory)
  if dtype is not None:
    overrides = {'dtype': dtype, **overrides}
  module = AutoencoderKL.from_config(config, **overrides)
  state = _rename_deprecated(core.read_component(directory, variant=variant))
  params = core.tree_from_state(state, vae_shapes(module), vae_key, dtype=dtype, component='vae')
  return module, params


def vae_state(params: PyTree, *, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our parameters in diffusers' layout and names (for ``safetensors.numpy.save_file``)."""
  return core.state_from_tree(params, vae_key, dtype=dtype)


def ldm_vae_key(key: str, *, num_levels: int) -> str:
  """The original LDM key (prefix stripped) of diffusers VAE key ``key``.

  Args:
    key: e.g. ``'decoder.up_blocks.0.resnets.2.conv_shortcut.weight'``.
    num_levels: ``len(block_out_channels)`` (the decoder's levels are numbered in reverse).

  Raises:
    ValueError: a key that is no parameter of an AutoencoderKL.
  """
  m = _BLOCK_KEY.match(key)
  if m:
    part, kind, i, sub, j, rest = m.groups()
    i = int(i)
    if part == 'encoder':
      base = f'encoder.down.{i}'
    else:
      base = f'decoder.up.{num_levels - 1 - i}'
    if j is not None:
      return f'{base}.block.{j}.{rest.replace("conv_shortcut", "nin_shortcut")}'
    return f'{base}.{"downsample" if part == "encoder" else "upsample"}.{rest}'
  m = _MID_KEY.match(key)
  if m:
    part, kind, j, rest = m.groups()
    if kind == 'resnets':
      return f'{part}.mid.block_{int(j) + 1}.{rest.replace("conv_shortcut", "nin_shortcut")}'
    name, leaf = rest.rsplit('.', 1)
    if name not in _LDM_ATTENTION:
      raise ValueError(f'{key!r} is not a parameter of an AutoencoderKL.')
    return f'{part}.mid.attn_{int(j) + 1}.{_LDM_ATTENTION[name]}.{leaf}'
  for part in ('encoder', 'decoder'):
    if key.startswith(f'{part}.conv_norm_out.'):
      return key.replace('conv_norm_out', 'norm_out')
  if re.match(r'^((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.', key):
    return key
  raise ValueError(f'{key!r} is not a parameter of an AutoencoderKL.')


def strip_ldm_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The VAE's tensors of a single-file checkpoint, ``first_stage_model.`` (or ``vae.``) removed.

  A state with neither prefix is taken to hold only the VAE (a standalone LDM VAE file).
  """
  for prefix in LDM_PREFIXES:
    if any(k.startswith(prefix) for k in state):
      return core.strip_prefix(state, prefix)
  return dict(state)


def vae_config_from_ldm(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """A diffusers ``AutoencoderKL`` config read off the shapes of an LDM-layout VAE's tensors.

  ``norm_num_groups`` (32) and ``scaling_factor`` (0.18215 for SD 1.x / 2.x; SDXL's VAE is
  0.13025) are not in the tensors: pass the right ones to ``AutoencoderKL.from_config``.

  Args:
    state: the VAE's tensors in LDM layout (``strip_ldm_prefix`` output).

  Raises:
    ValueError: when the tensors are not an LDM VAE's.
  """
  state = strip_ldm_prefix(state)
  if 'encoder.conv_in.weight' not in state or 'decoder.conv_out.weight' not in state:
    raise ValueError('the tensors are not an LDM-layout VAE: no encoder.conv_in.weight or '
                     'decoder.conv_out.weight (with or without the first_stage_model. prefix).')
  levels = sorted({int(k.split('.')[2]) for k in state if k.startswith('encoder.down.')})
  channels = [int(state[f'encoder.down.{i}.block.0.conv1.weight'].shape[0]) for i in levels]
  blocks = {int(k.split('.')[4]) for k in state if k.startswith('encoder.down.0.block.')}
  n = len(levels)
  return {
      'in_channels': int(state['encoder.conv_in.weight'].shape[1]),
      'out_channels': int(state['decoder.conv_out.weight'].shape[0]),
      'down_block_types': ['DownEncoderBlock2D'] * n,
      'up_block_types': ['UpDecoderBlock2D'] * n,
      'block_out_channels': channels,
      'layers_per_block': len(blocks),
      'latent_channels': int(state['decoder.conv_in.weight'].shape[1]),
      'use_quant_conv': 'quant_conv.weight' in state,
      'use_post_quant_conv': 'post_quant_conv.weight' in state,
      'mid_block_add_attention': 'encoder.mid.attn_1.q.weight' in state,
  }


def vae_params_from_ldm(state: Mapping[str, np.ndarray], module: AutoencoderKL | None = None, *,
                        dtype: Any = None) -> PyTree:
  """Our VAE parameters from an original LDM single-file checkpoint's tensors.

  Args:
    state: the checkpoint's tensors (``core.read_safetensors(path)``): those under
      ``first_stage_model.`` (or ``vae.``; or all, when neither prefix occurs); the U-Net's and
      text encoders' are left alone, and so are the VAE training loss's (``loss.*``).
    module: the VAE they are for; None: ``AutoencoderKL.from_config(vae_config_from_ldm(state))``
      (check its ``scaling_factor`` before use).
    dtype: dtype of the parameters; None: float32.

  Returns:
    The parameter tree of ``module``.

  Raises:
    ValueError: a missing or mis-shaped tensor (naming the LDM key and both shapes), or VAE
      tensors that match no parameter.
  """
  state = strip_ldm_prefix(state)
  if module is None:
    module = AutoencoderKL.from_config(vae_config_from_ldm(state))
  n = len(module.block_out_channels)
  return core.tree_from_state(state, vae_shapes(module),
                              lambda path: ldm_vae_key(vae_key(path), num_levels=n),
                              dtype=dtype, ignore=lambda k: k.startswith('loss.'),
                              component='vae (LDM layout)')


__all__ = ['LDM_PREFIXES', 'ldm_vae_key', 'load_vae', 'strip_ldm_prefix', 'vae_config_from_ldm',
           'vae_key', 'vae_params_from_ldm', 'vae_shapes', 'vae_state']
