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
``ValueError`` naming the key and both shapes. Tensors are read from safetensors files one at a
time as they are converted (``SafetensorsFile``; never pickle, never torch; bfloat16 through
``ml_dtypes``), and each is placed on the device before the next is read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util

PyTree = Any
Path = tuple[str, ...]

_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}
_INDEXED = re.compile(r'^(.*)_(\d+)$')


_DTYPES = {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32, 'F64': np.float64,
           'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
           'BOOL': np.bool_}


class SafetensorsFile(Mapping[str, np.ndarray]):
  """The tensors of one ``.safetensors`` file, each read from disk when it is looked up.

  Only the JSON header is read up front (keys, dtypes, shapes, ``metadata``); ``file[key]`` reads
  that tensor's bytes into a fresh NumPy array (bfloat16 through ``ml_dtypes``). Nothing is
  cached, so a loader that converts and places one tensor at a time holds one copy of the
  weights, not two or three (the whole file as bytes, then arrays, then device buffers).

  Why not safetensors' own NumPy API: ``load(bytes)`` needs the whole file in memory beside its
  arrays, ``safe_open`` maps the file (its pages count in the process's memory until closed) and
  takes local paths only, and neither reads bfloat16. The format is an 8-byte little-endian
  header length, a JSON header ``{key: {dtype, shape, data_offsets}}`` and the raw
  little-endian data; every entry is checked against the file's size when it is opened.

  Raises (on construction):
    FileNotFoundError: no such file.
    ValueError: not a safetensors file (bad header length, JSON, dtype, shape or offsets).
  """

  def __init__(self, path: str | epath.PathLike):
    self.path = epath.Path(path)
    if not self.path.exists():
      raise FileNotFoundError(f'no weights file {self.path}.')
    with self.path.open('rb') as f:
      first = f.read(8)
      n = int.from_bytes(first, 'little') if len(first) == 8 else -1
      f.seek(0, 2)
      size = f.tell()
      if not 2 <= n <= size - 8:
        self._bad(f'header length {n} for a file of {size} bytes')
      f.seek(8)
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        self._bad(f'header is not JSON ({e})')
    if not isinstance(header, dict):
      self._bad('header is not a JSON object')
    self.metadata: dict[str, str] = header.pop('__metadata__', None) or {}
    self._start = 8 + n
    data = size - self._start
    self._entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
    for key, info in header.items():
      try:
        dtype = np.dtype(_DTYPES[info['dtype']])
        shape = tuple(int(d) for d in info['shape'])
        start, end = (int(x) for x in info['data_offsets'])
      except (KeyError, TypeError, ValueError):
        self._bad(f'entry {key!r} is {info!r} (dtype one of {sorted(_DTYPES)}, shape, '
                  'data_offsets)')
      if not 0 <= start <= end <= data or end - start != math.prod(shape) * dtype.itemsize:
        self._bad(f'entry {key!r}: offsets {start}..{end} do not hold {shape} {dtype} within '
                  f'the {data} data bytes')
      self._entries[key] = (dtype, shape, start, end)

  def _bad(self, what: str):
    raise ValueError(f'{self.path} is not a readable safetensors file: {what}.')

  def __getitem__(self, key: str) -> np.ndarray:
    dtype, shape, start, end = self._entries[key]
    out = np.empty(shape, dtype)
    raw = out.reshape(-1).view(np.uint8)
    with self.path.open('rb') as f:
      f.seek(self._start + start)
      if hasattr(f, 'readinto'):
        got = f.readinto(raw)
      else:  # file objects of some remote filesystems
        chunk = f.read(end - start)
        got = len(chunk)
        raw[:got] = np.frombuffer(chunk, np.uint8)
    if got != end - start:
      self._bad(f'tensor {key!r} is cut short')
    return out

  def __iter__(self):
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: object) -> bool:
    return key in self._entries

  def shape(self, key: str) -> tuple[int, ...]:
    """The shape of ``key`` without reading it."""
    return self._entries[key][1]


class _View(Mapping[str, np.ndarray]):
  """Keys that each name a tensor of some mapping (``{key: (source, source_key)}``), read when
  looked up: a renamed state, or the files of a sharded component."""

  def __init__(self, entries: Mapping[str, tuple[Mapping[str, np.ndarray], str]]):
    self._entries = dict(entries)

  def __getitem__(self, key: str) -> np.ndarray:
    source, source_key = self._entries[key]
    return source[source_key]

  def __iter__(self):
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: object) -> bool:
    return key in self._entries


def renamed(state: Mapping[str, np.ndarray], fn: Callable[[str], str | None]
            ) -> Mapping[str, np.ndarray]:
  """``state`` with each key ``k`` as ``fn(k)`` (dropped where None), nothing read.

  Raises:
    ValueError: two keys renamed to the same one.
  """
  names = {}
  for key in state:
    new = fn(key)
    if new is None:
      continue
    if new in names:
      raise ValueError(f'keys {names[new]!r} and {key!r} both become {new!r}.')
    names[new] = key
  return _View({new: (state, old) for new, old in names.items()})


def read_safetensors(path: str | epath.PathLike) -> SafetensorsFile:
  """The tensors of one ``.safetensors`` file: a mapping key -> NumPy array, read on lookup.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a safetensors file.
  """
  return SafetensorsFile(path)


def read_component(directory: str | epath.PathLike, *, variant: str | None = None,
                   names: Iterable[str] = ('diffusion_pytorch_model', 'model')
                   ) -> Mapping[str, np.ndarray]:
  """The tensors of one component directory of a diffusers pipeline (``unet/``, ``vae/``, ...).

  A mapping key -> NumPy array whose tensors are read from disk when looked up
  (``SafetensorsFile``).

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
      files = {}
      for shard in shards:
        f = read_safetensors(directory / shard)
        files.update((key, (f, key)) for key in f)
      return _View(files)
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
    A nested dict like ``shapes`` of arrays on the default device, placed one at a time.

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
    raw = np.asarray(state[key])
    value = _to_ours(path[-1], raw, tuple(target.shape))
    if value.shape != tuple(target.shape):
      raise ValueError(f'{component}: tensor {key!r} has shape {tuple(raw.shape)}, the model '
                       f'expects {_torch_shape(path[-1], target.shape)} (our parameter '
                       f'{"/".join(path)}): the weights are for another configuration.')
    # Placed leaf by leaf, so that the host copy of one tensor at a time is all that is held
    # beside the device's (with ``read_component``'s lazy reads: one copy of the weights).
    out[path] = jax.device_put(value.astype(dtype or target.dtype))
    del raw, value
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


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> Mapping[str, np.ndarray]:
  """The entries of ``state`` under ``prefix`` (e.g. ``'text_model.'``), with it removed (a view:
  nothing is read)."""
  return renamed(state, lambda k: k[len(prefix):] if k.startswith(prefix) else None)


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


__all__ = ['SafetensorsFile', 'cast', 'read_component', 'read_config', 'read_safetensors', 'renamed',
           'shapes_of', 'state_from_tree', 'strip_prefix', 'torch_key', 'tree_from_state']
