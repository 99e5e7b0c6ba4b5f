"""Two local processes train through `jax.distributed`, like the hosts of a pod.

`python -m diffusion_jax.main --coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=i` trains 3 steps of configs/tiny.py (its MLP on 256 vectors, which compiles in a
second or two per process, for the train/sample/eval/restart checks; and, once, tiny.py as it is,
its U-Net on the digits, compared with one process the same way), one CPU device per process,
global batch 8,
4 examples loaded by each process; CPU collectives go through gloo, jax's default. Then both
processes sample (`--mode=sample`) and evaluate bits/dim (`--mode=eval`, each on its own shard).

How the result is checked honestly. The data order is global (grain's index sampling over the
whole data set; each process takes its slice of every global batch), so a plain one-process run,
with its real input pipeline, sees the same global batches as the two-process run, whose process 0
holds rows 0-3 and process 1 rows 4-7 of each. Keys depend on the step alone, so both runs draw the
same noise; they differ only in float32 reduction order (the all-reduce of two partial sums), hence
the tolerance (measured: 3e-8 here, 2.3e-10 for the U-Net). With per-process shards (before
issue 16) the losses differed by 2% (0.817 vs 0.835 after 5 steps of the U-Net, batch 16).

The two-process checkpoint then restores in one process (other mesh, other process count) and
trains on, and a one-process checkpoint resumes on two: both end like the uninterrupted
one-process run (the data order continues across topologies). Only process 0 writes metrics,
TensorBoard events and samples; a process that cannot reach the coordinator exits with a message
instead of hanging or aborting; SIGTERM to one process saves both at one step.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from configs import tiny
from diffusion_jax import training
from diffusion_jax.training import builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
OVERRIDES = {'training.num_train_steps': STEPS, 'training.log_every': 1,
             'training.checkpoint_every': STEPS, 'model.name': 'mlp', 'data.source': 'array'}
PARAM_ATOL = 2e-6  # max |param difference| after 3 steps (measured 2.3e-7): reduction order only
LOSS_RTOL = 1e-5
# --mode=eval on the continuous vectors: a density, so no 8-bit dequantization.
EVAL_FLAGS = ['--config.eval.dequantize=none', '--config.eval.num_examples=16']
TIMEOUT_S = 900  # the whole two-process run, compiles included, on a loaded 2-core machine


def _config(data_path, **extra):
  config = tiny.get_config()
  for dotted, value in {**OVERRIDES, 'data.path': data_path, **extra}.items():
    group, field = dotted.split('.')
    config[group][field] = value
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _flat(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _max_abs_diff(a, b):
  a, b = _flat(a), _flat(b)
  assert sorted(a) == sorted(b)
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  return env


def _cli(workdir, cache, data_path):
  flags = [f'--config.{k}={v}' for k, v in {**OVERRIDES, 'data.path': data_path}.items()]
  return [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.training.compilation_cache_dir={cache}', *flags]


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('data') / 'vectors.npz'
  np.savez(path, x=np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32))
  return str(path)


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, data_path):
  """Trains, samples and evaluates with two processes; returns the workdir and the outputs."""
  root = tmp_path_factory.mktemp('two_processes')
  workdir = str(root / 'run')
  cache = jax.config.jax_compilation_cache_dir or str(root / 'cache')
  outputs = ['', '']
  for mode in ('train', 'sample', 'eval'):
    cmd = _cli(workdir, cache, data_path) + [f'--mode={mode}'] + EVAL_FLAGS * (mode == 'eval')
    for i, out in enumerate(_run_two(root, mode, cmd)):
      outputs[i] += out
  return workdir, outputs


def _run_two(root, mode, cmd):
  """Runs `cmd` as processes 0 and 1 of a job; returns their outputs."""
  address = f'127.0.0.1:{portpicker.pick_unused_port()}'
  logs = [root / f'{mode}_process_{i}.log' for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, 'w') as f:  # the child keeps its own copy of the descriptor
        procs.append(subprocess.Popen(
            cmd + [f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}',
                   '--initialization_timeout=300', '--heartbeat_timeout=900'],
            cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:  # a failed or timed-out peer must not leave the other one waiting forever
      if p.poll() is None:
        p.kill()
        p.wait(timeout=60)
  outputs = [log.read_text() for log in logs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'{mode}: process {i} exited with {p.returncode}:\n{out[-5000:]}'
  return outputs


def _restore(config, workdir, element_shape, step=None):
  """``(state, step)`` of the newest checkpoint (or ``step``) of ``workdir``, in this process."""
  s = builders.setup(config, workdir, element_shape)
  restored = s.checkpointer.restore(s.abstract_state, step=step)
  s.checkpointer.close()
  assert restored is not None
  state, _, restored_step = restored
  return state, restored_step


def _losses(workdir):
  return [r['loss'] for r in _metrics(workdir) if 'loss' in r]


@pytest.fixture(scope='module')
def one_process(tmp_path_factory, data_path):
  """One process, one device, its real input pipeline: STEPS + 2 steps, saving at STEPS too."""
  workdir = str(tmp_path_factory.mktemp('one_process'))
  config = _config(data_path, **{'training.num_train_steps': STEPS + 2})
  state = training.train_and_evaluate(config, workdir)
  return workdir, state


def _compare(config, workdir, ref_dir, element_shape, atol, *, step):
  """The checkpoint of ``step`` in ``workdir`` against ``ref_dir``'s; losses up to ``step``.

  Returns (max |params difference|, how far training moved the params from their init).
  """
  state, restored_step = _restore(config, workdir, element_shape, step=step)
  ref, _ = _restore(config, ref_dir, element_shape, step=step)
  assert restored_step == step and int(state.step) == int(ref.step) == step
  diff = max(_max_abs_diff(state.params, ref.params),
             _max_abs_diff(state.ema_params, ref.ema_params))
  assert diff <= atol, f'max |params (workdir) - params (reference)| = {diff:.3g}'
  losses = _losses(workdir)
  assert len(losses) == step
  np.testing.assert_allclose(losses, _losses(ref_dir)[:step], rtol=LOSS_RTOL)
  s = builders.setup(config, workdir, element_shape)
  moved = _max_abs_diff(state.params, builders.fresh_state(s).params)
  s.checkpointer.close()
  return diff, moved


def test_two_processes_end_with_the_params_of_one_process(two_processes, one_process, data_path):
  ref_dir, _ = one_process
  diff, _ = _compare(_config(data_path), two_processes[0], ref_dir, (4,), PARAM_ATOL, step=STEPS)
  print(f'two processes vs one: max |params difference| = {diff:.3g}')


# tiny.py as it is (its U-Net on the digits), 3 steps. Adam's eps = 1 makes the update linear in
# the gradient: with eps = 1e-8 Adam maps the near-zero gradient elements (the zero-initialized
# output convolutions have many) to +-lr steps whose sign the float32 reduction order decides,
# which would compare rounding, not the two-process gradients (see test_mesh_training.py).
UNET_OVERRIDES = {'training.num_train_steps': STEPS, 'training.log_every': 1,
                  'training.checkpoint_every': STEPS, 'optim.eps': 1.0}
UNET_PARAM_ATOL = 1e-8  # measured 1.2e-10 (reduction order only); training moves them ~1e-3


def test_two_processes_train_tiny_unet_like_one_process(tmp_path):
  """configs/tiny.py's U-Net on the digits through the CLI, batch 16, 5 steps (issue 16's case:
  own shards gave losses 0.817 vs 0.835): two processes end with one process's loss and params."""
  cache = jax.config.jax_compilation_cache_dir or str(tmp_path / 'cache')
  overrides = {**UNET_OVERRIDES, 'training.num_train_steps': 5, 'training.checkpoint_every': 5,
               'training.batch_size': 16}

  def cmd(workdir):
    return [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
            f'--workdir={workdir}', f'--config.training.compilation_cache_dir={cache}',
            *[f'--config.{k}={v}' for k, v in overrides.items()]]

  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  _run_two(tmp_path, 'train_unet', cmd(two))
  out = subprocess.run(cmd(one), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stderr[-5000:]
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  diff, moved = _compare(config, two, one, (8, 8, 1), UNET_PARAM_ATOL, step=5)
  print(f'tiny U-Net, two processes vs one: losses {_losses(two)} vs {_losses(one)}; max '
        f'|params difference| = {diff:.3g} (params moved up to {moved:.3g} from their init)')
  assert moved > 1e4 * UNET_PARAM_ATOL  # the comparison is not between two untrained states


def test_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, data_path,
                                                      tmp_path):
  """Written by two processes at STEPS, resumed by one to STEPS + 2: the data order goes on, the
  run ends like the uninterrupted one-process run."""
  ref_dir, _ = one_process
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(two_processes[0], workdir)
  config = _config(data_path, **{'training.num_train_steps': STEPS + 2})
  state = training.train_and_evaluate(config, workdir)
  assert int(state.step) == STEPS + 2
  assert [r['step'] for r in _metrics(workdir) if 'loss' in r] == list(range(1, STEPS + 3))
  diff, _ = _compare(config, workdir, ref_dir, (4,), PARAM_ATOL, step=STEPS + 2)
  print(f'two processes to {STEPS}, one to {STEPS + 2} vs one throughout: {diff:.3g}')


