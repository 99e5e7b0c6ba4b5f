"""The trainer end to end on tiny configs: every data source, resume, sampling, bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from diffusion_jax import models, objectives, processes, training
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
  state = training.train_and_evaluate(_tiny(**{'training.num_sample_images': 4}), workdir)
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
  params = module.init(jax.random.PRNGKey(0), x, jnp.ones((16,)), train=False)['params']

  def network_fn(p, x, c, cond=None, *, train=False, rngs=None):
    return module.apply({'params': p}, x, c, **(cond or {}), train=train, rngs=rngs)

  import optax  # pylint: disable=import-outside-toplevel
  state = TrainState.create(params=params, tx=optax.adam(3e-3))
  loss_fn = objectives.denoising(network_fn=network_fn, process=process)
  step = jax.jit(lambda s, b, k: step_lib.train_step(s, b, k, loss_fn=loss_fn, ema_decay=0.9),
                 donate_argnums=0)
  key = jax.random.PRNGKey(1)
  # Evaluate on the same times/noise each time: a fixed key, independent of the step.
  def eval_loss(p):
    model_fn = lambda xt, t, cond=None: network_fn(p, xt, t)
    from diffusion_jax import losses  # pylint: disable=import-outside-toplevel
    return float(losses.denoising_loss(model_fn, process, x, jax.random.PRNGKey(7))[0])

  before = eval_loss(params)
  for _ in range(30):
    state, metrics = step(state, {'x': x}, key)
  after = eval_loss(state.params)
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
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', '--config.training.num_train_steps=2']
  subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
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
    ({'sampling.method': 'dpmpp_3m', 'sampling.num_steps': 2}, r'num_steps=2.*at least 3 steps'),
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


def test_checkpoint_of_another_model(tmp_path):
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(_tiny(**{'training.num_train_steps': 2}), workdir)
  with pytest.raises(ValueError, match='fresh --workdir'):
    training.train_and_evaluate(_tiny(**{'model.unet.ch': 32}), workdir)
