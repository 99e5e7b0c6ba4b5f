"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and Sec. 5).

Data prediction, exponential integrator in lambda = log(alpha / sigma):

    x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) x0_hat + (higher-order terms),
    h = lambda_s - lambda_t,

with the derivatives of x0_hat in lambda estimated from the previous steps' predictions, kept in a
fixed-size history. The first steps use lower orders (a warm start), the last step to the data
extrapolates the data predictions (``core.extrapolate_to_data``) at the method's order.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sampling import core

# Called directly with ``lower_order_final=None``, below this many steps the final step uses
# first order (the data prediction itself), as diffusers' ``lower_order_final``;
# ``sampling.sample`` passes the value chosen on the oracle panel for the run's NFE band instead
# (``defaults.py``). Measured on the oracle (linear schedule, quadratic grid, RMS error vs the
# exact PF-ODE map): DPM-Solver++(3M) 0.246 vs 0.411 at 10 steps and 0.194 vs 0.231
# at 12 with the first-order final step, 0.079 vs 0.074 at 16; the second-order methods are
# indifferent. The threshold is the same 15 as diffusers'.
LOWER_ORDER_FINAL_BELOW = 15

# The longest step, in lambda = log(alpha / sigma), that a third-order multistep update
# (DPM-Solver++(3M), UniPC with order 3) takes; longer steps use second order. The third-order
# extrapolation of the data predictions over coarse steps sent samples near a boundary between
# modes into the other mode: on a 5-D mixture with component stds down to 0.03 under the VE SDE
# (tests/test_sampler_defaults.py) 3M at 6 / 12 / 20 steps of the log-SNR grid (h = 1.42 / 0.71
# / 0.43) had RMS 0.94 / 0.67 / 0.017 (one of 48 samples off by 4.6-5.5), second order 0.29 /
# 0.051 / 0.015. Only the schedules laid out here are guarded: explicit ``orders`` and ``levels``
# (another library's schedule, step for step) are taken as given.
MAX_THIRD_ORDER_STEP = 0.5

# A third-order step whose previous step is shorter than this fraction of it (in lambda) takes
# second order: its second difference of the data predictions divides by r0 (r0 + r1), r = the
# history's steps over this one, and over a pair of close predictions that amplifies whatever
# in them is not smooth. grid='optimized' on SD's scaled-linear schedule (a narrow lambda range:
# its offsets push two interior times to the grid's 0.05 minimum step, then a 0.49 step) sent
# 112 of 4096 samples of a held-out 64-D mixture into another mode with UniPC-3 at 13 steps
# (2.26x DDIM's RMS; second order 0.48x). Neutral on the choosing panel of
# experiments/sampler_panel.py (UniPC-3 and 3M at 8-14 steps, 512 samples: the worst and
# geometric-mean ratios to DDIM unchanged but UniPC at 14 steps, 0.17 -> 0.15 geometric mean);
# 0.25 and 0.5 measured the same on both panels.
MIN_THIRD_ORDER_HISTORY_RATIO = 0.25


def cap_third_order(orders: np.ndarray, sched: core.Schedule):
  """``orders`` [n] with at most 2 on the steps longer than ``MAX_THIRD_ORDER_STEP`` in lambda
  and on those whose previous step is shorter than ``MIN_THIRD_ORDER_HISTORY_RATIO`` of them.

  The last iteration (the final step to the data, at most second order) is left alone. NumPy in
  float64; a traced schedule (a process passed as a jit argument) gives traced orders, the same
  rule in float32.
  """
  alpha, sigma = sched.alpha, sched.sigma
  if isinstance(alpha, jax.core.Tracer) or isinstance(sigma, jax.core.Tracer):
    xp, alpha, sigma = jnp, jnp.asarray(alpha), jnp.asarray(sigma)
  else:
    xp, alpha, sigma = np, np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
  lam = xp.log(alpha) - xp.log(xp.where(sigma > 0, sigma, 1.0))
  h = xp.diff(lam)[:len(orders)]
  # The final step onto sigma = 0 has no lambda: not a long step.
  h = xp.where((xp.arange(len(h)) == len(h) - 1) & (sigma[-1] == 0), 0.0, h)
  prev = xp.concatenate([xp.full((1,), xp.inf, h.dtype), h[:-1]])
  coarse = (h > MAX_THIRD_ORDER_STEP) | (prev < MIN_THIRD_ORDER_HISTORY_RATIO * h)
  return xp.where(coarse, xp.minimum(orders, 2), orders)


