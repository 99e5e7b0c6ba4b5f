"""No silent blow-ups (issue 22): the edge cases with their right values.

References are independent of the samplers: the exact probability-flow map of Gaussian data
(affine, closed form), a float64 NumPy DDIM, and the Gaussian-mixture oracle's SciPy float64 map.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import oracles, processes, sampling

# Data N(0.3, 0.5^2) in one dimension.
MEAN, STD = 0.3, 0.5
GAUSS = oracles.GaussianMixture(np.array([1.0]), np.array([[MEAN]]), np.array([[[STD**2]]]))
X_T3 = jnp.array([[-1.0], [0.0], [1.0]])


def gaussian_pf_map(x_T, alpha_T, sigma_T):
  """The exact PF-ODE map of N(m, c^2) data from (alpha_T, sigma_T) to the data (float64)."""
  x_T = np.asarray(x_T, np.float64)
  return MEAN + STD * (x_T - MEAN * alpha_T) / np.sqrt(STD**2 * alpha_T**2 + sigma_T**2)


# --- more steps than the grid has distinct times -------------------------------------------------


@pytest.mark.parametrize('method', ['dpmpp_3m', 'unipc', 'dpmpp_2m'])
def test_rounded_grid_repeats_are_dropped(method):
  # N = 10: 11 uniform steps round to a grid that repeats t = 4 (0 / 0 in log-SNR: was NaN),
  # 20 steps repeat most times. The distinct times are the 10-step grid's.
  process = processes.DiscreteVP.linear(num_timesteps=10, beta_start=1e-4, beta_end=0.2)
  model = GAUSS.model_fn(process)
  want = sampling.sample(model, process, method=method, num_steps=10, x_T=X_T3, grid='uniform')
  for n in (11, 20):
    got, info = sampling.sample(model, process, method=method, num_steps=n, x_T=X_T3,
                                grid='uniform', return_info=True)
    assert np.all(np.isfinite(got)), (n, got)
    np.testing.assert_array_equal(got, want)
    assert info['nfe'] == 10


@pytest.mark.parametrize('spacing', ['trailing', 'leading'])
def test_2500_steps_on_1000_timesteps_are_the_1000_step_run(spacing):
  # 'leading' puts 1501 of the 2500 times at t = N, where they did nothing.
  process = processes.DiscreteVP.linear()
  model = GAUSS.model_fn(process)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 1))
  run = lambda n: sampling.sample(model, process, method='dpmpp_2m', num_steps=n, x_T=x_T,
                                  grid='uniform', spacing=spacing, return_info=True)
  got, info = run(2500)
  want, _ = run(1000)
  np.testing.assert_array_equal(got, want)
  assert info['nfe'] == 1000
  ref = gaussian_pf_map(x_T, float(process.alpha(1000.0)), float(process.sigma(1000.0)))
  err = np.sqrt(np.mean(np.square(np.asarray(got, np.float64) - ref)))
  assert err < 1e-4, err  # measured 7.2e-5 (issue 22: 7e-5)


# --- zero terminal SNR ---------------------------------------------------------------------------


def _zero_snr():
  betas = np.linspace(1e-3, 0.2, 10)
  betas[-1] = 1.0
  return betas, processes.DiscreteVP.from_betas(betas)


def _exact_v_model(process):
  """The exact v-prediction of N(0.3, 0.5^2) data, written without dividing by alpha."""

  def fn(x, t, cond=None):
    del cond
    a = process.alpha(t)[:, None]
    s = process.sigma(t)[:, None]
    x0 = MEAN + STD**2 * a * (x - MEAN * a) / (STD**2 * a * a + s * s)
    eps = (x - a * x0) / s
    return a * eps - s * x0

  return fn


def _numpy_ddim(betas, x_T, times):
  """DDIM (eta = 0) in float64 with the exact posterior mean of the Gaussian data."""
  abar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
  a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
  x = np.asarray(x_T, np.float64)
  for k, t in enumerate(times):
    x0 = MEAN + STD**2 * a[t] * (x - MEAN * a[t]) / (STD**2 * a[t]**2 + s[t]**2)
    eps = (x - a[t] * x0) / s[t]
    t_next = times[k + 1] if k + 1 < len(times) else 0
    x = a[t_next] * x0 + s[t_next] * eps
  return x


def test_zero_terminal_snr_euler_is_ddim():
  betas, process = _zero_snr()
  want = _numpy_ddim(betas, X_T3, list(range(10, 0, -1)))
  np.testing.assert_allclose(want.ravel(), [-0.120, 0.3, 0.720], atol=5e-4)  # issue 22's values
  model = _exact_v_model(process)
  for method in ('ddim', 'euler'):
    got = sampling.sample(model, process, method=method, num_steps=10, x_T=X_T3, grid='uniform',
                          prediction='v')
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=method)  # euler was -0.146, 0.695


@pytest.mark.parametrize('method,options', [('heun', {}), ('plms', {}),
                                            ('plms', {'warm_start': 'ab'})])
def test_zero_terminal_snr_second_order_starts_stay_finite(method, options):
  # Were +-5e4 (heun, plms): their first step from alpha_T ~ 0 is now DDIM's. Right value: no
  # further from the exact map (0.3 + 0.5 x_T) than DDIM's 0.080.
  betas, process = _zero_snr()
  model = _exact_v_model(process)
  exact = gaussian_pf_map(X_T3, 0.0, 1.0)
  ddim_err = np.abs(_numpy_ddim(betas, X_T3, list(range(10, 0, -1))) - exact).max()
  got = sampling.sample(model, process, method=method, num_steps=10, x_T=X_T3, grid='uniform',
                        prediction='v', **options)
  assert np.all(np.isfinite(got))
  assert np.abs(np.asarray(got) - exact).max() <= ddim_err, got


def _rescaled_zero_snr():
  """DDPM's linear schedule (1000 steps) rescaled to zero terminal SNR: Lin et al. (2024),
  Algorithm 1 (sqrt(alpha_bar) shifted and scaled so its last value is 0)."""
  s = np.sqrt(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))
  s = (s - s[-1]) * s[0] / (s[0] - s[-1])
  abar = s**2
  return processes.DiscreteVP.from_betas(1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]]))


def test_oracle_predictions_hold_at_zero_terminal_snr():
  # The oracle's x0 / v / flow come from E[x0 | x_t] without dividing by alpha: at alpha_T ~ 6e-11
  # the v-prediction was off by ~900 (x0 = (x - sigma eps) / alpha in float32).
  process = _rescaled_zero_snr()
  assert float(process.alpha(process.t_max)) < 1e-9
  t = jnp.array([1000.0, 999.0, 990.0, 500.0, 1.0])
  x = jnp.linspace(-2.0, 2.0, 5)[:, None]
  want_v = _exact_v_model(process)(x, t)
  got_v = GAUSS.model_fn(process, prediction='v')(x, t)
  np.testing.assert_allclose(got_v, want_v, atol=2e-5)
  a = np.asarray(process.alpha(t), np.float64)[:, None]
  s = np.asarray(process.sigma(t), np.float64)[:, None]
  want_x0 = MEAN + STD**2 * a * (np.asarray(x) - MEAN * a) / (STD**2 * a * a + s * s)
  np.testing.assert_allclose(GAUSS.model_fn(process, prediction='x0')(x, t), want_x0, atol=2e-5)
  # A two-component 2-D mixture where alpha is not small: the same E[x0 | x_t] as the score's.
  mix = oracles.example_mixture()
  p = processes.DiscreteVP.linear()
  xs = jax.random.normal(jax.random.PRNGKey(3), (64, mix.dim))
  ts = jnp.full((64,), 300.0)
  a, s = p.alpha(ts)[:, None], p.sigma(ts)[:, None]
  via_score = (xs + s * s * mix.score(xs, p.alpha(ts), p.sigma(ts))) / a
  np.testing.assert_allclose(mix.model_fn(p, prediction='x0')(xs, ts), via_score, atol=1e-4)


@pytest.mark.parametrize('method', ['heun', 'plms', 'dpmpp_2m', 'dpmpp_3m', 'unipc'])
def test_zero_terminal_snr_defaults_within_twice_ddim(method):
  # With only method and num_steps: plms's log-SNR grid put half of 10 steps at alpha < 1e-3 and
  # returned 46-133x DDIM's error at 8-10 steps (grids.LOGSNR_FLOOR).
  process = _rescaled_zero_snr()
  model = GAUSS.model_fn(process, prediction='v')
  x_T = jax.random.normal(jax.random.PRNGKey(0), (256, 1))
  exact = gaussian_pf_map(np.asarray(x_T, np.float64), 0.0, 1.0)
  rms = lambda x: float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64) - exact))))
  for num_steps in (5, 8, 10, 14, 20):
    x, info = sampling.sample(model, process, method=method, num_steps=num_steps, x_T=x_T,
                              prediction='v', return_info=True)
    ddim = sampling.sample(model, process, method='ddim', num_steps=int(info['nfe']), x_T=x_T,
                           prediction='v')
    assert rms(x) <= 2.0 * rms(ddim), (num_steps, rms(x), rms(ddim))


# --- two or three steps --------------------------------------------------------------------------


@pytest.mark.parametrize('method,num_steps,grid', [('heun', 2, None), ('heun', 3, None),
                                                   ('heun', 3, 'karras'), ('heun', 6, 'karras'),
                                                   ('plms', 2, None), ('plms', 3, None),
                                                   ('plms', 4, None), ('plms', 3, 'karras')])
def test_few_steps_within_twice_ddim(method, num_steps, grid):
  # Were RMS 108 (heun 2 steps, plms 2 steps: 3 NFE), 24 (plms, 4 NFE), 4.5 (heun on Karras' grid).
  process = processes.DiscreteVP.linear()
  mix = oracles.example_mixture()
  model = mix.model_fn(process)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (128, 2))
  ref = mix.pf_ode_map(np.asarray(x_T, np.float64), float(process.alpha(1000.0)),
                       float(process.sigma(1000.0)))
  rms = lambda x: float(np.sqrt(np.mean(np.sum(np.square(np.asarray(x, np.float64) - ref), -1))))
  got, info = sampling.sample(model, process, method=method, num_steps=num_steps, x_T=x_T,
                              grid=grid, return_info=True)
  ddim = sampling.sample(model, process, method='ddim', num_steps=int(info['nfe']), x_T=x_T,
                         grid=grid)
  assert rms(got) <= 2.0 * rms(ddim), (rms(got), rms(ddim), info['nfe'])


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize('num_steps', [None, float('nan'), float('inf'), '5', 0, 2.5, True])
def test_num_steps_that_is_not_a_positive_integer_is_refused(num_steps):
  process = processes.DiscreteVP.linear()
  with pytest.raises(ValueError, match='num_steps must be an integer >= 1'):
    sampling.sample(GAUSS.model_fn(process), process, method='ddim', num_steps=num_steps,
                    x_T=X_T3)


@pytest.mark.parametrize('output,error', [
    (lambda x: x[:, 0], ValueError), (lambda x: x[..., None], ValueError),
    (lambda x: jnp.zeros(1), ValueError), (lambda x: 0.0, TypeError),
    (lambda x: (x, x), TypeError), (lambda x: {'eps': x}, TypeError), (lambda x: None, TypeError)])
@pytest.mark.parametrize('guided', [False, True])
def test_model_output_of_another_shape_is_refused(output, error, guided):
  # Were broadcast silently ([1], a scalar) or failed deep inside JAX; now named.
  process = processes.DiscreteVP.linear()
  x_T = jnp.zeros((4, 3))
  kwargs = {}
  if guided:
    kwargs = dict(cond={'label': jnp.zeros((4,), jnp.int32)},
                  null_cond={'label': jnp.array([10])}, guidance_scale=2.0)
  with pytest.raises(error, match='model_fn'):
    sampling.sample(lambda x, t, cond=None: output(x), process, method='dpmpp_2m', num_steps=3,
                    x_T=x_T, **kwargs)


def test_third_order_needs_a_history_step_not_much_shorter():
  # grid='optimized' on SD's scaled-linear schedule: its offsets push two interior times to the
  # grid's minimum step, then a 0.49 step (in lambda) that third order would take over them
  # (UniPC-3 at 13 steps: 2.26x DDIM's error on a held-out mixture, docs/benchmarks.md).
  from diffusion_jax.sampling import core, dpm_solver  # pylint: disable=import-outside-toplevel
  process = processes.DiscreteVP.from_betas(np.linspace(0.00085**0.5, 0.012**0.5, 1000)**2)
  sched = core.make_schedule(process, 13, grid='optimized', spacing='trailing', method='unipc')
  with np.errstate(divide='ignore'):  # the data: sigma = 0, lambda = inf
    lam = np.log(np.asarray(sched.alpha, np.float64)) - np.log(np.asarray(sched.sigma, np.float64))
  h = np.diff(lam)
  orders = dpm_solver.cap_third_order(np.full(13, 3), sched)
  for i in range(1, 12):
    short = h[i - 1] < dpm_solver.MIN_THIRD_ORDER_HISTORY_RATIO * h[i]
    coarse = h[i] > dpm_solver.MAX_THIRD_ORDER_STEP
    assert orders[i] == (2 if short or coarse else 3), (i, h[i - 1], h[i])
  assert any(h[i - 1] < 0.25 * h[i] <= 0.125 for i in range(1, 12))  # the case above is there
