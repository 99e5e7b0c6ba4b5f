"""weights.core's safetensors reader against safetensors' own writers and readers."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import numpy as st_numpy
from safetensors import torch as st_torch

from diffusion_jax.weights import core


def _arrays():
  rng = np.random.default_rng(0)
  return {'f32': rng.standard_normal((3, 4)).astype(np.float32),
          'f16': rng.standard_normal((2, 5)).astype(np.float16),
          'f64': rng.standard_normal(7),
          'i64': rng.integers(-9, 9, (2, 2, 2)),
          'i8': rng.integers(-9, 9, (4,)).astype(np.int8),
          'u8': rng.integers(0, 255, (3,)).astype(np.uint8),
          'b': np.array([True, False, True]),
          'scalar': np.array(2.5, np.float32),
          'empty': np.zeros((0, 3), np.float32)}


def test_reads_what_safetensors_writes(tmp_path):
  arrays = _arrays()
  path = tmp_path / 'a.safetensors'
  path.write_bytes(st_numpy.save(arrays, metadata={'format': 'pt', 'x': 'y'}))
  state = core.read_safetensors(path)
  assert sorted(state) == sorted(arrays) and len(state) == len(arrays)
  assert state.metadata == {'format': 'pt', 'x': 'y'}
  reference = st_numpy.load_file(str(path))
  for key, value in reference.items():
    got = state[key]
    assert got.dtype == value.dtype and got.shape == value.shape == state.shape(key)
    np.testing.assert_array_equal(got, value)
    got[...] = 0 if got.size else got  # a fresh, writable array on each lookup
    np.testing.assert_array_equal(state[key], value)
  assert 'nothing' not in state
  with pytest.raises(KeyError):
    state['nothing']  # pylint: disable=pointless-statement


def test_reads_bfloat16_written_by_torch(tmp_path):
  value = torch.randn(4, 3).to(torch.bfloat16)
  path = tmp_path / 'b.safetensors'
  st_torch.save_file({'w': value, 'v': torch.arange(5.0)}, str(path))
  state = core.read_safetensors(path)
  assert state['w'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(state['w'].astype(np.float32), value.float().numpy())
  np.testing.assert_array_equal(state['v'], np.arange(5.0, dtype=np.float32))


def test_sharded_component(tmp_path):
  arrays = _arrays()
  keys = sorted(arrays)
  first, second = keys[:4], keys[4:]
  (tmp_path / 'model-1.safetensors').write_bytes(st_numpy.save({k: arrays[k] for k in first}))
  (tmp_path / 'model-2.safetensors').write_bytes(st_numpy.save({k: arrays[k] for k in second}))
  weight_map = {**{k: 'model-1.safetensors' for k in first},
                **{k: 'model-2.safetensors' for k in second}}
  (tmp_path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  state = core.read_component(tmp_path, names=('model',))
  assert sorted(state) == keys
  for k in keys:
    np.testing.assert_array_equal(state[k], arrays[k])
  view = core.strip_prefix(state, 'f')
  assert sorted(view) == ['16', '32', '64']
  np.testing.assert_array_equal(view['32'], arrays['f32'])
  with pytest.raises(ValueError, match='both become'):
    core.renamed(state, lambda k: 'same')


@pytest.mark.parametrize('damage, message', [
    (lambda b: b[:5], 'header length'),
    (lambda b: (10**9).to_bytes(8, 'little') + b[8:], 'header length'),
    (lambda b: b[:8] + b'x' + b[9:], 'not JSON'),
    (lambda b: b[:-4], 'offsets'),
    (lambda b: b.replace(b'"F32"', b'"Q32"'), 'dtype one of'),
])
def test_damaged_files_are_named(tmp_path, damage, message):
  good = st_numpy.save({'w': np.ones((2, 3), np.float32)})
  path = tmp_path / 'bad.safetensors'
  path.write_bytes(damage(good))
  with pytest.raises(ValueError, match=f'bad.safetensors is not a readable safetensors file.*'
                     f'{message}'):
    core.read_safetensors(path)
  with pytest.raises(FileNotFoundError, match='no weights file'):
    core.read_safetensors(tmp_path / 'missing.safetensors')
