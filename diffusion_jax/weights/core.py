"""PyTorch-layout tensors <-> our Flax parameter trees: read safetensors, convert by a key table.

Importing weights is a table, not a search: each network names its modules so that a parameter's
path maps onto the source's key by a short function (``key_fn``), and ``tree_from_state`` fills
the tree that ``jax.eval_shape`` of our model describes, one key at a time, transposing layouts:

=============================  ==========================  ================================
our leaf                       PyTorch tensor              transform
=============================  ==========================  ================================
``kernel`` [kh, kw, I, O]      ``weight`` [O, I, kh, kw]    ``transpose(2, 3, 1, 0)`` (OIHW -> HWIO)
``kernel`` [I, O]              ``weight`` [O, I]            ``.T``; a 1x1 conv [O, I, 1, 1] is
                                                            accepted for a Linear (old VAE files)
``scale``, ``embedding``       ``weight``                   as is
``bias`` and anything else     same name                    as is
=============================  ==========================  ================================

A missing tensor, a tensor of another shape, or a tensor of the file that nothing used is a
``ValueError`` naming the key and both shapes. Tensors are read with safetensors' NumPy API
(never pickle, never torch); bfloat16 tensors, which NumPy cannot name, are read through
``ml_dtypes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util
from safetensors import numpy as st_numpy

PyTree = Any
Path = tuple[str, ...]

_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}
_INDEXED = re.compile(r'^(.*)_(\d+)$')


def read_safetensors(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as NumPy arrays (bfloat16 through ml_dtypes).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a safetensors file.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'no weights file {path}.')
  data = path.read_bytes()
  try:
    return st_numpy.load(data)
  except Exception as e:  # pylint: disable=broad-except
    if 'bfloat16' not in str(e):
      raise ValueError(f'{path} is not a readable safetensors file: {e}') from e
  return _load_with_bfloat16(data)


def _load_with_bfloat16(data: bytes) -> dict[str, np.ndarray]:
  """safetensors' format by hand (8-byte header size, JSON header, raw little-endian data)."""
  n = int.from_bytes(data[:8], 'little')
  header = json.loads(data[8:8 + n])
  header.pop('__metadata__', None)
  dtypes = {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32, 'F64': np.float64,
            'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
            'BOOL': np.bool_}
  out = {}
  for name, info in header.items():
    start, end = info['data_offsets']
    buf = data[8 + n + start:8 + n + end]
    out[name] = np.frombuffer(buf, dtype=dtypes[info['dtype']]).reshape(info['shape']).copy()
  return out


def read_component(directory: str | epath.PathLike, *, variant: str | None = None,
                   names: Iterable[str] = ('diffusion_pytorch_model', 'model')
                   ) -> dict[str, np.ndarray]:
  """The tensors of one component directory of a diffusers pipeline (``unet/``, ``vae/``, ...).

  Looks for ``{name}[.{variant}].safetensors`` and the sharded form
  ``{name}[.{variant}].safetensors.index.json`` for each of ``names`` in order.

  Args:
    directory: the component's directory.
    variant: e.g. ``'fp16'`` for ``diffusion_pytorch_model.fp16.safetensors``.
    names: file stems to try.

  Raises:
    FileNotFoundError: no safetensors file; the message says when only pickle (``.bin``/``.ckpt``)
      files are there, which are never read.
  """
  directory = epath.Path(directory)
  suffix = f'.{variant}' if variant else ''
  for name in names:
    single = directory / f'{name}{suffix}.safetensors'
    if single.exists():
      return read_safetensors(single)
    index = directory / f'{name}{suffix}.safetensors.index.json'
    if index.exists():
      shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
      out = {}
      for shard in shards:
        out.update(read_safetensors(directory / shard))
      return out
  found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
  pickles = [f for f in found if f.endswith(('.bin', '.ckpt', '.pt', '.pth'))]
  hint = (f' Only pickle files are there ({", ".join(pickles)}), which are never loaded: convert '
          'them to safetensors (e.g. diffusers save_pretrained(safe_serialization=True)).'
          if pickles else '')
  wanted = ', '.join(f'{n}{suffix}.safetensors' for n in names)
  raise FileNotFoundError(f'no weights in {directory}: looked for {wanted} (or a sharded '
                          f'.index.json); the directory holds {found or "nothing"}.{hint}')


def read_config(directory: str | epath.PathLike, *, component: str, layout: str,
                class_name: str | None = None, other: str = '') -> dict[str, Any]:
  """``directory/config.json`` of one diffusers component, checked.

  Args:
    directory: the component's directory.
    component: its name in messages (``'U-Net'``).
    layout: what such a directory is (``'a diffusers unet/ directory'``).
    class_name: the ``_class_name`` required (a missing one is taken as it); None: any.
    other: said after the class mismatch (e.g. which architectures those are).

  Raises:
    FileNotFoundError: no config.json (the message lists what the directory holds).
    ValueError: invalid JSON, or another ``_class_name``.
  """
  directory = epath.Path(directory)
  path = directory / 'config.json'
  if not path.exists():
    found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    raise FileNotFoundError(f'no {component} config {path}: {layout} holds config.json and '
                            f'diffusion_pytorch_model.safetensors; {directory} holds '
                            f'{found or "nothing (or does not exist)"}.')
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e
  name = config.get('_class_name', class_name)
  if class_name is not None and name != class_name:
    raise ValueError(f'{path} describes a {name}, not a {class_name}{other}.')
  return config


