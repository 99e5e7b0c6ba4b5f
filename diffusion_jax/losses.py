"""Denoising losses as pure functions: eps / x0 / v / score / flow prediction, weightings, time
sampling.

Every loss here is a weighted regression of the model's prediction on its target at a time ``t``:

    L = E_t E_{x0, eps} [ w(t) * mean((pred(x_t, t) - target)^2) ],   x_t = alpha x0 + sigma eps.

Weightings are named by what they do to the x0-error, whichever the parameterization, so that the
same name means the same objective for eps, x0, v or score models:

- ``'uniform'``: plain MSE of the prediction (Ho et al. 2020's L_simple for eps models).
- ``'snr'``: x0-error weighted by SNR = alpha^2/sigma^2, i.e. the eps-MSE for any parameterization
  (also lambda(t) = sigma^2 of denoising score matching, Song et al. 2021).
- ``'min_snr'``: x0-error weighted by min(SNR, gamma), the Min-SNR-gamma weighting of
  Hang et al. (2023), eqs. 6-8 (for eps: min(SNR, gamma)/SNR; for v: min(SNR, gamma)/(SNR + 1)).
- ``'likelihood'``: score-error weighted by g(t)^2 (Song et al. 2021b, "Maximum Likelihood Training
  of Score-Based Diffusion Models", Thm. 1); needs an SDE with ``drift_and_diffusion``.

With ``||d x0||^2 = c * ||d pred||^2`` (c_eps = sigma^2/alpha^2, c_x0 = 1,
c_v = sigma^2/(alpha^2+sigma^2)^2, c_score = sigma^4/alpha^2, c_flow = sigma^2/(alpha+sigma)^2)
each weighting becomes a weight on the prediction's MSE; the closed forms below avoid the 0 * inf
these products hit at the ends.

Flow matching (Lipman et al. 2023; Liu et al. 2022; Esser et al. 2024, SD3) is
``prediction='flow'`` (the target is the velocity ``eps - x0``) with ``weighting='uniform'`` on
``processes.RectifiedFlow``, and SD3's time sampling is ``'logit_normal'``.

Time sampling: ``'uniform'`` (integer steps 1..N for ``DiscreteVP``, uniform in [t_min, t_max] for
continuous processes), ``'importance'``: t drawn with density proportional to the weight and the
weight replaced by weight / density, an unbiased estimate of the same objective with lower variance
(Song et al. 2021b, Sec. 5: importance sampling of t for the likelihood weighting), or
``'logit_normal'``: the logit-normal density of Esser et al. (2024), SD3, Sec. 3.1, eq. 19,
``t = sigmoid(m + s z)``, z ~ N(0, 1), mapped affinely onto [t_min, t_max]; unlike 'importance' it
changes the objective (it weights the middle times more, as SD3 intends: factor 1), and it is
for continuous processes.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from diffusion_jax import processes

Weighting = Literal['uniform', 'snr', 'min_snr', 'likelihood']
WEIGHTINGS = ('uniform', 'snr', 'min_snr', 'likelihood')
TIME_SAMPLINGS = ('uniform', 'importance', 'logit_normal')
_IMPORTANCE_CELLS = 1024


def is_discrete(process) -> bool:
  """True for processes with integer steps (``DiscreteVP``), trained on t in {1..N}."""
  return isinstance(process, processes.DiscreteVP)


def prediction_weight(process, t: jax.Array, *, prediction: processes.Prediction,
                      weighting: Weighting, min_snr_gamma: float = 5.0) -> jax.Array:
  """The weight on the prediction's MSE that realises ``weighting`` (module docstring). t: [B] -> [B]."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f'weighting={weighting!r} is not known; use one of {WEIGHTINGS}.')
  if prediction not in processes.PREDICTIONS:
    raise ValueError(f'prediction={prediction!r} is not known; use one of {processes.PREDICTIONS}.')
  if weighting == 'uniform':
    return jnp.ones_like(jnp.asarray(t, jnp.float32))
  a, s = process.alpha(t), process.sigma(t)
  a2, s2 = a * a, s * s
  snr = a2 / s2
  if weighting == 'snr':
    return {'eps': jnp.ones_like(snr), 'x0': snr, 'v': a2 / jnp.square(a2 + s2), 'score': s2,
            'flow': a2 / jnp.square(a + s)}[prediction]
  if weighting == 'min_snr':
    m = jnp.minimum(snr, min_snr_gamma)
    return {'eps': m / snr, 'x0': m, 'v': m * s2 / jnp.square(a2 + s2),
            'score': m * s2 * s2 / a2, 'flow': m * s2 / jnp.square(a + s)}[prediction]
  # likelihood: g^2 on the score-error; c_pred / c_score converts it.
  if not hasattr(process, 'drift_and_diffusion'):
    raise ValueError(f"weighting='likelihood' needs an SDE (VPSDE, SubVPSDE, VESDE); "
                     f'{type(process).__name__} has no diffusion coefficient g(t).')
  t = jnp.asarray(t, jnp.float32)
  _, g = process.drift_and_diffusion(jnp.zeros(t.shape + (1,)), t)
  g2 = jnp.square(g)
  return {'eps': g2 / s2, 'x0': g2 * a2 / (s2 * s2), 'v': g2 * a2 / (s2 * jnp.square(a2 + s2)),
          'score': g2, 'flow': g2 * a2 / (s2 * jnp.square(a + s))}[prediction]


