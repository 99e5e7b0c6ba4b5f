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

Not covered: two processes agreeing on the preemption step (``training.preemption.Preemption`` with
``multihost_utils``). tests/test_multihost.py launches two gloo-connected trainers, but such a
run costs minutes on the 2-core test machine, more than this file's whole budget.

The subprocess runs share one uninterrupted reference run and start together (a module-scoped
fixture); the in-process runs use the MLP on an array data set (the same trainer, checkpointer
and input pipeline, a fraction of the U-Net's compile time).

Figure, counted from what the tests below check: 22 faults injected, 22 survived.
  Survived means: training resumed and ended bitwise identical to an uninterrupted run (SIGKILL,
  SIGTERM, crash while saving), or went on from the previous good checkpoint (truncated and
  scribbled checkpoints), or skipped and counted the bad update or file (NaN batch, corrupt and
  truncated image: training went on; an overflowing update: skipped, then stopped like K NaN
  steps), or stopped with a message naming the cause and left every checkpoint intact (K NaN
  steps in a row, checkpoint of other shapes, restore with unpickling forbidden, 3 missing/empty
  data sets, 7 bad configs: nothing compiled, nothing written).
  Training steps lost: 0 beyond the last checkpoint interval. SIGKILL loses the steps since the
  last checkpoint (at most ``training.checkpoint_every``); SIGTERM loses 0; a damaged newest
  checkpoint or a crash while writing it loses that one interval, retrained on resume; the NaN
  stop loses 0 good steps (its last checkpoint holds the last good state). Measured on one run:
  SIGKILL after step 6 resumed from checkpoint 4 (2 steps redone, identically); SIGTERM, sent
  once step 6 was logged, saved step 7 and the restart began at 7.
"""

import dataclasses
import json
import os
import pathlib
import pickle
import re
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
from diffusion_jax import checkpointing, sharding, training
from diffusion_jax.training import builders
from diffusion_jax.training import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Subprocess runs: long enough to be signalled between checkpoints, short enough to be cheap.
NUM_STEPS = 16
CHECKPOINT_EVERY = 4
SIGNAL_AT = 6  # signal once this step is logged (past checkpoint 4, before 8)
TIMEOUT_S = 540  # per phase of subprocesses; a hung trainer fails the test instead of the suite

# Reading a corrupted checkpoint makes orbax drop reads still in flight; Python reports the
# dropped coroutines whenever they are garbage collected.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _tiny(**overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def _vectors(tmp_path, x) -> str:
  path = str(tmp_path / 'vectors.npz')
  np.savez(path, x=x)
  return path


def _mlp(path, **overrides):
  """tiny.py with the MLP on an array data set: the same trainer, a fraction of the compile time."""
  return _tiny(**{'data.source': 'array', 'data.path': path, 'model.name': 'mlp',
                  'training.log_every': 1, 'training.checkpoint_every': 1,
                  'training.keep_checkpoints': 20, **overrides})


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
  started = []

  def start(name, workdir, sig=None):
    started.append(_Run(workdir, name, sig))
    return started[-1]

  try:
    deadline = time.time() + TIMEOUT_S
    ref = start('reference', root / 'reference')
    # The others start once the reference has compiled (and cached) the training step: on a
    # cold compilation cache three simultaneous compiles of one program triple the cost.
    while not _logged(ref.workdir) and ref.proc.poll() is None:
      if time.time() > deadline:
        pytest.fail(f'the reference run logged no step in time:\n{ref.output()[-3000:]}')
      time.sleep(0.1)
    killed = start('killed', root / 'killed', signal.SIGKILL)
    termed = start('termed', root / 'termed', signal.SIGTERM)
    first = {name: (run, run.wait(deadline)) for name, run in
             (('reference', ref), ('killed', killed), ('termed', termed))}
    after_signal = {name: {'logged': _logged(run.workdir), 'rc': rc,
                           'on_disk': _steps_on_disk(run.workdir),
                           'signalled_at': run.signalled_at}
                    for name, (run, rc) in first.items()}
    deadline = time.time() + TIMEOUT_S
    restarts = {name: start(name, run.workdir) for name, run in
                (('killed', killed), ('termed', termed))}
    final_rc = {name: run.wait(deadline) for name, run in restarts.items()}
  finally:
    for run in started:  # never leave a trainer behind, whatever failed
      if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()
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


# --- damaged checkpoints (in process, MLP on an array data set) -----------------------------------


@pytest.fixture(scope='module')
def vectors(tmp_path_factory):
  x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
  return _vectors(tmp_path_factory.mktemp('vectors'), x)


def _ckpt_config(vectors, **overrides):
  return _mlp(vectors, **{'training.num_train_steps': 4, 'training.log_every': 2,
                          'training.checkpoint_every': 2, 'training.keep_checkpoints': 3,
                          **overrides})


@pytest.fixture(scope='module')
def trained(tmp_path_factory, vectors):
  """A run of 4 steps with checkpoints 2 and 4; tests copy it before damaging it."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  training.train_and_evaluate(_ckpt_config(vectors), str(workdir))
  assert _steps_on_disk(workdir) == [2, 4]
  return workdir


def _copy(trained_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_dir, workdir)
  return workdir


def _largest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max(step_dir.glob('state/ocdbt.process_*/d/*'), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_state_file(step_dir)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _scribble(step_dir):
  path = _largest_state_file(step_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = b'\x00' * 16
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage', [_truncate, _scribble])
def test_damaged_checkpoint_is_named_and_the_previous_one_used(trained, vectors, tmp_path, capsys,
                                                               damage):
  workdir = _copy(trained, tmp_path)
  step_dir = workdir / 'checkpoints' / '4'
  damage(step_dir)
  with mock.patch.object(checkpointing.logging, 'warning',
                         wraps=checkpointing.logging.warning) as warning:
    state = training.train_and_evaluate(_ckpt_config(vectors, **{'training.num_train_steps': 6}),
                                     str(workdir))
  warned = ' '.join(' '.join(map(str, c.args)) for c in warning.call_args_list)
  assert str(step_dir) in warned and 'corrupted' in warned
  assert 'start at step 2 of 6' in capsys.readouterr().out
  assert int(state.step) == 6
  assert _steps_on_disk(workdir) == [2, 4, 6]  # step 4 trained again and saved anew
  assert any(p.name.startswith('4.corrupt-') for p in (workdir / 'checkpoints').iterdir())
  restored, _ = _read_checkpoint(workdir, 6)
  _assert_bitwise_equal(restored['params'], jax.device_get(state.params))


def test_crash_while_saving_keeps_the_last_good_checkpoint(trained, vectors, tmp_path, capsys,
                                                           monkeypatch):
  """keep_checkpoints=1 and the write of step 4 dies before its commit: step 2 must survive."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def disk_full_at_step_4(self, *args, **kwargs):
    if self.get().name.startswith('4.'):
      raise OSError('No space left on device (injected)')
    return await original(self, *args, **kwargs)

  workdir = tmp_path / 'run'
  config = _ckpt_config(vectors, **{'training.keep_checkpoints': 1})
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', disk_full_at_step_4)
  with pytest.raises(OSError, match='No space left'):
    training.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  assert _steps_on_disk(workdir) == [2]
  state = training.train_and_evaluate(config, str(workdir))
  assert 'start at step 2 of 4' in capsys.readouterr().out
  assert int(state.step) == 4
  # The resumed run ends exactly where the uninterrupted one (the `trained` fixture) did.
  resumed, resumed_data = _read_checkpoint(workdir, 4)
  reference, reference_data = _read_checkpoint(trained, 4)
  _assert_bitwise_equal(resumed, reference)
  assert resumed_data == reference_data


def test_restoring_into_other_shapes_names_the_first_mismatch(trained, vectors, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = _ckpt_config(vectors, **{'model.mlp.hidden_dim': 48})
  module, _ = config_lib.build_network(config.model)
  x = np.zeros((1, 3), np.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, np.ones((1,)),
                                              train=False)['params'])
  # The checkpointer's own order: EMA params come first, and the first difference is named.
  flatten = checkpointing._flatten  # pylint: disable=protected-access
  new = flatten({'ema_params': shapes})
  saved, _ = _read_checkpoint(workdir, 4)
  old = flatten({'ema_params': saved['ema_params']})
  first = next(name for name in new if tuple(new[name].shape) != tuple(old[name].shape))
  before = _metrics(workdir)
  with pytest.raises(ValueError, match=f"'{first}' has shape") as info:
    training.train_and_evaluate(config, str(workdir))
  assert str(workdir / 'checkpoints' / '4') in str(info.value)
  assert _metrics(workdir) == before and _steps_on_disk(workdir) == [2, 4]  # nothing trained


def test_restoring_never_unpickles(trained, vectors, tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'unpickling during a restore: {args!r:.80} {kwargs!r:.80}')

  np_load = np.load

  def np_load_without_pickle(*args, **kwargs):
    if kwargs.get('allow_pickle'):
      refuse(*args, **kwargs)
    return np_load(*args, **kwargs)

  restore = checkpointing.Checkpointer.restore
  restored_steps = []

  def guarded_restore(self, *args, **kwargs):
    with mock.patch.object(pickle, 'load', refuse), mock.patch.object(pickle, 'loads', refuse), \
         mock.patch.object(pickle, 'Unpickler', refuse), \
         mock.patch.object(np, 'load', np_load_without_pickle):
      out = restore(self, *args, **kwargs)
    restored_steps.append(out[2])
    return out

  workdir = _copy(trained, tmp_path)
  monkeypatch.setattr(checkpointing.Checkpointer, 'restore', guarded_restore)
  state = training.train_and_evaluate(_ckpt_config(vectors, **{'training.num_train_steps': 6}),
                                     str(workdir))
  assert restored_steps == [4] and int(state.step) == 6


# --- non-finite loss, gradients and updates (in process, MLP on an array data set) ----------------



def test_nan_batch_skips_the_update_and_is_counted(tmp_path):
  # Row i holds i, so a batch tells which rows it drew; then poison one row of the third batch.
  x = np.zeros((64, 3), np.float32)
  x[:, 0] = np.arange(64)
  clean = _mlp(_vectors(tmp_path, x))
  data = builders.create_data(clean)
  rows = [np.asarray(next(data.iterator)['x'][:, 0], int) for _ in range(3)]
  x = x / 64.0
  x[rows[2][0], 1] = np.nan  # drawn once in the first epoch (8 batches), at step 3
  workdir = tmp_path / 'run'
  config = _mlp(_vectors(tmp_path, x), **{'training.num_train_steps': 5})
  state = training.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 5
  assert [r['skipped_steps'] for r in _logged(workdir)] == [0, 0, 1, 0, 0]
  before, _ = _read_checkpoint(workdir, 2)
  skipped, _ = _read_checkpoint(workdir, 3)
  after, _ = _read_checkpoint(workdir, 4)
  for field in ('params', 'ema_params', 'opt_state'):
    _assert_bitwise_equal(skipped[field], before[field])  # the NaN step changed nothing
  assert not np.array_equal(after['params']['Dense_0']['kernel'],
                            skipped['params']['Dense_0']['kernel'])  # training went on
  assert _all_finite((state.params, state.ema_params))


class _PoisonedAfter:
  """The trainer's data iterator, with every batch after the first ``n`` turned into NaN."""

  def __init__(self, iterator, n):
    self._iterator, self._n, self._count = iterator, n, 0

  def __next__(self):
    batch = next(self._iterator)
    self._count += 1
    if self._count > self._n:
      batch = dict(batch, x=np.full_like(batch['x'], np.nan))
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)

  @property
  def num_skipped(self):
    return self._iterator.num_skipped


def test_consecutive_nonfinite_steps_stop_training_with_the_last_good_checkpoint_intact(
    tmp_path, monkeypatch):
  create_data = builders.create_data

  def poisoned_data(config, **kwargs):
    data = create_data(config, **kwargs)
    return dataclasses.replace(data, iterator=_PoisonedAfter(data.iterator, 4))

  monkeypatch.setattr(builders, 'create_data', poisoned_data)
  x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
  config = _mlp(_vectors(tmp_path, x), **{
      'training.num_train_steps': 20, 'training.checkpoint_every': 2,
      'training.keep_checkpoints': 1, 'training.max_nonfinite_steps': 3})
  workdir = tmp_path / 'run'
  with pytest.raises(FloatingPointError, match='3 consecutive') as info:
    training.train_and_evaluate(config, str(workdir))
  assert [r['skipped_steps'] for r in _logged(workdir)] == [0, 0, 0, 0, 1, 1, 1]
  # Step 6 was saved after two skipped steps: it holds step 4's state, which is good. (Step 4,
  # the last good one known when 6 was written, is kept beside it despite keep_checkpoints=1.)
  assert _steps_on_disk(workdir) == [4, 6]
  assert 'step 6' in str(info.value) and str(workdir / 'checkpoints') in str(info.value)
  good, _ = _read_checkpoint(workdir, 4)
  saved, _ = _read_checkpoint(workdir, 6)
  assert _all_finite((saved['params'], saved['ema_params'], saved['opt_state']))
  for field in ('params', 'ema_params', 'opt_state'):
    _assert_bitwise_equal(saved[field], good[field])
  monkeypatch.undo()  # the data is fine again: the same command resumes from step 6
  state = training.train_and_evaluate(config.copy_and_resolve_references(), str(workdir))
  assert int(state.step) == 20 and _all_finite(state.params)


@pytest.mark.filterwarnings('ignore:overflow encountered in cast:RuntimeWarning')  # lr=1e39
def test_overflowing_update_stops_before_saving(tmp_path):
  """A learning rate that overflows float32: step 3's loss and gradients are finite, its update
  makes the params Inf/NaN. Training stops with a message at the next save, which is not written:
  the checkpoints on disk are exactly the good ones (steps 1 and 2) and hold finite states."""
  x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
  config = _mlp(_vectors(tmp_path, x), **{
      'optim.learning_rate': 1e39, 'optim.warmup_steps': 0, 'training.num_train_steps': 20,
      'training.checkpoint_every': 1, 'training.log_every': 5})
  # Train 2 good steps with a sane learning rate, then rerun the same workdir with lr=1e39.
  sane = _mlp(_vectors(tmp_path, x), **{
      'optim.learning_rate': 1e-3, 'optim.warmup_steps': 0, 'training.num_train_steps': 2,
      'training.checkpoint_every': 1, 'training.log_every': 1})
  workdir = tmp_path / 'run'
  training.train_and_evaluate(sane, str(workdir))
  with pytest.raises(FloatingPointError, match='learning rate is far too high'):
    training.train_and_evaluate(config, str(workdir))
  assert _steps_on_disk(workdir) == [1, 2]
  for step in _steps_on_disk(workdir):
    saved, _ = _read_checkpoint(workdir, step)
    assert _all_finite((saved['params'], saved['ema_params'], saved['opt_state'])), step


# --- bad data ------------------------------------------------------------------------------------


def test_corrupt_and_truncated_images_are_skipped_named_and_counted(tmp_path):
  from diffusion_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(12):
    Image.fromarray(rng.integers(0, 255, (10, 12), np.uint8)).save(folder / f'{i:02d}.png')
  garbage = folder / 'garbage.png'
  garbage.write_bytes(b'this is not a png')
  truncated = folder / 'truncated.png'
  good = (folder / '00.png').read_bytes()
  truncated.write_bytes(good[:len(good) // 2])
  config = _tiny(**{'data.source': 'folder', 'data.path': str(folder), 'model.name': 'mlp',
                    'training.num_train_steps': 2, 'training.log_every': 1})
  workdir = tmp_path / 'run'
  with mock.patch.object(input_pipeline.logging, 'warning',
                         wraps=input_pipeline.logging.warning) as warning:
    state = training.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  warned = ' '.join(' '.join(map(str, c.args)) for c in warning.call_args_list)
  assert str(garbage) in warned and str(truncated) in warned
  # Two batches of 8 of 14 files: the whole first epoch, both bad files included, each counted
  # once (distinct files, not re-reads).
  counts = [r['data_skipped_files'] for r in _logged(workdir)]
  assert counts == sorted(counts) and counts[-1] == 2


def test_folder_of_mixed_modes_and_sizes_trains(tmp_path):
  folder = tmp_path / 'mixed'
  folder.mkdir()
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 255, (9, 14, 4), np.uint8), 'RGBA').save(folder / 'a.png')
  Image.fromarray(rng.integers(0, 65535, (11, 7), np.uint16)).save(folder / 'b.png')  # 16-bit
  Image.fromarray(rng.integers(0, 255, (8, 8, 2), np.uint8), 'LA').save(folder / 'c.png')
  palette = Image.fromarray(rng.integers(0, 4, (20, 10), np.uint8), 'P')
  palette.putpalette(list(rng.integers(0, 255, 12)) + [0] * 756)
  palette.save(folder / 'd.png', transparency=2)
  Image.new('CMYK', (13, 6), (10, 200, 30, 0)).save(folder / 'e.jpg')
  Image.fromarray(rng.integers(0, 255, (5, 5, 3), np.uint8)).save(folder / 'f.webp')
  Image.new('1', (6, 16), 1).save(folder / 'g.png')
  Image.fromarray(rng.normal(size=(7, 7)).astype(np.float32), 'F').save(folder / 'h.tiff')
  config = _tiny(**{'data.source': 'folder', 'data.path': str(folder), 'data.num_channels': 3,
                    'model.name': 'mlp', 'training.batch_size': 4,
                    'training.num_train_steps': 2, 'training.log_every': 1})
  state = training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  rows = _logged(tmp_path / 'run')
  assert [r['data_skipped_files'] for r in rows] == [0, 0]
  assert all(np.isfinite(r['loss']) for r in rows)


def test_label_less_data_where_labels_are_required_names_the_file(tmp_path, monkeypatch):
  folder = tmp_path / 'images'
  for name in ('cat/a.png', 'loose.png'):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new('L', (8, 8), 3).save(folder / name)
  unlabeled = _vectors(tmp_path, np.zeros((16, 4), np.float32))
  _no_compiling(monkeypatch)
  for overrides, named in [({'data.source': 'folder', 'data.path': str(folder)}, 'loose.png'),
                           ({'data.source': 'array', 'data.path': unlabeled,
                             'model.name': 'mlp'}, unlabeled)]:
    config = _tiny(**overrides, **{'data.use_labels': True, 'model.num_classes': 2})
    with pytest.raises(ValueError, match=re.escape(named)):
      training.train_and_evaluate(config, str(tmp_path / 'run'))


def _no_compiling(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('compiled before the input was checked')
  monkeypatch.setattr(jax, 'jit', refuse)
  monkeypatch.setattr(sharding, 'create_sharded_state', refuse)


@pytest.mark.parametrize('source, make, pattern', [
    ('folder', lambda p: p / 'missing', 'does not exist'),
    ('folder', lambda p: (p / 'empty').mkdir() or p / 'empty', 'contains no images'),
    ('array', lambda p: p / 'missing.npz', 'not a file'),
])
def test_missing_or_empty_data_fails_before_compiling(tmp_path, monkeypatch, source, make,
                                                      pattern):
  path = make(tmp_path)
  config = _tiny(**{'data.source': source, 'data.path': str(path)})
  _no_compiling(monkeypatch)
  with pytest.raises(ValueError, match=pattern) as info:
    training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(path) in str(info.value)
  assert not (tmp_path / 'run' / 'checkpoints').exists()


# --- bad config ----------------------------------------------------------------------------------


def _set(config, dotted, value):
  config.unlock()
  *groups, leaf = dotted.split('.')
  node = config
  for g in groups:
    node = node[g]
  with node.ignore_type():
    node[leaf] = value


@pytest.mark.parametrize('field, value, pattern', [
    ('training.lerning_rate', 1e-3, r"Unknown config field 'training\.lerning_rate'"),
    ('training.batch_size', 'eight', r"'training\.batch_size' must be of type int"),
    ('optim.learning_rate', '1e-3', r"'optim\.learning_rate' must be of type float"),
    ('data.image_size', 9, r"'data\.image_size': image_size=9 is not divisible"),
    ('model.unet.attn_resolutions', (3,), r"'model\.unet\.attn_resolutions': .*\(3,\)"),
    ('training.checkpoint_every', 3, r'training\.checkpoint_every=3 must be a multiple'),
])
def test_bad_config_fails_before_compiling_naming_the_field(tmp_path, monkeypatch, field, value,
                                                            pattern):
  config = _tiny(**{'training.steps_per_call': 2}) if 'checkpoint' in field else _tiny()
  _set(config, field, value)
  _no_compiling(monkeypatch)
  with pytest.raises(ValueError, match=pattern):
    training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_batch_not_divisible_by_the_devices_fails_before_compiling(tmp_path, monkeypatch):
  """Two devices are faked at the mesh: a real second device would need its own process."""
  make_mesh = sharding.make_mesh

  def two_device_mesh(**kwargs):
    mesh = make_mesh(**kwargs)
    return mock.Mock(wraps=mesh, devices=np.empty((2, 1)), shape={'data': 2, 'fsdp': 1})

  monkeypatch.setattr(sharding, 'make_mesh', two_device_mesh)
  _no_compiling(monkeypatch)
  with pytest.raises(ValueError, match=r'training\.batch_size=7 is not divisible by the 2 devices'):
    training.train_and_evaluate(_tiny(**{'training.batch_size': 7}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
