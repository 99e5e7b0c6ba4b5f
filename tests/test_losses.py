"""Losses: weightings against Hang et al. (2023) closed forms, parameterization invariance, and the
unbiasedness of importance-sampled times."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import losses, oracles, preconditioning, processes as P


def _imperfect_eps_model(process):
  """The exact mixture eps plus a deterministic error, so the loss is non-trivial."""
  exact = oracles.example_mixture().model_fn(process, prediction='eps')

  def fn(x, t, cond=None):
    return exact(x, t) + 0.1 * jnp.sin(3 * x) + 0.05
  return fn


def _as(model_eps, process, prediction):
  def fn(x, t, cond=None):
    return P.convert_prediction(model_eps(x, t), x, process.alpha(t), process.sigma(t),
                                source='eps', target=prediction)
  return fn


def test_min_snr_weights_match_hang_et_al():
  p = P.DiscreteVP.linear()
  t = jnp.array([1.0, 50.0, 200.0, 999.0])
  snr = np.asarray(p.alpha(t) ** 2 / p.sigma(t) ** 2)
  gamma = 5.0
  w = {pred: np.asarray(losses.prediction_weight(p, t, prediction=pred, weighting='min_snr',
                                                 min_snr_gamma=gamma)) for pred in P.PREDICTIONS}
  np.testing.assert_allclose(w['eps'], np.minimum(snr, gamma) / snr, rtol=1e-5)
  np.testing.assert_allclose(w['x0'], np.minimum(snr, gamma), rtol=1e-5)
  np.testing.assert_allclose(w['v'], np.minimum(snr, gamma) / (snr + 1), rtol=1e-4)
  np.testing.assert_allclose(
      losses.prediction_weight(p, t, prediction='eps', weighting='snr'), 1.0, rtol=1e-6)


@pytest.mark.parametrize('weighting', ['snr', 'min_snr'])
def test_weighted_loss_is_the_same_for_every_parameterization(weighting):
  """One model seen as eps, x0, v or score: same x0-error, so the same weighted loss."""
  p = P.DiscreteVP.cosine()
  base = _imperfect_eps_model(p)
  x0, _ = oracles.example_mixture().sample(jax.random.PRNGKey(0), 64)
  key = jax.random.PRNGKey(1)
  values = {}
  for pred in P.PREDICTIONS:
    loss, _ = losses.denoising_loss(_as(base, p, pred), p, x0, key, prediction=pred,
                                    weighting=weighting)
    values[pred] = float(loss)
  for pred in P.PREDICTIONS:
    np.testing.assert_allclose(values[pred], values['eps'], rtol=2e-3, err_msg=str(values))


def test_uniform_eps_loss_is_plain_mse_and_quarters():
  p = P.DiscreteVP.linear(num_timesteps=100)
  model = _imperfect_eps_model(p)
  x0, _ = oracles.example_mixture().sample(jax.random.PRNGKey(2), 256)
  key = jax.random.PRNGKey(3)
  loss, metrics = losses.denoising_loss(model, p, x0, key)
  # Recompute by hand with the same draws.
  k_t, k_eps = jax.random.split(key)
  t = jax.random.randint(k_t, (256,), 1, 101).astype(jnp.float32)
  eps = jax.random.normal(k_eps, x0.shape)
  x_t = p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * eps
  per = np.mean((np.asarray(model(x_t, t)) - np.asarray(eps)) ** 2, axis=1)
  np.testing.assert_allclose(loss, per.mean(), rtol=1e-5)
  q = np.clip(((np.asarray(t) - 1) / 99 * 4).astype(int), 0, 3)
  for i in range(4):
    np.testing.assert_allclose(metrics[f'loss_q{i}'], per[q == i].mean(), rtol=1e-5)


def test_importance_sampling_is_unbiased():
  """E over t of the importance-sampled loss equals the uniform-time objective."""
  p = P.DiscreteVP.linear(num_timesteps=200)
  model = _imperfect_eps_model(p)
  x0, _ = oracles.example_mixture().sample(jax.random.PRNGKey(4), 256)

  def run(sampling, key):
    return losses.denoising_loss(model, p, x0, key, prediction='eps', weighting='min_snr',
                                 time_sampling=sampling)[0]

  keys = jax.random.split(jax.random.PRNGKey(5), 200)
  uni = np.asarray(jax.jit(jax.vmap(lambda k: run('uniform', k)))(keys))
  imp = np.asarray(jax.jit(jax.vmap(lambda k: run('importance', k)))(keys))
  se = np.sqrt(uni.var() / len(uni) + imp.var() / len(imp))
  assert abs(uni.mean() - imp.mean()) < 4 * se, (uni.mean(), imp.mean(), se)


def test_bad_arguments():
  p = P.DiscreteVP.linear(num_timesteps=10)
  x0 = jnp.zeros((2, 2))
  model = lambda x, t, cond=None: x
  with pytest.raises(ValueError, match='weighting'):
    losses.denoising_loss(model, p, x0, jax.random.PRNGKey(0), weighting='snr2')
  with pytest.raises(ValueError, match='time_sampling'):
    losses.denoising_loss(model, p, x0, jax.random.PRNGKey(0), time_sampling='sobol')
  with pytest.raises(ValueError, match='likelihood'):
    losses.denoising_loss(model, p, x0, jax.random.PRNGKey(0), weighting='likelihood')


def test_cond_reaches_the_network_untouched():
  """denoising_loss hands ``cond`` to model_fn, and make_model_fn hands it to network_fn, as is."""
  p = P.DiscreteVP.linear(num_timesteps=10)
  x0 = jnp.ones((3, 2))
  cond = {'label': jnp.array([0, 1, 2], jnp.int32), 'context': jnp.zeros((3, 4, 5))}
  seen = []

  def network_fn(params, x, c_noise, cond, *, train=False, rngs=None):
    seen.append((cond, train, rngs))
    return params * x + c_noise[:, None]

  model_fn = preconditioning.make_model_fn(network_fn, 2.0, p)
  losses.denoising_loss(model_fn, p, x0, jax.random.PRNGKey(0), cond=cond)
  losses.denoising_loss(model_fn, p, x0, jax.random.PRNGKey(0))
  assert seen[0][0] is cond and seen[0][1:] == (False, None)
  assert seen[1][0] is None
