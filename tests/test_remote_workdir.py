"""A whole run (train, resume, sample, evaluate) in a workdir on a non-local path.

The path is ``gs://bucket/run`` on a fake GCS: etils.epath's 'gs' backend and orbax's TensorStore
kvstore for gs:// are both pointed at a local directory standing in for the bucket. Everything the
trainer writes must go through those two (epath, orbax); a writer that used ``os``/``open`` on the
literal path would create a local folder named ``gs:`` instead, which the test forbids.
"""

import contextlib
import json
import os
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

from configs import tiny
from diffusion_jax import training


class _LocalBucket(backend_lib._OsPathBackend):  # pylint: disable=protected-access
  """epath backend: ``gs://bucket/path`` -> ``root/bucket/path`` on the local disk."""

  def __init__(self, root: str):
    self.root = root

  def local(self, path) -> str:
    path = os.fspath(path)
    if not path.startswith('gs://'):
      raise AssertionError(f'the fake bucket got a non-gs path: {path}')
    return os.path.join(self.root, path[len('gs://'):])


def _one_path(name):
  def method(self, path, *args, **kwargs):
    return getattr(backend_lib._OsPathBackend, name)(self, self.local(path), *args, **kwargs)  # pylint: disable=protected-access
  return method


def _two_paths(name):
  def method(self, path, dst, *args, **kwargs):
    return getattr(backend_lib._OsPathBackend, name)(  # pylint: disable=protected-access
        self, self.local(path), self.local(dst), *args, **kwargs)
  return method


for _name in ('open', 'exists', 'isdir', 'listdir', 'glob', 'walk', 'makedirs', 'mkdir', 'rmtree',
              'remove', 'stat'):
  setattr(_LocalBucket, _name, _one_path(_name))
for _name in ('rename', 'replace', 'copy'):
  setattr(_LocalBucket, _name, _two_paths(_name))


@contextlib.contextmanager
def fake_gcs(root: str):
  """gs:// paths of epath and of orbax's TensorStore writes land under ``root``."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=import-outside-toplevel
  bucket = _LocalBucket(root)
  table = dict(gpath._PREFIX_TO_BACKEND, gs=bucket)  # pylint: disable=protected-access
  with mock.patch.object(gpath, '_PREFIX_TO_BACKEND', table), \
       mock.patch.object(gcs_utils, 'get_kvstore_for_gcs',
                         lambda path: {'driver': 'file', 'path': bucket.local(path)}), \
       mock.patch.object(gcs_utils, 'is_hierarchical_namespace_enabled', lambda *a, **k: False):
    yield


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch):
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  return cwd


def test_a_whole_run_in_a_gs_workdir(tmp_path, in_empty_dir):
  bucket_root = str(tmp_path / 'bucket_root')
  workdir = 'gs://bucket/run'
  config = tiny.get_config()
  config.training.num_train_steps = 2
  config.training.log_every = 1
  config.training.checkpoint_every = 1
  config.training.num_sample_images = 4
  config.training.sample_every = 2
  config.eval.dequantize = 'none'
  with fake_gcs(bucket_root):
    training.train_and_evaluate(config, workdir)
    config.training.num_train_steps = 3  # resume from step 2 on the same bucket
    state = training.train_and_evaluate(config, workdir)
    npz = training.sample(config, workdir)
    metrics = training.evaluate(config, workdir)
    run = epath.Path(workdir)
    rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    with epath.Path(npz).open('rb') as f:
      samples = np.load(f)
      images = samples['images']
    names = {p.name for p in run.iterdir()}
    steps = sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit())
    pngs = sorted(p.name for p in (run / 'samples').iterdir() if p.name.endswith('.png'))
    events = list((run / 'tensorboard').glob('*tfevents*'))

  assert int(state.step) == 3
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3]  # the resumed run appended
  assert np.isfinite(metrics['eval_bpd'])
  assert images.shape == (config.sampling.num_samples, 8, 8, 1) and images.dtype == np.uint8
  assert str(npz).startswith('gs://bucket/run/samples/')
  assert {'checkpoints', 'config.json', 'metrics.jsonl', 'samples', 'tensorboard'} <= names
  assert steps and steps[-1] == 3
  assert 'step_0000002.png' in pngs and any(p.startswith('ddim_3_step3') for p in pngs)
  assert events and all(e.stat().length > 0 for e in events)
  # Nothing reached the local disk under the literal path, and all of it is in the bucket.
  assert not list(in_empty_dir.iterdir()), list(in_empty_dir.iterdir())
  assert os.path.isdir(os.path.join(bucket_root, 'bucket', 'run', 'checkpoints', '3'))
