"""ControlNet weights: diffusers ControlNet directories (``config.json`` + safetensors), both ways.

Our ``ControlNetModel`` carries diffusers' module names, so a parameter's diffusers key is its
path, dotted (``controlnet_key``), with the U-Net's module lists plus the ControlNet's own
(``controlnet_cond_embedding.blocks.{i}``, ``controlnet_down_blocks.{k}``):
``controlnet_down_blocks_4/kernel`` -> ``controlnet_down_blocks.4.weight``. A directory written by
``save_controlnet`` is read back by diffusers' ``ControlNetModel.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from etils import epath
from safetensors import numpy as st_numpy

from diffusion_jax.models import controlnet as controlnet_lib
from diffusion_jax.models import sd_blocks
from diffusion_jax.weights import core

PyTree = Any
ControlNetModel = controlnet_lib.ControlNetModel

MODULE_LISTS = tuple(sd_blocks.MODULE_LISTS) + ('blocks', 'controlnet_down_blocks')
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
# Fields of ours that are no diffusers config keys.
_NOT_CONFIG = ('dtype', 'attention', 'parent', 'name')


def controlnet_key(path: tuple[str, ...]) -> str:
  """The diffusers key of our parameter ``path``: ``('controlnet_mid_block', 'kernel')`` ->
  ``controlnet_mid_block.weight``."""
  return core.torch_key(path, lists=MODULE_LISTS)


def controlnet_shapes(module: ControlNetModel) -> PyTree:
  """The parameter tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (no memory, no FLOPs)."""
  module.check_config()
  args, kwargs = module.example_inputs()
  return core.shapes_of(module, *args, **kwargs)


def _read_config(directory: epath.Path) -> dict[str, Any]:
  return core.read_config(directory, component='ControlNet',
                          layout='a diffusers ControlNet directory', class_name='ControlNetModel',
                          other=' (SD 1.x / 2.x / XL ControlNets; ControlNet-XS, union and SD3/Flux '
                          'ControlNets are other architectures)')


def load_controlnet(directory: str | epath.PathLike, *, variant: str | None = None,
                    dtype: Any = None, **overrides: Any) -> tuple[ControlNetModel, PyTree]:
  """The ControlNet of a diffusers ControlNet directory: ``(module, params)``.

  Args:
    directory: holds ``config.json`` and ``diffusion_pytorch_model[.{variant}].safetensors``
      (or its sharded ``.index.json`` form), as ``ControlNetModel.save_pretrained`` writes them.
    variant: e.g. ``'fp16'``.
    dtype: the module's computation dtype and the parameters' dtype; None: float32 for both.
    **overrides: module fields to set, e.g. ``attention='cudnn'``.

  Returns:
    ``(module, params)``: ``module.apply({'params': params}, sample, t, context, image)``;
    ``params`` is a nested dict of arrays on the default device.

  Raises:
    FileNotFoundError: no config or no safetensors file.
    ValueError: another model class, an unsupported configuration (naming the key), or a
      missing, extra or mis-shaped tensor (naming the key and both shapes).
  """
  directory = epath.Path(directory)
  config = _read_config(directory)
  if dtype is not None:
    overrides = {'dtype': dtype, **overrides}
  module = ControlNetModel.from_config(config, **overrides)
  state = core.read_component(directory, variant=variant)
  params = core.tree_from_state(state, controlnet_shapes(module), controlnet_key, dtype=dtype,
                                component='controlnet')
  return module, params


def controlnet_state(params: PyTree, *, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our parameters in diffusers' layout and names (for ``safetensors.numpy.save_file``)."""
  return core.state_from_tree(params, controlnet_key, dtype=dtype)


def controlnet_config(module: ControlNetModel) -> dict[str, Any]:
  """diffusers' ``config.json`` of ``module`` (``_class_name`` and the architecture keys)."""
  config = {'_class_name': 'ControlNetModel'}
  for field in dataclasses.fields(module):
    if field.name in _NOT_CONFIG:
      continue
    value = getattr(module, field.name)
    config[field.name] = list(value) if isinstance(value, tuple) else value
  return config


def save_controlnet(directory: str | epath.PathLike, module: ControlNetModel, params: PyTree, *,
                    dtype: Any = None) -> epath.Path:
  """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (diffusers' layout).

  Args:
    directory: created if missing; existing files of those names are replaced.
    module: the ControlNet (its fields become the config).
    params: its parameters.
    dtype: dtype of the saved tensors (e.g. ``np.float16``); default the parameters'.

  Returns:
    The directory, which ``load_controlnet`` and diffusers' ``ControlNetModel.from_pretrained``
    read.
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.json').write_text(json.dumps(controlnet_config(module), indent=2))
  (directory / WEIGHTS_NAME).write_bytes(
      st_numpy.save(controlnet_state(params, dtype=dtype), metadata={'format': 'pt'}))
  return directory


__all__ = ['MODULE_LISTS', 'controlnet_config', 'controlnet_key', 'controlnet_shapes',
           'controlnet_state', 'load_controlnet', 'save_controlnet']
