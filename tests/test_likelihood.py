"""Tests for diffusion_jax.likelihood: PF-ODE log-likelihoods and bits/dim on the mixture oracle.

With the oracle's exact score, the probability-flow ODE maps p_{t0} (the data noised to
alpha(t0), sigma(t0)) exactly onto p_T, so the computed log-likelihood is log p_{t0}(x) up to the
solver's error and the difference between p_T and the prior that replaces it (for the VP SDE
alpha(1) ~ 7e-3; for VE the N(0, 50^2) prior ignores the data). Both are checked: against
log p_{t0} with the prior, and tightly with the true p_T in place of the prior.
"""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import likelihood, oracles, processes, sde

MIXTURE = oracles.example_mixture()
SDES = {'vp': sde.VPSDE(), 'subvp': sde.SubVPSDE(), 've': sde.VESDE()}


@pytest.fixture(scope='module')
def data():
  x, _ = MIXTURE.sample(jax.random.key(3), 64)
  return x


@pytest.mark.parametrize('name', ['vp', 've'])
def test_exact_log_likelihood_matches_the_mixture_density(name, data):
  process = SDES[name]
  model_fn = MIXTURE.model_fn(process, prediction='eps')
  logp, info = jax.jit(lambda x: likelihood.log_likelihood(
      model_fn, process, x, key=None, divergence='exact', return_info=True))(data)
  t0 = process.t_min
  ref = MIXTURE.log_prob(data, process.alpha(t0), process.sigma(t0))
  assert logp.shape == (64,) and bool(info['success'])
  # With the prior: error below 1e-2 nats on average (measured 2e-3 VP, 6e-3 VE: prior mismatch).
  assert float(jnp.mean(jnp.abs(logp - ref))) < 1e-2
  # With the true p_T instead of the prior, only the solver's error remains (measured ~1e-5).
  exact_prior = MIXTURE.log_prob(info['z'], process.alpha(1.0), process.sigma(1.0))
  np.testing.assert_allclose(exact_prior + info['delta_logp'], ref, atol=5e-4)
  assert float(jnp.mean(jnp.abs(exact_prior + info['delta_logp'] - ref))) < 1e-4


def test_from_very_small_t_it_is_the_clean_density(data):
  """From t_start = 1e-5 (score_sde's likelihood eps) sigma = 1e-3: the clean density to ~1e-5."""
  process = SDES['subvp']
  model_fn = MIXTURE.model_fn(process, prediction='score')
  logp = likelihood.log_likelihood(model_fn, process, data, key=None, prediction='score',
                                   divergence='exact', t_start=1e-5)
  assert float(jnp.mean(jnp.abs(logp - MIXTURE.log_prob(data)))) < 1e-2


def test_hutchinson_is_unbiased(data):
  """Hutchinson estimates average to the exact value within their standard error."""
  process = SDES['vp']
  model_fn = MIXTURE.model_fn(process, prediction='eps')
  exact = jax.jit(lambda x: likelihood.log_likelihood(model_fn, process, x, key=None,
                                                      divergence='exact'))(data)
  for noise in ('rademacher', 'gaussian'):
    run = jax.jit(lambda x, k: likelihood.log_likelihood(model_fn, process, x, key=k,
                                                         noise=noise))
    draws = np.stack([np.asarray(run(data, jax.random.key(i))) for i in range(6)])
    diff = (draws - np.asarray(exact)[None]).ravel()  # independent over examples and draws
    assert diff.std() > 0
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(diff.size), (noise, diff.mean())


def test_discrete_vp(data):
  process = processes.DiscreteVP.linear()
  model_fn = MIXTURE.model_fn(process, prediction='eps')
  x = data[:8]
  logp = likelihood.log_likelihood(model_fn, process, x, key=None, divergence='exact', rtol=1e-3,
                                   atol=1e-3)
  ref = MIXTURE.log_prob(x, process.alpha(1.0), process.sigma(1.0))
  assert float(jnp.mean(jnp.abs(logp - ref))) < 1e-2


def test_conditioning_reaches_the_model(data):
  """A conditional model: the mixture translated by ``cond['shift']`` per example (VE: alpha = 1,
  so its exact score at x is the mixture's at x - shift). Its PF-ODE is the unconditional one
  translated, so log p(x + shift | shift) has the same integral and z + shift as endpoint."""
  process = SDES['ve']
  base = MIXTURE.model_fn(process, prediction='eps')
  shift = 0.5 * jax.random.normal(jax.random.key(4), data.shape)

  def cond_model(x, t, cond):
    return base(x - cond['shift'], t)

  kw = dict(key=None, divergence='exact', return_info=True)
  _, plain = likelihood.log_likelihood(base, process, data, **kw)
  _, moved = likelihood.log_likelihood(cond_model, process, data + shift, cond={'shift': shift},
                                       **kw)
  np.testing.assert_allclose(moved['delta_logp'], plain['delta_logp'], atol=1e-3)
  np.testing.assert_allclose(moved['z'], plain['z'] + shift, atol=1e-3)
  with pytest.raises(ValueError, match=r"cond\['shift'\] has shape \(3, 2\).* B = 64"):
    likelihood.log_likelihood(cond_model, process, data, cond={'shift': shift[:3]}, **kw)


