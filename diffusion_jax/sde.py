"""Continuous-time score SDEs behind the Process contract: VP, sub-VP and VE.

Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential Equations"
(ICLR 2021), write the forward process as an Ito SDE ``dx = f(t) x dt + g(t) dw`` on
``t in [0, T]`` whose marginal is ``x_t = alpha(t) x_0 + sigma(t) eps`` (their Appendix B):

- VP (eq. 11, the continuous DDPM): ``beta(t) = beta_min + t (beta_max - beta_min)``,
  ``f = -beta/2``, ``g = sqrt(beta)``, ``log alpha = -t^2 (beta_max - beta_min)/4 - t beta_min/2``,
  ``sigma^2 = 1 - alpha^2``.
- sub-VP (eq. 17): the VP drift with ``g^2 = beta (1 - alpha^4)``, so ``sigma = 1 - alpha^2``; its
  variance stays below the VP one, so ``alpha^2 + sigma^2 != 1``.
- VE (eq. 9, the continuous SMLD/NCSN): ``alpha = 1``,
  ``sigma = sigma_min (sigma_max/sigma_min)^t``, ``f = 0``,
  ``g = sigma sqrt(2 log(sigma_max/sigma_min))``. As in score_sde, ``sigma(0) = sigma_min``: the
  t = 0 marginal is the data convolved with N(0, sigma_min^2).

Every marginal of this kind obeys ``f = d log alpha/dt`` and ``g^2 = d sigma^2/dt - 2 f sigma^2
= -sigma^2 d lambda/dt`` with ``lambda = log(alpha^2/sigma^2)`` the log-SNR (cf. Kingma et al.
2021, VDM), so ``linear_sde_coefficients`` derives ``(f, g^2)`` from any process with
``jax.jvp`` -- ``DiscreteVP`` included -- and ``probability_flow_drift`` is the probability-flow ODE
(Song et al. 2021, eq. 13) of every process. The SDE classes give closed forms for the same.
The same identity makes ``importance_sample_times`` (the likelihood weighting's time density)
uniform in lambda.

Times: ``t_min`` is the ``eps`` field (1e-3 for VP/sub-VP, 1e-5 for VE, the ``sampling_eps`` of
score_sde's ``run_lib.py``), ``t_max`` the ``T`` field (1). Concrete times outside
``[t_min, t_max]`` raise ValueError at the public methods; traced times are not checked
(``processes.check_times``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from diffusion_jax import processes

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]  # score_fn(x [B, ...], t [B]) -> [B, ...]
_bcast = processes._bcast  # pylint: disable=protected-access


def _batch_times(t: jax.typing.ArrayLike, x: jax.Array) -> jax.Array:
  """Times as float32 ``[B]`` for ``x: [B, ...]`` (a scalar ``t`` is broadcast)."""
  return jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])


# --- what every process of the contract has ------------------------------------------------------


def linear_sde_coefficients(process, t: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """``(f(t), g(t)^2)`` of the linear SDE ``dx = f x dt + g dw`` whose marginal is ``process``'s.

  ``f = d log alpha/dt`` and ``g^2 = d sigma^2/dt - 2 f sigma^2 = 2 sigma^2 d log(sigma/alpha)/dt``
  (Song et al. 2021, App. B; cf. Kingma et al. 2021), both by forward-mode differentiation of
  the process's ``log_alpha`` and ``sigma``. For a ``DiscreteVP`` log alpha is piecewise linear, so
  these are the slopes of the segment ``t`` lies on.

  Args:
    process: any process of the contract.
    t: times, any shape.

  Returns:
    f, g2: arrays of the shape of ``t``.
  """
  t = jnp.asarray(t, jnp.float32)
  one = jnp.ones_like(t)
  _, dlog_alpha = jax.jvp(process.log_alpha, (t,), (one,))
  log_sigma_fn = getattr(process, 'log_sigma', None) or (lambda s: jnp.log(process.sigma(s)))
  log_sigma, dlog_sigma = jax.jvp(log_sigma_fn, (t,), (one,))
  g2 = 2.0 * jnp.exp(2.0 * log_sigma) * (dlog_sigma - dlog_alpha)
  return dlog_alpha, jnp.maximum(g2, 0.0)


def probability_flow_drift(process, score_fn: ScoreFn, x: jax.Array, t: jax.typing.ArrayLike
                           ) -> jax.Array:
  """``dx/dt`` of the probability-flow ODE (Song et al. 2021, eq. 13) of any process.

  ``dx/dt = f(t) x - g(t)^2 / 2 * score(x, t)``; for a ``DiscreteVP`` this is the ODE in
  ``(t, alpha, sigma)`` form, ``dlog alpha/dt x - sigma^2 dlog(sigma/alpha)/dt score``.

  Args:
    process: any process of the contract.
    score_fn: ``score_fn(x, t) -> grad_x log p_t(x)``, x: [B, ...], t: [B].
    x: [B, ...].
    t: [B] or a scalar.

  Returns:
    [B, ...], the drift.
  """
  t = _batch_times(t, x)
  f, g2 = linear_sde_coefficients(process, t)
  return _bcast(f, x) * x - 0.5 * _bcast(g2, x) * score_fn(x, t)


def discretize(process, x: jax.Array, t: jax.typing.ArrayLike, dt: jax.typing.ArrayLike
               ) -> tuple[jax.Array, jax.Array]:
  """One forward step ``x_{t+dt} = x + f + G z`` of any process, by its exact Gaussian transition.

  ``q(x_{t+dt} | x_t) = N(alpha_{t+dt|t} x_t, sigma_{t+dt|t}^2 I)``, so
  ``f = (alpha_{t+dt|t} - 1) x`` and ``G = sigma_{t+dt|t}``. For the VP SDE this is the DDPM
  discretization (``beta = 1 - alpha_{t+dt}^2/alpha_t^2``), for the VE SDE the SMLD one
  (``G^2 = sigma_{t+dt}^2 - sigma_t^2``): the two discretizations of score_sde's ``discretize``
  (Song et al. 2021, App. E), here on any grid rather than ``N`` fixed scales.

  Args:
    process: any process of the contract.
    x: [B, ...].
    t: [B] or scalar, the start of the step.
    dt: [B] or scalar, > 0.

  Returns:
    f [B, ...] and G [B].
  """
  t = _batch_times(t, x)
  dt = jnp.broadcast_to(jnp.asarray(dt, jnp.float32), t.shape)
  a_ts, var_ts = processes.transition(process, t + dt, t)
  return _bcast(a_ts - 1.0, x) * x, jnp.sqrt(var_ts)


# --- the SDEs ------------------------------------------------------------------------------------


class ReverseSDE(struct.PyTreeNode):
  """The reverse-time SDE or probability-flow ODE of a forward SDE (Song et al. 2021, eqs. 6, 13).

  ``dx = [f(x, t) - c g(t)^2 score(x, t)] dt + g_rev(t) dw_bar`` run from ``T`` down to ``t_min``
  (``dt < 0``), with ``c = 1, g_rev = g`` for the reverse SDE and ``c = 1/2, g_rev = 0`` for the
  ODE.
  Built by ``SDE.reverse``.

  Attributes:
    sde: the forward SDE.
    score_fn: ``score_fn(x, t) -> score``; static.
    probability_flow: whether this is the ODE; static.
  """

  sde: 'VPSDE | SubVPSDE | VESDE'
  score_fn: ScoreFn = struct.field(pytree_node=False)
  probability_flow: bool = struct.field(pytree_node=False, default=False)

  def drift_and_diffusion(self, x: jax.Array, t: jax.typing.ArrayLike
                          ) -> tuple[jax.Array, jax.Array]:
    """Reverse drift ``[B, ...]`` and diffusion ``[B]`` at ``x: [B, ...]``, ``t: [B]``."""
    processes.check_times(self.sde, t)
    t = _batch_times(t, x)
    f, g = self.sde.drift_and_diffusion(x, t)
    c = 0.5 if self.probability_flow else 1.0
    drift = f - c * _bcast(jnp.square(g), x) * self.score_fn(x, t)
    return drift, (jnp.zeros_like(g) if self.probability_flow else g)

  def discretize(self, x: jax.Array, t: jax.typing.ArrayLike, dt: jax.typing.ArrayLike
                 ) -> tuple[jax.Array, jax.Array]:
    """The reverse-diffusion step of Song et al. (2021), App. E: ``x_{t-dt} = x - f + G z``.

    ``(f, G)`` of the forward transition from ``t - dt`` to ``t`` give ``f_rev = f - G^2 score`` and
    ``G_rev = G`` (0 for the probability flow, with ``G^2 / 2``).
    """
    processes.check_times(self.sde, t)
    t = _batch_times(t, x)
    f, g = discretize(self.sde, x, t - dt, dt)
    c = 0.5 if self.probability_flow else 1.0
    rev_f = f - c * _bcast(jnp.square(g), x) * self.score_fn(x, t)
    return rev_f, (jnp.zeros_like(g) if self.probability_flow else g)


class _SDE(struct.PyTreeNode):
  """What the three SDEs share: everything but log alpha, log sigma, (f, g) and the prior."""

  @property
  def t_min(self) -> float:
    return float(self.eps)

  @property
  def t_max(self) -> float:
    return float(self.T)

  def alpha(self, t: jax.typing.ArrayLike) -> jax.Array:
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t: jax.typing.ArrayLike) -> jax.Array:
    return jnp.exp(self.log_sigma(t))

  def log_snr(self, t: jax.typing.ArrayLike) -> jax.Array:
    """lambda(t) = log(alpha^2 / sigma^2), decreasing in t."""
    return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

  def drift_and_diffusion(self, x: jax.Array, t: jax.typing.ArrayLike
                          ) -> tuple[jax.Array, jax.Array]:
    """The forward SDE's drift ``f(t) x: [B, ...]`` and diffusion ``g(t): [B]``.

    Args:
      x: [B, ...].
      t: [B] or a scalar.
    """
    processes.check_times(self, t)
    t = _batch_times(t, x)
    f, g2 = self._coefficients(t)
    return _bcast(f, x) * x, jnp.sqrt(g2)

  def discretize(self, x: jax.Array, t: jax.typing.ArrayLike, dt: jax.typing.ArrayLike
                 ) -> tuple[jax.Array, jax.Array]:
    """Forward step ``x_{t+dt} = x + f + G z`` by the exact transition (module ``discretize``)."""
    processes.check_times(self, t)
    return discretize(self, x, t, dt)

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
    """The reverse-time SDE (Song et al. 2021, eq. 6) or probability-flow ODE (eq. 13)."""
    return ReverseSDE(sde=self, score_fn=score_fn, probability_flow=probability_flow)

  def pf_ode_drift(self, score_fn: ScoreFn, x: jax.Array, t: jax.typing.ArrayLike) -> jax.Array:
    """``dx/dt = f(t) x - g(t)^2/2 score(x, t)`` of the probability-flow ODE (eq. 13)."""
    processes.check_times(self, t)
    t = _batch_times(t, x)
    f, g2 = self._coefficients(t)
    return _bcast(f, x) * x - 0.5 * _bcast(g2, x) * score_fn(x, t)

  def _check_times_public(self, t) -> jax.Array:
    processes.check_times(self, t)
    return jnp.asarray(t, jnp.float32)


class _VPFamily(_SDE):
  """Shared by VP and sub-VP: the linear beta(t) and its alpha(t)."""

  def beta(self, t: jax.typing.ArrayLike) -> jax.Array:
    """beta(t) = beta_min + t (beta_max - beta_min)."""
    return self.beta_min + jnp.asarray(t, jnp.float32) * (self.beta_max - self.beta_min)

  def log_alpha(self, t: jax.typing.ArrayLike) -> jax.Array:
    """log alpha(t) = -t^2 (beta_max - beta_min)/4 - t beta_min/2 (Song et al. 2021, App. B)."""
    t = self._check_times_public(t)
    return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def _t_from_log_alpha(self, log_alpha: jax.Array) -> jax.Array:
    """Inverts the quadratic ``log_alpha(t)``; written so that it is exact for small t."""
    # (bmax - bmin)/4 t^2 + bmin/2 t + log_alpha = 0, the positive root, rationalized.
    root = jnp.sqrt(0.25 * self.beta_min**2 - (self.beta_max - self.beta_min) * log_alpha)
    return -2.0 * log_alpha / (0.5 * self.beta_min + root)

  def prior_sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T ~ N(0, I); the true marginal at T = 1 has alpha(1) = exp(-5.025) ~ 7e-3 (defaults)."""
    return jax.random.normal(key, shape, jnp.float32)

  def prior_logp(self, z: jax.Array) -> jax.Array:
    """log N(z; 0, I) per example. z: [B, ...] -> [B]."""
    return processes._standard_normal_logp(z)  # pylint: disable=protected-access


