"""The trainer on continuous-time SDEs: likelihood-weighted training, --mode=eval, model/process
checks."""

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import oracles, training


def _gmm_config(tmp_path, **overrides):
  x, y = oracles.example_mixture().sample(jax.random.PRNGKey(0), 256)
  path = str(tmp_path / 'gmm.npz')
  np.savez(path, x=np.asarray(x), label=np.asarray(y))
  config = tiny.get_config()
  config.data.source = 'array'
  config.data.path = path
  config.model.name = 'mlp'
  config.process.type = 'vp'
  config.model.noise_input = 't999'
  config.training.weighting = 'likelihood'
  config.training.time_sampling = 'importance'
  config.training.num_train_steps = 2
  config.sampling.method = 'ode'
  config.eval.dequantize = 'none'
  config.eval.num_examples = 8
  config.eval.batch_size = 4
  config.eval.rtol = 1e-3
  config.eval.atol = 1e-3
  for dotted, value in overrides.items():
    group, field = dotted.split('.')
    config[group][field] = value
  return config


def test_vp_likelihood_training_then_eval_writes_bits_per_dim(tmp_path):
  config = _gmm_config(tmp_path)
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(config, workdir)
  metrics = training.evaluate(config, workdir)
  assert metrics['eval_num_examples'] == 8
  assert np.isfinite(metrics['eval_bpd']) and metrics['eval_bpd_stderr'] > 0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]['eval_bpd'] == pytest.approx(metrics['eval_bpd'])


@pytest.mark.parametrize('process_type, noise_input', [('vp', 'log_sigma'), ('ve', 't999'),
                                                       ('discrete', 't999')])
def test_model_and_process_must_match(tmp_path, process_type, noise_input):
  config = _gmm_config(tmp_path, **{'process.type': process_type, 'model.noise_input': noise_input})
  with pytest.raises(ValueError, match='noise_input'):
    training.validate_config(config)


def test_eval_refuses_continuous_data_as_8bit(tmp_path):
  config = _gmm_config(tmp_path, **{'eval.dequantize': 'uniform'})
  workdir = str(tmp_path / 'run')
  training.train_and_evaluate(config, workdir)
  with pytest.raises(ValueError, match='8-bit'):
    training.evaluate(config, workdir)
