"""Discrete noise schedules behind the Process contract, and what every process shares.

Every noise process, discrete or continuous, exposes the marginal

    x_t = alpha(t) * x_0 + sigma(t) * eps,        eps ~ N(0, I)

through ``alpha(t)``, ``sigma(t)``, ``t_min``, ``t_max``, ``prior_sample`` and ``prior_logp``
(../shared/DESIGN.md). This module holds the discrete variance-preserving process of DDPM
(Ho et al. 2020) with its linear and cosine (Nichol & Dhariwal 2021) schedules, the rectified
flow of Liu et al. (2022) and Esser et al. (2024) (``RectifiedFlow``: alpha = 1 - t, sigma = t),
and the functions that only need alpha and sigma and so serve the SDEs of ``sde.py`` too:
``q_sample``, the Gaussian posterior between two times, and the conversions between eps, x0, v,
score and flow predictions.

Time convention of ``DiscreteVP``: ``t`` is the DDPM step counted from the data, ``t = 0`` is the data
itself (alpha = 1, sigma = 0) and ``t = i`` for ``i = 1..N`` is step ``i`` of Ho et al., with
``alpha(i)^2 = prod_{s<=i} (1 - beta_s)``. Between grid points log-alpha is interpolated piecewise
linearly, so alpha and sigma are defined for every real ``t`` in ``[0, N]`` and every sampler works
with every process. The model is evaluated on ``[t_min, t_max] = [1, N]``.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Prediction = Literal['eps', 'x0', 'v', 'score', 'flow']
PREDICTIONS = ('eps', 'x0', 'v', 'score', 'flow')


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example array ``[B]`` (or a scalar) to broadcast against ``x: [B, ...]``."""
  a = jnp.asarray(a)
  if a.ndim == 0:
    return a
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _standard_normal_logp(z: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
  """log N(z; 0, scale^2 I) summed over all but the leading axis. z: [B, ...] -> [B]."""
  d = math.prod(z.shape[1:])
  sq = jnp.sum(jnp.square(z.reshape(z.shape[0], -1)), axis=-1)
  return -0.5 * d * jnp.log(2 * jnp.pi * scale**2) - 0.5 * sq / scale**2


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Linearly spaced betas of Ho et al. (2020), Sec. 4. Returns float64 ``[N]``."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the cosine schedule of Nichol & Dhariwal (2021), eq. 17.

  ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos((t/T + s) / (1 + s) * pi/2)^2``, and
  ``beta_t = 1 - alpha_bar(t) / alpha_bar(t-1)`` clipped to ``max_beta`` to avoid the singularity
  at ``t = T``, as in the paper. Returns float64 ``[N]``.
  """
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  alpha_bar = f / f[0]
  return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


@jax.jit
def _interp_unit_grid(t: jax.Array, fp: jax.Array) -> jax.Array:
  """``jnp.interp(t, arange(len(fp)), fp)`` without the search: the abscissae are 0, 1, ..., N.

  The segment of t is ``floor(t)`` (clipped to [0, N - 1]), so no binary search runs, which
  ``jnp.interp`` lowers to a ``while`` loop of log2(N) iterations over the batch (on CPU it was
  half the cost of a sampler step on the Gaussian-mixture oracle: 4.7 -> 2.2 us per DDIM step,
  batch 256). Same segment convention, formula and ends as ``jnp.interp`` (a grid point takes the
  segment to its right, the last one the segment to its left; constant outside [0, N]), so under
  jit the values and the gradients are bitwise equal to it (tests/test_processes.py).
  """
  n = fp.shape[0] - 1
  k = jnp.clip(jnp.floor(t), 0, n - 1)
  i = k.astype(jnp.int32)
  lo, hi = fp[i], fp[i + 1]
  f = lo + (t - k) * (hi - lo)
  f = jnp.where(t < 0, fp[0], f)
  return jnp.where(t > n, fp[n], f)


class DiscreteVP(struct.PyTreeNode):
  """The discrete variance-preserving process of DDPM (Ho et al. 2020, eqs. 2-4).

  ``q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I)``, so the marginal is
  ``q(x_i | x_0) = N(alpha_i x_0, sigma_i^2 I)`` with ``alpha_i^2 = prod_{s<=i} (1 - beta_s)`` and
  ``sigma_i^2 = 1 - alpha_i^2``. Build it with ``linear``, ``cosine`` or ``from_betas``.

  Attributes:
    betas: ``[N]`` float32, ``betas[i - 1]`` is beta_i of the paper.
    log_alphas: ``[N + 1]`` float32, log alpha at the grid points ``t = 0..N`` (``log_alphas[0] = 0``).
    num_timesteps: N, static.
  """

  betas: jax.Array  # [N]
  log_alphas: jax.Array  # [N + 1]
  num_timesteps: int = struct.field(pytree_node=False)

  @classmethod
  def from_betas(cls, betas) -> 'DiscreteVP':
    """A process from any betas ``[N]`` in (0, 1]; cumulative products are taken in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
      raise ValueError(f'betas must be a non-empty 1-D array, got shape {betas.shape}.')
    if not np.all((betas > 0) & (betas <= 1)):
      raise ValueError('betas must lie in (0, 1]; got values in '
                       f'[{betas.min():.3g}, {betas.max():.3g}].')
    log_alphas = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-np.minimum(betas, 1 - 1e-12)))])
    return cls(betas=jnp.asarray(betas, jnp.float32), log_alphas=jnp.asarray(log_alphas, jnp.float32),
               num_timesteps=int(betas.size))

  @classmethod
  def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4,
             beta_end: float = 0.02) -> 'DiscreteVP':
    """The linear schedule of Ho et al. (2020): betas from 1e-4 to 0.02 over T = 1000 steps.

    As in the DDPM code, the endpoints are given for T = 1000; they are used as given for any T.
    """
    return cls.from_betas(linear_betas(num_timesteps, beta_start, beta_end))

  @classmethod
  def cosine(cls, num_timesteps: int = 1000, s: float = 0.008) -> 'DiscreteVP':
    """The cosine schedule of Nichol & Dhariwal (2021), eq. 17, betas clipped at 0.999."""
    return cls.from_betas(cosine_betas(num_timesteps, s))

  # --- the Process contract -------------------------------------------------------------------

  @property
  def t_min(self) -> float:
    return 1.0

  @property
  def t_max(self) -> float:
    return float(self.num_timesteps)

  @property
  def is_variance_preserving(self) -> bool:
    return True

  def log_alpha(self, t: jax.typing.ArrayLike) -> jax.Array:
    """log alpha(t), piecewise linear in t between the grid points 0..N (constant outside)."""
    return _interp_unit_grid(jnp.asarray(t, jnp.float32), self.log_alphas)

  def alpha(self, t: jax.typing.ArrayLike) -> jax.Array:
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t: jax.typing.ArrayLike) -> jax.Array:
    # sqrt(1 - alpha^2) through expm1: exact near t = 0 where alpha^2 is close to 1.
    return jnp.sqrt(jnp.maximum(-jnp.expm1(2 * self.log_alpha(t)), 0.0))

  def log_snr(self, t: jax.typing.ArrayLike) -> jax.Array:
    """lambda(t) = log(alpha^2 / sigma^2)."""
    la2 = 2 * self.log_alpha(t)
    return la2 - jnp.log(-jnp.expm1(la2))

  def t_from_log_snr(self, log_snr: jax.typing.ArrayLike) -> jax.Array:
    """Inverse of ``log_snr``: alpha^2 = sigmoid(lambda), then invert the piecewise-linear log-alpha."""
    log_alpha = 0.5 * jax.nn.log_sigmoid(jnp.asarray(log_snr, jnp.float32))
    grid = jnp.arange(self.num_timesteps + 1, dtype=jnp.float32)
    # log_alphas decreases with t; jnp.interp needs increasing abscissae.
    return jnp.interp(log_alpha, self.log_alphas[::-1], grid[::-1])

  def prior_sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T ~ N(0, I), the prior of Ho et al. (2020); q(x_T | x_0) differs by alpha(T) ~ 6e-3."""
    return jax.random.normal(key, shape, jnp.float32)

  def prior_logp(self, z: jax.Array) -> jax.Array:
    """log N(z; 0, I) per example. z: [B, ...] -> [B]."""
    return _standard_normal_logp(z)

  # --- DDPM-specific quantities (Ho et al. 2020, eqs. 6-7) -----------------------------------

  def posterior_mean_variance(self, x_t: jax.Array, x0: jax.Array, t: jax.Array
                              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_{t-1} | x_t, x_0) for integer steps t in 1..N: Ho et al. (2020), eqs. 6-7.

    Args:
      x_t: [B, ...] noisy data at step t.
      x0: [B, ...] (predicted) clean data.
      t: [B] integer steps in 1..N.

    Returns:
      mean [B, ...]; beta_tilde_t [B] (the "fixedsmall" variance, eq. 7) and beta_t [B] (the
      "fixedlarge" variance); both variance choices of Sec. 3.2.
    """
    t = jnp.asarray(t, jnp.int32)
    beta = self.betas[t - 1]
    abar_prev = jnp.exp(2 * self.log_alphas[t - 1])
    # 1 - alpha_bar through expm1: at t = 1 it is beta_1 = 1e-4, which 1 - exp(.) loses in float32.
    one_minus_abar_t = -jnp.expm1(2 * self.log_alphas[t])
    one_minus_abar_prev = -jnp.expm1(2 * self.log_alphas[t - 1])
    coef_x0 = jnp.sqrt(abar_prev) * beta / one_minus_abar_t
    coef_xt = jnp.sqrt(1 - beta) * one_minus_abar_prev / one_minus_abar_t
    mean = _bcast(coef_x0, x0) * x0 + _bcast(coef_xt, x_t) * x_t
    beta_tilde = one_minus_abar_prev / one_minus_abar_t * beta
    return mean, beta_tilde, beta