class VPSDE(_VPFamily):
  """The variance-preserving SDE (Song et al. 2021, eq. 11): the continuous-time DDPM.

  ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw``, ``beta(t) = beta_min + t (beta_max - beta_min)``;
  ``q(x_t | x_0) = N(alpha(t) x_0, (1 - alpha(t)^2) I)``. With ``N`` steps of size ``1/N`` its DDPM
  discretization has ``beta_i ~ beta(i/N)/N``: the defaults are the linear schedule of Ho et al.
  (2020) for N = 1000.

  Attributes:
    beta_min, beta_max: beta(0), beta(1).
    eps: t_min, the smallest time sampled or integrated to (score_sde's ``sampling_eps``).
    T: t_max.
  """

  beta_min: float = struct.field(pytree_node=False, default=0.1)
  beta_max: float = struct.field(pytree_node=False, default=20.0)
  eps: float = struct.field(pytree_node=False, default=1e-3)
  T: float = struct.field(pytree_node=False, default=1.0)

  @property
  def is_variance_preserving(self) -> bool:
    return True

  def log_sigma(self, t: jax.typing.ArrayLike) -> jax.Array:
    # sigma^2 = 1 - alpha^2 through expm1: exact near t = 0.
    return 0.5 * jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

  def t_from_log_snr(self, log_snr: jax.typing.ArrayLike) -> jax.Array:
    """Inverse of ``log_snr``: alpha^2 = sigmoid(lambda), then the quadratic in t."""
    log_alpha = 0.5 * jax.nn.log_sigmoid(jnp.asarray(log_snr, jnp.float32))
    return self._t_from_log_alpha(log_alpha)

  def _coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    beta = self.beta(t)
    return -0.5 * beta, beta


