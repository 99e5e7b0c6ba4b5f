"""The trainer on 8 CPU devices: every mesh trains and samples like one device.

configs/tiny.py (its MLP on a small array data set, see MODEL) trains for 4 steps on one device in
this process (the reference) and on 8 forced CPU devices in one subprocess (tests/mesh_worker.py;
the device count must be set before jax starts): on the mesh (8, 1) (data parallel) and (4, 2)
(FSDP, with `mesh.fsdp_min_size` low enough that the tiny model's kernels are really split), and
with `steps_per_call=2` (a `lax.scan` over stacked batches). The same worker samples
(`training.sample`, what `--mode=sample` runs) from the reference's checkpoint with the batch split
over 8 devices, and checks the bad-input messages.

Tolerances. Every run sees the same global batches and the same noise (keys come from the step
number; threefry draws do not depend on the sharding), so the only difference between meshes is
the order of float32 reductions: per-device partial sums of the loss and the gradients, combined
by an all-reduce, instead of one sum on one device. That moves the loss by a few ulps and the
gradients by ~1e-7 relative; Adam divides by sqrt(v), which keeps such differences at the same
relative size in the updates. Measured (MLP, 4 steps of lr 2e-3): max |param difference| 3e-8 on
both meshes; steps_per_call=2 bitwise equal to 1; samples bitwise equal. The bounds leave margin
for other CPUs and XLA versions.

The MLP runs every variant (its step compiles in a second or two); tiny.py's U-Net runs once more
on the FSDP mesh (4, 2) against one device (UNET, `test_unet_on_an_fsdp_mesh_trains_like_one_device`:
conv kernels split, GroupNorm, attention and dropout on data shards), which became affordable once
the U-Net step compiled in ~10 s.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'mesh_worker.py')
NUM_DEVICES = 8
# Shared by every run: one checkpoint at the end; one sampler batch of 8 whatever the device count
# (training.sample rounds its batch up to a multiple of the device count, and the start noise is
# drawn per batch, so only equal batches give comparable samples).
BASE = {'training.checkpoint_every': 4, 'sampling.num_samples': 8, 'sampling.batch_size': 8}
MODEL = {'model.name': 'mlp', 'data.source': 'array'}  # data.path: the `base` fixture
# tiny.py's own U-Net on its 8x8 digits: convolutions, GroupNorm, attention and dropout sharded.
# Adam's eps = 1 makes the update linear in the gradient, so the comparison sees the sharded
# gradients themselves: with eps = 1e-8 a gradient element of ~1e-10 (the zero-initialized output
# convs have many) becomes a +-lr update whose sign rounding decides; measured max |difference|
# 1.8e-5 with eps = 1e-8 (a sizable part of the 1e-4 the warm-up lets a parameter move in 4 steps)
# against 1.75e-10 with eps = 1.
UNET = {'model.name': 'unet', 'data.source': 'digits', 'optim.eps': 1.0}
DIM = 4
PARAM_ATOL = 1e-6  # max |param difference| after 4 steps; see the module docstring
LOSS_RTOL = 1e-5  # logged loss (mean of 2 steps)
SAMPLE_ATOL = 1e-5  # 3 DDIM steps from identical params and noise


def _config(overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def _params(workdir):
  with np.load(os.path.join(workdir, 'final_params.npz')) as f:
    return dict(f)


def _max_abs_diff(a, b):
  assert sorted(a) == sorted(b)
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """The overrides of every run, with a data set of 256 vectors."""
  path = tmp_path_factory.mktemp('data') / 'vectors.npz'
  np.savez(path, x=np.random.default_rng(0).normal(size=(256, DIM)).astype(np.float32))
  return {**BASE, **MODEL, 'data.path': str(path)}


def _train_on_one_device(config, workdir):
  """Trains in this process; returns the reference dict (final params and EMA, logged losses)."""
  state = training.train_and_evaluate(config, workdir)
  params = {}
  for group, tree in (('params', state.params), ('ema_params', state.ema_params)):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
      params['/'.join([group] + [str(k.key) for k in path])] = np.asarray(leaf)
  return {'workdir': workdir, 'num_devices': jax.device_count(), 'params': params,
          'losses': _losses(workdir)}


@pytest.fixture(scope='module')
def reference(base, tmp_path_factory):
  """Train 4 steps and sample on one device, in this process."""
  config = _config(base)
  ref = _train_on_one_device(config, str(tmp_path_factory.mktemp('one_device')))
  ref['samples'] = np.load(training.sample(config, ref['workdir']))['x']
  return ref


@pytest.fixture(scope='module')
def unet_reference(base, tmp_path_factory):
  """tiny.py's U-Net trained 4 steps on one device, in this process."""
  return _train_on_one_device(_config({**base, **UNET}),
                              str(tmp_path_factory.mktemp('unet_one_device')))


