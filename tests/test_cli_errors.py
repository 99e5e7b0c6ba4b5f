"""Errors a user causes end in one line on stderr and exit code 1, with nothing created (issue 21).

Each case runs ``python -m diffusion_jax.main`` on configs/tiny.py as a user would; ``--verbose``
brings the traceback back.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('args, expected', [
    (['--config.training.num_train_step=3'],
     ['--config.training.num_train_step', 'Did you mean "num_train_steps"']),
    (['--mode=sample'], ['No checkpoint in', 'checkpoints', '--mode=train']),
    (['--mode=eval'], ['No checkpoint in', 'checkpoints', '--mode=train']),
])
def test_one_line_and_nothing_created(tmp_path, args, expected):
  workdir = tmp_path / 'run'
  out = _main(f'--workdir={workdir}', *args)
  assert out.returncode == 1, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr[-3000:]
  for text in expected:
    assert text in lines[0]
  assert not workdir.exists()  # neither checkpoints/ nor .jax_cache/


def test_workdir_is_a_file(tmp_path):
  workdir = tmp_path / 'a_file'
  workdir.write_text('not a run')
  out = _main(f'--workdir={workdir}')
  assert out.returncode == 1
  assert out.stderr.strip() == f'error: --workdir={workdir} is a file, not a directory: give a ' \
      'new or an existing run directory.'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']


def test_config_validation_error_then_verbose(tmp_path):
  workdir = tmp_path / 'run'
  bad = ['--config.process.type=rectified_flow', '--config.process.t_eps=0.7']
  out = _main(f'--workdir={workdir}', *bad)
  assert out.returncode == 1
  assert 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: Config field 'process.t_eps'")
  assert not workdir.exists()
  out = _main(f'--workdir={workdir}', *bad, '--verbose')
  assert out.returncode == 1
  assert 'Traceback' in out.stderr and "ValueError: Config field 'process.t_eps'" in out.stderr


# --- a quiet console: JAX's TPU probe on hosts without libtpu --------------------------------------

def _record(name, level, message):
  import logging  # pylint: disable=import-outside-toplevel
  return logging.LogRecord(name, level, '/x/jax/_src/xla_bridge.py', 849, message, None, None)


def test_the_tpu_probe_is_dropped_only_when_libtpu_is_missing():
  import logging  # pylint: disable=import-outside-toplevel
  from diffusion_jax import main  # pylint: disable=import-outside-toplevel
  quiet = main._QuietLibraries()  # pylint: disable=protected-access
  missing = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
             'cannot open shared object file: No such file or directory')
  assert not quiet.filter(_record('jax._src.xla_bridge', logging.INFO, missing))
  # A TPU whose libtpu is there but fails, the same text as a warning, other backends: kept.
  busy = ("Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process "
          'with pid 42.')
  assert quiet.filter(_record('jax._src.xla_bridge', logging.INFO, busy))
  assert quiet.filter(_record('jax._src.xla_bridge', logging.WARNING, missing))
  assert quiet.filter(_record('jax._src.xla_bridge', logging.INFO,
                              "Unable to initialize backend 'cuda': no supported devices found"))
  assert quiet.filter(_record('diffusion_jax', logging.INFO, 'JAX 0.10.2, process 0/1'))