class RectifiedFlow(struct.PyTreeNode):
  """Rectified flow: the straight path ``x_t = (1 - t) x_0 + t eps`` (Liu et al. 2022; Esser et
  al. 2024, Stable Diffusion 3, eq. 3 with the "RF" choice; Flux).

  ``alpha(t) = 1 - t``, ``sigma(t) = t`` on ``t in [0, 1]``: not variance preserving, and the
  velocity ``d x_t / dt = eps - x_0`` is the ``'flow'`` prediction (``convert_prediction``).

  Time domain: the model is evaluated on ``[t_min, t_max] = [eps, 1 - eps]`` (default 1e-3): at
  t = 0 the noise level sigma / alpha is 0 and at t = 1 it is infinite, where the log-SNR solvers
  and grids (``t_from_log_snr``, DPM-Solver, UniPC) have no finite time; the samplers take their
  final step to the data from t_min as for every process. At t_max = 0.999 the prior N(0, I)
  differs from q(x_T | x_0) by alpha = 1e-3, the size of DDPM's alpha_T = 6e-3. SD3's own grids
  start at sigma = 1; the shifted grid of SD3 is ``sampling.grids`` with ``shift=``.

  Attributes:
    eps: the distance of t_min from 0 and of t_max from 1, static.
  """

  eps: float = struct.field(pytree_node=False, default=1e-3)

  @property
  def t_min(self) -> float:
    return float(self.eps)

  @property
  def t_max(self) -> float:
    return 1.0 - float(self.eps)

  @property
  def is_variance_preserving(self) -> bool:
    return False

  def log_alpha(self, t: jax.typing.ArrayLike) -> jax.Array:
    return jnp.log1p(-jnp.asarray(t, jnp.float32))

  def alpha(self, t: jax.typing.ArrayLike) -> jax.Array:
    return 1.0 - jnp.asarray(t, jnp.float32)

  def sigma(self, t: jax.typing.ArrayLike) -> jax.Array:
    return jnp.asarray(t, jnp.float32)

  def log_snr(self, t: jax.typing.ArrayLike) -> jax.Array:
    """lambda(t) = log(alpha^2 / sigma^2) = 2 log((1 - t) / t)."""
    t = jnp.asarray(t, jnp.float32)
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def t_from_log_snr(self, log_snr: jax.typing.ArrayLike) -> jax.Array:
    """Inverse of ``log_snr``: (1 - t) / t = exp(lambda / 2), so t = sigmoid(-lambda / 2)."""
    return jax.nn.sigmoid(-0.5 * jnp.asarray(log_snr, jnp.float32))

  def prior_sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_1 ~ N(0, I), the end of the path."""
    return jax.random.normal(key, shape, jnp.float32)

  def prior_logp(self, z: jax.Array) -> jax.Array:
    """log N(z; 0, I) per example. z: [B, ...] -> [B]."""
    return _standard_normal_logp(z)


# --- functions of alpha and sigma alone: they serve every process ---------------------------------


def q_sample(process, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """Samples the marginal ``x_t = alpha(t) x0 + sigma(t) eps`` (Ho et al. 2020, eq. 4).

  Args:
    process: any process of the contract.
    x0: [B, ...] clean data.
    t: [B] times in the process's domain.
    eps: [B, ...] standard normal noise.
  """
  return _bcast(process.alpha(t), x0) * x0 + _bcast(process.sigma(t), x0) * eps


def transition(process, t: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I) for s < t (Kingma et al. 2021, eq. 9).

  Returns ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``.
  """
  log_a_ts = process.log_alpha(t) - process.log_alpha(s)
  a_ts = jnp.exp(log_a_ts)
  if process.is_variance_preserving:
    # sigma_t^2 - a_ts^2 sigma_s^2 = 1 - a_ts^2 when alpha^2 + sigma^2 = 1; expm1 keeps the
    # precision the subtraction loses for close times.
    var_ts = -jnp.expm1(2 * log_a_ts)
  else:
    var_ts = jnp.square(process.sigma(t)) - jnp.square(a_ts * process.sigma(s))
  return a_ts, jnp.maximum(var_ts, 0.0)