def test_one_process_checkpoint_resumes_on_two(one_process, data_path, tmp_path):
  """Written by one process at STEPS, resumed by two to STEPS + 2: ends like the one-process run."""
  ref_dir, _ = one_process
  workdir = tmp_path / 'resumed'
  (workdir / 'checkpoints').mkdir(parents=True)
  shutil.copytree(os.path.join(ref_dir, 'checkpoints', str(STEPS)),
                  workdir / 'checkpoints' / str(STEPS))
  with open(os.path.join(ref_dir, 'metrics.jsonl')) as f:  # the first run's rows up to STEPS
    rows = [line for line in f if json.loads(line)['step'] <= STEPS]
  (workdir / 'metrics.jsonl').write_text(''.join(rows))
  cache = jax.config.jax_compilation_cache_dir or str(tmp_path / 'cache')
  flags = {**OVERRIDES, 'data.path': data_path, 'training.num_train_steps': STEPS + 2}
  cmd = [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.training.compilation_cache_dir={cache}',
         *[f'--config.{k}={v}' for k, v in flags.items()]]
  _run_two(tmp_path, 'resume_on_two', cmd)
  config = _config(data_path, **{'training.num_train_steps': STEPS + 2})
  diff, _ = _compare(config, str(workdir), ref_dir, (4,), PARAM_ATOL, step=STEPS + 2)
  print(f'one process to {STEPS}, two to {STEPS + 2} vs one throughout: {diff:.3g}')


