"""Euler and Heun samplers of Karras et al. (2022), Algorithms 1-2, with optional churn.

Written in the scaled variables of the probability-flow ODE, ``y = x / alpha`` and the noise level
``rho = sigma / alpha`` (Karras et al.'s sigma(t) with s(t) = alpha), where the ODE reads
``dy/drho = (y - x0_hat) / rho`` for every process. Churn (Algorithm 2, lines 4-6) first raises the
noise level to ``rho_hat = rho (1 + gamma)`` by adding fresh noise, ``gamma = min(S_churn / n,
sqrt(2) - 1)`` for ``rho`` in ``[S_tmin, S_tmax]``.
"""

# Karras et al.'s names S_churn, S_tmin, S_tmax, S_noise, as in k-diffusion.
# pylint: disable=invalid-name

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sampling import core


def corrected_steps(rho):
  """[n] whether ``heun``'s step i takes its corrector, from ``rho`` [n + 1] = sigma / alpha of
  the schedule (``Schedule.rho``, ending at 0): the first step and steps that shrink the noise
  level by more than ``core.MAX_CORRECTED_RATIO`` are Euler's (DDIM's), with one evaluation; the
  last (to the data) never takes it. NumPy or JAX arrays.

  The first step: on trained models its corrector, which averages eps at x_T with eps at the
  Euler predictor, left the samples 1.9-3.5x further from the model's own probability-flow map
  than an Euler first step, up to 2.5x DDIM's error at the same NFE (two digits U-Nets, cosine
  grid from t_max, 14-30 steps: ``docs/benchmarks.md``), while from pure noise an Euler first
  step is nearly exact and one Euler step's local error keeps the method second order."""
  short = core.short_steps(rho)
  return short & (np.arange(short.shape[0]) > 0)


def heun_nfe(sched: core.Schedule) -> int:
  """The model evaluations ``heun`` spends on a concrete schedule (no ``S_churn``): one per step
  and one more per corrected step."""
  return sched.num_steps + int(np.sum(np.asarray(corrected_steps(np.asarray(sched.rho)))[:-1]))


