"""PLMS: the pseudo linear multistep method of Liu et al. (2022), "Pseudo Numerical Methods for
Diffusion Models on Manifolds" (PNDM), Sec. 3-4.

Each step is the DDIM transfer ``phi(x_t, eps', t -> s) = alpha_s (x_t - sigma_t eps') / alpha_t +
sigma_s eps'`` (their eq. 11) with ``eps'`` the fourth-order Adams-Bashforth combination of the last
four noise predictions, ``(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24`` (eq. 12). The AB weights assume
equal steps in t, which the uniform grid gives; yet the quadratic grid, whose steps shrink toward
the data, is more accurate on the oracle at 10-50 NFE (see ``sampling/__init__.py``) and is the
default. The final step extrapolates the data predictions (``core.extrapolate_to_data``) rather
than taking an AB step onto sigma = 0, where eps is not smooth in t. Warm start: the lower-order
start of diffusers' ``skip_prk_steps`` (the S-PNDM start): a pseudo improved Euler (Heun) first
step with two evaluations, then AB2 and AB3 before AB4. NFE = num_steps + 1 (num_steps for a
single step). When the first step shrinks sigma / alpha by more than ``core.MAX_CORRECTED_RATIO``
(few steps, or alpha_T = 0) the pseudo-Heun step would multiply the change of eps by the step's
length (RMS 108 at 3 NFE on the oracle, +-5e4 at alpha_T = 0); PLMS then takes iPNDM's start
below (a DDIM first step), with NFE = num_steps.

Order: AB4 integrates ``eps`` against ``dt`` while the transfer integrates it against ``d(sigma /
alpha)``, which is not linear in t: the local error keeps an ``eps' (d^2 rho / dt^2) dt^3 / 12``
term, so PLMS converges with order 2 (measured on the oracle: slope 2.2 from 160 to 320 steps of
the quadratic grid, tests/test_sampling.py).

``warm_start='ab'`` is iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
Exponential Integrator" (DEIS), Sec. 5 / App. "improved PNDM"; the fast-sampling baseline of
Zhou et al. 2024, AMED): no Heun start, the first step is Euler (DDIM) and the next ones AB2, AB3,
... up to ``order``, so NFE = num_steps, one more step than PNDM's start allows for the same NFE;
its last step is also an AB step, onto sigma / alpha = 0. In the scaled coordinates ``y = x /
alpha``, ``s = sigma / alpha`` the PF-ODE is ``dy/ds = eps`` and ``eps = dy/ds`` is a smooth (odd)
function of s at the data (``core`` module docstring: y is smooth in s^2), so an AB step onto
s = 0 is sound when it is as long as the steps before it (trailing ends); after the short steps
that end a 'linspace' grid it is replaced by ``y - s_0 e / 2`` (eps ~ e s / s_0 near the data),
without which the error stalls at 3e-4 on the oracle from 160 steps on. Below
``LOWER_ORDER_FINAL_BELOW`` steps (``lower_order_final``) the last step is AB of at most second
order, as PLMS's final extrapolation: over so coarse a grid the third-order extrapolation of eps
onto s = 0 sent samples near a boundary between modes into the other one. The AB weights assume
equal steps, so on the usual non-uniform grids iPNDM converges with order 2 whatever ``order``
is, as PLMS (measured: slopes 1.9-2.4 from 80 to 640 steps, linear schedule). Measured on the
oracle (experiments/bench_samplers.py, RMS error vs the exact map, quadratic grid with trailing
ends) at 5 / 10 / 20 NFE: order 3 0.134 / 0.054 / 0.029, order 4 0.170 / 0.044 / 0.0066; PNDM's
start 0.51 / 0.065 / 0.0072 (4 / 9 / 19 steps).

``analytic_first_step=True`` (iPNDM only) is the analytical first step (AFS) of Zhou et al. (2024),
"Fast ODE-based Sampling for Diffusion Models in Around 5 Steps" (AMED), Sec. 3.3: at the start of
the grid, almost pure noise, the model's noise prediction is replaced by its closed form for
zero-mean, unit-covariance data, ``E[eps | x_t] = sigma x_t / (alpha^2 + sigma^2)`` (for
``x_0 ~ N(0, I)``; AMED writes ``x_T / sqrt(1 + sigma_T^2)`` in EDM's scaling, equal to it up to
O(1 / sigma_T^2)). That saves the first model evaluation, so NFE = num_steps - 1: the same NFE
buys one more step. The price is an error of order ``alpha_T E[x_0 | x_T]`` in that first
prediction, which stays small when the start's ``alpha / sigma`` is small (DDPM's linear schedule:
0.0064) and the data roughly centred; starts with ``alpha / sigma > 0.1`` are refused. Measured on
the oracle (mean (-0.16, 0.29), experiments/bench_samplers.py), order 3, quadratic/trailing grid,
at 5 NFE: 0.134 -> 0.114 RMS, median per-sample error 0.032 -> 0.013. On the digits model (data
mean far from 0) at 10 NFE, the share of confidently classified samples was unchanged (87.3% with,
87.0% without; experiments/digits_quality.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes
from diffusion_jax.sampling import core
from diffusion_jax.sampling.ddim import ddim

# iPNDM (warm_start='ab') below this many steps takes AB of at most second order on its last step,
# onto the data (lower_order_final=None), as diffusers' lower_order_final does for DPM-Solver:
# below the NFEs the sampler defaults were chosen at (5 and 7 for the 5-NFE band), where the grid
# is coarser than any the choice ran. Measured on experiments/sampler_panel.py's choosing panel
# (18 mixtures, 1024 samples, x_T other than the choice's; order 3 on the cosine grid, the 5-NFE
# band's choice), worst / geometric-mean ratio to DDIM at the same NFE, reference last step ->
# second-order last step: 3 steps 1.63 / 1.03 -> 1.21 / 0.89, 4: 1.50 / 0.84 -> 1.05 / 0.74;
# held-out mixtures 2.13 / 0.99 -> 1.39 / 0.89 and 1.67 / 0.75 -> 1.08 / 0.72. At 5-7 steps the
# choosing panel gained less (5: 1.10 -> 0.98, 7: 0.81 -> 0.79), and with the threshold at 8 the
# held-out panel's 5-NFE ratio to diffusers' best went 0.69 -> 0.89 (its single Gaussians, where
# the third-order step is nearly exact, 0.41 -> 0.97), so it is not applied there.
LOWER_ORDER_FINAL_BELOW = 5

# Adams-Bashforth weights by order, newest first (row k = order k).
_AB = np.zeros((5, 4), np.float32)
_AB[1, :1] = [1.0]
_AB[2, :2] = [3 / 2, -1 / 2]
_AB[3, :3] = [23 / 12, -16 / 12, 5 / 12]
_AB[4, :4] = [55 / 24, -59 / 24, 37 / 24, -9 / 24]


def plms(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
         key: jax.Array | None = None, prediction: str = 'eps', t_start: float | None = None,
         grid: str | None = None, spacing: str | None = None, times=None,
         levels: core.Levels | None = None, step_hook: core.StepHook | None = None,
         order: int = 4, warm_start: str = 'heun', lower_order_final: bool | None = None,
         analytic_first_step: bool = False, clip_x0: bool = False,
         dynamic_threshold: float | None = None,
         return_trajectory: bool = False, callback=None) -> tuple[jax.Array, dict]:
  """PNDM's pseudo linear multistep sampler with a lower-order warm start (or iPNDM).

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B]) -> prediction``.
    process: any process of the contract.
    x_T: [B, ...] start noise (the state at ``t_start`` when given).
    num_steps: steps n; with ``warm_start='heun'`` the first step takes two evaluations, so
      NFE = n + 1 (n = 1 or order = 1: DDIM, NFE = 1; a long first step: iPNDM's start, NFE =
      n, module docstring); with 'ab', NFE = n.
    key: unused (deterministic).
    prediction: the model's prediction type.
    t_start: the time of x_T; the grid is laid out over [t_min, t_start] (default t_max).
    grid, spacing: the time grid (``grids.make_grid``), quadratic by default.
    times: instead of grid/spacing, the grid itself: ``[num_steps]`` decreasing times, one per
      step (``core.make_schedule``).
    levels: with ``times`` and ``warm_start='heun'``, explicit noise levels (``core.Levels``):
      diffusers' PNDMScheduler with ``skip_prk_steps`` step for step (``_pndm_levels``), e.g.
      ending at ``alphas_cumprod[0]`` (``pipelines.schedulers``).
    step_hook: ``step_hook(x, i, t, alpha, sigma) -> x`` after each step (``core.apply_hook``);
      with the Heun start, after the corrected first step (not after its Euler predictor).
    order: the Adams-Bashforth order, 1 to 4 (4: PNDM; 1 is DDIM).
    warm_start: 'heun' (PNDM's S-PNDM start: a pseudo improved Euler first step, then AB2, AB3)
      or 'ab' (iPNDM: Euler first step, then AB of rising order; the more accurate at <= 20 NFE
      on the oracle, see the module docstring).
    lower_order_final: with warm_start='ab' (or PNDM's fall-back to iPNDM's start), the last
      step (onto the data) uses AB of at most second order, as PLMS's final extrapolation;
      False: ``order`` there too, as the reference iPNDM. None: True below
      ``LOWER_ORDER_FINAL_BELOW`` steps. ``sampling.sample``'s defaults leave it to this rule
      except in the 10-NFE band (8-14 steps), whose chosen set passes True
      (``sampling/defaults.py``).
    analytic_first_step: with warm_start='ab', the first step's noise prediction in closed form
      instead of from the model (AMED's AFS, module docstring): NFE = n - 1, n >= 2.
    clip_x0, dynamic_threshold: see ``core.make_denoiser``.
    return_trajectory, callback: see ``core.scan_steps``.

  Returns:
    x_0 [B, ...] float32 and an info dict with 'nfe'.
  """
  del key
  n = num_steps
  order = core.check_order(order, (1, 2, 3, 4), method='plms')
  if warm_start not in ('heun', 'ab'):
    raise ValueError(f"plms: warm_start={warm_start!r} is not known; use 'heun' (PNDM) or 'ab' "
                     '(iPNDM).')
  if lower_order_final is None:
    lower_order_final = num_steps < LOWER_ORDER_FINAL_BELOW
  if not isinstance(lower_order_final, (bool, np.bool_)):
    raise ValueError(f'plms: lower_order_final must be True or False, got {lower_order_final!r}.')
  if analytic_first_step and warm_start != 'ab':
    raise ValueError("plms: analytic_first_step=True needs warm_start='ab' (iPNDM); PNDM's Heun "
                     'start evaluates the model twice at the first step.')
  if levels is not None:
    if warm_start != 'heun' or analytic_first_step or clip_x0 or dynamic_threshold is not None:
      raise ValueError("plms: levels reproduce diffusers' PNDM (warm_start='heun'), without "
                       'analytic_first_step, clip_x0 or dynamic_threshold.')
    return _pndm_levels(model_fn, process, x_T, num_steps=n, prediction=prediction, times=times,
                        levels=levels, step_hook=step_hook, order=order,
                        return_trajectory=return_trajectory, callback=callback)
  if warm_start == 'ab':
    return _ipndm(model_fn, process, x_T, num_steps=n, prediction=prediction, grid=grid,
                  spacing=spacing, times=times, t_start=t_start, step_hook=step_hook,
                  order=order, lower_order_final=bool(lower_order_final),
                  analytic_first_step=bool(analytic_first_step), clip_x0=clip_x0,
                  dynamic_threshold=dynamic_threshold, return_trajectory=return_trajectory,
                  callback=callback)
  if n == 1 or order == 1:
    return ddim(model_fn, process, x_T, num_steps=n, prediction=prediction, t_start=t_start,
                grid=grid, spacing=spacing, times=times, step_hook=step_hook, clip_x0=clip_x0,
                dynamic_threshold=dynamic_threshold, return_trajectory=return_trajectory,
                callback=callback)
  sched = core.make_schedule(process, n, grid=grid, spacing=spacing, times=times, t_start=t_start,
                             method='plms')
  n = sched.num_steps
  with jax.ensure_compile_time_eval():
    first_short = core.short_steps(sched.rho[:2])[0]
  if n == 1 or (not isinstance(first_short, jax.core.Tracer) and not bool(first_short)):
    # The pseudo-Heun first step over a long step (sigma / alpha shrinking by more than
    # core.MAX_CORRECTED_RATIO: few steps, or alpha_T ~ 0) multiplies the change of eps by the
    # step's length and blows up (RMS 108 at 3 NFE on the oracle); iPNDM's start, a DDIM first
    # step, then AB of rising order, is what remains (NFE = num_steps).
    return _ipndm(model_fn, process, x_T, num_steps=n, prediction=prediction, grid=None,
                  spacing=None, times=np.asarray(sched.t), t_start=None, step_hook=step_hook,
                  order=order, lower_order_final=bool(lower_order_final),
                  analytic_first_step=False, clip_x0=clip_x0,
                  dynamic_threshold=dynamic_threshold, return_trajectory=return_trajectory,
                  callback=callback)
  denoise = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)
  # n + 1 iterations, one evaluation each: j = 0 predicts step 0 (Euler), j = 1 corrects it at
  # t_1 (Heun), j >= 2 is step i = j - 1 from t_i.
  j = np.arange(n + 1)
  start = np.maximum(j - 1, 0)  # the step's start index into the schedule
  t_eval = np.where(j == 1, 1, start)
  ab_order = np.minimum(np.maximum(j, 1), order)
  xs = {'i': jnp.asarray(j), 't': sched.t[t_eval], 'alpha': sched.alpha[start],
        'sigma': sched.sigma[start], 'alpha_next': sched.alpha[start + 1],
        'sigma_next': sched.sigma[start + 1], 'ab': jnp.asarray(_AB[ab_order]),
        'alpha_eval': sched.alpha[t_eval], 'sigma_eval': sched.sigma[t_eval],
        'last': jnp.asarray(j == n)}
  if step_hook is not None:  # iteration j >= 1 completes step j - 1, at t_j
    xs['t_reached'] = sched.reached_t()[start]
    xs['no_step'] = jnp.asarray((j == 0) | (j == n))
  carry = (x_T, x_T, jnp.zeros((4,) + x_T.shape, jnp.float32),
           jnp.zeros((2,) + x_T.shape, jnp.float32))

  def step(c, s):
    x, x_eval, e_hist, m = c
    x0_hat, e = denoise(x_eval, s['t'], s['alpha_eval'], s['sigma_eval'])
    first, heun = s['i'] == 0, s['i'] == 1
    e_hist = jnp.where(heun, e_hist, core.push(e_hist, e))
    m = jnp.where(heun, m, core.push(m, x0_hat))
    e_ab = jnp.tensordot(s['ab'], e_hist, axes=1)
    e_prime = jnp.where(first, e, jnp.where(heun, 0.5 * (e_hist[0] + e), e_ab))
    x0 = (x - s['sigma'] * e_prime) / s['alpha']
    x_new = s['alpha_next'] * x0 + s['sigma_next'] * e_prime
    # The last iteration only evaluates the model: it keeps the state it evaluated at, and the
    # final step to the data follows the scan.
    x_new = jnp.where(s['last'], x_eval, x_new)
    if step_hook is not None:
      x_new = core.apply_hook(step_hook, x_new, s['i'] - 1, s['t_reached'], s['alpha_next'],
                              s['sigma_next'], skip=s['no_step'])
    x_next = jnp.where(first, x, x_new)
    return (x_next, x_new, e_hist, m), x_next

  (x, _, _, m), info = core.scan_steps(step, carry, xs, x_T=x_T, num_steps=n,
                                       return_trajectory=return_trajectory, callback=callback,
                                       trajectory_from=1)
  # The final step extrapolates the data predictions (core module docstring): eps is not smooth
  # in t at the data (sigma ~ sqrt(t) there), so an AB step onto t = 0 would be first order. The
  # evaluations' noise levels are the schedule's (the Heun corrector's is not in the history), so
  # the weights are computed while tracing.
  with jax.ensure_compile_time_eval():
    x = core.extrapolate_to_data(m, sched.rho_history(2), 2, y=x / sched.alpha[-2])
  x = core.apply_hook(step_hook, x, n - 1, 0.0, 1.0, 0.0)  # the step to the data
  if return_trajectory:
    info['trajectory'] = info['trajectory'].at[-1].set(x)
  return x, {'nfe': n + 1, **info}


# The largest alpha / sigma at the first grid time for which analytic_first_step is accepted.
AFS_MAX_SNR_RATIO = 0.1


def _ipndm(model_fn, process, x_T, *, num_steps, prediction, grid, spacing, times, t_start,
           step_hook, order, lower_order_final, analytic_first_step, clip_x0, dynamic_threshold,
           return_trajectory, callback):
  """iPNDM (``plms(..., warm_start='ab')``): AB of order ``min(i + 1, order)`` at step i, at
  most 2 at the last with ``lower_order_final``."""
  n = num_steps
  if analytic_first_step and n < 2:
    raise ValueError(f'plms: analytic_first_step=True needs num_steps >= 2 (NFE = num_steps - 1), '
                     f'got num_steps={n}.')
  sched = core.make_schedule(process, n, grid=grid, spacing=spacing, times=times, t_start=t_start,
                             method='plms')
  n = sched.num_steps  # repeated grid times dropped (core.make_schedule)
  if analytic_first_step:
    with jax.ensure_compile_time_eval():
      ratio = sched.alpha[0] / sched.sigma[0]
    # Checked when the schedule is concrete (the process closed over, not a jit argument).
    if not isinstance(ratio, jax.core.Tracer) and not float(ratio) <= AFS_MAX_SNR_RATIO:
      raise ValueError(
          f'plms: analytic_first_step=True replaces the model at the first grid time by its value '
          f'for pure noise, but alpha / sigma = {float(ratio):.3g} there (> {AFS_MAX_SNR_RATIO}): '
          'the start is not close enough to pure noise. Start the grid at the end of the process '
          '(no t_start, or times starting at t_max) or leave analytic_first_step off.')
  denoise = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)
  i = np.arange(n)
  ab_order = np.minimum(i + 1, order)
  if lower_order_final:
    ab_order[-1] = min(ab_order[-1], 2)
  xs = {'i': jnp.asarray(i), 't': sched.t, 'alpha': sched.alpha[:-1], 'sigma': sched.sigma[:-1],
        'alpha_next': sched.alpha[1:], 'sigma_next': sched.sigma[1:],
        'ab': jnp.asarray(_AB[ab_order]), 'rho': sched.rho[:-1],
        # sigma / alpha of the previous evaluation (the first step has none: twice its own).
        'rho_prev': jnp.concatenate([2.0 * sched.rho[:1], sched.rho[:-2]]),
        'last': jnp.asarray(i == n - 1)}
  if step_hook is not None:
    xs['t_reached'] = sched.reached_t()

  def model_x0_eps(x, s):
    return denoise(x, s['t'], s['alpha'], s['sigma'])

  def gaussian_x0_eps(x, s):  # E[eps | x_t] for x_0 ~ N(0, I): no model evaluation (AFS)
    e = s['sigma'] * x / (s['alpha']**2 + s['sigma']**2)
    return (x - s['sigma'] * e) / s['alpha'], e

  def step(c, s):
    x, e_hist = c
    if analytic_first_step:
      x0, e = jax.lax.cond(s['i'] == 0, gaussian_x0_eps, model_x0_eps, x, s)
    else:
      x0, e = model_x0_eps(x, s)
    e_hist = core.push(e_hist, e)
    e_ab = jnp.tensordot(s['ab'], e_hist, axes=1)
    # The DDIM transfer with the AB combination: y_next = y + (s_next - s) e_ab in y = x / alpha,
    # with (x - sigma e_ab) / alpha written as x0 + sigma (e - e_ab) / alpha: the same in exact
    # arithmetic, but the first step (e_ab = e) then does not lose x0 to cancellation where alpha
    # is ~0 (a zero terminal SNR schedule).
    x_next = (s['alpha_next'] * (x0 + s['sigma'] * (e - e_ab) / s['alpha'])
              + s['sigma_next'] * e_ab)
    # The last step from a time close to the data (the previous noise level within sqrt(2) of
    # this one, as at the end of a 'linspace' grid): AB's equal-step weights would extrapolate
    # eps over a step far longer than its history's; eps is odd in s and ~ e s / s_0 there, so
    # its mean over [0, s_0] is e / 2 (the same step as core.extrapolate_to_data's).
    close = s['last'] & (s['rho_prev']**2 < 2.0 * s['rho']**2)
    x_next = jnp.where(close, (x - 0.5 * s['sigma'] * e) / s['alpha'], x_next)
    if step_hook is not None:
      x_next = core.apply_hook(step_hook, x_next, s['i'], s['t_reached'], s['alpha_next'],
                               s['sigma_next'])
    return (x_next, e_hist), x_next

  carry = (x_T, jnp.zeros((4,) + x_T.shape, jnp.float32))
  (x, _), info = core.scan_steps(step, carry, xs, x_T=x_T, num_steps=n,
                                 return_trajectory=return_trajectory, callback=callback)
  return x, {'nfe': n - 1 if analytic_first_step else n, **info}


def _pndm_levels(model_fn, process, x_T, *, num_steps, prediction, times, levels, step_hook,
                 order, return_trajectory, callback):
  """PLMS on explicit ``times`` and ``Levels``: diffusers' ``PNDMScheduler.step_plms`` exactly.

  As ``plms`` (the pseudo-Heun start, then AB2, AB3, AB4), with what diffusers does differently:
  the Adams-Bashforth combination is taken of the model's raw outputs (for 'v', of v) and
  converted to eps at the start of each step with that step's state and level; every step, the
  last one too, is the DDIM transfer ``alpha_to (x - sigma e') / alpha + sigma_to e'`` onto its
  end level (``Levels.alpha_to``, default the next time's; no extrapolation to the data, no
  fallback for long first steps); the pseudo-Heun correction goes from ``Levels.alpha_heun``
  (default the first time's) to the second time's. One step (n = 1) is DDIM's. NFE = n + 1
  (1 for n = 1).
  """
  if prediction not in ('eps', 'v'):
    raise ValueError(f"plms with levels (diffusers' PNDM) takes prediction 'eps' or 'v', got "
                     f'{prediction!r}.')
  sched = core.make_schedule(process, num_steps, times=times, method='plms', levels=levels,
                             levels_to=True)
  n = sched.num_steps
  levels = core.Levels(*levels)
  alpha_to, sigma_to = sched.step_ends()
  heun = [sched.alpha[0], sched.sigma[0]]
  for k, name in enumerate(('alpha_heun', 'sigma_heun')):
    value = getattr(levels, name)
    if value is not None:
      if np.ndim(value) != 0 or not 0 <= float(value) < np.inf:
        raise ValueError(f'plms: levels.{name} must be a finite scalar >= 0, got {value!r}.')
      heun[k] = jnp.float32(value)
  # n + 1 iterations (1 for n = 1): j = 0 predicts step 0, j = 1 corrects it with the mean of
  # both outputs (not kept in the history), j >= 2 is step j - 1 with AB of the history. Each
  # converts at its start level and ends at its step's end: diffusers' (timestep, prev_timestep).
  j = np.arange(n + 1) if n > 1 else np.arange(1)
  start = np.maximum(j - 1, 0)
  t_eval = np.where(j == 1, 1, start)
  ab_order = np.minimum(np.maximum(j, 1), order)
  is_heun = jnp.asarray(j == 1)
  xs = {'i': jnp.asarray(j), 't': sched.t[t_eval],
        'alpha': jnp.where(is_heun, heun[0], sched.alpha[start]),
        'sigma': jnp.where(is_heun, heun[1], sched.sigma[start]),
        'alpha_next': jnp.where(is_heun, sched.alpha[1], alpha_to[start]),
        'sigma_next': jnp.where(is_heun, sched.sigma[1], sigma_to[start]),
        'ab': jnp.asarray(_AB[ab_order])}
  if step_hook is not None:
    xs['t_reached'] = jnp.concatenate([sched.t, jnp.zeros((1,), jnp.float32)])[start + 1]
    xs['no_step'] = jnp.asarray((j == 0) & (n > 1))
  carry = (x_T, x_T, jnp.zeros((4,) + x_T.shape, jnp.float32))

  def step(c, s):
    x, x_eval, hist = c
    t_b = jnp.broadcast_to(s['t'], x.shape[:1])
    out = jnp.asarray(model_fn(x_eval, t_b)).astype(jnp.float32)
    first, heun = s['i'] == 0, s['i'] == 1
    hist = jnp.where(heun, hist, core.push(hist, out))
    combined = jnp.where(heun, 0.5 * (out + hist[0]), jnp.tensordot(s['ab'], hist, axes=1))
    eps = processes.convert_prediction(combined, x, s['alpha'], s['sigma'], source=prediction,
                                       target='eps')
    x_new = s['alpha_next'] * (x - s['sigma'] * eps) / s['alpha'] + s['sigma_next'] * eps
    if step_hook is not None:
      x_new = core.apply_hook(step_hook, x_new, jnp.maximum(s['i'] - 1, 0), s['t_reached'],
                              s['alpha_next'], s['sigma_next'], skip=s['no_step'])
    x_next = jnp.where(first & (n > 1), x, x_new)  # the predictor's start stays for j = 1
    return (x_next, x_new, hist), x_new

  (_, x, _), info = core.scan_steps(step, carry, xs, x_T=x_T, num_steps=n,
                                    return_trajectory=return_trajectory, callback=callback,
                                    trajectory_from=1 if n > 1 else 0)
  return x, {'nfe': n + 1 if n > 1 else 1, **info}