def _dpmpp_update(x, m, lam_hist, lam_next, alpha_next, sigma_next, sigma, order, max_order,
                  d2_scale=2.0, solver_type='midpoint'):
  """One DPM-Solver++ step of order ``order`` in {1, 2, 3} (traced), from the history.

  Implements the data-prediction multistep updates of Lu et al. (2022b): first order is
  DDIM; second order is Algorithm 2 (``2M``); third order is the ``3M`` update of the
  dpm-solver reference code (``multistep_dpm_solver_third_update``).

  Args:
    x: [B, ...] the current state at lambda = lam_hist[0].
    m: [3, B, ...] data predictions, newest first.
    lam_hist: [3] their lambdas.
    lam_next, alpha_next, sigma_next: the end of the step.
    sigma: sigma at the start.
    order: traced int, at most the static ``max_order`` (which bounds what is computed).

  The third-order term is ``alpha_s h^2 (-phi3) x0''`` with ``phi3 = phi2 / h - 1/2``; as
  ``D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2``, it is ``-2 alpha_s phi3 D2``. The reference code
  (and diffusers, k-diffusion) use ``-alpha_s phi3 D2``, half the term, which measures second order
  on a single Gaussian; with the factor 2 the order is 3 (tests/test_sampling.py). ``d2_scale``
  is that factor: 1.0 reproduces the reference code. ``solver_type``: the second-order step's
  derivative term, 'midpoint' (Algorithm 2, ``-alpha_s phi1 D1 / 2``) or 'heun' (the reference
  code's other choice, ``alpha_s phi2 D1``); both are second order.
  """
  h = lam_next - lam_hist[0]
  safe = lambda v: jnp.where(v == 0, 1.0, v)
  # A step of zero length in log-SNR (float32 lambdas that tie) leaves x where it is: phi1 = 0,
  # and the divided differences stay finite with h taken as 1.
  h_safe = safe(h)
  phi1 = jnp.expm1(-h)  # < 0
  base = (sigma_next / sigma) * x - alpha_next * phi1 * m[0]
  if max_order == 1:
    return base
  # phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2 without the quotients' cancellation at small h.
  phi2 = h * core.exp_remainder(-h, 2)
  r0 = safe((lam_hist[0] - lam_hist[1]) / h_safe)
  d1_0 = (m[0] - m[1]) / r0
  if solver_type == 'heun':
    second = base + alpha_next * phi2 * d1_0
  else:
    second = base - 0.5 * alpha_next * phi1 * d1_0
  if max_order == 2:
    return jnp.where(order == 2, second, base)
  r1 = safe((lam_hist[1] - lam_hist[2]) / h_safe)
  phi3 = -h * core.exp_remainder(-h, 3)
  d1_1 = (m[1] - m[2]) / r1
  d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
  d2 = (d1_0 - d1_1) / (r0 + r1)
  third = base + alpha_next * phi2 * d1 - d2_scale * alpha_next * phi3 * d2
  return jnp.where(order >= 3, third, jnp.where(order == 2, second, base))


def check_orders(orders, *, n: int, order: int, method: str) -> np.ndarray:
  """Explicit per-step orders ``[n]``: integers in ``1..min(order, i + 1)`` at step i."""
  o = np.asarray(orders)
  if o.shape != (n,) or not np.issubdtype(o.dtype, np.integer):
    raise ValueError(f'{method}: orders must be {n} integers (one per step), got {orders!r}.')
  limit = np.minimum(order, np.arange(n) + 1)
  if np.any(o < 1) or np.any(o > limit):
    raise ValueError(f'{method}: orders[i] must lie in 1..min(order={order}, i + 1) (step i has '
                     f'i + 1 predictions), got {o.tolist()}.')
  return o