def _karras(model_fn, process, x_T, *, num_steps, key, prediction, second_order, grid, spacing,
            times, levels, t_start, step_hook, S_churn, S_tmin, S_tmax, S_noise, clip_x0,
            dynamic_threshold, return_trajectory, callback, method):
  n = num_steps
  if not S_churn >= 0:  # NaN too
    raise ValueError(f'{method}: S_churn must be >= 0, got {S_churn}.')
  if not isinstance(S_noise, jax.core.Tracer) and not math.isfinite(float(S_noise)):
    raise ValueError(f'{method}: S_noise must be a finite number (Karras et al. use 1.0-1.007), '
                     f'got {S_noise}.')
  churn = S_churn > 0
  if churn and key is None:
    raise ValueError(f'{method} with S_churn > 0 is stochastic and needs a PRNG `key`.')
  sched = core.make_schedule(process, n, grid=grid, spacing=spacing, times=times, t_start=t_start,
                             method=method, levels=levels)
  n = sched.num_steps  # repeated grid times dropped (core.make_schedule)
  if levels is not None and churn:
    raise ValueError(f'{method}: S_churn > 0 raises the noise level to times of the process, '
                     'which explicit levels do not have; use S_churn=0 with levels.')
  if levels is not None and second_order and not sched.to_data:
    raise ValueError(f'{method}: explicit levels must end at the data (levels.sigma[-1] = 0): '
                     "heun's final step extrapolates to it.")
  denoise = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)
  rho = sched.rho
  rho_max = rho[0]
  gamma = jnp.where((rho[:-1] >= S_tmin) & (rho[:-1] <= S_tmax),
                    min(S_churn / n, math.sqrt(2.0) - 1.0), 0.0)
  xs = {'i': jnp.arange(n), 't': sched.t, 't_next': sched.next_t(), 'rho': rho[:-1],
        'rho_next': rho[1:], 'alpha': sched.alpha[:-1], 'sigma': sched.sigma[:-1],
        'alpha_next': sched.alpha[1:], 'sigma_next': sched.sigma[1:], 'gamma': gamma,
        'last': sched.is_last()}
  # Heun's corrector only on steps that shrink the noise level by at most
  # core.MAX_CORRECTED_RATIO; longer steps are Euler's (DDIM's), with one evaluation (``heun``).
  with jax.ensure_compile_time_eval():
    xs['correct'] = corrected_steps(rho)
    corrected = jnp.sum(xs['correct'][:-1])
  nfe = n + (corrected if isinstance(corrected, jax.core.Tracer) else int(corrected))
  if step_hook is not None:
    xs['t_reached'] = sched.reached_t()
  # Data predictions at the trajectory's grid points, for the final step (core module docstring).
  carry = (x_T / sched.alpha[0], jnp.zeros((2,) + x_T.shape, jnp.float32),
           jnp.ones((2,), jnp.float32))

  def step(c, s):
    y, m, rho_hist = c
    rho_hat, t_hat = s['rho'], s['t']
    if churn:
      rho_hat = jnp.minimum(s['rho'] * (1.0 + s['gamma']), rho_max)
      y = y + (jnp.sqrt(jnp.maximum(rho_hat**2 - s['rho']**2, 0.0)) * S_noise
               * core.noise(key, s['i'], y))
      t_hat = jnp.where(s['gamma'] > 0, process.t_from_log_snr(-2.0 * jnp.log(rho_hat)), s['t'])
    if churn:
      a_hat = process.alpha(t_hat)
      x0, eps = denoise(a_hat * y, t_hat, a_hat, process.sigma(t_hat))
    else:
      x0, eps = denoise(s['alpha'] * y, t_hat, s['alpha'], s['sigma'])
    m = core.push(m, x0)
    rho_hist = core.push(rho_hist, rho_hat)
    # Euler's step y + (rho_next - rho_hat) d, d = (y - x0) / rho_hat, written as DDIM's
    # x0 + rho_next eps: equal in exact arithmetic, but y = x / alpha is huge where alpha is ~0
    # (a zero terminal SNR schedule) and y - x0 there loses x0 to float32 cancellation. At the
    # last step (rho_next = 0) this is x0_hat.
    y_next = x0 + s['rho_next'] * eps
    if second_order:
      def correct(_):
        x0_2, _ = denoise(s['alpha_next'] * y_next, s['t_next'], s['alpha_next'],
                          s['sigma_next'])
        d2 = (y_next - x0_2) / s['rho_next']
        return y + (s['rho_next'] - rho_hat) * 0.5 * ((y - x0) / rho_hat + d2)

      def euler_step(_):
        return y_next

      def final(_):
        # Deterministic: extrapolate the last two data predictions (second order); with churn
        # the last step is Euler's, as Algorithm 2.
        k = jnp.minimum(s['i'] + 1, 1 if churn else 2)
        return core.extrapolate_to_data(m, rho_hist, k, y=y)

      y_next = jax.lax.switch(jnp.where(s['last'], 2, s['correct'].astype(jnp.int32)),
                              (euler_step, correct, final), None)
    x_next = y_next * s['alpha_next']
    if step_hook is not None:
      # The hook sees x = alpha y; the carry stays y. Entries the hook leaves alone keep their
      # exact y (an identity hook changes nothing, bit for bit); at the data alpha = 1, y = x.
      x_hooked = core.apply_hook(step_hook, x_next, s['i'], s['t_reached'], s['alpha_next'],
                                 s['sigma_next'])
      y_next = jnp.where(x_hooked == x_next, y_next, x_hooked / s['alpha_next'])
      x_next = x_hooked
    return (y_next, m, rho_hist), x_next

  (y, *_), info = core.scan_steps(step, carry, xs, x_T=x_T, num_steps=n,
                                  return_trajectory=return_trajectory, callback=callback)
  return y, {'nfe': nfe if second_order else n, **info}