def posterior(process, x_t: jax.Array, x0: jax.Array, t: jax.Array, s: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """q(x_s | x_t, x_0) for any s < t of any process (Kingma et al. 2021, eqs. 31-33).

  ``mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_0`` and
  ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``. For a DDPM process with ``s = t - 1`` this is
  ``posterior_mean_variance`` (Ho et al. eqs. 6-7) with the "fixedsmall" variance.

  Args:
    x_t: [B, ...]; x0: [B, ...]; t, s: [B] or scalars.

  Returns:
    mean [B, ...] and variance (shape of t).
  """
  a_ts, var_ts = transition(process, t, s)
  var_t = jnp.square(process.sigma(t))
  var_s = jnp.square(process.sigma(s))
  mean = (_bcast(a_ts * var_s / var_t, x_t) * x_t
          + _bcast(process.alpha(s) * var_ts / var_t, x0) * x0)
  return mean, var_ts * var_s / var_t


def convert_prediction(pred: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array, *,
                       source: Prediction, target: Prediction) -> jax.Array:
  """Converts a model's prediction between the eps, x0, v, score and flow parameterizations.

  With ``x_t = alpha x0 + sigma eps``: ``score = -eps / sigma`` (the score of q(x_t | x_0)
  averaged over x_0, Vincent 2011), and ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Sec. 4;
  here without assuming alpha^2 + sigma^2 = 1, so ``x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)``
  and ``eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)``, which reduce to theirs for VP processes).
  ``flow = eps - x0``, the velocity of rectified flow (Liu et al. 2022; Esser et al. 2024), so
  ``x0 = (x_t - sigma flow) / (alpha + sigma)`` and ``eps = (x_t + alpha flow) / (alpha + sigma)``
  (for ``RectifiedFlow`` alpha + sigma = 1), with no division by alpha or sigma alone.

  Args:
    pred: [B, ...] the prediction in the ``source`` parameterization.
    x_t: [B, ...] the noisy input the prediction was made for.
    alpha, sigma: [B] (or scalars) the process's alpha(t), sigma(t).
    source, target: one of 'eps', 'x0', 'v', 'score', 'flow'.
  """
  for name, value in (('source', source), ('target', target)):
    if value not in PREDICTIONS:
      raise ValueError(f'{name}={value!r} is not a prediction type; use one of {PREDICTIONS}.')
  if source == target:
    return pred
  a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
  # To (x0, eps) first, then to the target.
  if source == 'eps':
    eps = pred
    x0 = (x_t - s * eps) / a
  elif source == 'score':
    eps = -s * pred
    x0 = (x_t - s * eps) / a
  elif source == 'x0':
    x0 = pred
    eps = (x_t - a * x0) / s
  elif source == 'flow':
    x0 = (x_t - s * pred) / (a + s)
    eps = (x_t + a * pred) / (a + s)
  else:  # v
    norm = a * a + s * s
    x0 = (a * x_t - s * pred) / norm
    eps = (s * x_t + a * pred) / norm
  if target == 'flow':
    return eps - x0
  if target == 'eps':
    return eps
  if target == 'x0':
    return x0
  if target == 'score':
    return -eps / s
  return a * eps - s * x0


def to_x0_eps(process, pred: jax.Array, x_t: jax.Array, t: jax.Array, *, prediction: Prediction
              ) -> tuple[jax.Array, jax.Array]:
  """The (x0, eps) pair implied by a prediction of type ``prediction`` at times ``t: [B]``."""
  alpha, sigma = process.alpha(t), process.sigma(t)
  x0 = convert_prediction(pred, x_t, alpha, sigma, source=prediction, target='x0')
  eps = convert_prediction(pred, x_t, alpha, sigma, source=prediction, target='eps')
  return x0, eps


def check_times(process, t: jax.typing.ArrayLike) -> None:
  """Raises ValueError when concrete times fall outside [t_min, t_max]; traced times are not checked."""
  try:
    t_np = np.asarray(t)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  lo, hi = float(process.t_min), float(process.t_max)
  if t_np.size and (t_np.min() < lo - 1e-6 or t_np.max() > hi + 1e-6):
    raise ValueError(f'times must lie in [t_min, t_max] = [{lo}, {hi}] for '
                     f'{type(process).__name__}; got values in [{t_np.min()}, {t_np.max()}].')