def _multistep(model_fn, process, x_T, *, num_steps, prediction, order, grid, spacing, times,
               t_start, step_hook, clip_x0, dynamic_threshold, return_trajectory, callback,
               lower_order_final, method, sde_key=None, levels=None, orders=None,
               d2_scale=2.0, solver_type='midpoint'):
  n = num_steps
  if solver_type not in ('midpoint', 'heun'):
    raise ValueError(f"{method}: solver_type={solver_type!r} is not known; use 'midpoint' or "
                     "'heun'.")
  sched = core.make_schedule(process, n, grid=grid, spacing=spacing, times=times, t_start=t_start,
                             method=method, levels=levels)
  n = sched.num_steps  # repeated grid times dropped (core.make_schedule)
  denoise = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)
  # Explicit levels may end off the data (diffusers' final_sigmas_type='sigma_min'): the final
  # step is then the regular update onto that level.
  to_data = levels is None or sched.to_data
  if lower_order_final is None:
    lower_order_final = n < LOWER_ORDER_FINAL_BELOW
  lam = sched.log_snr
  if to_data:
    # The last step's regular update is computed on a dummy lambda and discarded.
    lam_next = jnp.concatenate([lam[1:], lam[-1:] + 1.0])
    alpha_next = jnp.concatenate([sched.alpha[1:-1], sched.alpha[-2:-1]])
    sigma_next = jnp.concatenate([sched.sigma[1:-1], sched.sigma[-2:-1]])
  else:
    lam_next = jnp.log(sched.alpha[1:]) - jnp.log(sched.sigma[1:])
    alpha_next, sigma_next = sched.alpha[1:], sched.sigma[1:]
  steps = np.arange(n)
  if orders is not None:
    orders = check_orders(orders, n=n, order=order, method=method)
    final_order = int(min(orders[-1], 2))
  else:
    # Orders: warm start min(order, i + 1); with lower_order_final the last steps shrink too, so
    # the final step (i = n - 1) is first order and a 3M step before it at most second.
    orders = np.minimum(order, steps + 1)
    # At most 2 points: the extrapolation error O(s_{n-1} s_{n-2}) is already below float32
    # resolution, and a third point only amplifies the predictions' rounding.
    final_order = int(min(orders[-1], 1 if lower_order_final else min(order, 2)))
    if lower_order_final:
      orders = np.minimum(orders, n - steps)
    if levels is None and order >= 3:
      orders = cap_third_order(orders, sched)
  steps, orders = jnp.asarray(steps), jnp.asarray(orders)
  xs = {'i': steps, 't': sched.t, 'lam': lam, 'lam_next': lam_next, 'sigma': sched.sigma[:-1],
        'alpha': sched.alpha[:-1],
        'alpha_next': alpha_next, 'sigma_next': sigma_next,
        'order': orders, 'last': sched.is_last()}
  if step_hook is not None:
    xs['t_reached'] = sched.reached_t()
  hist = max(order, 2)
  carry = (x_T, jnp.zeros((hist,) + x_T.shape, jnp.float32), jnp.zeros((hist,), jnp.float32))

  def step(c, s):
    x, m, lam_hist = c
    x0, _ = denoise(x, s['t'], s['alpha'], s['sigma'])
    m = core.push(m, x0)
    lam_hist = core.push(lam_hist, s['lam'])
    if sde_key is None:
      x_reg = _dpmpp_update(x, m, lam_hist, s['lam_next'], s['alpha_next'], s['sigma_next'],
                            s['sigma'], s['order'], order, d2_scale, solver_type)
    else:
      # DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022b, Sec. 5, and the k-diffusion /
      # diffusers ``sde-dpmsolver++`` update): exact in the linear part, noise of variance
      # sigma_s^2 (1 - e^{-2h}).
      h = s['lam_next'] - s['lam']
      h0 = lam_hist[0] - lam_hist[1]
      r0 = jnp.where(h0 == 0, 1.0, h0 / jnp.where(h == 0, 1.0, h))
      decay = -jnp.expm1(-2.0 * h)
      d1 = (m[0] - m[1]) / r0
      x_reg = ((s['sigma_next'] / s['sigma']) * jnp.exp(-h) * x
               + s['alpha_next'] * decay * m[0]
               + jnp.where(s['order'] >= 2, 0.5 * s['alpha_next'] * decay, 0.0) * d1
               + s['sigma_next'] * jnp.sqrt(decay) * core.noise(sde_key, s['i'], x))
    if not to_data:  # every step, the last one too, is the regular update
      if step_hook is not None:
        x_reg = core.apply_hook(step_hook, x_reg, s['i'], s['t_reached'], s['alpha_next'],
                                s['sigma_next'])
      return (x_reg, m, lam_hist), x_reg
    # The last iteration only evaluates the model; the final step follows the scan.
    if step_hook is not None:
      x_reg = core.apply_hook(step_hook, x_reg, s['i'], s['t_reached'], s['alpha_next'],
                              s['sigma_next'], skip=s['last'])
    x_next = jnp.where(s['last'], x, x_reg)
    return (x_next, m, lam_hist), x_next

  (x, m, _), info = core.scan_steps(
      step, carry, xs, x_T=x_T, num_steps=n, return_trajectory=return_trajectory,
      callback=callback)
  if not to_data:
    return x, {'nfe': n, **info}
  if sde_key is None:
    # The noise levels are the schedule's, so the weights are computed while tracing.
    with jax.ensure_compile_time_eval():
      x = core.extrapolate_to_data(m, sched.rho_history(hist), final_order,
                                   y=x / sched.alpha[-2])
  else:
    x = m[0]
  x = core.apply_hook(step_hook, x, n - 1, 0.0, 1.0, 0.0)  # the step to the data
  if return_trajectory:
    info['trajectory'] = info['trajectory'].at[-1].set(x)
  return x, {'nfe': n, **info}