def euler(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
          key: jax.Array | None = None, prediction: str = 'eps', t_start: float | None = None,
          grid: str | None = None, spacing: str | None = None, times=None,
          levels: core.Levels | None = None,
          step_hook: core.StepHook | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
          S_tmax: float = float('inf'), S_noise: float = 1.0, clip_x0: bool = False,
          dynamic_threshold: float | None = None, return_trajectory: bool = False,
          callback=None) -> tuple[jax.Array, dict]:
  """Euler's method on the PF ODE: Algorithm 2 of Karras et al. (2022) without the Heun correction.

  Deterministic (S_churn = 0) it equals DDIM (eta = 0) on the same grid, and its update is
  written as DDIM's (``x0 + rho_next eps`` in y = x / alpha), so the two agree to rounding even at
  a zero terminal SNR (alpha_T = 0), where ``y - x0`` would lose x0. NFE = num_steps.

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B]) -> prediction``.
    process: any process of the contract.
    x_T: [B, ...] start noise (the state at ``t_start`` when given).
    num_steps: grid times (model evaluations).
    key: PRNG key, needed when S_churn > 0 (noise of step i from ``fold_in(key, i)``).
    prediction: the model's prediction type.
    t_start: the time of x_T; the grid is laid out over [t_min, t_start] (default t_max).
    grid, spacing: the time grid (``grids.make_grid``); quadratic when called directly
      (``sampling.DEFAULT_GRIDS``), the band's chosen grid through ``sampling.sample``
      (``sampling.defaults``).
    times: instead of grid/spacing, the grid itself: ``[num_steps]`` decreasing times
      (``core.make_schedule``).
    levels: with ``times``, explicit noise levels (``core.Levels``), e.g. diffusers'
      EulerDiscreteScheduler, whose sigma / alpha is linear in its (fractional) timesteps
      (``pipelines.schedulers``); the final step may end at a level other than the data.
    step_hook: ``step_hook(x, i, t, alpha, sigma) -> x`` after each step (``core.apply_hook``),
      on ``x = alpha y``; the method's scaled state y follows the entries the hook changes.
    S_churn, S_tmin, S_tmax, S_noise: Karras et al.'s churn (S_tmin, S_tmax in sigma / alpha).
    clip_x0, dynamic_threshold: see ``core.make_denoiser``.
    return_trajectory, callback: see ``core.scan_steps``.

  Returns:
    x_0 [B, ...] float32 and an info dict with 'nfe'.
  """
  return _karras(model_fn, process, x_T, num_steps=num_steps, key=key, prediction=prediction,
                 second_order=False, grid=grid, spacing=spacing, times=times, levels=levels,
                 t_start=t_start,
                 step_hook=step_hook, S_churn=S_churn, S_tmin=S_tmin,
                 S_tmax=S_tmax, S_noise=S_noise, clip_x0=clip_x0,
                 dynamic_threshold=dynamic_threshold, return_trajectory=return_trajectory,
                 callback=callback, method='euler')


def heun(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
         key: jax.Array | None = None, prediction: str = 'eps', t_start: float | None = None,
         grid: str | None = None, spacing: str | None = None, times=None,
          levels: core.Levels | None = None,
         step_hook: core.StepHook | None = None, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = float('inf'), S_noise: float = 1.0, clip_x0: bool = False,
         dynamic_threshold: float | None = None, return_trajectory: bool = False,
         callback=None) -> tuple[jax.Array, dict]:
  """Heun's second-order method: Algorithms 1-2 of Karras et al. (2022).

  Each step to a grid time takes two evaluations; the last step to the data takes one and, when
  deterministic, extrapolates the last two data predictions (``core.extrapolate_to_data``), so the
  method stays second order where Algorithm 1's final Euler step is first order.
  The first step, and every step whose noise level ``sigma / alpha`` shrinks by more than
  ``core.MAX_CORRECTED_RATIO`` (the first steps of a coarse grid, or a start at alpha_T = 0),
  takes Euler's (DDIM's) step with one evaluation: Heun's corrector over a long step multiplies
  the change of eps by the step's length and blew up (core), and over the first step it moved
  trained models' samples away from their ODE's solution (``corrected_steps``). NFE =
  num_steps + the corrected steps, 2 num_steps - 2 when all others are (from ~14 steps on the
  usual grids; ``info['nfe']``). Arguments as ``euler``.
  """
  return _karras(model_fn, process, x_T, num_steps=num_steps, key=key, prediction=prediction,
                 second_order=True, grid=grid, spacing=spacing, times=times, levels=levels,
                 t_start=t_start,
                 step_hook=step_hook, S_churn=S_churn, S_tmin=S_tmin,
                 S_tmax=S_tmax, S_noise=S_noise, clip_x0=clip_x0,
                 dynamic_threshold=dynamic_threshold, return_trajectory=return_trajectory,
                 callback=callback, method='heun')
