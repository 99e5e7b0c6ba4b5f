"""The package works installed non-editable and run from another directory: no file of the
repository but the config given by path is read (configs import ``diffusion_jax.configs``)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import setuptools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# conftest.py's persistent XLA cache: the runs below compile what the other tests compile.
_CACHE = os.environ.get('DIFFUSION_JAX_TEST_CACHE') or os.path.join(tempfile.gettempdir(),
                                                                    'diffusion_jax_test_xla_cache')


def _can_build_wheels() -> bool:
  """setuptools builds wheels itself from 70.1 on; before that it needs the ``wheel`` package."""
  version = tuple(int(p) for p in setuptools.__version__.split('.')[:2])
  return version >= (70, 1) or importlib.util.find_spec('wheel') is not None


def _install(src: str, site: str) -> None:
  """Installs the repository's package into ``site`` as a wheel would lay it out (no network).

  It builds from a copy of the sources in ``src``: a build without isolation writes build/ into the
  source tree, whose stale files (modules since deleted) a later build would ship.
  """
  for name in ('setup.py', 'setup.cfg', 'README.md'):
    shutil.copy(os.path.join(REPO, name), src)
  shutil.copytree(os.path.join(REPO, 'diffusion_jax'), os.path.join(src, 'diffusion_jax'),
                  ignore=shutil.ignore_patterns('__pycache__'))
  if _can_build_wheels():
    cmd = [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation',
           '--no-index', '--quiet', '--target', site, src]
  else:
    # No wheel builder here: setup.py build_py copies the same files a wheel holds (the packages
    # that setup.cfg's find: lists), which is what an installed copy has to import.
    cmd = [sys.executable, 'setup.py', '--quiet', 'build_py', '--build-lib', site]
  subprocess.run(cmd, cwd=src, check=True, capture_output=True, timeout=300)


def _metrics_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['step'] for r in map(json.loads, f) if 'loss' in r]


def test_installed_package_trains_resumes_and_samples_from_another_directory(tmp_path):
  src, site, workdir = tmp_path / 'src', str(tmp_path / 'site'), str(tmp_path / 'run')
  src.mkdir()
  _install(str(src), site)
  for sub in ('configs', 'training'):
    assert os.path.exists(os.path.join(site, 'diffusion_jax', sub, '__init__.py')), (
        f'diffusion_jax.{sub} is missing from the installed package: check setup.cfg packages')
  env = dict(os.environ, PYTHONPATH=site, JAX_PLATFORMS='cpu')

  def run(*args):
    return subprocess.run([sys.executable, *args], cwd=str(tmp_path), env=env, check=False,
                          capture_output=True, text=True, timeout=300)

  out = run('-c', 'import diffusion_jax; print(diffusion_jax.__file__)')
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == os.path.join(site, 'diffusion_jax', '__init__.py'), out.stdout

  main = ['-m', 'diffusion_jax.main', f'--config={REPO}/configs/tiny.py', f'--workdir={workdir}',
          '--config.training.log_every=1', '--config.training.checkpoint_every=2',
          f'--config.training.compilation_cache_dir={_CACHE}']
  out = run(*main, '--config.training.num_train_steps=2')
  assert out.returncode == 0, out.stderr[-3000:]
  assert _metrics_steps(workdir) == [1, 2]
  out = run(*main, '--config.training.num_train_steps=3')  # resumes at step 2
  assert out.returncode == 0, out.stderr[-3000:]
  assert _metrics_steps(workdir) == [1, 2, 3]  # steps 1-2 not redone
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == '3', (
      os.listdir(os.path.join(workdir, 'checkpoints')))

  out = run(*main, '--config.training.num_train_steps=3', '--mode=sample')
  assert out.returncode == 0, out.stderr[-3000:]
  data = np.load(os.path.join(workdir, 'samples', 'ddim_3_step3.npz'))
  assert data['images'].shape == (6, 8, 8, 1) and data['images'].dtype == np.uint8