def test_only_process_0_writes(two_processes):
  workdir, (out0, out1) = two_processes
  rows = _metrics(workdir)  # appended to by every writer: two writers would repeat each step
  # Training rows 0..STEPS, then the one --mode=eval row at the last step.
  assert [r['step'] for r in rows] == list(range(STEPS + 1)) + [STEPS], rows
  assert 'eval_bpd' in rows[-1] and 'bits/dim at step' in out0 and 'bits/dim at step' not in out1
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  # One events file per run that logs (train, eval), from process 0 only: two writers would make 4.
  assert len([f for f in events if f.startswith('events')]) == 2, events
  assert os.listdir(os.path.join(workdir, 'samples')) == [f'ddim_3_step{STEPS}.npz']
  assert np.load(os.path.join(workdir, 'samples', f'ddim_3_step{STEPS}.npz'))['x'].shape == (6, 4)
  banner = re.compile(r'diffusion_jax: [\d,]+ parameters, 2 device\(s\)')
  assert banner.search(out0) and not banner.search(out1)
  assert 'Wrote 6 samples' in out0 and 'Wrote' not in out1


def test_eval_on_two_processes_combines_both_shards(two_processes):
  """--mode=eval: each process evaluates half of eval.num_examples from its own shard; the
  written bits/dim is the example-weighted mean of both halves, not process 0's alone."""
  workdir, outputs = two_processes
  local = []
  for i, out in enumerate(outputs):
    m = re.search(rf'eval on process {i}: (\d+) examples, ([-\d.]+) bits/dim', out)
    assert m, out[-3000:]
    local.append((int(m.group(1)), float(m.group(2))))
  (n0, b0), (n1, b1) = local
  assert n0 == n1 == 8
  row = _metrics(workdir)[-1]
  assert row['eval_num_examples'] == 16
  np.testing.assert_allclose(row['eval_bpd'], (n0 * b0 + n1 * b1) / (n0 + n1), rtol=1e-5)
  assert abs(b0 - b1) > 1e-4  # two different halves: a combination of one of them would show