@pytest.fixture(scope='module')
def worker(base, reference, tmp_path_factory):
  """Every 8-device job in one subprocess; returns {name: (result, workdir)}."""
  root = tmp_path_factory.mktemp('eight_devices')
  sample_dir = root / 'sample'
  shutil.copytree(os.path.join(reference['workdir'], 'checkpoints'), sample_dir / 'checkpoints')
  jobs = {
      'bad_mesh': ('train', {'mesh.data': 3}),
      'bad_batch': ('train', {'training.batch_size': 12}),
      'mesh_8x1': ('train', {'mesh.data': 8, 'mesh.fsdp': 1}),
      'mesh_4x2': ('train', {'mesh.data': 4, 'mesh.fsdp': 2, 'mesh.fsdp_min_size': 256}),
      'steps_per_call_2': ('train', {'mesh.data': 8, 'training.steps_per_call': 2}),
      'unet_mesh_4x2': ('train', {**UNET, 'mesh.data': 4, 'mesh.fsdp': 2,
                                  'mesh.fsdp_min_size': 256}),
      'sample': ('sample', {}),
  }
  spec = {}
  for name, (kind, overrides) in jobs.items():
    workdir = sample_dir if kind == 'sample' else root / name
    spec[name] = {'kind': kind, 'workdir': str(workdir), 'overrides': {**base, **overrides}}
  (root / 'jobs.json').write_text(json.dumps(spec))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={NUM_DEVICES}',
             DIFFUSION_JAX_TEST_CACHE=jax.config.jax_compilation_cache_dir or '')
  out = subprocess.run([sys.executable, WORKER, str(root / 'jobs.json')], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  results = {}
  for line in out.stdout.splitlines():
    if line.startswith('RESULT '):
      r = json.loads(line[len('RESULT '):])
      results[r['name']] = (r, spec[r['name']]['workdir'])
  assert out.returncode == 0 and len(results) == len(jobs), (
      f'worker failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}')
  return results


def _ok(worker, name):
  result, workdir = worker[name]
  assert result['ok'], f'{name}: {result["error"]}: {result["message"]}'
  return result, workdir


def _check_like_one_device(reference, worker, name, mesh):
  """The 8-device run `name` on `mesh` logged the reference's losses and ended with its params."""
  assert reference['num_devices'] == 1
  result, workdir = _ok(worker, name)
  assert result['num_devices'] == NUM_DEVICES and result['mesh'] == mesh and result['step'] == 4
  if mesh['fsdp'] > 1:  # FSDP really splits the kernels, not just replicates everything
    assert any(k.startswith('params/') and k.endswith('kernel') for k in result['fsdp_sharded'])
  losses = _losses(workdir)
  assert sorted(losses) == sorted(reference['losses']) == [2, 4]
  for step, loss in losses.items():
    np.testing.assert_allclose(loss, reference['losses'][step], rtol=LOSS_RTOL)
  diff = _max_abs_diff(_params(workdir), reference['params'])
  assert diff <= PARAM_ATOL, f'{name}: max |params - one device| = {diff:.3g}'
  print(f'{name}: max |params - one device| = {diff:.3g}')
  return result


@pytest.mark.parametrize('name, mesh', [('mesh_8x1', {'data': 8, 'fsdp': 1}),
                                        ('mesh_4x2', {'data': 4, 'fsdp': 2})])
def test_mesh_trains_like_one_device(reference, worker, name, mesh):
  _check_like_one_device(reference, worker, name, mesh)


def test_unet_on_an_fsdp_mesh_trains_like_one_device(unet_reference, worker):
  """The same comparison with tiny.py's U-Net: conv kernels FSDP-split, GroupNorm statistics and
  attention computed on data shards, dropout drawn per shard."""
  result = _check_like_one_device(unet_reference, worker, 'unet_mesh_4x2', {'data': 4, 'fsdp': 2})
  assert any('Conv' in k for k in result['fsdp_sharded'])


def test_steps_per_call_2_matches_one_step_per_call(worker):
  _, one = _ok(worker, 'mesh_8x1')
  result, two = _ok(worker, 'steps_per_call_2')
  assert result['step'] == 4
  diff = _max_abs_diff(_params(two), _params(one))
  # Same mesh, same batches and keys; the scan body may fuse differently, so not always bitwise.
  assert diff <= PARAM_ATOL, f'steps_per_call 2 vs 1: max |params difference| = {diff:.3g}'
  print(f'steps_per_call 2 vs 1 on (8, 1): max |params difference| = {diff:.3g}')
  np.testing.assert_allclose(list(_losses(two).values()), list(_losses(one).values()),
                             rtol=LOSS_RTOL)


def test_sampling_sharded_over_8_devices_matches_one_device(reference, worker):
  result, _ = _ok(worker, 'sample')
  assert result['num_devices'] == NUM_DEVICES
  samples = np.load(result['path'])['x']
  assert samples.shape == (8, DIM) == reference['samples'].shape
  assert np.isfinite(samples).all()
  diff = float(np.max(np.abs(samples - reference['samples'])))
  assert diff <= SAMPLE_ATOL, f'max |samples - one device| = {diff:.3g}'


def test_mesh_that_does_not_match_the_devices_names_the_field(worker):
  result, _ = worker['bad_mesh']
  assert not result['ok'] and result['error'] == 'ValueError', result
  assert 'mesh.data' in result['message'] and '8 devices' in result['message'], result['message']


def test_batch_not_divisible_by_the_devices_names_the_field(worker):
  result, _ = worker['bad_batch']
  assert not result['ok'] and result['error'] == 'ValueError', result
  assert 'training.batch_size=12' in result['message'], result['message']
