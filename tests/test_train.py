"""The trainer end to end on tiny configs: every data source, resume, sampling, bad input, frozen
trees, starting from other params (init_from, init_params), parameter-only restores."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from unittest import mock

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import tiny
from diffusion_jax import checkpointing, models, objectives, processes, sharding, training
from diffusion_jax.training import builders, evaluation, loop
from diffusion_jax.training import config as config_lib
from diffusion_jax.training import step as step_lib
from diffusion_jax.training.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**overrides):
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _make_folder(root, n=12, size=10, corrupt=False):
  rng = np.random.default_rng(0)
  for i in range(n):
    sub = root / f'class{i % 2}'
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size + 2, 3), np.uint8)).save(sub / f'{i}.png')
  if corrupt:
    (root / 'class0' / 'broken.png').write_bytes(b'not a png at all')
  return root


def test_digits_one_job_writes_metrics_checkpoints(tmp_path):
  workdir = str(tmp_path / 'run')
  config = _tiny(**{'training.num_sample_images': 4})
  state = training.train_and_evaluate(config, workdir)
  # The whole config, read back equal (tuples included) to the one that trained.
  with open(os.path.join(workdir, 'config.json')) as f:
    assert config_lib.config_from_json(f.read()).to_dict() == config.to_dict()
  assert int(state.step) == 4
  rows = _metrics(workdir)
  logged = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in logged] == [2, 4]
  for r in logged:
    assert np.isfinite(r['loss']) and {'loss_q0', 'loss_q3', 'images_per_sec'} <= set(r)
  assert rows[0]['num_params'] > 0
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  assert os.listdir(os.path.join(workdir, 'samples'))  # the final grid


def test_folder_source_with_corrupt_file(tmp_path):
  folder = _make_folder(tmp_path / 'imgs', corrupt=True)
  config = _tiny(**{'data.source': 'folder', 'data.path': str(folder), 'data.num_channels': 3,
                    'data.image_size': 8, 'training.num_train_steps': 2})
  training.train_and_evaluate(config, str(tmp_path / 'run'))
  rows = [r for r in _metrics(str(tmp_path / 'run')) if 'loss' in r]
  assert rows[-1]['data_skipped_files'] >= 1


def test_array_source_with_mlp_and_labels(tmp_path):
  x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
  np.savez(tmp_path / 'data.npz', x=x, label=np.arange(64) % 3)
  config = _tiny(**{'data.source': 'array', 'data.path': str(tmp_path / 'data.npz'),
                    'data.use_labels': True, 'model.name': 'mlp', 'model.num_classes': 3,
                    'training.num_train_steps': 2, 'sampling.guidance_scale': 2.0})
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(config, workdir)
  path = training.sample(config, workdir)
  samples = np.load(path)['x']
  assert samples.shape == (6, 3) and np.isfinite(samples).all()


def test_tfds_source_through_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _tiny(**{'data.source': 'tfds', 'data.name': 'cifar10', 'data.num_channels': 3,
                    'data.image_size': 8, 'training.num_train_steps': 2})
  with tfds.testing.mock_data(num_examples=32):
    training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert [r['step'] for r in _metrics(str(tmp_path / 'run')) if 'loss' in r] == [2]


def test_train_step_lowers_the_loss_on_a_fixed_batch():
  module = models.UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
  process = processes.DiscreteVP.linear(num_timesteps=100)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)), jnp.float32)
  # jit: an eager init compiles each of the U-Net's ops alone (3x the time of one program).
  params = jax.jit(lambda k: module.init(k, x, jnp.ones((16,)), train=False))(
      jax.random.PRNGKey(0))['params']

  def network_fn(p, x, c, cond=None, *, train=False, rngs=None):
    return module.apply({'params': p}, x, c, **(cond or {}), train=train, rngs=rngs)

  import optax  # pylint: disable=import-outside-toplevel
  state = TrainState.create(params=params, tx=optax.adam(3e-3))
  loss_fn = objectives.denoising(network_fn=network_fn, process=process)
  step = jax.jit(lambda s, b, k: step_lib.train_step(s, b, k, loss_fn=loss_fn, ema_decay=0.9),
                 donate_argnums=0)
  key = jax.random.PRNGKey(1)
  # Evaluate on the same times/noise each time: a fixed key, independent of the step.
  @jax.jit
  def eval_loss(p):
    model_fn = lambda xt, t, cond=None: network_fn(p, xt, t)
    from diffusion_jax import losses  # pylint: disable=import-outside-toplevel
    return losses.denoising_loss(model_fn, process, x, jax.random.PRNGKey(7))[0]

  before = float(eval_loss(params))
  for _ in range(30):
    state, metrics = step(state, {'x': x}, key)
  after = float(eval_loss(state.params))
  assert after < 0.7 * before, (before, after)
  assert int(metrics['skipped']) == 0


def test_nonfinite_update_is_skipped():
  module = models.MLP(hidden_dim=8, num_layers=1, embed_dim=8)
  process = processes.DiscreteVP.linear(num_timesteps=10)
  x = jnp.ones((4, 2))
  params = module.init(jax.random.PRNGKey(0), x, jnp.ones((4,)), train=False)['params']
  import optax  # pylint: disable=import-outside-toplevel
  state = TrainState.create(params=params, tx=optax.adam(1e-2))
  loss_fn = objectives.denoising(
      network_fn=lambda p, x, c, cond=None, *, train=False, rngs=None: module.apply(
          {'params': p}, x, c, train=train), process=process)
  new, metrics = step_lib.train_step(state, {'x': x.at[0, 0].set(jnp.nan)},
                                     jax.random.PRNGKey(0), loss_fn=loss_fn, ema_decay=0.9999)
  assert int(metrics['skipped']) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves((new.params, new.ema_params, new.opt_state)),
                  jax.tree.leaves((state.params, state.ema_params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_restart_resumes_at_the_saved_step(tmp_path):
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(_tiny(**{'training.num_train_steps': 2}), workdir)
  state = training.train_and_evaluate(_tiny(**{'training.num_train_steps': 4}), workdir)
  assert int(state.step) == 4
  assert [r['step'] for r in _metrics(workdir) if 'loss' in r] == [2, 4]  # step 2 not redone


def test_cli_trains_with_override_and_samples(tmp_path):
  workdir = str(tmp_path / 'run')
  # JAX_PLATFORMS unset, as a user runs it: JAX probes every backend, the TPU's included.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  cmd = [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', '--config.training.num_train_steps=2']
  out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True,
                       timeout=600)
  # The console: no backend-probe noise on this host without a TPU (issue 21); the fields that
  # differ from the defaults, not the config; one progress bar whose only rates are the logged
  # steps/s and images/s, with the ETA; a last line naming the outputs.
  assert 'Unable to initialize backend' not in out.stderr and 'libtpu' not in out.stderr
  assert 'training.num_train_steps=2' in out.stderr and 'num_train_steps: 2' not in out.stderr
  renders = re.split(r'[\r\n]', out.stderr)
  final = [r for r in renders if '2/2 [' in r]
  assert final and re.search(r'\| 2/2 \[\d\d:\d\d, ETA \d\d:\d\d, loss=\d+\.\d{4}, [\d.]+ steps/s, '
                             r'[\d.]+ images/s\]', final[-1]), final
  assert not re.search(r'\d(s/step|step/s)', out.stderr)  # tqdm's own rate, a second figure
  assert out.stdout.strip().splitlines()[-1] == (
      f'diffusion_jax: trained to step 2. Checkpoints {workdir}/checkpoints, metrics '
      f'{workdir}/metrics.jsonl.')
  out = subprocess.run(cmd + ['--mode=sample', '--config.sampling.method=dpmpp_2m',
                              '--config.sampling.num_steps=4'],
                       cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600)
  samples = os.listdir(os.path.join(workdir, 'samples'))
  assert 'dpmpp_2m_4_step2.npz' in samples and 'dpmpp_2m_4_step2.png' in samples, samples
  data = np.load(os.path.join(workdir, 'samples', 'dpmpp_2m_4_step2.npz'))
  assert data['images'].shape == (6, 8, 8, 1) and data['images'].dtype == np.uint8
  assert 'Wrote 6 samples' in out.stdout


def test_cli_rejects_unknown_field_before_compiling(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.training.batchsize=4'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert 'batchsize' in out.stderr and 'batch_size' in out.stderr


# --- bad input: each stops with a message that names the field or file and the fix ----------------

@pytest.mark.parametrize('overrides, pattern', [
    ({'training.batch_size': 'eight'}, r"training\.batch_size.*type int"),
    ({'data.image_size': 9}, r'image_size=9 is not divisible'),
    ({'model.unet.attn_resolutions': (3,)}, r'attn_resolutions'),
    ({'sampling.method': 'dpm_fast'}, r'sampling\.method'),
    ({'model.num_classes': 10}, r'data\.use_labels'),
    ({'sampling.method': 'ddim', 'sampling.order': 2}, r"'sampling\.order' = 2.*takes no order"),
    ({'sampling.method': 'unipc', 'sampling.order': 4}, r"unipc: order=4 is not supported"),
    ({'sampling.method': 'dpmpp_3m', 'sampling.num_steps': 0}, r'num_steps'),
    ({'sampling.method': 'plms', 'sampling.warm_start': 'rk4'}, r"'sampling\.warm_start' = 'rk4'"),
    ({'sampling.method': 'ddim', 'sampling.analytic_first_step': True},
     r"'sampling\.analytic_first_step' = True needs sampling\.method='plms'"),
    ({'sampling.method': 'plms', 'sampling.analytic_first_step': True},
     r"analytic_first_step=True needs warm_start='ab'"),
])
def test_bad_config_values(tmp_path, overrides, pattern):
  config = _tiny()
  config.unlock()
  for dotted, value in overrides.items():
    group, *rest = dotted.split('.')
    node = config[group]
    for p in rest[:-1]:
      node = node[p]
    with node.ignore_type():
      node[rest[-1]] = value
  with pytest.raises(ValueError, match=pattern):
    training.validate_config(config)


def test_sampler_options_from_the_config():
  config = _tiny()
  config.sampling.method, config.sampling.order, config.sampling.warm_start = 'plms', 3, 'ab'
  config.sampling.grid = 'quadratic'
  training.validate_config(config)
  assert config_lib.sampler_options(config) == {'grid': 'quadratic', 'order': 3, 'warm_start': 'ab'}
  config.sampling.analytic_first_step = True
  with pytest.raises(ValueError, match=r'alpha / sigma = 0\.7.*not close enough to pure noise'):
    training.validate_config(config)  # the tiny config's 100-step process ends far from noise
  config.process.num_timesteps = 1000
  training.validate_config(config)
  assert config_lib.sampler_options(config)['analytic_first_step'] is True


def test_unknown_field_in_a_notebook_config():
  config = _tiny()
  config.unlock()
  config.training.lerning_rate = 1.0
  with pytest.raises(ValueError, match="Unknown config field 'training.lerning_rate'"):
    training.validate_config(config)


def test_folder_without_images(tmp_path):
  (tmp_path / 'empty').mkdir()
  config = _tiny(**{'data.source': 'folder', 'data.path': str(tmp_path / 'empty')})
  with pytest.raises(ValueError, match='empty'):
    training.train_and_evaluate(config, str(tmp_path / 'run'))


def test_array_of_wrong_rank(tmp_path):
  np.save(tmp_path / 'a.npy', np.zeros((10,), np.float32))
  config = _tiny(**{'data.source': 'array', 'data.path': str(tmp_path / 'a.npy'),
                    'model.name': 'mlp'})
  with pytest.raises(ValueError, match='a.npy'):
    training.train_and_evaluate(config, str(tmp_path / 'run'))


def test_vectors_with_a_unet(tmp_path):
  np.save(tmp_path / 'a.npy', np.zeros((10, 3), np.float32))
  config = _tiny(**{'data.source': 'array', 'data.path': str(tmp_path / 'a.npy')})
  with pytest.raises(ValueError, match='model.name="mlp"'):
    training.train_and_evaluate(config, str(tmp_path / 'run'))


# --- data.image_size means the same for every source (issue 21) --------------------------------


def _digits_on_array(tmp_path, size, **overrides):
  from configs import digits  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(0).integers(0, 256, (16, size, size, 1), np.uint8)
  np.savez(tmp_path / 'images.npz', x=images)
  config = digits.get_config()
  config.update_from_flattened_dict({'data.source': 'array',
                                     'data.path': str(tmp_path / 'images.npz'), **overrides})
  return config


def test_array_images_of_another_size_than_image_size(tmp_path):
  # The digits config (image_size 8) on 16x16 arrays: the network used to be built for 16x16
  # silently, without the attention of the 4x4 level; now one error names both sizes.
  config = _digits_on_array(tmp_path, 16)
  with pytest.raises(ValueError) as info:
    training.validate_config(config)
  assert str(info.value) == (f'data.path={tmp_path / "images.npz"} holds 16x16 images but '
                             'data.image_size=8; arrays are not resized: set '
                             '--config.data.image_size=16.')
  # At the right size, attention at 4x4 no longer exists: the error says what to set.
  config.data.image_size = 16
  with pytest.raises(ValueError, match=re.escape(
      "'model.unet.attn_resolutions': attn_resolutions=(4,) contains [4], which are not "
      'resolutions of this U-Net (image_size=16, ch_mult=(1, 2) gives [16, 8]). Set '
      "--config.model.unet.attn_resolutions='(8,)' (any of [16, 8]), or '()' for no attention.")):
    training.validate_config(config)
  config.model.unet.attn_resolutions = (8,)
  training.validate_config(config)


def test_array_images_train_a_network_of_the_configured_size(tmp_path):
  config = _tiny(**{'data.source': 'array', 'data.image_size': 16,
                    'model.unet.attn_resolutions': (8,), 'training.num_train_steps': 2})
  np.save(tmp_path / 'images.npy', np.zeros((16, 16, 16, 1), np.float32))
  config.data.path = str(tmp_path / 'images.npy')
  state = training.train_and_evaluate(config, str(tmp_path / 'run'))
  # Attention in the 8x8 level's blocks besides the middle block's: built for 16x16 images.
  attn = {k[0] for k in flax.traverse_util.flatten_dict(state.params) if 'Attn' in k[0]}
  assert len(attn) > 1, attn
  np.save(tmp_path / 'images.npy', np.zeros((16, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match='holds 8x8 images but data.image_size=16'):
    training.train_and_evaluate(config, str(tmp_path / 'run2'))


@pytest.mark.parametrize('source, dtype, expected', [
    ('digits', None, None), ('digits_text', None, None), ('folder', None, 'uniform'),
    ('tfds', None, 'uniform'), ('array', np.uint8, 'uniform'), ('array', np.float32, None)])
def test_eval_dequantizes_only_8bit_data_by_default(tmp_path, source, dtype, expected):
  config = _tiny(**{'data.source': source})
  if dtype is not None:
    np.save(tmp_path / 'a.npy', np.zeros((4, 8, 8, 1), dtype))
    config.data.path = str(tmp_path / 'a.npy')
  assert config.eval.dequantize == 'auto'
  assert evaluation.dequantization(config) == expected
  config.eval.dequantize = 'none'
  assert evaluation.dequantization(config) is None
  config.eval.dequantize = 'uniform'
  assert evaluation.dequantization(config) == 'uniform'


def test_checkpoint_of_another_model(tmp_path):
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(_tiny(**{'training.num_train_steps': 2}), workdir)
  with pytest.raises(ValueError, match='fresh --workdir'):
    training.train_and_evaluate(_tiny(**{'model.unet.ch': 32}), workdir)


# --- a smoke run of configs/tiny.py: the step is traced once --------------------------------------


def test_tiny_config_end_to_end_traces_the_step_once(tmp_path, monkeypatch):
  traces = []
  checked = chex.assert_max_traces(step_lib.train_step, n=1)

  def train_step(*args, **kwargs):  # runs once per trace of the jitted step
    traces.append(1)
    return checked(*args, **kwargs)

  monkeypatch.setattr(step_lib, 'train_step', train_step)
  workdir = tmp_path / 'run'
  state = training.train_and_evaluate(
      _tiny(**{'training.num_train_steps': 2, 'training.log_every': 1,
               'training.checkpoint_every': 1}), str(workdir))
  assert int(state.step) == 2 and len(traces) == 1
  assert [r['step'] for r in _metrics(workdir) if 'loss' in r] == [1, 2]
  assert _steps_on_disk(workdir) == [1, 2]


# --- frozen trees in the loop ---------------------------------------------------------------------


def _vectors(tmp_path, **overrides):
  """tiny.py with its MLP on 64 labelled 3-vectors (compiles in seconds)."""
  path = tmp_path / 'vectors.npz'
  if not path.exists():
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    np.savez(path, x=x, label=np.arange(64) % 3)
  return _tiny(**{'data.source': 'array', 'data.path': str(path), 'model.name': 'mlp',
                  'training.num_train_steps': 2, **overrides})


def _steps_on_disk(workdir):
  root = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _saved(workdir, step):
  """A checkpoint's state item as nested dicts of arrays, read with orbax alone."""
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / 'checkpoints' / str(step) /
                                            'state')


