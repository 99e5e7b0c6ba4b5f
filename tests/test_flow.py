"""Rectified flow (issue 22): the process, the 'flow' prediction, flow matching with SD3's
logit-normal times and shifted grid, every sampler on the exact Gaussian-mixture oracle, and the
digits config.

References: NumPy float64 formulas of Liu et al. (2022) / Esser et al. (2024), and the oracle's
SciPy float64 probability-flow map (``oracles.GaussianMixture.pf_ode_map``).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import configs, losses, oracles, preconditioning, processes, sampling
from diffusion_jax.sampling import grids
from diffusion_jax.training import config as training_config
from diffusion_jax.training import step as step_lib
from diffusion_jax.training.state import TrainState
from test_sampling import _moments_close  # pylint: disable=wrong-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RF = processes.RectifiedFlow()
MIX = oracles.example_mixture()
B = 64


def test_process_contract():
  t = np.array([0.001, 0.1, 0.5, 0.9, 0.999], np.float32).astype(np.float64)
  np.testing.assert_allclose(RF.alpha(t), 1 - t, rtol=1e-6)
  np.testing.assert_allclose(RF.sigma(t), t, rtol=1e-6)
  np.testing.assert_allclose(RF.log_snr(t), 2 * np.log((1 - t) / t), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(RF.t_from_log_snr(RF.log_snr(t)), t, rtol=1e-5)
  assert (RF.t_min, RF.t_max) == (1e-3, 0.999)
  x0, eps = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
  np.testing.assert_allclose(processes.q_sample(RF, x0, jnp.array([0.25, 0.75]), eps),
                             [[1.25] * 3, [1.75] * 3], rtol=1e-6)
  z = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  want = -0.5 * 3 * np.log(2 * np.pi) - 0.5 * np.sum(np.square(np.asarray(z, np.float64)), -1)
  np.testing.assert_allclose(RF.prior_logp(z), want, rtol=1e-5)
  # A pytree (jit argument) with static ends.
  assert jax.jit(lambda p, t: p.alpha(t))(RF, 0.25) == 0.75


def test_flow_prediction_converts_like_the_others():
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  a, s = rng.uniform(0.1, 1.0, size=5), rng.uniform(0.1, 1.0, size=5)  # any alpha, sigma
  x_t = a[:, None] * x0 + s[:, None] * eps
  exact = {'eps': eps, 'x0': x0, 'v': a[:, None] * eps - s[:, None] * x0,
           'score': -eps / s[:, None], 'flow': eps - x0}
  for source in processes.PREDICTIONS:
    for target in ('flow', 'x0', 'eps'):
      got = processes.convert_prediction(jnp.asarray(exact[source], jnp.float32),
                                         jnp.asarray(x_t, jnp.float32), jnp.asarray(a, jnp.float32),
                                         jnp.asarray(s, jnp.float32), source=source, target=target)
      np.testing.assert_allclose(got, exact[target], rtol=2e-4, atol=2e-4,
                                 err_msg=f'{source}->{target}')


def test_shift_is_sd3s_formula():
  t = grids.make_grid(RF, 6, 'uniform', spacing='linspace', shift=3.0)
  u = np.linspace(1.0, 0.0, 6)
  lo, hi = 1e-3, 0.999
  base = lo + (hi - lo) * u  # the unshifted grid, t_max to t_min
  v = (base - lo) / (hi - lo)
  want = lo + (hi - lo) * 3.0 * v / (1 + 2.0 * v)  # Esser et al. (2024), eq. 23, on [lo, hi]
  np.testing.assert_allclose(t, want, rtol=1e-6)
  np.testing.assert_array_equal(grids.make_grid(RF, 6, 'quadratic', shift=1.0),
                                grids.make_grid(RF, 6, 'quadratic'))
  with pytest.raises(ValueError, match='shift must be a positive'):
    grids.make_grid(RF, 6, 'uniform', shift=0.0)


# Deterministic methods: the error against the exact PF-ODE map shrinks with the steps.
DETERMINISTIC = [('ddim', {}), ('euler', {}), ('heun', {}), ('plms', {}),
                 ('plms', {'warm_start': 'ab'}), ('dpmpp_2m', {}), ('dpmpp_3m', {}),
                 ('unipc', {}), ('dpmpp_2m', {'shift': 3.0}), ('heun', {'shift': 3.0})]


def _setup(prediction='flow'):
  x_T = RF.prior_sample(jax.random.PRNGKey(0), (B, 2))
  ref = MIX.pf_ode_map(np.asarray(x_T, np.float64), float(RF.alpha(RF.t_max)),
                       float(RF.sigma(RF.t_max)))
  return MIX.model_fn(RF, prediction=prediction), x_T, ref


def _rms(x, ref):
  return float(np.sqrt(np.mean(np.sum(np.square(np.asarray(x, np.float64) - ref), -1))))


@pytest.mark.parametrize('method,options', DETERMINISTIC,
                         ids=['-'.join([m, *map(str, o.values())]) for m, o in DETERMINISTIC])
def test_samplers_converge_on_the_oracle(method, options):
  model, x_T, ref = _setup()
  errs = [_rms(sampling.sample(model, RF, method=method, num_steps=n, x_T=x_T, prediction='flow',
                               **options), ref) for n in (10, 40)]
  # Measured: 0.025-0.25 at 10 steps, 0.0011-0.029 at 40 (ddim / euler the first order).
  assert errs[1] < errs[0], errs
  assert errs[1] < 0.03 * 1.5, errs  # the mixture's scale is ~1.5


def test_ode_on_the_oracle():
  model, x_T, ref = _setup()
  assert _rms(sampling.sample(model, RF, method='ode', num_steps=1, x_T=x_T, prediction='flow'),
              ref) < 1e-3  # measured 6e-5


@pytest.mark.parametrize('method,n', [('ddpm', 200), ('dpmpp_2m_sde', 100), ('pc', 200)])
def test_stochastic_samplers_reproduce_the_mixture(method, n):
  model = MIX.model_fn(RF, prediction='flow')
  fn = jax.jit(lambda key: sampling.sample(model, RF, method=method, num_steps=n, key=key,
                                           shape=(3000, 2), prediction='flow'))
  _moments_close(fn(jax.random.PRNGKey(7)), MIX)


def test_logit_normal_times():
  t, factor = losses.sample_times(RF, jax.random.PRNGKey(0), 20000, time_sampling='logit_normal',
                                  logit_normal_mean=0.5, logit_normal_std=0.8)
  u = (np.asarray(t, np.float64) - RF.t_min) / (RF.t_max - RF.t_min)
  logit = np.log(u / (1 - u))
  # logit(u) ~ N(0.5, 0.8^2): 4 standard errors.
  assert abs(logit.mean() - 0.5) < 4 * 0.8 / np.sqrt(20000)
  assert abs(logit.std() - 0.8) < 4 * 0.8 / np.sqrt(2 * 20000)
  np.testing.assert_array_equal(factor, 1.0)
  with pytest.raises(ValueError, match='continuous processes'):
    losses.sample_times(processes.DiscreteVP.linear(), jax.random.PRNGKey(0), 4,
                        time_sampling='logit_normal')


def test_flow_matching_loss_is_the_velocity_mse():
  x0 = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  key = jax.random.PRNGKey(2)
  model = lambda x, t, cond: 0.5 * x  # any model: the loss is its MSE against eps - x0
  loss, _ = losses.denoising_loss(model, RF, x0, key, prediction='flow', weighting='uniform',
                                  time_sampling='logit_normal')
  k_t, k_eps = jax.random.split(key)  # denoising_loss's split
  z = np.asarray(jax.random.normal(k_t, (16,)), np.float64)
  t = 1e-3 + 0.998 / (1 + np.exp(-z))
  eps = np.asarray(jax.random.normal(k_eps, x0.shape), np.float64)
  x0 = np.asarray(x0, np.float64)
  x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
  want = np.mean(np.square(0.5 * x_t - (eps - x0)))
  np.testing.assert_allclose(loss, want, rtol=1e-4)
  # Weightings named by the x0-error: 'snr' on flow is the eps-MSE (c_flow = s^2 / (a + s)^2).
  t = jnp.array([0.2, 0.7])
  w = losses.prediction_weight(RF, t, prediction='flow', weighting='snr')
  np.testing.assert_allclose(w, np.square(1 - np.array([0.2, 0.7])), rtol=1e-5)


def _digits_flow_config():
  return configs.load(os.path.join(REPO, 'configs', 'digits_flow.py')).get_config()


def test_digits_flow_config_takes_a_finite_step():
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  config = _digits_flow_config()
  training_config.validate_config(config)
  process = training_config.build_process(config.process)
  assert isinstance(process, processes.RectifiedFlow)
  preconditioning.check_model_process(config.model.noise_input, config.model.parameterization,
                                      process)
  config.model.unet.ch = 8  # a tiny network: one step, not the job
  config.model.unet.num_res_blocks = 1
  module, network_fn = training_config.build_network(config.model)
  images = datasets.load_digits().images[:8].astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
  batch = {'x': jnp.asarray(images[..., None])}
  params = jax.jit(lambda k: module.init({'params': k}, batch['x'], jnp.ones((8,))))(
      jax.random.PRNGKey(0))['params']  # jit: eagerly, each op of the init compiles alone
  loss_fn = training_config.build_objective(config, process, network_fn)
  state = TrainState.create(params=params, tx=optax.adam(1e-3))
  state, metrics = jax.jit(lambda s, b, k: step_lib.train_step(s, b, k, loss_fn=loss_fn,
                                                               ema_decay=0.9))(
                                                                   state, batch,
                                                                   jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['loss']) > 0
  assert int(metrics['skipped']) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_likelihood_on_the_oracle():
  # The PF-ODE log-likelihood through the same contract: exact but for the ends t_min, t_max
  # (measured within 0.016 nats).
  from diffusion_jax import likelihood  # pylint: disable=import-outside-toplevel
  x, _ = MIX.sample(jax.random.PRNGKey(0), 8)
  got = likelihood.log_likelihood(MIX.model_fn(RF, prediction='flow'), RF, x,
                                  key=jax.random.PRNGKey(1), prediction='flow',
                                  divergence='exact')
  np.testing.assert_allclose(got, MIX.log_prob(x), atol=0.05)