def test_argument_errors(data):
  process = SDES['vp']
  model_fn = MIXTURE.model_fn(process)
  with pytest.raises(ValueError, match='divergence'):
    likelihood.log_likelihood(model_fn, process, data, key=None, divergence='trace')
  with pytest.raises(ValueError, match='noise'):
    likelihood.log_likelihood(model_fn, process, data, key=jax.random.key(0), noise='uniform')
  with pytest.raises(ValueError, match='key'):
    likelihood.log_likelihood(model_fn, process, data, key=None)
  with pytest.raises(ValueError, match='t_start'):
    likelihood.log_likelihood(model_fn, process, data, key=None, divergence='exact', t_start=0.0)


# --- bits per dimension --------------------------------------------------------------------------


def _levels(x):
  """8-bit levels k with x in [k/128 - 1, (k + 1)/128 - 1), the bins dequantization fills."""
  return np.clip(np.floor((np.asarray(x) + 1.0) * 128), 0, 255).astype(np.uint8)


def test_bits_per_dim_of_8bit_data():
  """bpd = E_u[-log2 p((k + u)/128 - 1)]/D + 7, the reference from the exact density."""
  mixture = oracles.example_mixture(scale=0.5)
  x, _ = mixture.sample(jax.random.key(7), 32)
  k = _levels(x)
  process = SDES['vp']
  model_fn = mixture.model_fn(process, prediction='eps')
  bpd, stderr = likelihood.bits_per_dim(model_fn, process, k, key=jax.random.key(0), num_draws=2,
                                        divergence='exact')
  u = jax.random.uniform(jax.random.key(99), (64,) + k.shape)
  z = (k[None].astype(np.float32) + u) / 128.0 - 1.0
  a, s = process.alpha(process.t_min), process.sigma(process.t_min)
  logp = jax.vmap(lambda zz: mixture.log_prob(zz, a, s))(z)
  ref = float(jnp.mean(-logp / (2 * math.log(2.0)))) + 7.0
  assert 0 < stderr < 1.0
  assert abs(bpd - ref) < 0.01, (bpd, ref)
  # An eval loop passes the same model_fn for every batch: the solver compiles once.
  compiled = likelihood._solve._cache_size()  # pylint: disable=protected-access
  likelihood.bits_per_dim(model_fn, process, 255 - k, key=jax.random.key(1), num_draws=1,
                          divergence='exact')
  assert likelihood._solve._cache_size() == compiled  # pylint: disable=protected-access
  # The same data given as floats k/127.5 - 1 is recognized as 8-bit.
  levels = likelihood._to_8bit_levels(k / 127.5 - 1.0)  # pylint: disable=protected-access
  np.testing.assert_array_equal(levels, k)


def test_bits_per_dim_of_continuous_data(data):
  process = SDES['ve']
  model_fn = MIXTURE.model_fn(process, prediction='eps')
  x = data[:8]
  bpd, _ = likelihood.bits_per_dim(model_fn, process, x, key=jax.random.key(0), num_draws=1,
                                   dequantize=None, divergence='exact')
  logp = MIXTURE.log_prob(x, 1.0, process.sigma(process.t_min))
  assert abs(bpd - float(jnp.mean(-logp / (2 * math.log(2.0))))) < 0.01  # no +7 offset


def test_bits_per_dim_refuses_data_and_settings_that_do_not_fit(data):
  process = SDES['vp']
  model_fn = MIXTURE.model_fn(process)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='not on that grid.*dequantize=None'):
    likelihood.bits_per_dim(model_fn, process, data, key=key)  # continuous, not 8-bit
  with pytest.raises(ValueError, match="needs dequantize='uniform'.*negative"):
    likelihood.bits_per_dim(model_fn, process, np.zeros((2, 2), np.uint8), key=key,
                            dequantize=None)
  with pytest.raises(ValueError, match=r'\[0, 255\]'):
    likelihood.bits_per_dim(model_fn, process, np.full((2, 2), 300), key=key)
  with pytest.raises(ValueError, match='dequantize'):
    likelihood.bits_per_dim(model_fn, process, np.zeros((2, 2), np.uint8), key=key,
                            dequantize='variational')


def test_log_likelihood_under_jit_on_a_batch_sharded_input():
  """Four CPU devices, the batch sharded over them: the same values as on one device."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from diffusion_jax import likelihood, oracles, sde
      assert jax.device_count() == 4
      mixture = oracles.example_mixture()
      process = sde.VPSDE()
      model_fn = mixture.model_fn(process)
      x, _ = mixture.sample(jax.random.key(0), 16)
      fn = jax.jit(lambda x, k: likelihood.log_likelihood(model_fn, process, x, key=k))
      ref = fn(x, jax.random.key(1))
      mesh = jax.make_mesh((4,), ('data',))
      xs = jax.device_put(x, NamedSharding(mesh, P('data')))
      out = fn(xs, jax.random.key(1))
      assert len(out.sharding.device_set) == 4, out.sharding
      np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)
      print('ok')
      """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]