def torch_key(path: Path, *, lists: Collection[str] = ()) -> str:
  """The PyTorch key of our parameter ``path``: dotted, leaf renamed, list indices split off.

  ``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` with ``lists={'down_blocks', 'resnets'}``
  -> ``'down_blocks.0.resnets.1.conv1.weight'``. Only the names in ``lists`` are split, so that
  diffusers' own names with digits (``linear_1``, ``conv_norm_out``) stay as they are.
  """
  parts = []
  for name in path[:-1]:
    m = _INDEXED.match(name)
    if m and m.group(1) in lists:
      parts.extend([m.group(1), m.group(2)])
    else:
      parts.append(name)
  parts.append(_LEAF_TO_TORCH.get(path[-1], path[-1]))
  return '.'.join(parts)


def _to_ours(leaf: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if leaf == 'kernel':
    if value.ndim == 4 and len(shape) == 4:
      return value.transpose(2, 3, 1, 0)
    if value.ndim == 4 and len(shape) == 2 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    if value.ndim == 2:
      return value.T
  return value


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel':
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
      return value.T
  return value


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def tree_from_state(state: Mapping[str, np.ndarray], shapes: PyTree,
                    key_fn: Callable[[Path], str], *, dtype: Any = None,
                    ignore: Callable[[str], bool] = lambda key: False,
                    component: str = 'model') -> PyTree:
  """Our parameter tree from a PyTorch-layout ``state`` dict, by the key table ``key_fn``.

  Args:
    state: PyTorch key -> array (``read_component``'s output, or a prefix-stripped part of it).
    shapes: the tree to fill, e.g. ``jax.eval_shape(model.init, ...)['params']``: leaves with
      ``.shape`` (and ``.dtype``).
    key_fn: our path (tuple of names, leaf last) -> PyTorch key.
    dtype: dtype of the result's leaves; default each leaf's dtype in ``shapes``.
    ignore: keys of ``state`` that may stay unused (buffers such as ``position_ids``).
    component: name used in error messages (``'unet'``, ``'vae'``, ...).

  Returns:
    A nested dict like ``shapes`` of NumPy arrays.

  Raises:
    ValueError: naming the first missing key, the first key whose shape differs (both shapes,
      in PyTorch layout), or the unused keys of ``state``.
  """
  flat = traverse_util.flatten_dict(shapes)
  out, used = {}, set()
  for path, target in flat.items():
    key = key_fn(path)
    if key not in state:
      near = sorted(k for k in state if k.rsplit('.', 1)[0] == key.rsplit('.', 1)[0])[:4]
      raise ValueError(f'{component}: the weights have no tensor {key!r} (our parameter '
                       f'{"/".join(path)}, shape {_torch_shape(path[-1], target.shape)} in '
                       f'PyTorch layout){"; near it: " + ", ".join(near) if near else ""}.')
    value = _to_ours(path[-1], np.asarray(state[key]), tuple(target.shape))
    if value.shape != tuple(target.shape):
      raise ValueError(f'{component}: tensor {key!r} has shape {tuple(state[key].shape)}, the model '
                       f'expects {_torch_shape(path[-1], target.shape)} (our parameter '
                       f'{"/".join(path)}): the weights are for another configuration.')
    out[path] = value.astype(dtype or target.dtype)
    used.add(key)
  unused = sorted(k for k in state if k not in used and not ignore(k))
  if unused:
    raise ValueError(f'{component}: {len(unused)} tensors of the weights match no parameter of the '
                     f'model, e.g. {unused[:5]}: the weights are for another architecture or '
                     'configuration.')
  return traverse_util.unflatten_dict(out)


def state_from_tree(params: PyTree, key_fn: Callable[[Path], str], *,
                    dtype: Any = None) -> dict[str, np.ndarray]:
  """The inverse of ``tree_from_state``: PyTorch key -> array in PyTorch layout (for saving)."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(jax.device_get(value))
    out[key_fn(path)] = np.ascontiguousarray(_to_torch(path[-1], value).astype(dtype or value.dtype))
  return out


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """The entries of ``state`` under ``prefix`` (e.g. ``'text_model.'``), with it removed."""
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def shapes_of(module, *args, **kwargs) -> PyTree:
  """``jax.eval_shape`` of ``module.init(key, *args, **kwargs)['params']``: no memory, no FLOPs.

  Array arguments may be arrays or ``jax.ShapeDtypeStruct`` s (traced either way); other
  arguments (sizes, flags) stay Python values.
  """
  is_array = [isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for a in args]
  arrays = [a for a, t in zip(args, is_array) if t]

  def init(*traced):
    it = iter(traced)
    full = [next(it) if t else a for a, t in zip(args, is_array)]
    return module.init(jax.random.key(0), *full, **kwargs)

  return jax.eval_shape(init, *arrays)['params']


def cast(params: PyTree, dtype: Any) -> PyTree:
  """Every floating leaf of ``params`` as ``dtype`` (a jnp array)."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


__all__ = ['cast', 'read_component', 'read_config', 'read_safetensors', 'shapes_of', 'state_from_tree',
           'strip_prefix', 'torch_key', 'tree_from_state']
