"""Runs trainer jobs in a fresh process on the devices XLA_FLAGS asks for; prints JSON results.

Used by tests/test_mesh_training.py: `--xla_force_host_platform_device_count` is read once, when
jax's CPU backend starts, and the pytest process has already started it with one device. One
worker runs every job in sequence, so jax starts (and shared programs compile) only once.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_worker.py jobs.json

`jobs.json` maps a job name to `{"kind": "train" | "sample", "workdir": str, "overrides":
{"training.steps_per_call": 2, ...}}` (fields of configs/tiny.py). For each job the worker prints
one line `RESULT {"name": ..., "ok": true, ...}`, or `"ok": false` with the exception's type and
message. A "train" job also writes its final params and EMA params to
`<workdir>/final_params.npz` (keys `params/<path>` and `ema_params/<path>`).
"""

import json
import os
import sys

import jax
import numpy as np

from diffusion_jax import configs, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  """configs/tiny.py's config, loaded by its path (as --config=configs/tiny.py does)."""
  return configs.load(os.path.join(REPO, 'configs', 'tiny.py')).get_config()


def config_with(overrides: dict):
  config = tiny_config()
  for dotted, value in overrides.items():
    node = config
    *path, leaf = dotted.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def flat(tree) -> dict:
  """`{'params/Conv_0/kernel': leaf, ...}` for a tree of nested dicts."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf for path, leaf in leaves}


def run(job: dict) -> dict:
  config = config_with(job['overrides'])
  workdir = job['workdir']
  if job['kind'] == 'train':
    state = training.train_and_evaluate(config, workdir)
    leaves = flat({'params': state.params, 'ema_params': state.ema_params})
    np.savez(os.path.join(workdir, 'final_params.npz'),
             **{k: np.asarray(v) for k, v in leaves.items()})
    specs = {k: v.sharding.spec for k, v in leaves.items()}
    some = next(iter(leaves.values()))
    return {'step': int(state.step), 'num_devices': jax.device_count(),
            'mesh': dict(some.sharding.mesh.shape),
            'fsdp_sharded': sorted(k for k, s in specs.items() if 'fsdp' in tuple(s))}
  if job['kind'] == 'sample':
    path = training.sample(config, workdir)
    return {'path': path, 'num_devices': jax.device_count()}
  raise ValueError(f'unknown job kind {job["kind"]!r}')


def main() -> None:
  cache = os.environ.get('DIFFUSION_JAX_TEST_CACHE')
  if cache:  # the same persistent compilation cache as the pytest process (tests/conftest.py)
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  with open(sys.argv[1]) as f:
    jobs = json.load(f)
  for name, job in jobs.items():
    try:
      result = dict(ok=True, **run(job))
    except Exception as e:  # pylint: disable=broad-except
      result = {'ok': False, 'error': type(e).__name__, 'message': str(e)}
    print('RESULT ' + json.dumps(dict(name=name, **result)), flush=True)


if __name__ == '__main__':
  main()