def sample_times(process, key: jax.Array, batch_size: int, *, time_sampling: str = 'uniform',
                 weight_fn: Callable[[jax.Array], jax.Array] | None = None,
                 logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0
                 ) -> tuple[jax.Array, jax.Array]:
  """Draws training times and the factor that keeps the objective unbiased.

  Args:
    process: the noise process.
    key: PRNG key.
    batch_size: B.
    time_sampling: 'uniform', 'importance' or 'logit_normal' (module docstring).
    weight_fn: t -> loss weight; needed for 'importance', which draws t with density proportional
      to it (exactly on the integer grid of a discrete process; on 1024 cells uniform in log-SNR,
      uniform within a cell, for a continuous one).
    logit_normal_mean, logit_normal_std: m and s of 'logit_normal' (SD3: 0 and 1).

  Returns:
    t: [B] float32 times; factor: [B], the ratio uniform density / sampling density, by which
    the per-example loss is multiplied (1 for 'uniform').
  """
  if time_sampling not in TIME_SAMPLINGS:
    raise ValueError(f'time_sampling={time_sampling!r} is not known; use one of {TIME_SAMPLINGS}.')
  if time_sampling == 'logit_normal':
    if is_discrete(process):
      raise ValueError("time_sampling='logit_normal' is for continuous processes (RectifiedFlow, "
                       "the SDEs); DiscreteVP trains on integer steps: use 'uniform' or "
                       "'importance'.")
    if not logit_normal_std > 0:
      raise ValueError(f'logit_normal_std must be > 0, got {logit_normal_std}.')
    u = jax.nn.sigmoid(logit_normal_mean
                       + logit_normal_std * jax.random.normal(key, (batch_size,), jnp.float32))
    t = process.t_min + (process.t_max - process.t_min) * u
    return t.astype(jnp.float32), jnp.ones((batch_size,), jnp.float32)
  if is_discrete(process):
    n = process.num_timesteps
    if time_sampling == 'uniform':
      t = jax.random.randint(key, (batch_size,), 1, n + 1)
      return t.astype(jnp.float32), jnp.ones((batch_size,), jnp.float32)
    grid = jnp.arange(1, n + 1, dtype=jnp.float32)
    w = weight_fn(grid)
    p = w / jnp.sum(w)
    idx = jax.random.choice(key, n, (batch_size,), p=p)
    return grid[idx], 1.0 / (n * p[idx])
  t_min, t_max = process.t_min, process.t_max
  if time_sampling == 'uniform':
    t = jax.random.uniform(key, (batch_size,), jnp.float32, t_min, t_max)
    return t, jnp.ones((batch_size,), jnp.float32)
  # Cells uniform in log-SNR put many cells where the weight changes fastest (near t_min).
  lam = jnp.linspace(process.log_snr(t_min), process.log_snr(t_max), _IMPORTANCE_CELLS + 1)
  edges = jnp.clip(process.t_from_log_snr(lam), t_min, t_max)
  edges = edges.at[0].set(t_min).at[-1].set(t_max)
  width = jnp.diff(edges)
  mids = 0.5 * (edges[1:] + edges[:-1])
  mass = weight_fn(mids) * width
  p = mass / jnp.sum(mass)
  k_cell, k_pos = jax.random.split(key)
  idx = jax.random.choice(k_cell, _IMPORTANCE_CELLS, (batch_size,), p=p)
  t = edges[idx] + width[idx] * jax.random.uniform(k_pos, (batch_size,))
  density = p[idx] / width[idx]
  return t, 1.0 / ((t_max - t_min) * density)


