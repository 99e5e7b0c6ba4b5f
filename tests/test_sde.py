"""Tests for diffusion_jax.sde and the SDE samplers (sampling/pc.py, sampling/ode.py).

References are independent: NumPy transcriptions of Song et al. (2021), App. B; jax.grad of the
marginal variance for the forward SDE; the Gaussian-mixture oracle (exact score, exact moments and
the exact probability-flow map by SciPy in float64) for the samplers.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion_jax import oracles, preconditioning, processes, sampling, sde
from diffusion_jax.sampling.ode import ode, solve_ode
from diffusion_jax.sampling.pc import pc

SDES = {'vp': sde.VPSDE(), 'subvp': sde.SubVPSDE(), 've': sde.VESDE()}
MIXTURE = oracles.example_mixture()


def _np_marginal(name, t):
  """alpha(t), sigma(t) of Song et al. (2021), App. B, in float64."""
  t = np.asarray(t, np.float64)
  if name == 've':
    return np.ones_like(t), 0.01 * (50.0 / 0.01) ** t
  log_mean = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
  alpha = np.exp(log_mean)
  if name == 'vp':
    return alpha, np.sqrt(1.0 - np.exp(2.0 * log_mean))
  return alpha, 1.0 - np.exp(2.0 * log_mean)


@pytest.mark.parametrize('name', list(SDES))
def test_marginals_match_numpy_formulas(name):
  process = SDES[name]
  t = np.linspace(process.t_min, 1.0, 11)
  alpha, sigma = _np_marginal(name, t)
  np.testing.assert_allclose(process.alpha(t), alpha, rtol=1e-5)
  np.testing.assert_allclose(process.sigma(t), sigma, rtol=1e-4)
  np.testing.assert_allclose(process.log_snr(t), np.log(alpha**2 / sigma**2), rtol=1e-4, atol=1e-4)
  assert process.t_min == (1e-5 if name == 've' else 1e-3) and process.t_max == 1.0
  assert process.is_variance_preserving == (name == 'vp')


def test_defaults_and_immutability():
  vp = sde.VPSDE()
  assert (vp.beta_min, vp.beta_max) == (0.1, 20.0)
  ve = sde.VESDE()
  assert (ve.sigma_min, ve.sigma_max) == (0.01, 50.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    vp.beta_min = 1.0
  # A process is a pytree: it goes through jit as an argument.
  out = jax.jit(lambda p, t: p.sigma(t))(ve, jnp.array([0.5]))
  np.testing.assert_allclose(out, [0.01 * 5000**0.5], rtol=1e-5)


@pytest.mark.parametrize('name', list(SDES))
def test_drift_and_diffusion_generate_the_marginal(name):
  """d log alpha/dt = f and d sigma^2/dt = 2 f sigma^2 + g^2 (Sarkka & Solin 2019, eqs. 5.50-5.51,
  as used in Song et al. 2021, App. B)."""
  process = SDES[name]
  t = jnp.linspace(0.01, 0.99, 9)
  x = jnp.ones((9, 1))
  f_x, g = process.drift_and_diffusion(x, t)
  f = f_x[:, 0]
  assert g.shape == (9,)
  dlog_alpha = jax.vmap(jax.grad(lambda s: process.log_alpha(s)))(t)
  dvar = jax.vmap(jax.grad(lambda s: jnp.square(process.sigma(s))))(t)
  np.testing.assert_allclose(f, dlog_alpha, rtol=1e-5, atol=1e-6)
  # atol: for sub-VP near t = 1 the right side is a difference of terms ~17 in float32.
  np.testing.assert_allclose(dvar, 2 * f * jnp.square(process.sigma(t)) + g**2, rtol=1e-4,
                             atol=1e-5)
  # The generic coefficients (jvp of alpha and sigma) agree with the closed forms.
  f_gen, g2_gen = sde.linear_sde_coefficients(process, t)
  np.testing.assert_allclose(f_gen, f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g2_gen, g**2, rtol=1e-4)


def test_generic_coefficients_of_discrete_vp_are_its_betas():
  """For DDPM, log alpha falls by log(1 - beta_i)/2 on step i: f = log(1 - beta_i)/2."""
  process = processes.DiscreteVP.linear()
  i = np.array([10, 300, 900])
  f, g2 = sde.linear_sde_coefficients(process, i - 0.5)
  betas = np.asarray(process.betas, np.float64)[i - 1]
  np.testing.assert_allclose(f, 0.5 * np.log1p(-betas), rtol=1e-3)
  np.testing.assert_allclose(g2, -np.log1p(-betas), rtol=2e-2)  # g^2 = beta/(dt = 1) to O(beta^2)


@pytest.mark.parametrize('name', list(SDES))
def test_t_from_log_snr_inverts_log_snr(name):
  process = SDES[name]
  t = jnp.concatenate([jnp.array([process.t_min, 2e-3, 0.01]), jnp.linspace(0.05, 1.0, 20)])
  np.testing.assert_allclose(process.t_from_log_snr(process.log_snr(t)), t, rtol=1e-4, atol=1e-6)
  lam = jnp.linspace(process.log_snr(1.0), process.log_snr(process.t_min), 25)
  np.testing.assert_allclose(process.log_snr(process.t_from_log_snr(lam)), lam, rtol=1e-4,
                             atol=2e-3)


@pytest.mark.parametrize('name', list(SDES))
def test_times_outside_the_domain_raise(name):
  process = SDES[name]
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match=r'times must lie in \[t_min, t_max\]'):
    process.sigma(jnp.array([1.5]))
  with pytest.raises(ValueError, match='times must lie'):
    process.drift_and_diffusion(x, jnp.array([0.0]))
  with pytest.raises(ValueError, match='times must lie'):
    process.alpha(-0.1)
  # Traced times are not checked (the samplers and the likelihood ODE call these inside jit).
  jax.jit(process.sigma)(jnp.array([0.5]))


def test_prior():
  for process, scale in ((SDES['vp'], 1.0), (SDES['subvp'], 1.0), (SDES['ve'], 50.0)):
    z = process.prior_sample(jax.random.key(0), (4000, 3))
    assert z.shape == (4000, 3)
    assert abs(float(jnp.std(z)) / scale - 1.0) < 0.05
    ref = stats.multivariate_normal(np.zeros(3), scale**2 * np.eye(3)).logpdf(np.asarray(z[:5]))
    np.testing.assert_allclose(process.prior_logp(z[:5]), ref, rtol=1e-5)


def test_discretize_is_ddpm_for_vp_and_smld_for_ve():
  x = jnp.ones((3, 2))
  t, dt = jnp.array([0.1, 0.5, 0.9]), 1e-3
  vp, ve = SDES['vp'], SDES['ve']
  f, g = vp.discretize(x, t, dt)
  a_t, a_next = _np_marginal('vp', t)[0], _np_marginal('vp', t + dt)[0]
  beta = 1 - (a_next / a_t) ** 2  # DDPM: x_{i+1} = sqrt(1 - beta) x_i + sqrt(beta) z
  np.testing.assert_allclose(f[:, 0], np.sqrt(1 - beta) - 1, rtol=1e-3)
  np.testing.assert_allclose(g, np.sqrt(beta), rtol=1e-3)
  f, g = ve.discretize(x, t, dt)
  s_t, s_next = _np_marginal('ve', t)[1], _np_marginal('ve', t + dt)[1]
  np.testing.assert_allclose(f, 0.0, atol=1e-7)
  np.testing.assert_allclose(g, np.sqrt(s_next**2 - s_t**2), rtol=1e-3)


@pytest.mark.parametrize('name', list(SDES))
def test_reverse_sde_and_probability_flow(name):
  process = SDES[name]
  score_fn = MIXTURE.model_fn(process, prediction='score')
  x = jax.random.normal(jax.random.key(1), (5, 2))
  t = jnp.full((5,), 0.3)
  f, g = process.drift_and_diffusion(x, t)
  score = score_fn(x, t)
  drift, diffusion = process.reverse(score_fn).drift_and_diffusion(x, t)
  np.testing.assert_allclose(drift, f - g[:, None] ** 2 * score, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(diffusion, g)
  drift, diffusion = process.reverse(score_fn, probability_flow=True).drift_and_diffusion(x, t)
  np.testing.assert_allclose(drift, process.pf_ode_drift(score_fn, x, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(drift, sde.probability_flow_drift(process, score_fn, x, t),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(diffusion, 0.0)


def test_check_model_process():
  for kind, process in (('log_sigma', SDES['ve']), ('t999', SDES['vp']), ('t999', SDES['subvp']),
                        ('t', processes.DiscreteVP.linear(100))):
    preconditioning.check_model_process(kind, 'eps', process)
  with pytest.raises(ValueError, match='a VE model .* VPSDE'):
    preconditioning.check_model_process('log_sigma', 'score', SDES['vp'])
  with pytest.raises(ValueError, match='a VP model .* VE process'):
    preconditioning.check_model_process('t999', 'eps', SDES['ve'])
  with pytest.raises(ValueError, match=r'\[eps, 1\].*DiscreteVP'):
    preconditioning.check_model_process('t999', 'eps', processes.DiscreteVP.linear(100))
  with pytest.raises(ValueError, match='parameterization'):
    preconditioning.check_model_process('t', 'noise', SDES['vp'])


@pytest.mark.parametrize('name', ['vp', 've'])
def test_importance_sample_times_is_unbiased_for_the_likelihood_weighting(name):
  """E_{t~p}[w h(t)] = E_{t~U}[g^2/sigma^2 h(t)], the reference by quadrature in float64."""
  process = SDES[name]
  t, w = sde.importance_sample_times(process, jax.random.key(0), (100_000,))
  assert float(t.min()) >= process.t_min and float(t.max()) <= process.t_max
  h = lambda s: np.sin(3 * s) + 1.5
  estimate = np.asarray(w) * h(np.asarray(t, np.float64))
  # g^2/sigma^2 = -d lambda/dt, lambda from the NumPy marginal.
  grid = np.geomspace(process.t_min, 1.0, 200_001)
  alpha, sigma = _np_marginal(name, grid)
  weight = -np.gradient(np.log(alpha**2 / sigma**2), grid)
  ref = integrate.trapezoid(weight * h(grid), grid) / (1.0 - process.t_min)
  assert abs(estimate.mean() - ref) < 4 * estimate.std() / np.sqrt(estimate.size) + 1e-3 * ref


# --- samplers ------------------------------------------------------------------------------------


def _assert_matches_mixture(x):
  """Mean, covariance and mode weights of samples x: [n, 2] within 4 standard errors."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  assert np.all(np.isfinite(x))
  mean = x.mean(0)
  np.testing.assert_array_less(np.abs(mean - MIXTURE.mean()), 4 * x.std(0) / np.sqrt(n))
  centered = x - MIXTURE.mean()
  prods = np.einsum('ni,nj->nij', centered, centered)
  se_cov = prods.std(0) / np.sqrt(n)
  np.testing.assert_array_less(np.abs(prods.mean(0) - MIXTURE.cov()), 4 * se_cov)
  # E_x[p(k | x)] = w_k under the true distribution.
  resp = np.asarray(MIXTURE.responsibilities(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_array_less(np.abs(resp.mean(0) - MIXTURE.weights),
                               4 * resp.std(0) / np.sqrt(n) + 1e-3)


@pytest.mark.parametrize('name', list(SDES))
@pytest.mark.parametrize('sampler', ['pc', 'ode'])
def test_samplers_reproduce_the_mixture(name, sampler):
  process = SDES[name]
  model_fn = MIXTURE.model_fn(process, prediction='eps')
  x_T = process.prior_sample(jax.random.key(0), (2000, 2))
  if sampler == 'pc':
    run = jax.jit(lambda x, k: pc(model_fn, process, x, num_steps=250, key=k))
    x0, info = run(x_T, jax.random.key(1))
    assert int(info['nfe']) == 250 * 2 + 1
  else:
    x0, info = jax.jit(lambda x: ode(model_fn, process, x))(x_T)
    assert bool(info['success'])
  _assert_matches_mixture(x0)


@pytest.mark.parametrize('predictor,corrector', [('euler_maruyama', 'none'),
                                                 ('ancestral', 'none'),
                                                 ('reverse_diffusion', 'ald')])
def test_pc_predictors_and_correctors(predictor, corrector):
  process = SDES['vp']
  model_fn = MIXTURE.model_fn(process, prediction='x0')
  x_T = process.prior_sample(jax.random.key(0), (2000, 2))
  run = jax.jit(lambda x, k: pc(model_fn, process, x, num_steps=200, key=k, prediction='x0',
                                predictor=predictor, corrector=corrector))
  x0, _ = run(x_T, jax.random.key(2))
  _assert_matches_mixture(x0)


def test_pc_works_for_discrete_vp_and_explains_euler_maruyama():
  process = processes.DiscreteVP.linear()
  model_fn = MIXTURE.model_fn(process, prediction='eps')
  x_T = process.prior_sample(jax.random.key(0), (2000, 2))
  x0, info = jax.jit(lambda x, k: pc(model_fn, process, x, num_steps=200, key=k,
                                     predictor='ancestral', corrector='none',
                                     return_trajectory=True))(x_T, jax.random.key(3))
  assert info['trajectory'].shape == (201, 2000, 2)
  np.testing.assert_array_equal(info['trajectory'][-1], x0)
  _assert_matches_mixture(x0)
  with pytest.raises(ValueError, match="'reverse_diffusion', 'ancestral' or 'none'"):
    pc(model_fn, process, x_T, num_steps=10, key=jax.random.key(0), predictor='euler_maruyama')


def test_pc_argument_errors():
  process = SDES['vp']
  model_fn = MIXTURE.model_fn(process)
  x_T = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match='predictor=.*PREDICTORS|predictor=.*one of'):
    pc(model_fn, process, x_T, num_steps=5, key=jax.random.key(0), predictor='heun')
  with pytest.raises(ValueError, match='corrector=.*one of'):
    pc(model_fn, process, x_T, num_steps=5, key=jax.random.key(0), corrector='mala')
  with pytest.raises(ValueError, match='key'):
    pc(model_fn, process, x_T, num_steps=5, key=None)
  with pytest.raises(ValueError, match='num_steps'):
    pc(model_fn, process, x_T, num_steps=0, key=jax.random.key(0))


@pytest.mark.parametrize('name', ['vp', 've'])
def test_ode_follows_the_exact_flow_and_nfe_falls_with_rtol(name):
  """Without denoising, ode lands on the exact PF-ODE map (SciPy DOP853, float64)."""
  process = SDES[name]
  model_fn = MIXTURE.model_fn(process, prediction='v')
  x_T = process.prior_sample(jax.random.key(4), (64, 2))
  nfes = []
  for rtol in (1e-5, 1e-3):
    x, info = jax.jit(lambda x: ode(model_fn, process, x, prediction='v', rtol=rtol, atol=rtol,
                                    denoise=False))(x_T)
    nfes.append(int(info['nfe']))
    if rtol == 1e-5:
      t_min = process.t_min
      exact = MIXTURE.pf_ode_map(np.asarray(x_T), float(process.alpha(1.0)),
                                 float(process.sigma(1.0)), alpha_end=float(process.alpha(t_min)),
                                 sigma_end=float(process.sigma(t_min)))
      np.testing.assert_allclose(x, exact, atol=2e-3)
  assert nfes[1] < nfes[0], nfes


def test_ode_trajectory_and_discrete_vp():
  process = processes.DiscreteVP.linear()
  model_fn = MIXTURE.model_fn(process, prediction='eps')
  x_T = process.prior_sample(jax.random.key(5), (16, 2))
  calls = []
  x0, info = jax.jit(lambda x: ode(model_fn, process, x, num_steps=4, rtol=1e-3, atol=1e-3,
                                   return_trajectory=True,
                                   callback=lambda step, n: calls.append((int(step), n))))(x_T)
  jax.effects_barrier()
  assert info['trajectory'].shape == (5, 16, 2) and bool(info['success'])
  np.testing.assert_allclose(info['trajectory'][0], x_T)
  np.testing.assert_array_equal(info['trajectory'][-1], x0)  # denoised, as the other samplers
  assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
  assert np.all(np.isfinite(np.asarray(x0)))


def test_solve_ode_on_a_linear_system():
  """dy/dt = -k y, per-example rates, integrated backward and forward in time."""
  k = jnp.array([0.5, 2.0, 5.0])[:, None]
  y0 = jnp.ones((3, 2))
  sol = solve_ode(lambda t, y: -k * y, y0, 0.0, 1.0, rtol=1e-7, atol=1e-9)
  np.testing.assert_allclose(sol.y, np.exp(-np.asarray(k)) * np.ones((3, 2)), rtol=1e-5)
  back = solve_ode(lambda t, y: -k * y, sol.y, 1.0, 0.0, rtol=1e-7, atol=1e-9)
  np.testing.assert_allclose(back.y, y0, rtol=1e-5)
  assert bool(sol.success) and int(sol.nfe) == 2 + 6 * (int(sol.num_accepted) +
                                                       int(sol.num_rejected))


def test_pc_program_does_not_grow_with_num_steps():
  process = SDES['ve']
  model = MIXTURE.model_fn(process)
  x_T = jnp.zeros((4, 2))
  sizes = []
  for n in (10, 40):
    jaxpr = jax.make_jaxpr(lambda x, n=n: pc(model, process, x, num_steps=n,
                                             key=jax.random.key(0)))(x_T)
    sizes.append(len(jaxpr.jaxpr.eqns))
  assert sizes[0] == sizes[1], sizes


def test_ode_that_runs_out_of_max_steps_warns():
  """Without return_info nothing else says the solve stopped early: a RuntimeWarning at run time
  (under jit too), none when it finishes."""
  process = processes.DiscreteVP.linear()
  model_fn = MIXTURE.model_fn(process, prediction='eps')
  x_T = process.prior_sample(jax.random.key(5), (8, 2))
  run = jax.jit(lambda x, steps: sampling.sample(model_fn, process, method='ode', num_steps=1,
                                                 x_T=x, max_steps=steps, return_info=True),
                static_argnums=1)
  with pytest.warns(RuntimeWarning, match=r'max_steps=3 step attempts before reaching t_min'):
    _, info = run(x_T, 3)
    jax.effects_barrier()
  assert not bool(info['success'])
  with warnings.catch_warnings():
    warnings.simplefilter('error', RuntimeWarning)
    _, info = run(x_T, 4096)
    jax.effects_barrier()
  assert bool(info['success'])
