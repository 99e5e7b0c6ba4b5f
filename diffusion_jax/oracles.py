"""An exact oracle for diffusion models: Gaussian-mixture data.

If ``x_0`` follows a mixture of Gaussians, ``x_t = alpha x_0 + sigma eps`` follows the mixture with
means ``alpha mu_k`` and covariances ``alpha^2 C_k + sigma^2 I``, so its log-density, its score and the
optimal eps-prediction ``E[eps | x_t] = -sigma * score`` are closed form. The tests and benchmarks
use it as the perfect denoiser, to tell a sampler's discretization error from a network's error.

The probability-flow ODE does not depend on the process in the scaled variables ``y = x / alpha``
and ``rho = sigma / alpha``: ``y = x_0 + rho eps``, and the ODE of DDIM (Song et al. 2021a, eq. 14)
is ``dy/drho = E[eps | y]``. ``pf_ode_map`` integrates it with SciPy in float64 from any
``(alpha_T, sigma_T)`` down to ``rho = 0``: the exact map every deterministic sampler approximates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate


class GaussianMixture(NamedTuple):
  """A mixture of K full-covariance Gaussians in D dimensions.

  Attributes:
    weights: [K], summing to 1.
    means: [K, D].
    covs: [K, D, D], symmetric positive definite.
  """

  weights: np.ndarray
  means: np.ndarray
  covs: np.ndarray

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def mean(self) -> np.ndarray:
    return np.einsum('k,kd->d', self.weights, self.means)

  def cov(self) -> np.ndarray:
    """The mixture's covariance: E[C_k + mu_k mu_k^T] - m m^T."""
    m = self.mean()
    second = np.einsum('k,kde->de', self.weights, self.covs + np.einsum('kd,ke->kde', self.means,
                                                                        self.means))
    return second - np.outer(m, m)

  def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """n samples ``[n, D]`` and their component labels ``[n]``."""
    k_comp, k_noise = jax.random.split(key)
    labels = jax.random.choice(k_comp, len(self.weights), (n,), p=jnp.asarray(self.weights))
    chol = jnp.linalg.cholesky(jnp.asarray(self.covs, jnp.float32))
    z = jax.random.normal(k_noise, (n, self.dim))
    x = jnp.asarray(self.means, jnp.float32)[labels] + jnp.einsum('nde,ne->nd', chol[labels], z)
    return x, labels

  # --- closed forms under noise (JAX, jittable) -----------------------------------------------

  def _eigh(self):
    """The covariances' eigendecomposition ``C_k = U_k diag(lam_k) U_k^T``: lam [K, D], U [K, D, D]
    (float32; computed in float64 NumPy when the covariances are concrete)."""
    if isinstance(self.covs, jax.core.Tracer):  # a mixture passed through jit as a pytree
      lam, u = jnp.linalg.eigh(self.covs)
    else:
      lam, u = np.linalg.eigh(np.asarray(self.covs, np.float64))
    return jnp.asarray(lam, jnp.float32), jnp.asarray(u, jnp.float32)

  def _component_terms(self, x, alpha, sigma):
    """Per-component log-density [B, K] and score [B, K, D] of x: [B, D] at (alpha, sigma): [B].

    In each component's eigenbasis ``alpha^2 C_k + sigma^2 I`` is ``diag(alpha^2 lam_k + sigma^2)``,
    so its inverse and log-determinant are elementwise: no matrix inverse in the traced function
    (jnp.linalg's batched LAPACK calls inside Heun's compiled loop hung XLA's CPU runtime at
    B = 500, D = 8; see tests/test_sampling.py).
    """
    lam, u = self._eigh()
    var = (jnp.square(alpha)[:, None, None] * lam
           + jnp.square(sigma)[:, None, None])  # [B, K, D]
    diff = x[:, None, :] - alpha[:, None, None] * jnp.asarray(self.means, jnp.float32)
    z = jnp.einsum('kde,bkd->bke', u, diff) / var  # U_k^T diff, scaled: the solve in the eigenbasis
    sol = jnp.einsum('kde,bke->bkd', u, z)  # (alpha^2 C_k + sigma^2 I)^-1 diff
    logp = (jnp.log(jnp.asarray(self.weights, jnp.float32))
            - 0.5 * (self.dim * jnp.log(2 * jnp.pi) + jnp.sum(jnp.log(var), -1)
                     + jnp.sum(diff * sol, -1)))
    return logp, -sol

  def log_prob(self, x: jax.Array, alpha=1.0, sigma=0.0) -> jax.Array:
    """log p_t(x) of x: [B, D] at alpha, sigma ([B] or scalars) -> [B]."""
    b = x.shape[0]
    logp, _ = self._component_terms(x, jnp.broadcast_to(alpha, (b,)), jnp.broadcast_to(sigma, (b,)))
    return jax.nn.logsumexp(logp, axis=-1)

  def _posterior_terms(self, x, alpha, sigma):
    """p(component | x_t = x) [B, K] and the per-component scores [B, K, D] of x: [B, D] at
    alpha, sigma ([B] or scalars)."""
    b = x.shape[0]
    logp, scores = self._component_terms(x, jnp.broadcast_to(alpha, (b,)),
                                         jnp.broadcast_to(sigma, (b,)))
    return jax.nn.softmax(logp, axis=-1), scores

  def _mean_from_terms(self, resp, scores, alpha):
    """E[x_0 | x_t] from ``_posterior_terms``: per component ``mu_k - alpha C_k score_k``."""
    alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), resp.shape[:1])
    x0_k = (jnp.asarray(self.means, jnp.float32)
            - alpha[:, None, None] * jnp.einsum('kde,bke->bkd',
                                                jnp.asarray(self.covs, jnp.float32), scores))
    return jnp.einsum('bk,bkd->bd', resp, x0_k)

  def score(self, x: jax.Array, alpha, sigma) -> jax.Array:
    """grad_x log p_t(x) of x: [B, D] -> [B, D]."""
    resp, scores = self._posterior_terms(x, alpha, sigma)
    return jnp.einsum('bk,bkd->bd', resp, scores)

  def posterior_mean(self, x: jax.Array, alpha, sigma) -> jax.Array:
    """E[x_0 | x_t = x] of x: [B, D] at alpha, sigma ([B] or scalars) -> [B, D].

    Per component ``mu_k + alpha C_k (alpha^2 C_k + sigma^2 I)^-1 (x - alpha mu_k)`` weighted by
    the responsibilities: no division by alpha, so it holds where alpha is ~0 (zero terminal SNR),
    where ``(x - sigma eps) / alpha`` loses x_0 to cancellation.
    """
    resp, scores = self._posterior_terms(x, alpha, sigma)
    return self._mean_from_terms(resp, scores, alpha)

  def responsibilities(self, x: jax.Array) -> jax.Array:
    """p(component | x) for clean data x: [B, D] -> [B, K]."""
    b = x.shape[0]
    logp, _ = self._component_terms(x, jnp.ones((b,)), jnp.zeros((b,)))
    return jax.nn.softmax(logp, axis=-1)

  def model_fn(self, process, *, prediction: str = 'eps'):
    """The exact ``model_fn(x, t, cond=None) -> prediction`` for ``process`` (DESIGN.md contract;
    the mixture is unconditional: ``cond`` is ignored). 'eps' and 'score' come from the score;
    'x0', 'v' and 'flow' from ``posterior_mean`` and eps, without dividing by alpha."""
    from diffusion_jax import processes  # pylint: disable=import-outside-toplevel
    if prediction not in processes.PREDICTIONS:
      raise ValueError(f'prediction={prediction!r} is not a prediction type; use one of '
                       f'{processes.PREDICTIONS}.')

    def fn(x, t, cond=None):
      del cond
      t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
      alpha, sigma = process.alpha(t), process.sigma(t)
      resp, scores = self._posterior_terms(x, alpha, sigma)  # the terms eps and x0 share
      score = jnp.einsum('bk,bkd->bd', resp, scores)
      if prediction in ('eps', 'score'):
        return processes.convert_prediction(score, x, alpha, sigma, source='score',
                                            target=prediction)
      x0 = self._mean_from_terms(resp, scores, alpha)
      eps = -sigma[:, None] * score
      if prediction == 'x0':
        return x0
      if prediction == 'flow':
        return eps - x0
      return alpha[:, None] * eps - sigma[:, None] * x0  # v

    return fn

  # --- the exact probability-flow map (NumPy/SciPy, float64) ---------------------------------

  def eps_y_np(self, y: np.ndarray, rho: float) -> np.ndarray:
    """E[eps | y] for y = x_0 + rho eps, y: [B, D], float64."""
    covs = self.covs + rho**2 * np.eye(self.dim)
    prec = np.linalg.inv(covs)
    diff = y[:, None, :] - self.means[None]
    sol = np.einsum('kde,bke->bkd', prec, diff)
    _, logdet = np.linalg.slogdet(covs)
    logp = np.log(self.weights) - 0.5 * (logdet + np.sum(diff * sol, -1))
    logp -= logp.max(axis=1, keepdims=True)
    resp = np.exp(logp)
    resp /= resp.sum(axis=1, keepdims=True)
    score = -np.einsum('bk,bkd->bd', resp, sol)
    return -rho * score

  def pf_ode_map(self, x_T: np.ndarray, alpha_T: float, sigma_T: float, *,
                 alpha_end: float = 1.0, sigma_end: float = 0.0,
                 rtol: float = 1e-10, atol: float = 1e-10) -> np.ndarray:
    """The exact probability-flow ODE solution from x_T at (alpha_T, sigma_T) to (alpha_end, sigma_end).

    Integrates ``dy/drho = E[eps | y]`` with ``y = x / alpha``, ``rho = sigma / alpha`` by SciPy's
    DOP853 in float64. x_T: [B, D]; returns [B, D] float64.
    """
    x_T = np.asarray(x_T, np.float64)
    shape = x_T.shape
    rho_T, rho_end = sigma_T / alpha_T, sigma_end / alpha_end

    def rhs(rho, flat):
      return self.eps_y_np(flat.reshape(shape), rho).ravel()

    sol = integrate.solve_ivp(rhs, (rho_T, rho_end), (x_T / alpha_T).ravel(), method='DOP853',
                              rtol=rtol, atol=atol)
    if not sol.success:
      raise RuntimeError(f'solve_ivp failed: {sol.message}')
    return alpha_end * sol.y[:, -1].reshape(shape)


def example_mixture(dim: int = 2, *, scale: float = 1.0) -> GaussianMixture:
  """A fixed 3-component mixture with unequal weights and anisotropic covariances.

  ``scale`` stretches the means, so tests can put data outside [-1, 1].
  """
  if dim != 2:
    raise ValueError('example_mixture is defined for dim=2.')
  means = scale * np.array([[-1.0, -0.5], [1.0, 0.8], [0.2, 1.5]])
  covs = np.array([[[0.05, 0.02], [0.02, 0.08]],
                   [[0.10, -0.03], [-0.03, 0.04]],
                   [[0.03, 0.0], [0.0, 0.03]]])
  return GaussianMixture(weights=np.array([0.5, 0.3, 0.2]), means=means, covs=covs)