def test_unreachable_coordinator_exits_with_a_message(tmp_path):
  address = f'127.0.0.1:{portpicker.pick_unused_port()}'  # nothing listens there
  start = time.monotonic()
  out = subprocess.run(
      _cli(str(tmp_path / 'run'), str(tmp_path / 'cache'), str(tmp_path / 'none.npz'))
      + [f'--coordinator_address={address}', '--num_processes=2', '--process_id=1',
         '--initialization_timeout=2'],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  elapsed = time.monotonic() - start
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])  # not SIGABRT (-6)
  assert f'Could not reach the coordinator at --coordinator_address={address}' in out.stderr
  assert '--initialization_timeout=2s' in out.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
  print(f'unreachable coordinator: exited after {elapsed:.1f}s')


def _checkpoint(config, workdir, step):
  """(state restored in this process, data-iterator state as saved) of one step."""
  state, _ = _restore(config, str(workdir), (4,), step=step)
  step_dir = pathlib.Path(workdir) / 'checkpoints' / str(step)
  return state, json.loads((step_dir / 'data' / 'metadata').read_text())


def _assert_bitwise_equal(a, b):
  a, b = _flat(a), _flat(b)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert np.array_equal(a[k].reshape(-1).view(np.uint8), b[k].reshape(-1).view(np.uint8)), k


def test_sigterm_to_one_process_saves_on_both_at_one_step_and_resumes(data_path, tmp_path):
  """Preemption of a pod: SIGTERM reaches one host only. JAX's preemption sync manager spreads the
  notice; both processes save the same step together, exit 0, and the same command resumes there,
  ending bitwise equal to an uninterrupted two-process run."""
  cache = jax.config.jax_compilation_cache_dir or str(tmp_path / 'cache')
  workdir = tmp_path / 'run'

  def cmd(steps, where=workdir):
    settings = {**OVERRIDES, 'data.path': data_path, 'training.num_train_steps': steps,
                'training.checkpoint_every': steps, 'training.log_every': 1}
    return [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
            f'--workdir={where}', f'--config.training.compilation_cache_dir={cache}',
            *[f'--config.{k}={v}' for k, v in settings.items()]]

  def start(command, tag):
    address = f'127.0.0.1:{portpicker.pick_unused_port()}'
    procs = []
    for i in range(2):
      with open(tmp_path / f'{tag}_{i}.log', 'w') as f:
        procs.append(subprocess.Popen(
            command + [f'--coordinator_address={address}', '--num_processes=2',
                       f'--process_id={i}', '--initialization_timeout=300',
                       '--heartbeat_timeout=900'],
            cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, text=True))
    return procs

  def logged_steps(where=workdir):
    if not (where / 'metrics.jsonl').exists():
      return []
    return [r['step'] for r in _metrics(str(where)) if 'loss' in r]

  procs = start(cmd(1_000_000), 'first')
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while len(logged_steps()) < 20:
      assert time.monotonic() < deadline, 'the two-process run did not reach step 20'
      assert all(p.poll() is None for p in procs), 'a process ended early'
      time.sleep(0.5)
    procs[1].send_signal(15)  # SIGTERM to process 1 alone
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=60)
  for i, p in enumerate(procs):
    assert p.returncode == 0, (i, (tmp_path / f'first_{i}.log').read_text()[-3000:])
  saved = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert len(saved) == 1, saved
  stop = saved[0]
  assert logged_steps()[-1] == stop  # no process ran past the step both saved

  # The restart, and (at the same time: one wait) an uninterrupted run of the same steps.
  reference = tmp_path / 'uninterrupted'
  procs = start(cmd(stop + 2), 'resumed') + start(cmd(stop + 2, reference), 'uninterrupted')
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=60)
  assert all(p.returncode == 0 for p in procs)
  assert logged_steps()[-3:] == [stop, stop + 1, stop + 2]  # resumed at the saved step
  config = _config(data_path, **{'training.num_train_steps': stop + 2})
  state, data = _checkpoint(config, workdir, stop + 2)
  ref_state, ref_data = _checkpoint(config, reference, stop + 2)
  _assert_bitwise_equal(state, ref_state)  # params, EMA params, optimizer state, step
  assert data == ref_data
  ref_loss = {r['step']: r['loss'] for r in _metrics(str(reference)) if 'loss' in r}
  assert all(r['loss'] == ref_loss[r['step']] for r in _metrics(str(workdir)) if 'loss' in r)