def _bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).shape == np.asarray(y).shape and np.asarray(x).dtype == np.asarray(y).dtype
      and np.array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                         np.asarray(y).reshape(-1).view(np.uint8)) for x, y in zip(la, lb))


def test_a_frozen_tree_is_read_by_the_loss_and_saved_only_when_asked(tmp_path, monkeypatch):
  """A task whose labels go through a frozen table: identity table == no frozen tree (bitwise);
  a permutation changes what trains; the table is checkpointed only with save_frozen."""
  config = _vectors(tmp_path, **{'data.use_labels': True, 'model.num_classes': 3,
                                 'training.label_dropout': 0.0})

  def task_with(table, save):
    def build_task(s, data=None):  # builders.build_task(s, data)
      del data
      loss_fn = objectives.denoising(
          network_fn=s.network_fn, process=s.process,
          cond_fn=lambda frozen, batch: {'label': frozen['table'][batch['label']]})
      return builders.Task(loss_fn=loss_fn, frozen={'table': np.asarray(table, np.int32)},
                           save_frozen=save)
    return build_task

  plain = training.train_and_evaluate(config, str(tmp_path / 'plain'))
  with monkeypatch.context() as m:
    m.setattr(builders, 'build_task', task_with([0, 1, 2], save=False))
    identity = training.train_and_evaluate(config, str(tmp_path / 'identity'))
    m.setattr(builders, 'build_task', task_with([2, 0, 1], save=True))
    permuted = training.train_and_evaluate(config, str(tmp_path / 'permuted'))
  assert _bitwise_equal(identity.params, plain.params)
  assert not _bitwise_equal(permuted.params, plain.params)
  assert not (tmp_path / 'identity' / 'checkpoints' / '2' / 'frozen').exists()
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'permuted' / 'checkpoints'))
  mesh = sharding.make_mesh()
  abstract = sharding.with_shardings({'table': jax.ShapeDtypeStruct((3,), jnp.int32)},
                                     {'table': sharding.replicated(mesh)})
  frozen, step = ckpt.restore_frozen(abstract)
  ckpt.close()
  assert step == 2 and np.asarray(frozen['table']).tolist() == [2, 0, 1]


