"""Predictor-corrector sampling of score SDEs (Song et al. 2021, Sec. 4.2, Algorithms 1-3).

Each step moves from ``t_i`` to ``t_{i+1}`` on the uniform grid ``t_max = t_0 > ... > t_N = t_min``:
first ``n_corrector_steps`` of Langevin MCMC at ``t_i`` (the corrector), then one step of a
numerical solver of the reverse-time SDE (the predictor). Predictors:

- ``'reverse_diffusion'``: the reverse of the forward process's own Gaussian transition,
  ``x <- x - f + G^2 score + G z`` with ``(f, G)`` of ``q(x_{t_i} | x_{t_{i+1}})``
  (Song et al. 2021, App. E). With the exact transition (``sde.discretize``) this is the DDPM-style
  step for VP processes and the SMLD one for VE, and it works for every process, ``DiscreteVP``
  included.
- ``'euler_maruyama'``: Euler-Maruyama on the reverse SDE (eq. 6); needs ``drift_and_diffusion``.
- ``'ancestral'``: a draw from ``q(x_{t_{i+1}} | x_{t_i}, x0_hat)`` with ``x0_hat`` by Tweedie's
  formula (Ho et al. 2020, eqs. 6-7; Song et al. 2021, App. F); for VP processes the DDPM sampler
  with its "fixedsmall" variance (score_sde uses beta, the "fixedlarge" one), for VE the SMLD
  ancestral step of App. F. Works for every process.
- ``'none'``: corrector-only sampling (annealed Langevin dynamics when ``corrector='ald'``).

Correctors: ``'langevin'``, Langevin MCMC with the step size set by the target signal-to-noise
ratio ``snr`` (Song et al. 2021, App. G, Algorithms 4 (VE) and 5 (VP)), and ``'ald'``, the annealed
Langevin dynamics of NCSN (Song & Ermon 2019) with step ``2 alpha_i (snr sigma(t_i))^2``;
``'none'``.
``snr = 0.16`` is score_sde's CIFAR-10 default (``configs/default_cifar10_configs.py``) for VP and
VE alike; ``alpha_i`` is the one-step ``alpha_{t_i|t_{i+1}}^2`` (``1 - beta_i`` for VP, 1 for VE).

As in score_sde, the Langevin step size uses the batch means of the norms of the score and of the
noise (under ``jit`` over a batch-sharded input, a mean over all devices): per-example norms give
huge steps in low dimension wherever the score nearly vanishes. So a sample depends on the rest of
its batch through this one scalar.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax import processes
from diffusion_jax import sde as sde_lib
from diffusion_jax.sampling import core
from diffusion_jax.sampling import grids

PREDICTORS = ('reverse_diffusion', 'euler_maruyama', 'ancestral', 'none')
CORRECTORS = ('langevin', 'ald', 'none')
_bcast = processes._bcast  # pylint: disable=protected-access


def _norm(a: jax.Array) -> jax.Array:
  """Per-example Euclidean norm of ``a: [B, ...]`` -> ``[B]``."""
  return jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=-1))


def pc(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
       key: jax.Array, prediction: processes.Prediction = 'eps', t_start: float | None = None,
       times=None, step_hook: core.StepHook | None = None,
       predictor: str = 'reverse_diffusion', corrector: str = 'langevin', snr: float = 0.16,
       n_corrector_steps: int = 1, denoise: bool = True, return_trajectory: bool = False,
       callback: Callable[[int, int], Any] | None = None, clip_x0: bool = False,
       dynamic_threshold: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Predictor-corrector sampler (Song et al. 2021, Algorithms 2 and 3), one ``lax.scan``.

  Args:
    model_fn: ``model_fn(x, t) -> prediction``, x: [B, ...], t: [B]; already guided.
    process: an SDE of ``sde.py`` or a ``DiscreteVP`` (not with ``'euler_maruyama'``).
    x_T: [B, ...] start noise at the prior's scale (the state at ``t_start`` or ``times[0]``
      when given).
    num_steps: N, predictor steps from ``t_max`` to ``t_min`` (on a uniform grid of N + 1 times).
    key: PRNG key; step i draws its noise from ``fold_in(key, i)``.
    prediction: what model_fn returns: 'eps', 'x0', 'v' or 'score'.
    t_start: the time of x_T: the uniform grid runs from ``t_start`` to ``t_min``.
    times: instead, the grid itself: ``[N + 1]`` strictly decreasing times in
      ``[t_min, t_max]``; predictor step i runs from ``times[i]`` to ``times[i + 1]`` and the
      denoising step evaluates at ``times[-1]`` (``core.check_times``).
    step_hook: ``step_hook(x, i, t, alpha, sigma) -> x`` after each predictor step (i in
      0..N-1, t = the time reached) and, with ``denoise``, once more after the denoising step
      (i = N, t = 0, alpha = 1, sigma = 0); ``core.apply_hook``.
    predictor: one of ``PREDICTORS`` (module docstring).
    corrector: one of ``CORRECTORS``.
    snr: the corrector's target signal-to-noise ratio (0.16: score_sde's CIFAR-10 configs).
    n_corrector_steps: corrector steps per predictor step (score_sde's ``n_steps_each``).
    denoise: at ``t_min``, return ``E[x0 | x_{t_min}]`` by Tweedie's formula (one more model
      evaluation) rather than the last noisy state; score_sde's ``noise_removal``.
    return_trajectory: also return ``info['trajectory']``, ``[N + 1, B, ...]``: ``x_T`` and the
      state after each step; with ``denoise`` the last entry is the returned x0, as for the
      other samplers.
    callback: ``callback(step, num_steps)`` after each step (``core.scan_steps``).
    clip_x0, dynamic_threshold: clip or threshold the model's x0 before it is turned into the
      score (``core.make_denoiser``); off by default, as in score_sde.

  Returns:
    x0 [B, ...] and info: ``nfe`` (int32 model evaluations) and, when asked, ``trajectory``.
  """
  if predictor not in PREDICTORS:
    raise ValueError(f'predictor={predictor!r} is not known; use one of {PREDICTORS}.')
  if corrector not in CORRECTORS:
    raise ValueError(f'corrector={corrector!r} is not known; use one of {CORRECTORS}.')
  if predictor == 'euler_maruyama' and not hasattr(process, 'drift_and_diffusion'):
    raise ValueError(
        f"predictor='euler_maruyama' needs an SDE with drift_and_diffusion (VPSDE, SubVPSDE, "
        f"VESDE); {type(process).__name__} has none. Use predictor='reverse_diffusion', "
        f"'ancestral' or 'none'.")
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f'num_steps must be a positive int; got {num_steps!r}.')
  if isinstance(n_corrector_steps, bool) or not isinstance(n_corrector_steps, int) or (
      n_corrector_steps < 0):
    raise ValueError(f'n_corrector_steps must be a non-negative int; got {n_corrector_steps!r}.')
  if corrector != 'none' and not snr > 0:
    raise ValueError(f'snr must be positive; got {snr}.')
  if key is None:
    raise ValueError('pc is a stochastic sampler: pass key=jax.random.key(...).')
  denoiser = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                                dynamic_threshold=dynamic_threshold)
  score_fn = score_fn_from_denoiser(denoiser, process)
  x_T = jnp.asarray(x_T, jnp.float32)
  batch = x_T.shape[0]
  n_corr = n_corrector_steps if corrector != 'none' else 0
  t_start = grids.check_t_start(process, t_start)
  if times is None:
    t_hi = process.t_max if t_start is None else t_start
    times = jnp.linspace(t_hi, process.t_min, num_steps + 1, dtype=jnp.float32)
  elif t_start is not None:
    raise ValueError('pc: times and t_start were both given; explicit times start at times[0], '
                     'the time of x_T: drop t_start.')
  else:
    times = core.check_times(process, times, num_steps=num_steps, num_points=num_steps + 1,
                             method='pc', per_step='N + 1 times bound its N predictor steps')

  def corrector_step(x, t, alpha_i, k):
    score = score_fn(x, t)
    z = jax.random.normal(k, x.shape, jnp.float32)
    if corrector == 'langevin':
      # Algorithms 4-5 of Song et al. (2021): eps = 2 alpha (r ||z|| / ||score||)^2, with the norms
      # averaged over the batch as in score_sde: per example, a score near 0 (x at a mode) in low
      # dimension gives a huge step.
      ratio = jnp.mean(_norm(z)) / jnp.maximum(jnp.mean(_norm(score)), 1e-30)
      step = 2.0 * alpha_i * jnp.square(snr * ratio)
    else:  # ald: NCSN's annealed Langevin step, 2 alpha (r sigma)^2
      step = 2.0 * alpha_i * jnp.square(snr * process.sigma(t))
    return x + _bcast(step, x) * score + _bcast(jnp.sqrt(2.0 * step), x) * z

  def predictor_step(x, t, s, k):
    """One step of the predictor from t to s < t; t, s: [B]."""
    if predictor == 'none':
      return x
    z = jax.random.normal(k, x.shape, jnp.float32)
    if predictor == 'reverse_diffusion':
      f, g = sde_lib.discretize(process, x, s, t - s)  # the forward transition s -> t
      x_mean = x - f + _bcast(jnp.square(g), x) * score_fn(x, t)
      return x_mean + _bcast(g, x) * z
    if predictor == 'euler_maruyama':
      dt = t - s
      f, g = process.drift_and_diffusion(x, t)
      x_mean = x - _bcast(dt, x) * (f - _bcast(jnp.square(g), x) * score_fn(x, t))
      return x_mean + _bcast(g * jnp.sqrt(dt), x) * z
    # ancestral: sample q(x_s | x_t, x0_hat).
    x0, _ = denoiser(x, t)
    mean, var = processes.posterior(process, x, x0, t, s)
    return mean + _bcast(jnp.sqrt(var), x) * z

  def step(x, xs):
    i = xs['i']
    t = jnp.full((batch,), times[i])
    s = jnp.full((batch,), times[i + 1])
    k_pred, k_corr = jax.random.split(jax.random.fold_in(key, i))
    if n_corr:
      alpha_i = jnp.exp(2.0 * (process.log_alpha(t) - process.log_alpha(s)))
      for j in range(n_corr):
        x = corrector_step(x, t, alpha_i, jax.random.fold_in(k_corr, j))
    x = predictor_step(x, t, s, k_pred)
    if step_hook is not None:
      t_s = times[i + 1]
      x = core.apply_hook(step_hook, x, i, t_s, process.alpha(t_s), process.sigma(t_s))
    return x, x

  x, info = core.scan_steps(step, x_T, {'i': jnp.arange(num_steps)}, x_T=x_T,
                            num_steps=num_steps, return_trajectory=return_trajectory,
                            callback=callback)
  nfe = num_steps * (n_corr + (predictor != 'none'))
  if denoise:
    x, _ = denoiser(x, jnp.full((batch,), times[-1], jnp.float32))
    x = core.apply_hook(step_hook, x, num_steps, 0.0, 1.0, 0.0)
    nfe += 1
    if return_trajectory:
      info['trajectory'] = info['trajectory'].at[-1].set(x)
  info['nfe'] = jnp.asarray(nfe, jnp.int32)
  return x, info


def score_fn_from_denoiser(denoiser: core.Denoiser, process) -> sde_lib.ScoreFn:
  """``score(x, t) = -eps_hat / sigma(t)`` from a ``denoise(x, t) -> (x0, eps)``."""

  def score_fn(x, t):
    _, eps = denoiser(x, t)
    return -eps / _bcast(process.sigma(t), x)

  return score_fn
