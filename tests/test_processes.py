"""Processes against NumPy implementations of the formulas.

References: Ho et al. (2020) eqs. 4, 6-7; Nichol & Dhariwal (2021) eq. 17; Salimans & Ho (2022) Sec. 4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import processes as P


def np_linear_alpha_bar(n=1000, b0=1e-4, b1=0.02):
  betas = np.linspace(b0, b1, n)
  return betas, np.cumprod(1 - betas)


def test_linear_schedule_matches_ho_et_al():
  p = P.DiscreteVP.linear()
  betas, abar = np_linear_alpha_bar()
  t = np.arange(1, 1001)
  np.testing.assert_allclose(p.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(p.alpha(t)) ** 2, abar, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(p.sigma(t)) ** 2, 1 - abar, rtol=2e-5, atol=1e-7)
  assert p.t_min == 1 and p.t_max == 1000
  assert float(p.alpha(0.0)) == 1.0 and float(p.sigma(0.0)) == 0.0


def test_cosine_schedule_matches_nichol_dhariwal():
  n, s = 1000, 0.008
  p = P.DiscreteVP.cosine(n, s)
  t = np.arange(0, n)  # the last step is clipped at beta = 0.999 (paper), compare before it
  f = np.cos((t / n + s) / (1 + s) * np.pi / 2) ** 2
  f0 = np.cos(s / (1 + s) * np.pi / 2) ** 2
  np.testing.assert_allclose(np.asarray(p.alpha(t)) ** 2, f / f0, rtol=1e-4, atol=1e-7)
  assert np.max(np.asarray(p.betas)) <= 0.999 + 1e-7


def test_log_alpha_interpolates_piecewise_linearly():
  p = P.DiscreteVP.linear(num_timesteps=50)
  _, abar = np_linear_alpha_bar(50)
  la = np.concatenate([[0.0], 0.5 * np.log(abar)])
  for t in [0.25, 3.5, 17.9, 49.01]:
    i, frac = int(np.floor(t)), t - np.floor(t)
    expected = np.exp((1 - frac) * la[i] + frac * la[i + 1])
    np.testing.assert_allclose(float(p.alpha(t)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(p.sigma(t)), np.sqrt(1 - expected**2), rtol=1e-5)


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_log_alpha_equals_jnp_interp_bitwise(schedule):
  # log_alpha finds the segment as floor(t) instead of jnp.interp's binary search; values and
  # gradients must be those of jnp.interp on the grid 0..N, at the grid points and ends included.
  p = getattr(P.DiscreteVP, schedule)(num_timesteps=1000)
  grid = jnp.arange(1001, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  t = jnp.asarray(np.concatenate([
      rng.uniform(-5.0, 1005.0, 20000), np.arange(1001.0),  # the grid points
      np.nextafter(np.arange(1001.0), -np.inf), np.nextafter(np.arange(1001.0), np.inf),
      [-np.inf, np.inf, -1e-30, 1000.0 + 1e-4]]), jnp.float32)
  ref = lambda t: jnp.interp(t, grid, p.log_alphas)  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_array_equal(jax.jit(p.log_alpha)(t), jax.jit(ref)(t))
  np.testing.assert_array_equal(p.log_alpha(t), ref(t))  # eager too
  grad = lambda f: jax.jit(jax.vmap(jax.grad(f)))  # pylint: disable=unnecessary-lambda-assignment
  finite = t[jnp.isfinite(t)]
  np.testing.assert_array_equal(grad(p.log_alpha)(finite), grad(ref)(finite))
  assert bool(jnp.isnan(p.log_alpha(jnp.float32(np.nan))))


def test_from_betas_roundtrip_and_errors():
  betas = np.array([0.1, 0.2, 0.3])
  p = P.DiscreteVP.from_betas(betas)
  np.testing.assert_allclose(np.asarray(p.alpha(np.arange(4))) ** 2, [1, 0.9, 0.72, 0.504],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='betas must lie in'):
    P.DiscreteVP.from_betas([0.1, 0.0])
  with pytest.raises(ValueError, match='1-D'):
    P.DiscreteVP.from_betas(np.ones((2, 2)) * 0.1)


def test_log_snr_inverse():
  for p in [P.DiscreteVP.linear(), P.DiscreteVP.cosine()]:
    t = jnp.array([1.0, 2.5, 100.0, 731.3, 1000.0])
    np.testing.assert_allclose(p.t_from_log_snr(p.log_snr(t)), t, rtol=1e-4, atol=2e-3)


def test_q_sample_eq4():
  p = P.DiscreteVP.linear()
  key = jax.random.PRNGKey(0)
  x0 = jax.random.normal(key, (4, 3, 3, 2))
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([1, 10, 500, 1000])
  _, abar = np_linear_alpha_bar()
  ab = abar[np.asarray(t) - 1].reshape(-1, 1, 1, 1)
  expected = np.sqrt(ab) * np.asarray(x0) + np.sqrt(1 - ab) * np.asarray(eps)
  np.testing.assert_allclose(P.q_sample(p, x0, t, eps), expected, rtol=1e-5, atol=1e-5)


def test_posterior_eqs_6_7_and_generic_posterior():
  p = P.DiscreteVP.linear()
  betas, abar = np_linear_alpha_bar()
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  key1, key2 = jax.random.split(jax.random.PRNGKey(3))
  x_t = jax.random.normal(key1, (5, 4))
  x0 = jax.random.normal(key2, (5, 4))
  t = np.array([1, 2, 40, 600, 1000])
  mean, var_small, var_large = p.posterior_mean_variance(x_t, x0, t)
  i = t - 1
  c0 = np.sqrt(abar_prev[i]) * betas[i] / (1 - abar[i])
  ct = np.sqrt(1 - betas[i]) * (1 - abar_prev[i]) / (1 - abar[i])
  np.testing.assert_allclose(mean, c0[:, None] * np.asarray(x0) + ct[:, None] * np.asarray(x_t),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(var_small, (1 - abar_prev[i]) / (1 - abar[i]) * betas[i], rtol=1e-4)
  np.testing.assert_allclose(var_large, betas[i], rtol=1e-6)
  # The general two-time posterior (Kingma et al. 2021) with s = t - 1 is the same thing.
  gmean, gvar = P.posterior(p, x_t, x0, jnp.asarray(t, jnp.float32), jnp.asarray(t - 1.0))
  np.testing.assert_allclose(gmean, mean, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(gvar, var_small, rtol=2e-3, atol=1e-9)


def test_prediction_conversions_match_formulas():
  key = jax.random.PRNGKey(7)
  k1, k2 = jax.random.split(key)
  x0 = jax.random.normal(k1, (6, 5))
  eps = jax.random.normal(k2, (6, 5))
  # VP pairs (Salimans & Ho) and VE-like pairs (alpha = 1, sigma large).
  for alpha, sigma in [(np.full(6, 0.8), np.full(6, 0.6)),
                       (np.linspace(0.1, 0.99, 6), np.sqrt(1 - np.linspace(0.1, 0.99, 6) ** 2)),
                       (np.ones(6), np.linspace(0.01, 50, 6))]:
    a, s = alpha[:, None], sigma[:, None]
    x_t = a * np.asarray(x0) + s * np.asarray(eps)
    truth = {'eps': np.asarray(eps), 'x0': np.asarray(x0), 'score': -np.asarray(eps) / s,
             'v': a * np.asarray(eps) - s * np.asarray(x0),
             'flow': np.asarray(eps) - np.asarray(x0)}  # rectified flow's velocity
    if np.allclose(alpha**2 + sigma**2, 1):  # Salimans & Ho eq. for VP: x0 = alpha x_t - sigma v
      np.testing.assert_allclose(a * x_t - s * truth['v'], truth['x0'], rtol=1e-5, atol=1e-5)
    for src in P.PREDICTIONS:
      for tgt in P.PREDICTIONS:
        out = P.convert_prediction(jnp.asarray(truth[src]), jnp.asarray(x_t), alpha, sigma,
                                   source=src, target=tgt)
        np.testing.assert_allclose(out, truth[tgt], rtol=2e-4, atol=2e-4, err_msg=f'{src}->{tgt}')
  with pytest.raises(ValueError, match='prediction type'):
    P.convert_prediction(x0, x0, 1.0, 1.0, source='noise', target='x0')


def test_prior_and_jit():
  p = P.DiscreteVP.linear()
  z = p.prior_sample(jax.random.PRNGKey(0), (3, 4, 4, 1))
  assert z.shape == (3, 4, 4, 1) and z.dtype == jnp.float32
  expected = stats.multivariate_normal(np.zeros(16), np.eye(16)).logpdf(np.asarray(z).reshape(3, -1))
  np.testing.assert_allclose(p.prior_logp(z), expected, rtol=1e-5)
  f = jax.jit(lambda proc, t: (proc.alpha(t), proc.sigma(t)))
  a, s = f(p, jnp.array([5.0]))
  np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)


def test_check_times():
  p = P.DiscreteVP.linear()
  P.check_times(p, np.array([1.0, 1000.0]))
  with pytest.raises(ValueError, match=r'\[t_min, t_max\]'):
    P.check_times(p, np.array([0.5, 10.0]))