class SubVPSDE(_VPFamily):
  """The sub-VP SDE (Song et al. 2021, eq. 17), which gives better likelihoods.

  ``dx = -beta(t)/2 x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw``; the mean is the VP one and
  ``sigma(t) = 1 - alpha(t)^2`` (App. B), below the VP ``sqrt(1 - alpha^2)``, so the process is not
  variance preserving.

  Attributes:
    beta_min, beta_max: beta(0), beta(1).
    eps: t_min; T: t_max.
  """

  beta_min: float = struct.field(pytree_node=False, default=0.1)
  beta_max: float = struct.field(pytree_node=False, default=20.0)
  eps: float = struct.field(pytree_node=False, default=1e-3)
  T: float = struct.field(pytree_node=False, default=1.0)

  @property
  def is_variance_preserving(self) -> bool:
    return False

  def log_sigma(self, t: jax.typing.ArrayLike) -> jax.Array:
    return jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

  def t_from_log_snr(self, log_snr: jax.typing.ArrayLike) -> jax.Array:
    """Inverse of ``log_snr = log u - 2 log(1 - u)``, ``u = alpha^2``, in closed form.

    ``u / (1 - u)^2 = r = e^lambda`` has the root ``u = 2r / (2r + 1 + sqrt(4r + 1))`` in (0, 1);
    for lambda > 0 it is evaluated through ``s = e^-lambda`` to avoid overflow.
    """
    lam = jnp.asarray(log_snr, jnp.float32)
    r = jnp.exp(jnp.minimum(lam, 0.0))
    log_u_neg = lam + jnp.log(2.0) - jnp.log(2.0 * r + 1.0 + jnp.sqrt(4.0 * r + 1.0))
    s = jnp.exp(-jnp.maximum(lam, 0.0))
    log_u_pos = -jnp.log1p(0.5 * (s + jnp.sqrt(s * (4.0 + s))))
    log_u = jnp.where(lam > 0, log_u_pos, log_u_neg)
    return self._t_from_log_alpha(0.5 * log_u)

  def _coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    beta = self.beta(t)
    # g^2 = beta (1 - alpha^4), with 1 - alpha^4 = -expm1(4 log alpha).
    return -0.5 * beta, beta * -jnp.expm1(4.0 * self.log_alpha(t))


