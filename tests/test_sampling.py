"""Samplers against the exact Gaussian-mixture oracle (diffusion_jax/oracles.py).

The oracle's probability-flow map (SciPy, float64) is the exact answer every deterministic sampler
approximates, so the error is pure discretization error and its slope in NFE is the method's order;
stochastic samplers must reproduce the mixture's moments and mode weights within sampling error.
The model is the oracle's formula with the 2 x 2 inverses written out (checked against
``GaussianMixture.model_fn`` below): the same function, compiled several times faster.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import oracles, processes, sampling, sde
from diffusion_jax.sampling import core, grids, guidance

B = 64


def mixture_model(mix, process, prediction='eps'):
  """The exact ``model_fn(x, t, cond=None)`` of a 2-D mixture, closed form."""
  logw = jnp.log(jnp.asarray(mix.weights, jnp.float32))
  mu = jnp.asarray(mix.means, jnp.float32)
  c = jnp.asarray(mix.covs, jnp.float32)

  def fn(x, t, cond=None):
    del cond
    alpha, sigma = process.alpha(t), process.sigma(t)
    a2, s2 = (alpha**2)[:, None], (sigma**2)[:, None]
    p, q, r = a2 * c[:, 0, 0] + s2, a2 * c[:, 0, 1], a2 * c[:, 1, 1] + s2
    det = p * r - q * q
    d0 = x[:, None, 0] - alpha[:, None] * mu[:, 0]
    d1 = x[:, None, 1] - alpha[:, None] * mu[:, 1]
    sol0, sol1 = (r * d0 - q * d1) / det, (p * d1 - q * d0) / det
    resp = jax.nn.softmax(logw - 0.5 * (jnp.log(det) + d0 * sol0 + d1 * sol1), axis=-1)
    score = -jnp.stack([jnp.sum(resp * sol0, -1), jnp.sum(resp * sol1, -1)], -1)
    return processes.convert_prediction(score, x, alpha, sigma, source='score', target=prediction)

  return fn


PROCESSES = {'linear': processes.DiscreteVP.linear(), 'cosine': processes.DiscreteVP.cosine()}
MIXTURES = {1.0: oracles.example_mixture(), 3.0: oracles.example_mixture(scale=3.0)}


@functools.lru_cache(maxsize=None)
def setup(process_name='linear', scale=1.0):
  """(process, mixture, model, x_T [B, 2], exact PF-ODE image of x_T [B, 2] float64)."""
  process, mix = PROCESSES[process_name], MIXTURES[scale]
  x_T = jax.random.normal(jax.random.PRNGKey(0), (B, 2), jnp.float32)
  ref = mix.pf_ode_map(np.asarray(x_T, np.float64), float(process.alpha(process.t_max)),
                       float(process.sigma(process.t_max)))
  return process, mix, mixture_model(mix, process), x_T, ref


def rms(x, ref):
  return float(np.sqrt(np.mean(np.sum((np.asarray(x, np.float64) - ref)**2, -1))))


def run(model, process, x_T, method, n, **options):
  fn = jax.jit(lambda x: sampling.sample(model, process, method=method, num_steps=n, x_T=x,
                                         return_info=True, **options))
  return fn(x_T)


def test_closed_form_model_is_the_oracle():
  process, mix, model, x_T, _ = setup()
  t = jnp.linspace(1.0, 1000.0, B)
  np.testing.assert_allclose(model(x_T, t), mix.model_fn(process)(x_T, t), atol=2e-5)


# --- grids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(grids.GRIDS))
@pytest.mark.parametrize('process_name', ['linear', 'cosine'])
def test_grids_decrease_within_the_domain(name, process_name):
  process = PROCESSES[process_name]
  for n in (1, 7, 50):
    t = np.asarray(grids.make_grid(process, n, name))
    assert t.shape == (n,) and t.dtype == np.float32
    assert np.all(np.diff(t) < 0)
    assert t[0] == process.t_max and t.min() >= process.t_min
    if name != 'uniform' and n > 1:
      assert t[-1] == process.t_min


def test_grid_shapes():
  process = PROCESSES['linear']
  lam = np.asarray(process.log_snr(grids.logsnr(process, 9)))
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=2e-3)
  rho = np.exp(-0.5 * np.asarray(process.log_snr(grids.karras(process, 9)), np.float64))
  ramp = rho ** (1 / 7)  # eq. 5 of Karras et al.: linear in rho^(1/7)
  np.testing.assert_allclose(np.diff(ramp), np.diff(ramp)[0], rtol=2e-3)
  # diffusers' timestep_spacing, in our 1-based steps (diffusers' t + 1).
  np.testing.assert_array_equal(grids.uniform(process, 10, spacing='trailing'),
                                np.arange(1000, 0, -100))
  np.testing.assert_array_equal(grids.uniform(process, 10, spacing='leading'),
                                np.arange(901, 0, -100))
  np.testing.assert_array_equal(grids.uniform(process, 4, spacing='linspace'), [1000, 667, 334, 1])
  for spacing in grids.SPACINGS:  # Ho et al. Algorithm 2: every step
    np.testing.assert_array_equal(grids.uniform(process, 1000, spacing=spacing),
                                  np.arange(1000, 0, -1))


def test_cosine_grid():
  """grids.cosine: lambda = center + width * asinh(tan(y)) with y uniform (the Gudermannian's
  inverse in another form), pinned to t_max and t_min; on the cosine schedule with center 0 and
  width 1 it is the uniform grid (up to the schedule's offset s = 0.008); grid='cosine' is the
  chosen shape."""
  ve = sde.VESDE()
  for center, width, n in ((0.0, 1.0, 9), (-0.5, 2.0, 20), (-1.0, 1.5, 5)):
    t = np.asarray(grids.cosine(ve, n, center=center, width=width), np.float64)
    lam = -np.log(ve.sigma_min * (ve.sigma_max / ve.sigma_min)**t)  # log(alpha / sigma), alpha 1
    lo, hi = -np.log(ve.sigma_max), -np.log(ve.sigma_min)
    y = np.linspace(np.arctan(np.sinh((lo - center) / width)),
                    np.arctan(np.sinh((hi - center) / width)), n)
    np.testing.assert_allclose(lam, center + width * np.arcsinh(np.tan(y)), atol=2e-4)
    trailing = np.asarray(grids.cosine(ve, n, spacing='trailing', center=center, width=width))
    np.testing.assert_allclose(
        trailing, np.asarray(grids.cosine(ve, n + 1, center=center, width=width))[:n], rtol=1e-6)
  process = processes.DiscreteVP.cosine()
  np.testing.assert_allclose(grids.cosine(process, 10, spacing='trailing', center=0.0, width=1.0),
                             grids.uniform(process, 10, spacing='trailing'), atol=4.0)
  np.testing.assert_array_equal(grids.make_grid(process, 7, 'cosine'), grids.cosine(
      process, 7, center=grids.COSINE_CENTER, width=grids.COSINE_WIDTH))
  with pytest.raises(ValueError, match='width must be positive'):
    grids.cosine(ve, 5, width=0.0)


def test_optimized_grid(monkeypatch):
  """grids.optimized: the cosine grid's lambda plus the offset table at the interior points
  (exactly at n - 1 = len(table) trailing steps, interpolated in the position otherwise), the
  ends and t_start those of the cosine grid; zero offsets give the cosine grid; offsets that
  would reorder the times leave them MIN_LOG_SNR_STEP apart."""
  ve = sde.VESDE()
  lam_of = lambda t: -np.log(ve.sigma_min * (ve.sigma_max / ve.sigma_min)**np.asarray(t, np.float64))
  table = np.asarray(grids.OPTIMIZED_OFFSETS)
  linear = processes.DiscreteVP.linear()
  lam_linear = lambda t: 0.5 * np.asarray(linear.log_snr(t), np.float64)
  for n in (len(table) + 1, 5, 17):
    opt = grids.optimized(linear, n, spacing='trailing')
    cos = grids.cosine(linear, n, spacing='trailing')
    assert opt[0] == cos[0] == linear.t_max and np.all(np.diff(np.asarray(opt)) < 0)
    want = np.interp(np.linspace(0, 1, n - 1), np.linspace(0, 1, len(table)), table)
    moved = np.concatenate([lam_linear(cos[:1]), lam_linear(cos[1:]) + want])
    assert np.all(np.diff(moved) > grids.MIN_LOG_SNR_STEP + 0.01)  # the spacing rule is idle
    np.testing.assert_allclose(lam_linear(opt[1:]) - lam_linear(cos[1:]), want, atol=1e-5)
  np.testing.assert_array_equal(grids.make_grid(ve, 7, 'optimized', spacing='trailing'),
                                grids.optimized(ve, 7, spacing='trailing'))
  linspace = np.asarray(grids.optimized(ve, 6))
  assert linspace[-1] == pytest.approx(ve.t_min) and linspace[0] == ve.t_max
  t = grids.optimized(ve, 6, t_start=0.5)
  assert t[0] == np.float32(0.5) and np.all(np.diff(np.asarray(t)) < 0)
  monkeypatch.setattr(grids, 'OPTIMIZED_OFFSETS', (0.0,) * 9)
  for process in (ve, processes.DiscreteVP.linear()):
    np.testing.assert_allclose(grids.optimized(process, 10, spacing='trailing'),
                               grids.cosine(process, 10, spacing='trailing'), rtol=1e-6)
  monkeypatch.setattr(grids, 'OPTIMIZED_OFFSETS', (-30.0, 30.0))  # past both ends
  lam = lam_of(grids.optimized(ve, 4, spacing='linspace'))
  np.testing.assert_allclose(np.diff(lam)[[0, 2]], [grids.MIN_LOG_SNR_STEP] * 2, rtol=1e-2)


def test_trailing_spacing_of_the_nonuniform_grids():
  """'trailing' lays out n + 1 times as 'linspace' would and keeps the first n: the last
  evaluation is no longer at t_min, and at 5 NFE the oracle error drops (measured 0.275 -> 0.155
  for DPM-Solver++(2M) on the quadratic grid)."""
  process, _, model, x_T, ref = setup()
  for name in ('logsnr', 'karras', 'quadratic'):
    trailing = np.asarray(grids.make_grid(process, 5, name, spacing='trailing'))
    closed6 = np.asarray(grids.make_grid(process, 6, name, spacing='linspace'))
    np.testing.assert_allclose(trailing, closed6[:5], rtol=1e-6)
    assert trailing[-1] > process.t_min
    np.testing.assert_array_equal(grids.make_grid(process, 5, name),
                                  grids.make_grid(process, 5, name, spacing='linspace'))
    with pytest.raises(ValueError, match="'uniform' grid only"):
      grids.make_grid(process, 5, name, spacing='leading')
  errors = {sp: rms(run(model, process, x_T, 'dpmpp_2m', 5, grid='quadratic', spacing=sp)[0], ref)
            for sp in ('linspace', 'trailing')}
  assert errors['trailing'] < 0.7 * errors['linspace'], errors


# --- DDPM is Algorithm 2 of Ho et al. ------------------------------------------------------------


def test_ddpm_is_ho_algorithm_2():
  process = processes.DiscreteVP.linear(num_timesteps=50, beta_start=1e-3, beta_end=0.2)
  mix = MIXTURES[1.0]
  model = mixture_model(mix, process)
  key = jax.random.PRNGKey(3)
  x_T = jax.random.normal(jax.random.PRNGKey(4), (8, 2))
  for variance in ('small', 'large'):
    got = sampling.sample(model, process, method='ddpm', num_steps=50, x_T=x_T, key=key,
                          variance=variance)
    x = x_T
    for i, t in enumerate(range(50, 0, -1)):  # t = N, ..., 1 with Ho et al.'s eqs. 6-7, 11
      tb = jnp.full((8,), t)
      eps = model(x, tb.astype(jnp.float32))
      abar = jnp.exp(2 * process.log_alphas[t])
      x0 = (x - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
      mean, beta_tilde, beta = process.posterior_mean_variance(x, x0, tb)
      var = beta_tilde if variance == 'small' else beta
      z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
      x = mean + (t > 1) * jnp.sqrt(var)[:, None] * z
    np.testing.assert_allclose(got, x, atol=2e-4, rtol=1e-4)


# --- convergence to the exact PF-ODE map ---------------------------------------------------------


@pytest.mark.parametrize('process_name,scale', [('linear', 1.0), ('cosine', 1.0), ('linear', 3.0)])
def test_ddim_converges_to_the_pf_ode_map(process_name, scale):
  process, _, model, x_T, ref = setup(process_name, scale)
  errors = [rms(run(model, process, x_T, 'ddim', n)[0], ref) for n in (10, 100, 1000)]
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 0.01 * scale


# (method, options, process, NFE pair where the error is asymptotic (measured), order).
# The mixture's trajectories near the boundary between modes keep the error pre-asymptotic up to
# ~100 NFE; the pairs are where the local slope has settled.
ORDER_CASES = [
    ('ddim', {'grid': 'uniform'}, 'linear', (80, 160), 1),
    ('euler', {'grid': 'karras'}, 'linear', (80, 160), 1),
    ('heun', {'grid': 'karras'}, 'linear', (80, 160), 2),  # steps; NFE 158, 318
    ('dpmpp_2m', {'grid': 'logsnr'}, 'linear', (160, 320), 2),
    ('dpmpp_3m', {'grid': 'logsnr'}, 'linear', (160, 320), 3),
    ('unipc', {'grid': 'logsnr', 'order': 2}, 'linear', (160, 320), 3),  # UniP-2 + UniC
    ('unipc', {'grid': 'logsnr', 'order': 3}, 'linear', (80, 160), 4),
    ('unipc', {'grid': 'logsnr', 'order': 2, 'variant': 'bh1'}, 'linear', (160, 320), 3),
    ('ddim', {'grid': 'uniform'}, 'cosine', (80, 160), 1),
    ('dpmpp_2m', {'grid': 'logsnr'}, 'cosine', (320, 640), 2),
    ('dpmpp_3m', {'grid': 'logsnr'}, 'cosine', (160, 320), 3),
    ('unipc', {'grid': 'logsnr', 'order': 3}, 'cosine', (160, 320), 4),
    # The quadratic grid: same orders.
    ('dpmpp_3m', {'grid': 'quadratic'}, 'linear', (160, 320), 3),
    ('heun', {'grid': 'quadratic'}, 'linear', (80, 160), 2),
    ('unipc', {'grid': 'quadratic', 'order': 2}, 'linear', (160, 320), 3),
    # PLMS: AB4 in t inside the DDIM transfer, whose weight d(sigma/alpha)/dt is not constant,
    # leaves an O(dt^3) local error: second order (plms.py).
    ('plms', {'grid': 'quadratic', 'warm_start': 'heun', 'order': 4}, 'linear', (160, 320), 2),
    # iPNDM: the same equal-step AB weights on a non-uniform grid, order 2 whatever AB order.
    ('plms', {'grid': 'quadratic', 'warm_start': 'ab', 'order': 4}, 'linear', (160, 320), 2),
    ('plms', {'grid': 'quadratic', 'warm_start': 'ab', 'order': 2}, 'linear', (160, 320), 2),
]


@pytest.mark.parametrize('method,options,process_name,steps,order', ORDER_CASES,
                         ids=['-'.join([c[0], *map(str, c[1].values()), c[2]])
                              for c in ORDER_CASES])
def test_convergence_order(method, options, process_name, steps, order):
  process, _, model, x_T, ref = setup(process_name)
  errs, nfes = [], []
  for n in steps:
    x0, info = run(model, process, x_T, method, n, **options)
    errs.append(rms(x0, ref))
    nfes.append(info['nfe'])
  slope = -np.log(errs[1] / errs[0]) / np.log(nfes[1] / nfes[0])
  assert abs(slope - order) <= 0.3, (errs, nfes, slope)


@pytest.mark.parametrize('name', ['VPSDE', 'VESDE'])
def test_continuous_processes(name):
  from diffusion_jax import sde  # pylint: disable=import-outside-toplevel
  process, mix = getattr(sde, name)(), MIXTURES[1.0]
  x_T = process.prior_sample(jax.random.PRNGKey(0), (B, 2))
  ref = mix.pf_ode_map(np.asarray(x_T, np.float64), float(process.alpha(process.t_max)),
                       float(process.sigma(process.t_max)))
  for method, options in (('dpmpp_2m', {}), ('plms', {'warm_start': 'ab'})):
    x0 = run(mixture_model(mix, process), process, x_T, method, 50, **options)[0]
    assert rms(x0, ref) < 0.02, method


@pytest.mark.parametrize('method', ['dpmpp_2m', 'ddim'])
@pytest.mark.parametrize('prediction', ['x0', 'v', 'score'])
def test_prediction_types_agree(method, prediction):
  process, mix, model, x_T, _ = setup()
  want = run(model, process, x_T, method, 20)[0]
  other = mixture_model(mix, process, prediction)
  got = run(other, process, x_T, method, 20, prediction=prediction)[0]
  np.testing.assert_allclose(got, want, atol=2e-4)


# --- stochastic samplers reproduce the distribution ----------------------------------------------


def _moments_close(samples, mix, n_ref=200_000):
  """Mean, covariance and mode weights within 4 standard errors of the exact mixture."""
  samples = np.asarray(samples, np.float64)
  n = samples.shape[0]
  true, _ = mix.sample(jax.random.PRNGKey(123), n_ref)
  true = np.asarray(true, np.float64)
  m = mix.mean()
  se_mean = np.sqrt(np.diag(mix.cov()) / n)
  np.testing.assert_array_less(np.abs(samples.mean(0) - m), 4 * se_mean)
  centred_true = true - m
  prods_true = np.einsum('ni,nj->nij', centred_true, centred_true)
  se_cov = prods_true.std(0) / np.sqrt(n)
  cov = np.cov(samples.T, bias=True)
  np.testing.assert_array_less(np.abs(cov - mix.cov()), 4 * se_cov + 1e-12)
  # Mode weights through the Bayes assignment, compared with the same statistic on exact samples.
  assign = np.argmax(np.asarray(mix.responsibilities(jnp.asarray(samples, jnp.float32))), -1)
  assign_true = np.argmax(np.asarray(mix.responsibilities(jnp.asarray(true, jnp.float32))), -1)
  for k in range(len(mix.weights)):
    p = np.mean(assign_true == k)
    assert abs(np.mean(assign == k) - p) <= 4 * np.sqrt(p * (1 - p) / n), k


@pytest.mark.parametrize('method,n,options', [('ddpm', 1000, {}), ('ddim', 200, {'eta': 1.0}),
                                              ('dpmpp_2m_sde', 100, {}),
                                              ('euler', 200, {'S_churn': 40.0})])
def test_stochastic_samplers_reproduce_the_mixture(method, n, options):
  process, mix, model = PROCESSES['linear'], MIXTURES[1.0], mixture_model(MIXTURES[1.0],
                                                                          PROCESSES['linear'])
  fn = jax.jit(lambda key: sampling.sample(model, process, method=method, num_steps=n, key=key,
                                           shape=(3000, 2), **options))
  _moments_close(fn(jax.random.PRNGKey(7)), mix)


def test_stochastic_sampler_keys():
  process, _, model, x_T, _ = setup()
  a = sampling.sample(model, process, method='dpmpp_2m_sde', num_steps=10, x_T=x_T,
                      key=jax.random.PRNGKey(1))
  b = sampling.sample(model, process, method='dpmpp_2m_sde', num_steps=10, x_T=x_T,
                      key=jax.random.PRNGKey(1))
  c = sampling.sample(model, process, method='dpmpp_2m_sde', num_steps=10, x_T=x_T,
                      key=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


# --- the contract ---------------------------------------------------------------------------------


def test_all_methods_run_with_every_option():
  process, _, model, x_T, _ = setup()
  key = jax.random.PRNGKey(0)
  calls = []
  for method in sorted(sampling.METHODS):
    fn = jax.jit(lambda x, k, method=method: sampling.sample(
        model, process, method=method, num_steps=4, x_T=x, key=k, return_info=True,
        return_trajectory=True, callback=lambda i, n: calls.append((i, n))))
    x0, info = fn(x_T, key)
    assert x0.shape == x_T.shape and x0.dtype == jnp.float32
    assert info['trajectory'].shape == (5,) + x_T.shape
    np.testing.assert_array_equal(info['trajectory'][0], x_T)
    np.testing.assert_array_equal(info['trajectory'][-1], x0)
    assert np.all(np.isfinite(x0))
    jax.effects_barrier()
    assert calls == [(i, 4) for i in range(1, 5)], (method, calls)
    # Same x_T (and key): same result.
    np.testing.assert_array_equal(fn(x_T, key)[0], x0)
    jax.effects_barrier()
    calls.clear()


def test_shape_and_key_start():
  process, _, model, _, _ = setup()
  key = jax.random.PRNGKey(5)
  got = sampling.sample(model, process, method='ddim', num_steps=6, key=key, shape=(4, 2))
  x_T = process.prior_sample(key, (4, 2))
  np.testing.assert_array_equal(got, sampling.sample(model, process, method='ddim', num_steps=6,
                                                     x_T=x_T))


def test_ddim_is_euler_on_the_same_grid():
  process, _, model, x_T, _ = setup()
  a = sampling.sample(model, process, method='ddim', num_steps=12, x_T=x_T, grid='karras')
  b = sampling.sample(model, process, method='euler', num_steps=12, x_T=x_T, grid='karras')
  np.testing.assert_allclose(a, b, atol=1e-4)


def test_heun_first_step_is_ddims():
  # karras.corrected_steps: the first step takes no corrector (on trained digits models it
  # left the samples 1.9-3.5x further from the ODE's solution at 14-30 steps); every
  # later step of this fine grid (noise level ratios < 4) does, and the last extrapolates.
  # From t = 400 the corrector changes the first step by ~3e-3 here; from t_max by ~2e-6.
  process, _, model, x_T, _ = setup()
  n = 30
  calls = []

  def counting_model(x, t, cond=None):  # counts the evaluations run, not traced
    jax.debug.callback(lambda: calls.append(1), ordered=True)
    return model(x, t, cond)

  run = lambda method, m, t_start=None: sampling.sample(
      m, process, method=method, num_steps=n, x_T=x_T, grid='karras', t_start=t_start,
      return_info=True, return_trajectory=True)[1]
  heun, ddim = run('heun', model, 400.0), run('ddim', model, 400.0)
  np.testing.assert_allclose(heun['trajectory'][1], ddim['trajectory'][1], rtol=0, atol=2e-6)
  assert float(np.max(np.abs(heun['trajectory'][2] - ddim['trajectory'][2]))) > 1e-3
  for t_start in (None, 400.0):
    calls.clear()
    info = run('heun', counting_model, t_start)
    jax.effects_barrier()
    assert int(info['nfe']) == len(calls) == 2 * n - 2, (t_start, info['nfe'], len(calls))


def test_float32_integration_whatever_the_model_dtype():
  process, _, model, x_T, _ = setup()
  bf16 = lambda x, t, cond: model(x, t).astype(jnp.bfloat16)
  x0 = sampling.sample(bf16, process, method='dpmpp_2m', num_steps=10, x_T=x_T)
  assert x0.dtype == jnp.float32
  np.testing.assert_allclose(x0, sampling.sample(model, process, method='dpmpp_2m', num_steps=10,
                                                 x_T=x_T), atol=0.05)


def test_clipping_and_dynamic_thresholding():
  process, _, model, x_T, ref = setup('linear', 3.0)
  assert np.abs(ref).max() > 2  # data outside [-1, 1]: clipping must be off by default
  x0 = sampling.sample(model, process, method='ddim', num_steps=50, x_T=x_T)
  assert rms(x0, ref) < 0.2
  for opts in ({'clip_x0': True}, {'dynamic_threshold': 99.5}):
    x0 = sampling.sample(model, process, method='ddim', num_steps=50, x_T=x_T, **opts)
    assert np.abs(x0).max() <= 1.0 + 1e-6
  x0 = core.dynamic_threshold_x0(jnp.array([[0.5, 3.0, -0.2, 0.1]]), 100.0)
  np.testing.assert_allclose(x0, [[0.5 / 3, 1.0, -0.2 / 3, 0.1 / 3]], rtol=1e-6)


def _ipndm_numpy(model, process, x_T, t, order, afs=False, lower_order_final=True):
  """iPNDM written out in NumPy float64 (Zhang & Chen 2023): in y = x / alpha, s = sigma / alpha,
  ``y += (s_next - s) * AB(eps history)`` with AB's equal-step weights, Euler first; the last step
  onto s = 0 uses eps / 2 when the previous s is within sqrt(2) of the last one, else AB of at
  most second order with ``lower_order_final``. ``afs``: the first eps is E[eps | x] for N(0, I)
  data, sigma x / (alpha^2 + sigma^2) (AMED's AFS)."""
  ab = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
  alpha = np.asarray(process.alpha(jnp.asarray(t)), np.float64)
  sigma = np.asarray(process.sigma(jnp.asarray(t)), np.float64)
  s = np.append(sigma / alpha, 0.0)
  y, hist = np.asarray(x_T, np.float64) / alpha[0], []
  for i, t_i in enumerate(t):
    if afs and i == 0:
      e = sigma[0] * y * alpha[0] / (alpha[0]**2 + sigma[0]**2)
    else:
      e = np.asarray(model(jnp.asarray(y * alpha[i], jnp.float32),
                           jnp.full((x_T.shape[0],), t_i, jnp.float32)), np.float64)
    hist.insert(0, e)
    last = i == len(t) - 1
    e_ab = sum(w * h for w, h in zip(ab[min(i + 1, order, 2 if last and lower_order_final
                                                 else order)], hist))
    if last and i > 0 and s[i - 1]**2 < 2 * s[i]**2:
      e_ab = e / 2
    y = y + (s[i + 1] - s[i]) * e_ab
  return y


@pytest.mark.parametrize('spacing,order,lower_order_final', [
    ('trailing', 3, True), ('trailing', 3, False), ('trailing', 4, False), ('linspace', 4, True),
    ('linspace', 2, True)])
def test_ipndm_is_the_written_out_method(spacing, order, lower_order_final):
  process, _, model, x_T, ref = setup()
  n = 6
  t = np.asarray(sampling.grids.make_grid(process, n, 'quadratic', spacing=spacing), np.float64)
  want = _ipndm_numpy(model, process, x_T, t, order, lower_order_final=lower_order_final)
  got, info = sampling.sample(model, process, method='plms', num_steps=n, x_T=x_T,
                              grid='quadratic', spacing=spacing, order=order, warm_start='ab',
                              lower_order_final=lower_order_final, return_info=True)
  assert info['nfe'] == n
  np.testing.assert_allclose(got, want, atol=2e-4)
  assert rms(got, ref) < 0.2
  calls = []
  x0, info = jax.jit(lambda x: sampling.sample(
      model, process, method='plms', num_steps=n, x_T=x, grid='quadratic', spacing=spacing,
      order=order, warm_start='ab', return_info=True, return_trajectory=True,
      callback=lambda i, total: calls.append((i, total))))(x_T)
  jax.effects_barrier()
  assert calls == [(i, n) for i in range(1, n + 1)]
  assert info['trajectory'].shape == (n + 1,) + x_T.shape
  np.testing.assert_array_equal(info['trajectory'][-1], x0)
  # Order 1 is DDIM on the same grid.
  ddim = sampling.sample(model, process, method='ddim', num_steps=n, x_T=x_T, grid='quadratic',
                          spacing=spacing)
  np.testing.assert_allclose(sampling.sample(model, process, method='plms', num_steps=n, x_T=x_T,
                                             grid='quadratic', spacing=spacing, order=1,
                                             warm_start='ab'),
                             ddim, atol=1e-5)


def _counting(model):
  """``model`` that counts its evaluations at run time (a traced call count would be 1)."""
  calls = [0]

  def fn(x, t, cond):
    jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
    return model(x, t, cond)

  return fn, calls


@pytest.mark.parametrize('spacing,order', [('trailing', 3), ('linspace', 4)])
def test_ipndm_analytic_first_step_is_the_written_out_method(spacing, order):
  process, _, model, x_T, ref = setup()
  n = 6
  t = np.asarray(sampling.grids.make_grid(process, n, 'quadratic', spacing=spacing), np.float64)
  want = _ipndm_numpy(model, process, x_T, t, order, afs=True, lower_order_final=False)  # 6 steps
  counted, calls = _counting(model)
  got, info = jax.jit(lambda x: sampling.sample(
      counted, process, method='plms', num_steps=n, x_T=x, grid='quadratic', spacing=spacing,
      order=order, warm_start='ab', analytic_first_step=True, return_info=True))(x_T)
  jax.effects_barrier()
  assert info['nfe'] == n - 1 and calls[0] == n - 1  # the first step evaluates no model
  np.testing.assert_allclose(got, want, atol=2e-4)
  assert rms(got, ref) < 0.2


def test_ipndm_analytic_first_step_is_exact_for_standard_normal_data():
  """For x_0 ~ N(0, I) the closed form is the true E[eps | x_t] at every t: AFS changes nothing."""
  process = PROCESSES['linear']
  mix = oracles.GaussianMixture(weights=np.ones(1), means=np.zeros((1, 2)), covs=np.eye(2)[None])
  model = mixture_model(mix, process)
  x_T = jax.random.normal(jax.random.PRNGKey(1), (B, 2))
  kw = dict(method='plms', warm_start='ab', order=3, num_steps=6, x_T=x_T, spacing='trailing')
  np.testing.assert_allclose(sampling.sample(model, process, analytic_first_step=True, **kw),
                             sampling.sample(model, process, **kw), atol=1e-5)


def test_ipndm_analytic_first_step_at_five_evaluations_on_the_oracle():
  """One more step for the same 5 NFE (bench_samplers measures 0.134 -> 0.114 on B = 256), with
  the reference iPNDM's last step (AMED's setting)."""
  process, _, model, x_T, ref = setup()
  kw = dict(method='plms', warm_start='ab', order=3, x_T=x_T, grid='quadratic', spacing='trailing',
            lower_order_final=False)
  plain = rms(sampling.sample(model, process, num_steps=5, **kw), ref)
  afs = rms(sampling.sample(model, process, num_steps=6, analytic_first_step=True, **kw), ref)
  assert afs < 0.9 * plain, (afs, plain)


def test_ipndm_analytic_first_step_bad_input():
  process, _, model, x_T, _ = setup()
  s = functools.partial(sampling.sample, model, process, method='plms', x_T=x_T,
                        analytic_first_step=True)
  with pytest.raises(ValueError, match="needs warm_start='ab'"):
    s(num_steps=5, warm_start='heun')
  with pytest.raises(ValueError, match='needs num_steps >= 2'):
    s(num_steps=1, warm_start='ab')
  short = processes.DiscreteVP.linear(10)  # ends far from pure noise: alpha / sigma ~ 3
  with pytest.raises(ValueError, match=r'alpha / sigma = .* not close enough to pure noise'):
    sampling.sample(mixture_model(MIXTURES[1.0], short), short, method='plms', x_T=x_T,
                    num_steps=5, warm_start='ab', analytic_first_step=True)


@pytest.mark.parametrize('method,options', [('ddim', {}), ('heun', {}), ('dpmpp_3m', {}),
                                            ('unipc', {}), ('plms', {}),
                                            ('plms', {'warm_start': 'ab'}),
                                            ('plms', {'warm_start': 'ab',
                                                      'analytic_first_step': True}),
                                            ('plms', {'step_hook': lambda x, *_: x}),
                                            ('unipc', {'step_hook': lambda x, *_: x}),
                                            ('heun', {'step_hook': lambda x, *_: x})])
def test_one_compilation_whatever_num_steps(method, options):
  process, _, model, x_T, _ = setup()
  traces = []

  def counting_model(x, t, cond):
    traces.append(x.shape)
    return model(x, t, cond)

  sizes, counts = [], []
  for n in (40, 80):  # both in the defaults' last NFE band (sampling/defaults.py): same options
    traces.clear()
    jaxpr = jax.make_jaxpr(lambda x, n=n: sampling.sample(counting_model, process, method=method,
                                                          num_steps=n, x_T=x, **options))(x_T)
    sizes.append(len(jaxpr.jaxpr.eqns))
    counts.append(len(traces))
  # The model is traced a fixed number of times (inside the scan body: Heun's second evaluation
  # is a second call site), and the program does not grow with num_steps.
  assert counts[0] == counts[1] <= 2, counts
  assert sizes[0] == sizes[1], sizes

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def sampler(x):
    return sampling.sample(model, process, method=method, num_steps=10, x_T=x, **options)

  for i in range(3):
    sampler(x_T + i)


def test_errors():
  process, _, model, x_T, _ = setup()
  s = functools.partial(sampling.sample, model, process)
  with pytest.raises(ValueError, match='ddim.*dpmpp_2m.*unipc'):
    s(method='ddim2', num_steps=5, x_T=x_T)
  for bad in (0, -1, 2.5):
    with pytest.raises(ValueError, match='num_steps'):
      s(method='ddim', num_steps=bad, x_T=x_T)
  # An order above num_steps falls back to what the steps allow (the warm start), as diffusers'
  # lower-order start does: order 2 at one step is the DDIM step (issue 22: was refused).
  one = s(method='ddim', num_steps=1, x_T=x_T, grid='quadratic')
  for method in ('dpmpp_2m', 'dpmpp_3m', 'unipc'):
    np.testing.assert_allclose(s(method=method, num_steps=1, x_T=x_T, grid='quadratic', order=2),
                               one, atol=1e-6)
  np.testing.assert_array_equal(s(method='dpmpp_3m', num_steps=2, x_T=x_T, order=3),
                                s(method='dpmpp_3m', num_steps=2, x_T=x_T, order=2))
  np.testing.assert_array_equal(s(method='unipc', num_steps=2, x_T=x_T, order=3),
                                s(method='unipc', num_steps=2, x_T=x_T, order=2))
  with pytest.raises(ValueError, match='order'):
    s(method='dpmpp_2m', num_steps=5, x_T=x_T, order=3)
  with pytest.raises(ValueError, match=r'shape \(64, 2\).*shape=\(64, 3\)'):
    s(method='ddim', num_steps=5, x_T=x_T, shape=(64, 3))
  with pytest.raises(ValueError, match='floating'):
    s(method='ddim', num_steps=5, x_T=jnp.ones((4, 2), jnp.int32))
  with pytest.raises(ValueError, match='x_T.*shape and key'):
    s(method='ddim', num_steps=5, shape=(4, 2))
  with pytest.raises(ValueError, match='needs a PRNG `key`'):
    s(method='ddpm', num_steps=5, x_T=x_T)
  with pytest.raises(ValueError, match='needs a PRNG `key`'):
    s(method='ddim', num_steps=5, x_T=x_T, eta=1.0)
  with pytest.raises(ValueError, match='grid'):
    s(method='ddim', num_steps=5, x_T=x_T, grid='cubic')
  with pytest.raises(ValueError, match='spacing'):
    s(method='ddim', num_steps=5, x_T=x_T, spacing='middle')
  with pytest.raises(ValueError, match='prediction'):
    s(method='ddim', num_steps=5, x_T=x_T, prediction='noise')
  with pytest.raises(TypeError, match="method='ddim' takes no option order; its options are "
                     "eta, grid"):
    s(method='ddim', num_steps=5, x_T=x_T, order=2)
  with pytest.raises(TypeError, match='no option oder, zz;'):
    s(method='plms', num_steps=5, x_T=x_T, oder=3, zz=1)
  with pytest.raises(ValueError, match='t_start must be a concrete number'):
    s(method='ddim', num_steps=5, x_T=x_T, t_start='500')
  with pytest.raises(ValueError, match='heun: S_noise must be a finite number'):
    s(method='heun', num_steps=5, x_T=x_T, S_noise=float('nan'))
  with pytest.raises(ValueError, match='static argument'):
    jax.jit(lambda n: s(method='ddim', num_steps=n, x_T=x_T))(5)
  with pytest.raises(ValueError, match=r"plms: order=5 .* use an int, one of \(1, 2, 3, 4\)"):
    s(method='plms', num_steps=5, x_T=x_T, order=5)
  # A float, bool or string order failed deep in the solver (an index of float type) or ran.
  for method, bad in (('plms', 3.0), ('unipc', 2.0), ('dpmpp_3m', '3'), ('dpmpp_2m', True)):
    with pytest.raises(ValueError, match=f'{method}: order={bad!r} is not supported; use an int'):
      s(method=method, num_steps=5, x_T=x_T, order=bad)
  np.testing.assert_array_equal(s(method='unipc', num_steps=5, x_T=x_T, order=np.int64(2)),
                                s(method='unipc', num_steps=5, x_T=x_T, order=2))
  with pytest.raises(ValueError, match=r"clip_x0 is True or False, got 'yes'"):
    s(method='ddim', num_steps=5, x_T=x_T, clip_x0='yes')
  for bad in ('2', True):
    with pytest.raises(ValueError, match=f'shift must be a positive number.*got {bad!r}'):
      s(method='ddim', num_steps=5, x_T=x_T, shift=bad)
  with pytest.raises(ValueError, match="warm_start='rk'.*'heun'.*'ab'"):
    s(method='plms', num_steps=5, x_T=x_T, warm_start='rk')


# --- classifier-free guidance ---------------------------------------------------------------------


def test_classifier_free_guidance():
  process, _, model, x_T, _ = setup()
  labels = jnp.arange(B, dtype=jnp.int32) % 3
  null = 3
  batches = []

  def record(n):
    batches.append(int(n))

  def cond_model(x, t, cond):
    jax.debug.callback(record, x.shape[0], ordered=True)
    y = cond['label']
    shift = jnp.where(y == null, 0.0, 0.1 * (y.astype(jnp.float32) + 1.0))
    return model(x, t) + shift[:, None]

  n, w = 7, 2.5
  cond, null_cond = {'label': labels}, {'label': jnp.full((1,), null, jnp.int32)}
  guided = sampling.sample(cond_model, process, method='dpmpp_2m', num_steps=n, x_T=x_T,
                           guidance_scale=w, cond=cond, null_cond=null_cond)
  jax.effects_barrier()
  assert batches == [2 * B] * n  # one call per step on the doubled batch
  # The same sampler on the hand-combined prediction: uncond + w (cond - uncond).
  shift = 0.1 * (labels.astype(jnp.float32) + 1.0)
  want = sampling.sample(lambda x, t, c: model(x, t) + w * shift[:, None], process,
                         method='dpmpp_2m', num_steps=n, x_T=x_T)
  np.testing.assert_allclose(guided, want, atol=1e-4)
  batches.clear()
  one = sampling.sample(cond_model, process, method='dpmpp_2m', num_steps=n, x_T=x_T,
                        guidance_scale=1.0, cond=cond, null_cond=null_cond)
  jax.effects_barrier()
  assert batches == [B] * n  # w = 1: the plain conditional call
  plain = sampling.sample(cond_model, process, method='dpmpp_2m', num_steps=n, x_T=x_T, cond=cond)
  np.testing.assert_array_equal(one, plain)
  want = sampling.sample(lambda x, t, c: model(x, t) + shift[:, None], process, method='dpmpp_2m',
                         num_steps=n, x_T=x_T)
  np.testing.assert_allclose(one, want, atol=1e-5)
  # One w per example ([B]): each row guided by its own scale.
  ws = jnp.linspace(0.0, 4.0, B)
  per_example = sampling.sample(cond_model, process, method='dpmpp_2m', num_steps=n, x_T=x_T,
                                guidance_scale=ws, cond=cond, null_cond=null_cond)
  want = sampling.sample(lambda x, t, c: model(x, t) + (ws * shift)[:, None], process,
                         method='dpmpp_2m', num_steps=n, x_T=x_T)
  np.testing.assert_allclose(per_example, want, atol=1e-4)
  with pytest.raises(ValueError, match=r'guidance_scale must be a number, or an array of shape '
                                       rf'\[B\] = \({B},\).*got shape \(3,\)'):
    sampling.sample(cond_model, process, method='dpmpp_2m', num_steps=n, x_T=x_T,
                    guidance_scale=jnp.ones(3), cond=cond, null_cond=null_cond)
  with pytest.raises(ValueError, match='needs cond'):
    sampling.sample(cond_model, process, method='dpmpp_2m', num_steps=n, x_T=x_T,
                    guidance_scale=3.0, null_cond=null_cond)


def test_guidance_rescale():
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  cond = jax.random.normal(key1, (4, 8, 8, 3))
  guided = 3.0 * jax.random.normal(key2, (4, 8, 8, 3))
  full = guidance.rescale_guidance(guided, cond, 1.0)
  np.testing.assert_allclose(jnp.std(full, axis=(1, 2, 3)), jnp.std(cond, axis=(1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(guidance.rescale_guidance(guided, cond, 0.0), guided)
  half = guidance.rescale_guidance(guided, cond, 0.5)
  np.testing.assert_allclose(half, 0.5 * (full + guided), rtol=1e-5, atol=1e-6)


# --- conditioning is a pytree --------------------------------------------------------------------


def affine_cond_model(process, calls=None):
  """The exact eps of Gaussian data ``N(m(cond), S)``, ``m = M_a cond['a'] + M_b cond['b']``.

  ``E[eps | x_t] = sigma (alpha^2 S + sigma^2)^-1 (x - alpha m)``: affine in cond at every (x, t),
  so guidance with scale w is exactly the model at ``cond_u + w (cond_c - cond_u)``. ``calls``
  records (batch of x, batch of each cond leaf) per evaluation at run time.
  """
  m_a = 0.5 * jnp.array([[1.0, 0.5], [-0.5, 0.75]])
  m_b = 0.5 * jnp.array([[-0.25, 0.0], [0.5, 1.0]])
  s = jnp.array([0.5, 0.5])

  def fn(x, t, cond):
    if calls is not None:
      shapes = (x.shape[0], cond['a'].shape[0], cond['b'].shape[0])
      jax.debug.callback(functools.partial(calls.append, shapes), ordered=True)
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    m = cond['a'] @ m_a.T + cond['b'] @ m_b.T
    return sigma * (x - alpha * m) / (alpha**2 * s + sigma**2)

  return fn


def _conds(batch_null=1):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
  cond = {'a': 0.5 * jax.random.normal(k1, (B, 2)), 'b': 0.5 * jax.random.normal(k2, (B, 2))}
  null = {'a': jnp.broadcast_to(jnp.array([[0.3, -0.2]]), (batch_null, 2)),
          'b': 0.2 * jax.random.normal(k3, (batch_null, 2))}
  return cond, null


# (method, t_start, batch of null_cond). From t_max, DDIM's and Heun's first steps divide eps by
# alpha(T) = 0.006 (x0 = (x - sigma eps) / alpha), which turns the 1-ulp difference between the two
# ways of combining the predictions into ~1e-6 of the samples (measured 1.2e-6, 4.5e-6 at 8 steps);
# from t = 500 every method agrees to 2-3e-7, DPM-Solver++ and UniPC also from t_max (2.8e-7,
# 4.5e-7).
AFFINE_CASES = [('ddim', 500.0, 1), ('heun', 500.0, B), ('dpmpp_2m', None, B), ('unipc', None, 1)]


@pytest.mark.parametrize('method,t_start,batch_null', AFFINE_CASES)
def test_guidance_of_an_affine_model_is_the_model_at_the_guided_cond(method, t_start, batch_null):
  """w-guidance of a model affine in cond equals the plain conditional model at
  ``cond_u + w (cond_c - cond_u)`` (leaf by leaf) to float32 rounding: within 1e-6 of the samples'
  scale. It costs one model call per evaluation, on the doubled batch 2B."""
  process = PROCESSES['linear']
  x_T = jax.random.normal(jax.random.PRNGKey(0), (B, 2))
  cond, null = _conds(batch_null)
  w, n = 2.0, 8
  calls = []
  guided, info = jax.jit(lambda x, c, u: sampling.sample(
      affine_cond_model(process, calls), process, method=method, num_steps=n, x_T=x, cond=c,
      null_cond=u, guidance_scale=w, t_start=t_start, return_info=True))(x_T, cond, null)
  jax.effects_barrier()
  assert calls == [(2 * B, 2 * B, 2 * B)] * int(info['nfe']), calls
  mixed = jax.tree.map(lambda c, u: u + w * (c - u), cond, null)
  want = sampling.sample(affine_cond_model(process), process, method=method, num_steps=n,
                         x_T=x_T, cond=mixed, t_start=t_start)
  scale = float(np.abs(want).max())
  assert scale > 1.0  # samples of O(1), not a degenerate comparison
  np.testing.assert_allclose(guided, want, rtol=1e-6, atol=1e-6 * scale)
  # Guidance acts: the conditional samples differ.
  plain = sampling.sample(affine_cond_model(process), process, method=method, num_steps=n,
                          x_T=x_T, cond=cond, t_start=t_start)
  assert float(np.abs(plain - want).max()) > 0.1
  # w = 1 is the conditional model: one plain call per evaluation, the same program as without
  # null_cond.
  runs = []
  for kw in ({'null_cond': null, 'guidance_scale': 1.0}, {}):
    calls.clear()
    runs.append(jax.jit(lambda x, kw=kw: sampling.sample(
        affine_cond_model(process, calls), process, method=method, num_steps=n, x_T=x,
        cond=cond, t_start=t_start, **kw))(x_T))
    jax.effects_barrier()
    assert calls == [(B, B, B)] * int(info['nfe'])
  np.testing.assert_array_equal(runs[0], runs[1])


def test_cond_errors_name_the_shapes():
  process = PROCESSES['linear']
  x_T = jax.random.normal(jax.random.PRNGKey(0), (B, 2))
  cond, null = _conds()
  s = functools.partial(sampling.sample, affine_cond_model(process), process, method='ddim',
                        num_steps=3, x_T=x_T)
  with pytest.raises(ValueError, match=r"cond\['b'\] has shape \(3, 2\).* B = 64"):
    s(cond={'a': cond['a'], 'b': cond['b'][:3]})
  with pytest.raises(ValueError, match=r"cond\['a'\] has shape \(\).* B = 64"):
    s(cond={'a': jnp.float32(1.0), 'b': cond['b']})
  with pytest.raises(ValueError, match='guidance_scale=2.0.*needs null_cond'):
    s(cond=cond, guidance_scale=2.0)
  with pytest.raises(ValueError, match='guidance_rescale=0.5.*needs null_cond'):
    s(cond=cond, guidance_rescale=0.5)
  with pytest.raises(ValueError, match='tree structure of cond'):
    s(cond=cond, null_cond={'a': null['a']}, guidance_scale=2.0)
  with pytest.raises(ValueError, match=r"null_cond\['a'\] has shape \(5, 2\).* B = 64 \(or 1\)"):
    s(cond=cond, null_cond={'a': jnp.zeros((5, 2)), 'b': null['b']}, guidance_scale=2.0)
  with pytest.raises(ValueError, match=r"null_cond\['b'\] has shape \(1, 3\) but cond\['b'\] "
                                       r'has shape \(64, 2\)'):
    s(cond=cond, null_cond={'a': null['a'], 'b': jnp.zeros((1, 3))}, guidance_scale=2.0)
  with pytest.raises(ValueError, match='guidance_rescale must lie in'):
    s(cond=cond, null_cond=null, guidance_scale=2.0, guidance_rescale=1.5)
  with pytest.raises(ValueError, match=r"guidance_scale must be a number.*got '3' \(str\)"):
    s(cond=cond, null_cond=null, guidance_scale='3')
  with pytest.raises(ValueError, match='guidance_scale must be finite, got nan'):
    s(cond=cond, null_cond=null, guidance_scale=float('nan'))
  # Concrete arrays are checked as numbers are (NaN ran and returned NaN); traced ones are not.
  for bad in (jnp.float32(jnp.nan), np.array(np.inf), jnp.full((B,), jnp.nan)):
    with pytest.raises(ValueError, match='guidance_scale must be finite'):
      s(cond=cond, null_cond=null, guidance_scale=bad)
  with pytest.raises(ValueError, match='guidance_rescale must be finite'):
    s(cond=cond, null_cond=null, guidance_scale=2.0, guidance_rescale=jnp.float32(jnp.nan))
  # An array w guides even at 1.0, and the message says so (it read as if 1.0 needed null_cond).
  with pytest.raises(ValueError, match=r'an array guidance_scale guides even at 1.0; pass the '
                     r'number 1.0 for the plain conditional model'):
    s(cond=cond, guidance_scale=jnp.float32(1.0))
  for bad in (float('nan'), jnp.float32(jnp.nan), -0.5, jnp.float32(-1.0), 50.0, 1.5):
    with pytest.raises(ValueError, match=r'eta must lie in \[0, 1\]'):
      s(eta=bad, key=jax.random.PRNGKey(0))
  # A concrete zero eta is deterministic: no key needed, the same samples as eta=0.0.
  np.testing.assert_array_equal(s(cond=cond, eta=jnp.float32(0.0)), s(cond=cond, eta=0.0))
  with pytest.raises(ValueError, match=r"cond\['a'\] has shape \(3, 2\)"):
    sampling.invert(affine_cond_model(process), process, x_T, num_steps=3,
                    cond={'a': cond['a'][:3], 'b': cond['b']})


# --- explicit times -------------------------------------------------------------------------------


GRID_CASES = [('ddpm', {}, 'uniform', 'trailing'), ('ddim', {}, 'quadratic', None),
              ('ddim', {}, 'karras', 'trailing'), ('heun', {}, 'logsnr', None),
              ('plms', {}, 'quadratic', None), ('plms', {'warm_start': 'ab'}, 'quadratic',
                                                'trailing'),
              ('dpmpp_3m', {}, 'quadratic', None), ('dpmpp_2m_sde', {}, 'logsnr', None),
              ('unipc', {}, 'quadratic', None), ('euler', {'S_churn': 5.0}, 'karras', None),
              ('dpmpp_3m', {}, 'logsnr', 'trailing'), ('unipc', {}, 'cosine', 'trailing'),
              ('ddim', {}, 'optimized', 'trailing')]


@pytest.mark.parametrize('method,options,grid,spacing', GRID_CASES,
                         ids=[f'{c[0]}-{c[2]}-{len(c[1])}' for c in GRID_CASES])
def test_times_are_the_named_grid_bitwise(method, options, grid, spacing):
  process, _, model, x_T, _ = setup()
  # 20 steps: jnp.linspace's log-SNR grid at 20 trailing steps differed by an ulp between an
  # eager make_grid and make_schedule's (under ensure_compile_time_eval).
  n, key = (20 if grid == 'logsnr' and spacing == 'trailing' else 8), jax.random.PRNGKey(2)
  named = sampling.sample(model, process, method=method, num_steps=n, x_T=x_T, key=key,
                          grid=grid, spacing=spacing, **options)
  times = np.asarray(grids.make_grid(process, n, grid, spacing=spacing))
  given = sampling.sample(model, process, method=method, num_steps=n, x_T=x_T, key=key,
                          times=times, **options)
  np.testing.assert_array_equal(given, named)
  other = sampling.sample(model, process, method=method, num_steps=n, x_T=x_T, key=key,
                          times=1 + (times - 1) * np.float32(0.9), **options)
  assert not np.array_equal(other, named)  # the times are used


def test_pc_times_are_its_grid_bitwise():
  process, _, model, x_T, _ = setup()
  n, key = 6, jax.random.PRNGKey(2)
  times = np.asarray(jnp.linspace(process.t_max, process.t_min, n + 1, dtype=jnp.float32))
  np.testing.assert_array_equal(
      sampling.sample(model, process, method='pc', num_steps=n, x_T=x_T, key=key, times=times),
      sampling.sample(model, process, method='pc', num_steps=n, x_T=x_T, key=key))
  with pytest.raises(ValueError, match=r'pc: times has 6 entries .* pass num_steps=5'):
    sampling.sample(model, process, method='pc', num_steps=n, x_T=x_T, key=key, times=times[:6])


def test_times_errors():
  process, _, model, x_T, _ = setup()
  s = functools.partial(sampling.sample, model, process, x_T=x_T)
  good = np.array([900.0, 500.0, 100.0, 1.0], np.float32)
  with pytest.raises(ValueError, match='strictly decreasing'):
    s(method='ddim', num_steps=4, times=good[::-1])
  with pytest.raises(ValueError, match='strictly decreasing'):
    s(method='ddim', num_steps=4, times=np.array([900.0, 500.0, 500.0, 1.0]))
  with pytest.raises(ValueError, match=r'ddim: times has 4 entries but num_steps=6.*'
                                       r'pass num_steps=4'):
    s(method='ddim', num_steps=6, times=good)
  with pytest.raises(ValueError, match=r'\[t_min, t_max\] = \[1.0, 1000.0\]'):
    s(method='heun', num_steps=4, times=np.array([1200.0, 500.0, 100.0, 1.0]))
  with pytest.raises(ValueError, match=r'1-D.*shape \(2, 2\)'):
    s(method='ddim', num_steps=4, times=good.reshape(2, 2))
  with pytest.raises(ValueError, match='either grid/spacing or times'):
    s(method='dpmpp_2m', num_steps=4, times=good, grid='karras')
  with pytest.raises(ValueError, match='drop t_start'):
    s(method='unipc', num_steps=4, times=good, t_start=900.0)
  with pytest.raises(TypeError):
    s(method='ode', num_steps=4, times=good)


# --- starting at an intermediate time -------------------------------------------------------------


@pytest.mark.parametrize('method', ['ddim', 'dpmpp_2m', 'heun', 'unipc', 'ode'])
def test_t_start_follows_the_exact_map_from_t_start(method):
  """x_T = alpha x_0 + sigma z at t_start (SDEdit): the sampler approximates the exact PF-ODE map
  from (alpha, sigma) at t_start, and the run from t_max on the same x_T does not."""
  process, mix = PROCESSES['linear'], MIXTURES[1.0]
  model = mixture_model(mix, process)
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  x0, _ = mix.sample(k1, B)
  t_s = 400.0
  a, s = float(process.alpha(t_s)), float(process.sigma(t_s))
  x_t = a * x0 + s * jax.random.normal(k2, x0.shape)
  ref = mix.pf_ode_map(np.asarray(x_t, np.float64), a, s)
  errs = [rms(run(model, process, x_t, method, n, t_start=t_s)[0], ref) for n in (10, 80)]
  assert errs[1] < 0.01, errs
  if method != 'ode':
    assert errs[1] < 0.5 * errs[0], errs
  assert rms(run(model, process, x_t, method, 80)[0], ref) > 0.1  # the full range is another map


@pytest.mark.parametrize('method', sorted(sampling.METHODS))
def test_t_start_at_t_max_is_the_default_run(method):
  process, _, model, x_T, _ = setup()
  key = jax.random.PRNGKey(3)
  default = sampling.sample(model, process, method=method, num_steps=7, x_T=x_T, key=key)
  at_t_max = sampling.sample(model, process, method=method, num_steps=7, x_T=x_T, key=key,
                             t_start=process.t_max)
  np.testing.assert_array_equal(at_t_max, default)
  lower = sampling.sample(model, process, method=method, num_steps=7, x_T=x_T, key=key,
                          t_start=600.0)
  assert not np.array_equal(lower, default)


def test_t_start_grids_span_t_min_to_t_start():
  process = PROCESSES['linear']
  for name in sorted(grids.GRIDS):
    t = np.asarray(grids.make_grid(process, 6, name, t_start=500.0))
    assert t[0] == 500.0 and np.all(np.diff(t) < 0) and t.min() >= 1.0, (name, t)
    if name != 'uniform':
      assert t[-1] == 1.0
  np.testing.assert_array_equal(grids.uniform(process, 5, t_start=500.0), [500, 400, 300, 200, 100])


def test_uniform_grid_starts_at_a_t_start_between_steps():
  # The first time is x_T's; the others are the integer steps the model was trained on. Defaults
  # that take the uniform grid (dpmpp_2m at 15-31 steps) refused a non-integer t_start before.
  process, _, model, x_T, _ = setup()
  np.testing.assert_array_equal(grids.uniform(process, 5, t_start=500.5),
                                [500.5, 400, 300, 200, 100])
  np.testing.assert_array_equal(grids.uniform(process, 3, spacing='linspace', t_start=500.5),
                                [500.5, 251, 1])
  for method in ('ddpm', 'dpmpp_2m'):
    x, info = sampling.sample(model, process, method=method, num_steps=20, x_T=x_T,
                              t_start=500.5, key=jax.random.PRNGKey(0), return_info=True)
    assert np.all(np.isfinite(x)) and int(info['nfe']) == 20, method


def test_uniform_trailing_on_a_continuous_process_stays_above_t_min():
  # t_max (1 - i / n) put the last times of a short span below t_min: clipped there, they
  # repeated, and 100 steps from t_start = 0.05 of the VP SDE were refused as "too short a span".
  for process in (sde.VPSDE(), sde.VESDE(), processes.RectifiedFlow()):
    t_min, t_hi, n = float(process.t_min), 0.05, 100
    t = np.asarray(grids.uniform(process, n, t_start=t_hi), np.float64)
    np.testing.assert_allclose(t, t_min + (t_hi - t_min) * (1 - np.arange(n) / n), rtol=1e-6)
    assert np.all(np.diff(t) < 0) and t[-1] > t_min, (process, t[-3:])
  process = sde.VPSDE()
  mix = oracles.example_mixture()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
  out, info = sampling.sample(mix.model_fn(process), process, method='ddim', num_steps=100,
                              x_T=x, t_start=0.05, grid='uniform', return_info=True)
  assert np.all(np.isfinite(out)) and int(info['nfe']) == 100


def test_t_start_errors():
  process, _, model, x_T, _ = setup()
  s = functools.partial(sampling.sample, model, process, method='ddim', num_steps=4)
  with pytest.raises(ValueError, match='t_start=500.0 needs x_T'):
    s(key=jax.random.PRNGKey(0), shape=(4, 2), t_start=500.0)
  for bad in (1.0, 0.5, 1001.0):
    with pytest.raises(ValueError, match=r'must lie in \(t_min, t_max\] = \(1.0, 1000.0\]'):
      s(x_T=x_T, t_start=bad)
  with pytest.raises(ValueError, match='too short a span'):
    s(x_T=x_T, t_start=3.0, num_steps=10, grid='uniform')
  with pytest.raises(ValueError, match=r'alpha / sigma = .* not close enough to pure noise'):
    s(x_T=x_T, t_start=300.0, method='plms', warm_start='ab', analytic_first_step=True)



def test_key_must_be_a_prng_key():
  """An int or a float array as key is refused with what to pass; raw and typed keys work, also
  under jit."""
  process, _, model, _, _ = setup()
  s = functools.partial(sampling.sample, model, process, method='ddim', num_steps=3, shape=(4, 2))
  for bad, got in ((0, 'int 0'), (jnp.zeros(2), 'dtype float32')):
    with pytest.raises(ValueError, match=f'key must be a PRNG key, e.g. jax.random.PRNGKey.*{got}'):
      s(key=bad)
  raw = s(key=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(jax.jit(lambda k: s(key=k))(jax.random.PRNGKey(0)), raw)
  assert s(key=jax.random.key(0)).shape == (4, 2)


# --- inversion ------------------------------------------------------------------------------------


def _slope(errs, ns):
  return -np.log(errs[-1] / errs[-2]) / np.log(ns[-1] / ns[-2])


def _median_error(x, ref):
  return float(np.median(np.sqrt(np.sum((np.asarray(x, np.float64) - ref)**2, -1))))


@pytest.mark.parametrize('method,trip_bound,inv_bound', [('ddim', 0.03, 0.04),
                                                         ('euler', 0.03, 0.04),
                                                         ('dpmpp_2m', 2e-4, 3e-3)])
def test_invert_round_trip_on_the_mixture(method, trip_bound, inv_bound):
  """sample(invert(x_0)) = x_0 up to discretization error, shrinking with num_steps; invert alone
  approximates the exact inverse PF-ODE map (the oracle's, from the data to t_end).

  Per-sample medians: one of the 64 points lies where trajectories split between modes, and its
  error (0.7-0.9 for DDIM) stays pre-asymptotic up to 160 steps. Measured medians at 10 / 20 / 40
  / 80 steps, round trip: DDIM 0.18 / 0.091 / 0.045 / 0.023, DPM-Solver++(2M) 0.034 / 0.0048 /
  5.4e-4 / 6.4e-5; inversion against the exact map: DDIM 0.27 / 0.13 / 0.067 / 0.033,
  DPM-Solver++(2M) 0.075 / 0.021 / 0.0056 / 0.0015.
  """
  process, mix = PROCESSES['linear'], MIXTURES[1.0]
  model = mixture_model(mix, process)
  x0, _ = mix.sample(jax.random.PRNGKey(5), B)
  x0_np = np.asarray(x0, np.float64)
  t_end = 800.0  # below t_max: also checks that t_end and t_start lay out the same grid
  a, s = float(process.alpha(t_end)), float(process.sigma(t_end))
  exact = mix.pf_ode_map(x0_np, 1.0, 0.0, alpha_end=a, sigma_end=s)
  trip, inv = [], []
  for n in (10, 20, 40, 80):
    # The quadratic grid, on which the medians above were measured.
    x_T, info = jax.jit(lambda x, n=n: sampling.invert(
        model, process, x, method=method, num_steps=n, t_end=t_end, grid='quadratic',
        return_info=True))(x0)
    assert info['nfe'] == n
    back = run(model, process, x_T, method, n, t_start=t_end, grid='quadratic')[0]
    trip.append(_median_error(back, x0_np))
    inv.append(_median_error(x_T, exact))
  assert all(e1 > 1.5 * e2 for e1, e2 in zip(trip[:3], trip[1:3])), trip
  assert all(e1 > 1.5 * e2 for e1, e2 in zip(inv, inv[1:])), inv
  assert trip[-1] < trip[-2] and trip[-1] < trip_bound and inv[-1] < inv_bound, (trip, inv)


# (method, steps, order of the inversion's error, order of the round trip), measured on the
# Gaussian below, RMS at 10 / 20 / 40 / 80 / 160 / 320 steps: DDIM inversion 0.21 / 0.10 / 0.051 /
# 0.026 / 0.013 / 0.0064 (slope 1.00), round trip 0.24 / 0.13 / 0.064 / 0.032 / 0.016 / 0.0082
# (0.99); DPM-Solver++(2M) inversion 0.045 / 0.013 / 0.0035 / 9.2e-4 / 2.4e-4 / 5.9e-5 (1.96 from
# 80 to 160), round trip 0.042 / 0.0072 / 8.0e-4 / 9.5e-5 / 1.2e-5 / 2.3e-6 (3.01 from 80 to 160:
# the two directions' second-order errors cancel to leading order).
INVERT_ORDERS = [('ddim', (40, 80), 1, 1), ('dpmpp_2m', (80, 160), 2, 3)]


@pytest.mark.parametrize('method,steps,order,trip_order', INVERT_ORDERS)
def test_invert_order_on_a_gaussian(method, steps, order, trip_order):
  """For Gaussian data N(mu, diag(c)) the PF-ODE map is linear and known:
  ``(y - mu) / sqrt(c + rho^2)`` is constant along it (y = x / alpha, rho = sigma / alpha)."""
  process = PROCESSES['linear']
  mu, c = np.array([0.5, -0.3]), np.array([0.6, 0.2])
  gauss = oracles.GaussianMixture(weights=np.ones(1), means=mu[None], covs=np.diag(c)[None])
  model = mixture_model(gauss, process)
  x0 = mu + np.sqrt(c) * np.asarray(jax.random.normal(jax.random.PRNGKey(6), (B, 2)), np.float64)
  a, s = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
  rho = s / a
  exact = a * (mu + np.sqrt((c + rho**2) / c) * (x0 - mu))
  inv, trip = [], []
  for n in steps:
    x_T = jax.jit(lambda x, n=n: sampling.invert(model, process, x, method=method,
                                                 num_steps=n, grid='quadratic'))(
                                                     jnp.asarray(x0, jnp.float32))
    inv.append(rms(x_T, exact))
    trip.append(rms(run(model, process, x_T, method, n, grid='quadratic')[0], x0))
  assert abs(_slope(inv, steps) - order) <= 0.3, (inv, _slope(inv, steps))
  assert abs(_slope(trip, steps) - trip_order) <= 0.3, (trip, _slope(trip, steps))


def test_invert_errors_and_options():
  process, _, model, x_T, _ = setup()
  for method in ('ddpm', 'dpmpp_2m_sde', 'pc', 'ode', 'ddim2'):
    with pytest.raises(ValueError, match=r"method='.*' has no inverse.*\['ddim', 'dpmpp_2m', "
                                         r"'euler'\]"):
      sampling.invert(model, process, x_T, method=method, num_steps=5)
  with pytest.raises(TypeError, match="invert: method='ddim' takes no option eta; its options "
                                      "are grid, spacing, times"):
    sampling.invert(model, process, x_T, method='ddim', num_steps=5, eta=1.0)
  with pytest.raises(ValueError, match='floating'):
    sampling.invert(model, process, jnp.ones((4, 2), jnp.int32), num_steps=5)
  with pytest.raises(ValueError, match=r't_end=2000.0 must lie in \(t_min, t_max\]'):
    sampling.invert(model, process, x_T, num_steps=5, t_end=2000.0)
  # euler inverts as ddim; the trajectory runs from x_0 to x_T.
  x_T_d, info = sampling.invert(model, process, x_T, method='ddim', num_steps=5,
                                return_info=True, return_trajectory=True)
  np.testing.assert_array_equal(sampling.invert(model, process, x_T, method='euler', num_steps=5),
                                x_T_d)
  assert info['trajectory'].shape == (6,) + x_T.shape
  np.testing.assert_array_equal(info['trajectory'][0], x_T)
  np.testing.assert_array_equal(info['trajectory'][-1], x_T_d)


# --- the step hook --------------------------------------------------------------------------------


HOOK_CASES = [('ddpm', {}), ('ddim', {}), ('ddim', {'eta': 1.0}), ('plms', {}),
              ('plms', {'warm_start': 'ab'}), ('euler', {}), ('euler', {'S_churn': 10.0}),
              ('heun', {}), ('dpmpp_2m', {}), ('dpmpp_3m', {}), ('dpmpp_2m_sde', {}),
              ('unipc', {}), ('pc', {})]


def _expected_times(process, method, n):
  """(t, alpha, sigma) the hook must see after steps 0..n-1 (pc: 0..n, its denoising step)."""
  if method == 'pc':
    t = np.append(np.linspace(process.t_max, process.t_min, n + 1, dtype=np.float32)[1:], 0.0)
  else:  # the grid of the method's defaults (sampling/defaults.py)
    opts = sampling.defaults.default_options(method, n)
    grid = 'uniform' if method == 'ddpm' else opts.get('grid', 'quadratic')
    t = np.append(np.asarray(grids.make_grid(process, n, grid, spacing=opts.get('spacing')))[1:],
                  0.0)
  alpha = np.append(np.asarray(process.alpha(jnp.asarray(t[:-1]))), 1.0)
  sigma = np.append(np.asarray(process.sigma(jnp.asarray(t[:-1]))), 0.0)
  return t, alpha, sigma


@pytest.mark.parametrize('method,options', HOOK_CASES,
                         ids=['-'.join([c[0], *map(str, c[1].values())]) for c in HOOK_CASES])
def test_step_hook(method, options):
  process, _, model, x_T, _ = setup()
  n, key = 6, jax.random.PRNGKey(8)

  def go(**kw):
    return jax.jit(lambda x: sampling.sample(model, process, method=method, num_steps=n, x_T=x,
                                             key=key, return_info=True,
                                             return_trajectory=True, **options, **kw))(x_T)

  plain, info = go()
  # The identity hook changes nothing, bit for bit.
  same, info_same = go(step_hook=lambda x, i, t, alpha, sigma: x)
  np.testing.assert_array_equal(same, plain)
  np.testing.assert_array_equal(info_same['trajectory'], info['trajectory'])
  # The hook sees every step: its index, the time reached and the noise levels there.
  seen = []

  def record(x, i, t, alpha, sigma):
    jax.debug.callback(lambda *v: seen.append(tuple(float(u) for u in v)), i, t, alpha, sigma,
                       ordered=True)
    return x

  go(step_hook=record)
  jax.effects_barrier()
  t, alpha, sigma = _expected_times(process, method, n)
  assert [int(v[0]) for v in seen] == list(range(len(t))), seen
  np.testing.assert_allclose([v[1] for v in seen], t, rtol=1e-6)
  np.testing.assert_allclose([v[2] for v in seen], alpha, rtol=1e-5)
  np.testing.assert_allclose([v[3] for v in seen], sigma, rtol=1e-5, atol=1e-7)
  assert seen[-1][1:] == (0.0, 1.0, 0.0)
  # Inpainting-like: x[:, 0] pinned to the known value v at every noise level (alpha v + sigma
  # 0) ends exactly at v, and the trajectory carries the pinned states.
  v = 0.375
  pinned, info_pin = go(step_hook=lambda x, i, t, alpha, sigma: x.at[:, 0].set(alpha * v))
  assert np.all(np.asarray(pinned)[:, 0] == np.float32(v))
  assert np.all(np.isfinite(pinned)) and not np.array_equal(pinned[:, 1], plain[:, 1])
  np.testing.assert_array_equal(info_pin['trajectory'][-1], pinned)


def test_step_hook_errors_and_ode():
  process, _, model, x_T, _ = setup()
  with pytest.raises(TypeError):
    sampling.sample(model, process, method='ode', num_steps=4, x_T=x_T,
                    step_hook=lambda x, *_: x)
  with pytest.raises(ValueError, match=r'step_hook must return the state, shape \(64, 2\)'):
    sampling.sample(model, process, method='ddim', num_steps=4, x_T=x_T,
                    step_hook=lambda x, *_: x[:, :1])
  # A tuple failed inside NumPy (a tracer converted to an array).
  with pytest.raises(ValueError, match=r'step_hook must return the state, an array of shape '
                     r'\(64, 2\); got tuple'):
    sampling.sample(model, process, method='ddim', num_steps=4, x_T=x_T,
                    step_hook=lambda x, *_: (x, 1))
  # Traced tolerances failed as a tracer converted to bool.
  with pytest.raises(ValueError, match='rtol and atol must be concrete numbers'):
    jax.jit(lambda x, r: sampling.sample(model, process, method='ode', num_steps=4, x_T=x,
                                         rtol=r))(x_T, 1e-3)
  for method in ('ddim', 'ode'):
    with pytest.raises(ValueError, match="return_trajectory is True or False, got 'yes'"):
      sampling.sample(model, process, method=method, num_steps=4, x_T=x_T,
                      return_trajectory='yes')


def test_start_shape_and_key_errors_name_them():
  # shape=() failed with an IndexError, shape=8 with "'int' object is not iterable", (-1, 2)
  # inside jax.random; a batch of keys with JAX's "normal accepts a single key".
  process, _, model, _, _ = setup()
  key = jax.random.PRNGKey(0)
  s = functools.partial(sampling.sample, model, process, method='ddim', num_steps=3)
  for bad in ((), 8, (-1, 2), (4, 0), (4.0, 2), (True, 2)):
    with pytest.raises(ValueError, match=r'shape must be a tuple of positive ints \[B, \.\.\.\]'):
      s(key=key, shape=bad)
  for keys in (jax.random.split(key, 8), jax.random.split(jax.random.key(0), 8)):
    with pytest.raises(ValueError, match=r'key must be one PRNG key .* got shape \(8,'):
      s(key=keys, shape=(4, 2))
  assert s(key=key, shape=[4, np.int64(2)]).shape == (4, 2)  # a list and NumPy ints are shapes
  x = jax.vmap(lambda k: s(key=k, shape=(4, 2)))(jax.random.split(key, 3))  # one key per call
  assert x.shape == (3, 4, 2)


# --- short steps in log-SNR ----------------------------------------------------------------------


def test_exp_remainder_matches_its_definition_in_float64():
  """R_k(x) = (e^x - sum_{j<k} x^j / j!) / x^k, the phi functions of DPM-Solver and UniPC: the
  float32 values against float64 (the quotient where it does not cancel, |x| >= 0.5; a 40-term
  series below), at steps from 0 to 5 in log-SNR, both signs."""
  import math  # pylint: disable=import-outside-toplevel
  xs = np.array([0.0, 1e-7, -1e-6, 1e-4, -1e-3, 1e-2, -0.05, 0.1, -0.3, 0.5, -0.99, 1.0, -1.01,
                 1.5, -3.0, 5.0])
  for k in (1, 2, 3, 4):
    got = np.asarray(core.exp_remainder(jnp.asarray(xs, jnp.float32), k), np.float64)
    want = []
    for x in xs:
      if abs(x) >= 0.5:
        want.append((math.expm1(x) - sum(x**j / math.factorial(j) for j in range(1, k))) / x**k)
      else:
        want.append(sum(x**m / math.factorial(k + m) for m in range(40)))
    np.testing.assert_allclose(got, want, rtol=3e-6, err_msg=f'k={k}')


@pytest.mark.parametrize('method', ['unipc', 'dpmpp_2m', 'dpmpp_3m'])
def test_short_and_tied_log_snr_steps_stay_finite(method):
  """Steps far shorter than any grid's: 30 times within 0.001 of t_min on the DDPM schedule
  (h ~ 1e-6 in log-SNR; UniPC's reference recursion for its weights gave NaN), and on the VE SDE
  times whose float32 log-SNRs tie (h = 0: 0 / 0 before). The samplers end where DDIM does, to
  the order of the few steps' size, and at the exact map's image (the steps hardly move x)."""
  process, mix, model, x_T, _ = setup()
  for proc, times in ((process, np.linspace(1.001, 1.0, 30)),
                      (sde.VESDE(), np.linspace(1.01e-5, 1e-5, 30))):
    times = times.astype(np.float32)
    fn = mix.model_fn(proc)
    start = x_T * float(proc.sigma(times[0]))  # noise at the first time's level
    ref = mix.pf_ode_map(np.asarray(start, np.float64), float(proc.alpha(times[0])),
                         float(proc.sigma(times[0])))
    x = sampling.sample(fn, proc, method=method, num_steps=30, x_T=start, times=times)
    ddim = sampling.sample(fn, proc, method='ddim', num_steps=30, x_T=start, times=times)
    assert np.all(np.isfinite(np.asarray(x))), (type(proc).__name__, method)
    assert rms(x, ref) <= 2.0 * rms(ddim, ref) + 1e-6, (type(proc).__name__, method,
                                                          rms(x, ref), rms(ddim, ref))


def test_a_process_passed_to_jit_samples_as_one_closed_over():
  """Processes are pytrees (DESIGN.md); passed as a jit argument DiscreteVP's betas are traced,
  and the defaults' grids (cosine, optimized) and the third-order guard are computed from
  tracers in float32: the same times and samples as with the process closed over, to float32
  rounding. UniPC-3 at 10 steps takes the optimized grid, and UniPC-3 and 3M the guard."""
  process, mix, _, x_T, _ = setup()
  for grid in ('cosine', 'optimized'):
    for n, spacing, t_start in ((2, 'trailing', None), (10, 'trailing', None),
                                (25, 'linspace', 400.0)):
      make = lambda p: grids.make_grid(p, n, grid, spacing=spacing, t_start=t_start)  # pylint: disable=cell-var-from-loop
      np.testing.assert_allclose(jax.jit(make)(process), make(process), rtol=1e-5,
                                 err_msg=f'{grid} {n} {spacing} {t_start}')
  for method in ('unipc', 'dpmpp_3m'):
    closed = sampling.sample(mix.model_fn(process), process, method=method, num_steps=10,
                             x_T=x_T)
    traced = jax.jit(lambda p, x: sampling.sample(mix.model_fn(p), p, method=method,  # pylint: disable=cell-var-from-loop
                                                  num_steps=10, x_T=x))(process, x_T)
    np.testing.assert_allclose(traced, closed, atol=2e-5, err_msg=method)