def dpmpp_2m(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
             key: jax.Array | None = None, prediction: str = 'eps',
             t_start: float | None = None, order: int = 2, grid: str | None = None,
             spacing: str | None = None, times=None, levels: core.Levels | None = None,
             orders=None, step_hook: core.StepHook | None = None,
             lower_order_final: bool | None = None, solver_type: str = 'midpoint',
             clip_x0: bool = False,
             dynamic_threshold: float | None = None, return_trajectory: bool = False,
             callback=None) -> tuple[jax.Array, dict]:
  """DPM-Solver++(2M): Algorithm 2 of Lu et al. (2022b), deterministic, NFE = num_steps.

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B]) -> prediction``.
    process: any process of the contract.
    x_T: [B, ...] start noise (the state at ``t_start`` when given).
    num_steps: model evaluations (one per grid time).
    key: unused (deterministic).
    prediction: the model's prediction type.
    t_start: the time of x_T; the grid is laid out over [t_min, t_start] (default t_max).
    order: 1 (DDIM) or 2.
    grid, spacing: the time grid (``grids.make_grid``); quadratic when called directly
      (``sampling.DEFAULT_GRIDS``), the band's chosen grid through ``sampling.sample``
      (``sampling.defaults``).
    times: instead of grid/spacing, the grid itself: ``[num_steps]`` decreasing times
      (``core.make_schedule``).
    levels: with ``times``, explicit noise levels (``core.Levels``), e.g. diffusers'
      DPMSolverMultistepScheduler with Karras sigmas (``pipelines.schedulers``); when they end
      off the data (sigma > 0) the final step is the regular update onto that level.
    orders: explicit per-step orders ``[num_steps]`` (step i at most ``min(order, i + 1)``; the
      last entry is the final step's), instead of the warm start and ``lower_order_final``.
    step_hook: ``step_hook(x, i, t, alpha, sigma) -> x`` after each step (``core.apply_hook``).
    lower_order_final: use first order for the final step to the data; default: only when
      ``num_steps < LOWER_ORDER_FINAL_BELOW`` (measured).
    solver_type: the second-order update, 'midpoint' (Lu et al. 2022b, Algorithm 2) or 'heun'
      (``_dpmpp_update``; diffusers' ``solver_type``).
    clip_x0, dynamic_threshold: see ``core.make_denoiser``.
    return_trajectory, callback: see ``core.scan_steps``.

  Returns:
    x_0 [B, ...] float32 and an info dict with 'nfe'.
  """
  del key
  order = core.check_order(order, (1, 2), method='dpmpp_2m')
  return _multistep(model_fn, process, x_T, num_steps=num_steps, prediction=prediction,
                    order=order, grid=grid, spacing=spacing, times=times, t_start=t_start,
                    step_hook=step_hook, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold,
                    return_trajectory=return_trajectory, callback=callback,
                    lower_order_final=lower_order_final, method='dpmpp_2m', levels=levels,
                    orders=orders, solver_type=solver_type)


