"""GITS (sampling/gits.py): the dynamic programme against brute force, the costs against NumPy,
and the fitted grid on an exact mixture oracle."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import oracles, processes, sampling
from diffusion_jax.sampling import gits


def _brute_force(cost, n, coeff):
  m = cost.shape[0] - 1
  best = None
  for mid in itertools.combinations(range(1, m), n - 1):
    path = [0, *mid, m]
    value = sum(coeff**s * cost[path[s], path[s + 1]] for s in range(n))
    if best is None or value < best[0]:
      best = (value, path)
  return best[1]


@pytest.mark.parametrize('coeff', [1.0, 1.15, 0.8])
def test_cheapest_path_is_the_brute_force_minimum(coeff):
  rng = np.random.default_rng(0)
  for _ in range(20):
    m = int(rng.integers(3, 10))
    n = int(rng.integers(1, m + 1))
    cost = rng.uniform(0.0, 1.0, (m + 1, m + 1))
    cost[np.tril_indices(m + 1)] = np.inf
    assert gits.cheapest_path(cost, n, coeff=coeff) == _brute_force(cost, n, coeff)


@pytest.fixture(scope='module')
def mixture_calibration():
  process = processes.DiscreteVP.linear()
  mix = oracles.example_mixture()
  fn = mix.model_fn(process)
  return process, mix, fn, gits.calibrate(fn, process, key=jax.random.PRNGKey(0), shape=(32, 2),
                                          num_teacher_steps=40)


@pytest.mark.parametrize('metric,scale', [('mse', 'prior'), ('l2', 'edm')])
def test_costs_are_ddim_steps_between_teacher_states(mixture_calibration, metric, scale):
  """Each cost is recomputed in float64 NumPy from the teacher's states and the oracle's x0."""
  process, mix, fn, cal = mixture_calibration
  if (metric, scale) != ('mse', 'prior'):
    cal = gits.calibrate(fn, process, key=jax.random.PRNGKey(0), shape=(32, 2),
                         num_teacher_steps=40, metric=metric, scale=scale)
  fine = cal.teacher_times
  _, info = sampling.sample(fn, process, method='unipc', num_steps=len(fine),
                            key=jax.random.PRNGKey(0), shape=(32, 2), times=fine, order=3,
                            variant='bh2', lower_order_final=True, return_info=True,
                            return_trajectory=True)
  states = np.asarray(info['trajectory'], np.float64)
  alpha = np.append(np.asarray(process.alpha(jnp.asarray(fine)), np.float64), 1.0)
  sigma = np.append(np.asarray(process.sigma(jnp.asarray(fine)), np.float64), 0.0)
  m = len(fine)
  for i, j in [(0, 1), (0, m), (3, 17), (m - 1, m), (10, m)]:
    x0 = np.asarray(mix.posterior_mean(jnp.asarray(states[i], jnp.float32), alpha[i], sigma[i]),
                    np.float64)
    eps = (states[i] - alpha[i] * x0) / sigma[i]
    d = (alpha[j] * x0 + sigma[j] * eps - states[j]) / (
        np.sqrt(alpha[j]**2 + sigma[j]**2) if scale == 'prior' else alpha[j])
    want = np.mean(d**2) if metric == 'mse' else np.mean(np.sqrt(np.sum(d**2, axis=1)))
    # float32 states and predictions: about 1e-6 absolute per coordinate near the data.
    np.testing.assert_allclose(cal.cost[i, j], want, rtol=2e-3,
                               atol=2e-6 if metric == 'l2' else 4e-12)
  assert np.all(np.isinf(cal.cost[np.tril_indices(m + 1)]))
  assert cal.nfe == 2 * m == int(info['nfe']) * 2


def test_times_are_a_path_of_the_fine_grid(mixture_calibration):
  process, _, _, cal = mixture_calibration
  for n in (1, 2, 7, 40):
    t = np.asarray(cal.times(n))
    assert t.shape == (n,) and t[0] == cal.teacher_times[0] == process.t_max
    assert np.all(np.diff(t) < 0) and np.all(np.isin(t, cal.teacher_times))
  np.testing.assert_array_equal(cal.times(40), cal.teacher_times)
  np.testing.assert_array_equal(cal.times(jnp.int32(7)), cal.times(7))
  # NumPy times: a jitted sampler may lay them out itself.
  fn = oracles.example_mixture().model_fn(process)
  x = jax.jit(lambda k: sampling.sample(fn, process, method='plms', num_steps=5, times=cal.times(5),
                                        order=3, warm_start='ab', key=k, shape=(4, 2)))(
                                            jax.random.PRNGKey(3))
  assert x.shape == (4, 2) and bool(jnp.all(jnp.isfinite(x)))
  for bad in (0, 41, 2.5, True, 'a'):
    with pytest.raises(ValueError, match='num_steps must be an integer in'):
      cal.times(bad)


def test_bad_arguments_are_refused():
  process = processes.DiscreteVP.linear()
  fn = oracles.example_mixture().model_fn(process)
  with pytest.raises(ValueError, match='num_teacher_steps'):
    gits.calibrate(fn, process, key=jax.random.PRNGKey(0), shape=(4, 2), num_teacher_steps=1)
  for bad in (2.0, True, jnp.float32(3.0)):
    with pytest.raises(ValueError, match='num_teacher_steps must be an integer'):
      gits.calibrate(fn, process, key=jax.random.PRNGKey(0), shape=(4, 2), num_teacher_steps=bad)
  for coeff in (0.0, 'a', None):
    with pytest.raises(ValueError, match='coeff must be a positive number'):
      gits.calibrate(fn, process, key=jax.random.PRNGKey(0), shape=(4, 2), coeff=coeff)
  with pytest.raises(ValueError, match='metric'):
    gits.calibrate(fn, process, key=jax.random.PRNGKey(0), shape=(4, 2), metric='l1')
  with pytest.raises(ValueError, match='scale'):
    gits.calibrate(fn, process, key=jax.random.PRNGKey(0), shape=(4, 2), scale='x')
  with pytest.raises(ValueError, match='x_T'):
    gits.calibrate(fn, process)


def _mixture_5d():
  rng = np.random.default_rng(22)  # test_sampler_defaults.py's 5-D oracle (stds down to 0.03)
  return oracles.GaussianMixture(
      weights=np.array([0.2, 0.5, 0.3]), means=1.5 * rng.standard_normal((3, 5)) + 0.5,
      covs=np.stack([np.diag(s) for s in np.exp(rng.uniform(np.log(0.03**2), 0.0, (3, 5)))]))


@pytest.mark.parametrize('name', ['linear-2d', 've-5d'])
def test_fitted_grid_against_the_exact_map(name):
  """iPNDM (plms, order 3) on the fitted grid against the exact probability-flow map: within 2x
  DDIM's error (the library's defaults) at 5 and 10 steps on both oracles (measured 0.07-0.89x);
  on the 2-D mixture at 10 steps 0.2x the error of plms's defaults (its grid ends coarser). On
  the 5-D VE oracle at 10 steps it is 6x plms's defaults (a mode flip of a few samples), which is
  why the fitted grid is an option and not a default (docs/benchmarks.md)."""
  from diffusion_jax import sde  # pylint: disable=import-outside-toplevel
  process, mix = ((processes.DiscreteVP.linear(), oracles.example_mixture()) if name == 'linear-2d'
                  else (sde.VESDE(), _mixture_5d()))
  fn = mix.model_fn(process)
  a_T, s_T = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
  x_T = np.sqrt(a_T**2 + s_T**2) * np.asarray(jax.random.normal(jax.random.PRNGKey(1),
                                                                 (256, mix.dim)))
  ref = mix.pf_ode_map(x_T.astype(np.float64), a_T, s_T)
  cal = gits.calibrate(fn, process, key=jax.random.PRNGKey(2), shape=(64, mix.dim))
  rms = lambda x: float(np.sqrt(np.mean((np.asarray(x, np.float64) - ref)**2)))
  x_T = jnp.asarray(x_T, jnp.float32)
  for n in (5, 10):
    fitted = rms(sampling.sample(fn, process, method='plms', num_steps=n, x_T=x_T,
                                 times=cal.times(n), order=3, warm_start='ab'))
    ddim = rms(sampling.sample(fn, process, method='ddim', num_steps=n, x_T=x_T))
    assert fitted <= 2.0 * ddim, (n, fitted, ddim)
    if name == 'linear-2d' and n == 10:
      plms = rms(sampling.sample(fn, process, method='plms', num_steps=n, x_T=x_T))
      assert fitted <= 0.5 * plms, (fitted, plms)


def test_rectified_flow_and_a_model_that_is_not_finite():
  """A 'flow' model on RectifiedFlow calibrates (its grid starts at t_max); a model whose
  prediction is NaN at some times is refused with the time named, not fitted around."""
  process = processes.RectifiedFlow()
  mix = oracles.example_mixture()
  cal = gits.calibrate(mix.model_fn(process, prediction='flow'), process, prediction='flow',
                       key=jax.random.PRNGKey(0), shape=(16, 2),
                       num_teacher_steps=np.int64(20))  # any concrete integer
  assert len(cal.teacher_times) == 20
  t = np.asarray(cal.times(5))
  assert t[0] == process.t_max and np.all(np.diff(t) < 0)
  eps_fn = mix.model_fn(process)
  broken = lambda x, t, cond: jnp.where((t > 0.5)[:, None], jnp.nan, eps_fn(x, t, cond))
  with pytest.raises(ValueError, match='is not finite'):
    gits.calibrate(broken, process, key=jax.random.PRNGKey(0), shape=(16, 2),
                   num_teacher_steps=20)