def denoising_loss(model_fn: Callable[..., jax.Array], process, x0: jax.Array, key: jax.Array, *,
                   prediction: processes.Prediction = 'eps', weighting: Weighting = 'uniform',
                   min_snr_gamma: float = 5.0, time_sampling: str = 'uniform',
                   logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0,
                   cond: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The denoising loss of one batch.

  Args:
    model_fn: ``model_fn(x_t, t, cond) -> prediction`` (closing over params, so ``jax.grad`` of
      this loss in params works through it).
    process: the noise process (DiscreteVP or an SDE).
    x0: [B, ...] clean data.
    key: PRNG key for the times and the noise.
    prediction: what model_fn predicts: 'eps', 'x0', 'v', 'score' or 'flow' (eps - x0).
    weighting: 'uniform', 'snr', 'min_snr' or 'likelihood' (module docstring).
    min_snr_gamma: gamma of 'min_snr' (Hang et al. 2023 use 5).
    time_sampling: 'uniform', 'importance' or 'logit_normal'.
    logit_normal_mean, logit_normal_std: m and s of 'logit_normal' (``sample_times``).
    cond: the conditioning pytree passed to model_fn untouched (leaves [B, ...], e.g.
      ``{'label': [B] int32}``), or None.

  Returns:
    loss: scalar, the batch mean of the weighted per-example MSE.
    metrics: 'loss', 'mse' (unweighted prediction MSE), and 'loss_q0'..'loss_q3', the mean
    weighted loss of the examples whose t falls in each quarter of [t_min, t_max] (0 for a quarter
    that drew no example).
  """
  if not jnp.issubdtype(x0.dtype, jnp.floating):
    raise ValueError(f'x0 must be floating point, got {x0.dtype}.')
  batch = x0.shape[0]
  k_t, k_eps = jax.random.split(key)

  def weight_fn(t):
    return prediction_weight(process, t, prediction=prediction, weighting=weighting,
                             min_snr_gamma=min_snr_gamma)

  t, factor = sample_times(process, k_t, batch, time_sampling=time_sampling, weight_fn=weight_fn,
                           logit_normal_mean=logit_normal_mean,
                           logit_normal_std=logit_normal_std)
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  x0 = x0.astype(jnp.float32)
  x_t = processes.q_sample(process, x0, t, eps)
  alpha, sigma = process.alpha(t), process.sigma(t)
  a, s = processes._bcast(alpha, x0), processes._bcast(sigma, x0)  # pylint: disable=protected-access
  # Targets from the exact (x0, eps), not reconstructed through alpha(t), which is tiny near t_max.
  target = {'eps': eps, 'x0': x0, 'v': a * eps - s * x0, 'score': -eps / s,
            'flow': eps - x0}[prediction]
  pred = model_fn(x_t, t, cond).astype(jnp.float32)
  mse = jnp.mean(jnp.square(pred - target).reshape(batch, -1), axis=-1)  # [B]
  per_example = weight_fn(t) * mse
  loss = jnp.mean(factor * per_example)
  metrics = {'loss': loss, 'mse': jnp.mean(mse)}
  quarter = jnp.clip(((t - process.t_min) / (process.t_max - process.t_min) * 4).astype(jnp.int32),
                     0, 3)
  for q in range(4):
    mask = (quarter == q).astype(jnp.float32)
    metrics[f'loss_q{q}'] = jnp.sum(mask * per_example) / jnp.maximum(jnp.sum(mask), 1.0)
  return loss, metrics