def dpmpp_3m(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
             key: jax.Array | None = None, prediction: str = 'eps',
             t_start: float | None = None, order: int = 3, grid: str | None = None,
             spacing: str | None = None, times=None, levels: core.Levels | None = None,
             orders=None, step_hook: core.StepHook | None = None,
             lower_order_final: bool | None = None, reference_third_order: bool = False,
             solver_type: str = 'midpoint', clip_x0: bool = False,
             dynamic_threshold: float | None = None, return_trajectory: bool = False,
             callback=None) -> tuple[jax.Array, dict]:
  """DPM-Solver++(3M): the third-order multistep data-prediction solver of Lu et al. (2022b).

  Arguments as ``dpmpp_2m``; ``order`` in {1, 2, 3}, default 3. NFE = num_steps.
  ``reference_third_order``: the third-order term of the dpm-solver reference code, diffusers and
  k-diffusion, half of this module's (``_dpmpp_update``), to reproduce them; False (default)
  keeps the term that makes the method third order.
  """
  del key
  order = core.check_order(order, (1, 2, 3), method='dpmpp_3m')
  return _multistep(model_fn, process, x_T, num_steps=num_steps, prediction=prediction,
                    order=order, grid=grid, spacing=spacing, times=times, t_start=t_start,
                    step_hook=step_hook, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold,
                    return_trajectory=return_trajectory, callback=callback,
                    lower_order_final=lower_order_final, method='dpmpp_3m', levels=levels,
                    orders=orders, d2_scale=1.0 if reference_third_order else 2.0,
                    solver_type=solver_type)


def dpmpp_2m_sde(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
                 key: jax.Array | None, prediction: str = 'eps', t_start: float | None = None,
                 order: int = 2, grid: str | None = None, spacing: str | None = None, times=None,
                 step_hook: core.StepHook | None = None, clip_x0: bool = False,
                 dynamic_threshold: float | None = None, return_trajectory: bool = False,
                 callback=None) -> tuple[jax.Array, dict]:
  """DPM-Solver++(2M) SDE (Lu et al. 2022b, Sec. 5; midpoint variant), stochastic.

  Solves the reverse SDE in the data-prediction form with an exact linear part; step i draws its
  noise from ``fold_in(key, i)``. The last step returns the data prediction. NFE = num_steps.
  Arguments as ``dpmpp_2m``; ``key`` is required.
  """
  if key is None:
    raise ValueError("method 'dpmpp_2m_sde' is stochastic and needs a PRNG `key`.")
  order = core.check_order(order, (1, 2), method='dpmpp_2m_sde')
  return _multistep(model_fn, process, x_T, num_steps=num_steps, prediction=prediction,
                    order=order, grid=grid, spacing=spacing, times=times, t_start=t_start,
                    step_hook=step_hook, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold,
                    return_trajectory=return_trajectory, callback=callback,
                    lower_order_final=True, method='dpmpp_2m_sde', sde_key=key)