# --- starting points and parameter-only restores --------------------------------------------------


@pytest.fixture
def source_run(tmp_path):
  """A finished 2-step run of the MLP, checkpoints 2 (and the ema_params it holds)."""
  workdir = tmp_path / 'source'
  training.train_and_evaluate(_vectors(tmp_path), str(workdir))
  return workdir


def test_init_from_starts_from_the_ema_params_with_a_fresh_optimizer(tmp_path, source_run):
  source_ema = _saved(source_run, 2)['ema_params']
  config = _vectors(tmp_path, **{'training.init_from': str(source_run / 'checkpoints'),
                                 'training.num_train_steps': 1, 'training.log_every': 1,
                                 'training.checkpoint_every': 1, 'seed': 5})
  workdir = tmp_path / 'run'
  state = training.train_and_evaluate(config, str(workdir))
  # The reference: one step of the same objective from TrainState.create(source EMA), on the
  # run's first batch with the run's key.
  s = builders.setup(config, str(tmp_path / 'reference'), (3,))
  s.checkpointer.close()
  start = TrainState.create(params=jax.tree.map(jnp.asarray, source_ema), tx=s.tx)
  batch = next(builders.create_data(config).iterator)
  loss_fn = config_lib.build_objective(config, s.process, s.network_fn)
  want, _ = jax.jit(lambda st, b: step_lib.train_step(
      st, b, jax.random.PRNGKey(config.seed + 1), loss_fn=loss_fn,
      ema_decay=config.training.ema_decay, lr_schedule=s.lr_schedule))(start, batch)
  assert int(state.step) == 1
  for field in ('params', 'ema_params', 'opt_state'):
    assert _bitwise_equal(getattr(state, field), getattr(want, field)), field
  counts = [int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
  assert counts and set(counts) == {1}  # fresh: one update, not the source's two


def test_resume_wins_over_init_from(tmp_path, source_run, capsys):
  config = _vectors(tmp_path, **{'training.num_train_steps': 1, 'training.checkpoint_every': 1,
                                 'training.log_every': 1})
  workdir = tmp_path / 'run'
  training.train_and_evaluate(config, str(workdir))
  config = _vectors(tmp_path, **{'training.init_from': str(source_run / 'checkpoints'),
                                 'training.checkpoint_every': 1, 'training.log_every': 1})
  with mock.patch.object(loop.logging, 'warning', wraps=loop.logging.warning) as warning:
    state = training.train_and_evaluate(config, str(workdir))
  assert 'start at step 1 of 2' in capsys.readouterr().out
  assert int(state.step) == 2
  warned = ' '.join(' '.join(map(str, c.args)) for c in warning.call_args_list)
  assert 'training.init_from' in warned and 'ignored' in warned


def _first_mismatch(abstract, saved):
  """The first path (sorted) whose shape differs: the reference for the error messages."""
  def flat(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {'/'.join(str(k.key) for k in path): np.shape(leaf) for path, leaf in leaves}
  a, b = flat(abstract), flat(saved)
  return next(k for k in sorted(a) if a[k] != b.get(k))


def test_init_from_of_another_model_fails_before_training(tmp_path, source_run):
  config = _vectors(tmp_path, **{'training.init_from': str(source_run / 'checkpoints'),
                                 'model.mlp.hidden_dim': 48})
  workdir = tmp_path / 'run'
  s = builders.setup(config, str(tmp_path / 'shapes'), (3,))
  s.checkpointer.close()
  first = _first_mismatch(s.abstract_params, _saved(source_run, 2)['ema_params'])
  with pytest.raises(ValueError, match=f'ema_params/{first}'):
    training.train_and_evaluate(config, str(workdir))
  assert _steps_on_disk(workdir) == [] and not (workdir / 'metrics.jsonl').exists()
  # The same tree passed in memory: named as init_params/<path>.
  tree = jax.tree.map(np.asarray, _saved(source_run, 2)['ema_params'])
  with pytest.raises(ValueError, match=f'init_params/{first}'):
    training.train_and_evaluate(_vectors(tmp_path, **{'model.mlp.hidden_dim': 48}),
                                str(workdir), init_params=tree)
  assert _steps_on_disk(workdir) == [] and not (workdir / 'metrics.jsonl').exists()


def test_init_params_in_memory_start_like_init_from(tmp_path, source_run):
  overrides = {'training.num_train_steps': 1, 'training.checkpoint_every': 1,
               'training.log_every': 1}
  tree = jax.tree.map(np.asarray, _saved(source_run, 2)['ema_params'])
  a = training.train_and_evaluate(_vectors(tmp_path, **overrides), str(tmp_path / 'a'),
                                  init_params=tree)
  b = training.train_and_evaluate(
      _vectors(tmp_path, **overrides, **{'training.init_from': str(source_run / 'checkpoints')}),
      str(tmp_path / 'b'))
  assert _bitwise_equal((a.params, a.ema_params, a.opt_state),
                        (b.params, b.ema_params, b.opt_state))


def _delete_arrays(step_dir: pathlib.Path, prefix: str) -> None:
  """Deletes every array of a checkpoint's state item under `prefix` (headers and chunks)."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  kv = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{step_dir / "state"}/'}).result()
  kv.delete_range(ts.KvStore.KeyRange(f'{prefix}.'.encode(), f'{prefix}/'.encode())).result()
  assert not [k for k in kv.list().result() if k.startswith(f'{prefix}.'.encode())]


def test_sample_and_eval_read_only_the_ema_params(tmp_path, source_run):
  config = _vectors(tmp_path, **{'eval.dequantize': 'none', 'eval.num_examples': 4,
                                 'eval.rtol': 1e-3, 'eval.atol': 1e-3})
  intact = np.load(training.sample(config, str(source_run)))['x']
  workdir = tmp_path / 'damaged'
  shutil.copytree(source_run, workdir)
  for prefix in ('opt_state', 'params'):  # all that is left of the state is its EMA params
    _delete_arrays(workdir / 'checkpoints' / '2', prefix)
  s = builders.setup(config, str(workdir), (3,))
  with pytest.raises(checkpointing.CheckpointCorruptedError):  # the deletion bites a full restore
    s.checkpointer.restore(s.abstract_state, step=2)
  s.checkpointer.close()
  samples = np.load(training.sample(config, str(workdir)))['x']
  assert _bitwise_equal(samples, intact)
  metrics = training.evaluate(config, str(workdir))
  assert metrics['eval_num_examples'] == 4 and np.isfinite(metrics['eval_bpd'])