class VESDE(_SDE):
  """The variance-exploding SDE (Song et al. 2021, eq. 9): the continuous-time SMLD / NCSN.

  ``dx = sigma(t) sqrt(2 log(sigma_max/sigma_min)) dw`` with ``sigma(t) = sigma_min
  (sigma_max/sigma_min)^t``; ``alpha = 1``. The prior is N(0, sigma_max^2 I), which ignores the data
  mean and spread (negligible for data in [-1, 1] and sigma_max = 50).

  Attributes:
    sigma_min, sigma_max: sigma(0), sigma(1).
    eps: t_min (1e-5, score_sde's sampling_eps for VE); T: t_max.
  """

  sigma_min: float = struct.field(pytree_node=False, default=0.01)
  sigma_max: float = struct.field(pytree_node=False, default=50.0)
  eps: float = struct.field(pytree_node=False, default=1e-5)
  T: float = struct.field(pytree_node=False, default=1.0)

  @property
  def is_variance_preserving(self) -> bool:
    return False

  @property
  def _log_ratio(self) -> float:
    return math.log(self.sigma_max / self.sigma_min)

  def log_alpha(self, t: jax.typing.ArrayLike) -> jax.Array:
    return jnp.zeros_like(self._check_times_public(t))

  def log_sigma(self, t: jax.typing.ArrayLike) -> jax.Array:
    return math.log(self.sigma_min) + self._check_times_public(t) * self._log_ratio

  def t_from_log_snr(self, log_snr: jax.typing.ArrayLike) -> jax.Array:
    """Inverse of ``log_snr = -2 log sigma(t)``."""
    log_sigma = -0.5 * jnp.asarray(log_snr, jnp.float32)
    return (log_sigma - math.log(self.sigma_min)) / self._log_ratio

  def _coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    g2 = 2.0 * self._log_ratio * jnp.exp(2.0 * self.log_sigma(t))
    return jnp.zeros_like(t), g2

  def prior_sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T ~ N(0, sigma_max^2 I)."""
    return self.sigma_max * jax.random.normal(key, shape, jnp.float32)

  def prior_logp(self, z: jax.Array) -> jax.Array:
    """log N(z; 0, sigma_max^2 I) per example. z: [B, ...] -> [B]."""
    return processes._standard_normal_logp(z, self.sigma_max)  # pylint: disable=protected-access


# --- likelihood weighting ------------------------------------------------------------------------


def importance_sample_times(process, key: jax.Array, shape: tuple[int, ...]
                            ) -> tuple[jax.Array, jax.Array]:
  """Times for the likelihood-weighted loss, drawn with density proportional to g(t)^2 / sigma(t)^2.

  The likelihood weighting of Song et al. (2021b, "Maximum Likelihood Training of Score-Based
  Diffusion Models", Thm. 1 and Sec. 5) puts ``g(t)^2`` on the score error, i.e.
  ``g^2/sigma^2`` on the eps error. Since ``g^2 = -sigma^2 d lambda/dt`` (module docstring), that
  weight is ``-d lambda/dt``: drawing t with density proportional to it is drawing the log-SNR
  lambda uniformly on ``[lambda(t_max), lambda(t_min)]``, exactly, for every process (for the VP
  SDE this is the closed-form sampler of that paper's code; for VE it is uniform t).

  Args:
    process: a process with ``log_snr`` and ``t_from_log_snr``.
    key: PRNG key.
    shape: the shape of the times, e.g. ``(B,)``.

  Returns:
    t: float32 ``shape``, in ``[t_min, t_max]``.
    weight: float32 ``shape``, ``Z / (t_max - t_min)`` with ``Z = lambda(t_min) - lambda(t_max)``,
      so that ``mean(weight * ||eps_hat - eps||^2)`` estimates without bias the same objective as
      uniform ``t`` with weight ``g^2/sigma^2`` (score_sde's ``likelihood_weighting=True``).
  """
  lam_hi = process.log_snr(jnp.float32(process.t_min))
  lam_lo = process.log_snr(jnp.float32(process.t_max))
  u = jax.random.uniform(key, shape, jnp.float32)
  t = process.t_from_log_snr(lam_hi - u * (lam_hi - lam_lo))
  t = jnp.clip(t, process.t_min, process.t_max)
  weight = jnp.full(shape, (lam_hi - lam_lo) / (process.t_max - process.t_min), jnp.float32)
  return t, weight
