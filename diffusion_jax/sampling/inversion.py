"""Deterministic samplers run backwards, data -> noise (DDIM inversion: Song et al. 2021a, 4.3).

``sampling.invert`` integrates the probability-flow ODE from the data up to ``t_end`` on the
sampler's own grid (the same ``grid`` / ``spacing`` / ``times`` / ``t_start = t_end``) taken in
reverse, ``u = [t_{n-1}, ..., t_0]``, inside the same ``core.scan_steps`` loop, so that sampling
with the same method, steps and grid maps its output back to the data up to the two
discretization errors (tests/test_sampling.py measures the round trip).

The step from ``u_{j-1}`` to ``u_j`` evaluates the model where the state is, ``(x_{u_{j-1}},
u_{j-1})``, and applies the method's own update with the roles of start and end exchanged (the
updates are written for any pair of noise levels, so they run backwards unchanged):

- ``'ddim'`` / ``'euler'`` (equal when deterministic): ``x_u = alpha_u x0_hat + sigma_u eps_hat``,
  Euler's method in ``y = x / alpha`` against ``sigma / alpha`` (first order);
- ``'dpmpp_2m'``: DPM-Solver++(2M)'s multistep update (Lu et al. 2022b, Algorithm 2) with ``h < 0``,
  first order at its first step from a grid time, second order after (second order).

The first step leaves the data, where the model cannot be evaluated (sigma = 0 is no time of the
process). In ``y = x / alpha`` against ``rho = sigma / alpha`` the ODE is ``dy/drho = eps`` and eps
is odd in rho at the data (``eps = rho g(y, rho^2)``, core.py's module docstring), so its mean over
``[0, rho]`` is half its value at rho: the step takes ``x_{u_0} = alpha_{u_0} x_0 +
sigma_{u_0} eps_hat / 2`` with ``eps_hat`` evaluated at the data scaled to that time,
``(alpha_{u_0} x_0, u_0)``, an error ``O(rho_{u_0}^4)``. It is the inverse of the final step the
multistep samplers take when their last noise levels are close, ``x_0 = (y + x0_hat) / 2``
(``core.extrapolate_to_data``). (The full ``sigma eps_hat``, as diffusers' ``DDIMInverseScheduler``
takes, leaves an error ``rho_{u_0}^2 g / 2`` that no number of steps removes: 1e-4 in x_T on a
Gaussian with ``DiscreteVP.linear()``, where ``rho(t_min) = 0.01``.) NFE = num_steps.

Exact inversion (``edict_invert`` / ``edict_sample``): EDICT (Wallace et al. 2023, "EDICT: Exact
Diffusion Inversion via Coupled Transformations") carries two states ``(x, y)`` and alternates
affine DDIM half-updates, each evaluating the model on the *other* state, with two mixing layers of
weight ``p`` (0.93 in the paper, which used 50 steps; closer to 1 beyond: ``default_mix``). Every
update is an affine map whose inverse is written out, so the inversion is the exact inverse of the
sampler: the round trip returns x_0 up to floating-point round-off, whatever the guidance and the
number of steps (DDIM inversion drifts with the discretization error, which guidance enlarges:
tests/test_editing.py measures both). NFE = 2 per step in each direction.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes
from diffusion_jax.sampling import core
from diffusion_jax.sampling.dpm_solver import _dpmpp_update  # pylint: disable=protected-access


def _reversed(process, num_steps, *, grid, spacing, times, t_end, method):
  """xs of the reversed schedule: iteration j steps from level j - 1 (the data for j = 0) to u_j."""
  sched = core.make_schedule(process, num_steps, grid=grid, spacing=spacing, times=times,
                             t_start=t_end, method=f'invert({method!r})')
  num_steps = sched.num_steps  # repeated grid times dropped (core.make_schedule)
  with jax.ensure_compile_time_eval():
    u = sched.t[::-1]
    alpha_u, sigma_u = sched.alpha[-2::-1], sched.sigma[-2::-1]
    j = np.arange(num_steps)
    prev = np.maximum(j - 1, 0)
    first = jnp.asarray(j == 0)
    xs = {'i': jnp.asarray(j), 'first': first, 't_reached': u,
          'alpha_next': alpha_u, 'sigma_next': sigma_u,
          # where the model is evaluated: the start state at u_{j-1}; for j = 0 the data scaled to
          # u_0 (module docstring).
          't': u[prev], 'alpha': alpha_u[prev], 'sigma': sigma_u[prev],
          'lam': jnp.log(alpha_u[prev]) - jnp.log(sigma_u[prev]),
          'lam_next': jnp.log(alpha_u) - jnp.log(sigma_u),
          'scale_in': jnp.where(first, alpha_u[0], 1.0),
          'eps_weight': jnp.where(first, 0.5, 1.0)}
  return sched, xs


def invert_ddim(model_fn: Callable[..., jax.Array], process, x_0: jax.Array, *, num_steps: int,
                prediction: str = 'eps', t_end: float | None = None, grid: str | None = None,
                spacing: str | None = None, times=None, step_hook: core.StepHook | None = None,
                return_trajectory: bool = False, callback=None) -> tuple[jax.Array, dict]:
  """DDIM (eta = 0) inversion: the state at ``t_end`` whose DDIM sample is ``x_0``.

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B]) -> prediction`` (guidance applied).
    process: any process of the contract.
    x_0: [B, ...] float32 data.
    num_steps: grid times (model evaluations), as for ``ddim``.
    prediction: the model's prediction type.
    t_end: the time to invert to (default ``t_max``); the grid is laid out over
      ``[t_min, t_end]``, as ``sample(..., t_start=t_end)`` lays it out.
    grid, spacing, times: the sampler's grid (``core.make_schedule``), quadratic by default.
    step_hook: ``step_hook(x, i, t, alpha, sigma) -> x`` after each step, t the time reached.
    return_trajectory, callback: see ``core.scan_steps`` (the trajectory runs from x_0 to x_T).

  Returns:
    x_T [B, ...] float32 and an info dict with 'nfe'.
  """
  sched, xs = _reversed(process, num_steps, grid=grid, spacing=spacing, times=times, t_end=t_end,
                        method='ddim')
  num_steps = sched.num_steps
  denoise = core.make_denoiser(model_fn, process, prediction=prediction)

  def step(x, s):
    x0_hat, eps = denoise(s['scale_in'] * x, s['t'], s['alpha'], s['sigma'])
    x0_start = jnp.where(s['first'], x, x0_hat)  # at the data, x is x_0 itself
    x_next = s['alpha_next'] * x0_start + (s['eps_weight'] * s['sigma_next']) * eps
    x_next = core.apply_hook(step_hook, x_next, s['i'], s['t_reached'], s['alpha_next'],
                             s['sigma_next'])
    return x_next, x_next

  x, info = core.scan_steps(step, x_0, xs, x_T=x_0, num_steps=num_steps,
                            return_trajectory=return_trajectory, callback=callback)
  return x, {'nfe': num_steps, **info}


def invert_dpmpp_2m(model_fn: Callable[..., jax.Array], process, x_0: jax.Array, *,
                    num_steps: int, prediction: str = 'eps', t_end: float | None = None,
                    order: int = 2, grid: str | None = None, spacing: str | None = None,
                    times=None, step_hook: core.StepHook | None = None,
                    return_trajectory: bool = False, callback=None) -> tuple[jax.Array, dict]:
  """DPM-Solver++(2M) inversion: the 2M update with the noise levels exchanged.

  After the first step off the data (module docstring), step j >= 1 evaluates the model at
  ``(x_{u_{j-1}}, u_{j-1})`` and takes the update of order ``min(order, j)``: first order (DDIM)
  at the first grid time, then second order with the previous evaluation's data prediction.
  Arguments as ``invert_ddim``; ``order``: 1 or 2.
  """
  order = core.check_order(order, (1, 2), method='invert(dpmpp_2m)')
  sched, xs = _reversed(process, num_steps, grid=grid, spacing=spacing, times=times, t_end=t_end,
                        method='dpmpp_2m')
  num_steps = sched.num_steps
  xs['order'] = jnp.asarray(np.minimum(np.arange(num_steps), order))
  denoise = core.make_denoiser(model_fn, process, prediction=prediction)

  def step(c, s):
    x, m, lam_hist = c
    x0_hat, eps = denoise(s['scale_in'] * x, s['t'], s['alpha'], s['sigma'])
    # The first evaluation is off the trajectory: it enters the history at u_0, where the next
    # one (order 1) follows, and is never used in a difference (order 2 from j = 2 on).
    m = core.push(m, x0_hat)
    lam_hist = core.push(lam_hist, s['lam'])
    x_off_data = s['alpha_next'] * x + (0.5 * s['sigma_next']) * eps
    x_step = _dpmpp_update(x, m, lam_hist, s['lam_next'], s['alpha_next'], s['sigma_next'],
                           s['sigma'], jnp.maximum(s['order'], 1), 2)
    x_next = jnp.where(s['first'], x_off_data, x_step)
    x_next = core.apply_hook(step_hook, x_next, s['i'], s['t_reached'], s['alpha_next'],
                             s['sigma_next'])
    return (x_next, m, lam_hist), x_next

  carry = (x_0, jnp.zeros((2,) + x_0.shape, jnp.float32), jnp.zeros((2,), jnp.float32))
  (x, _, _), info = core.scan_steps(step, carry, xs, x_T=x_0, num_steps=num_steps,
                                    return_trajectory=return_trajectory, callback=callback)
  return x, {'nfe': num_steps, **info}


# --- EDICT: exact inversion by coupled transformations --------------------------------------------


def _edict_schedule(process, num_steps, *, grid, spacing, times, t_start, method):
  """The DDIM grid (quadratic by default, as ``ddim``) and the affine coefficients of its steps.

  Step i maps a state at ``t_i`` to ``t_{i+1}`` (the data after the last grid time) as
  ``x -> a_i x + b_i eps``, DDIM's update written for an eps evaluated anywhere:
  ``a_i = alpha_{i+1} / alpha_i``, ``b_i = sigma_{i+1} - a_i sigma_i``.
  """
  sched = core.make_schedule(process, num_steps, grid=grid, spacing=spacing, times=times,
                             t_start=t_start, method=method)
  n = sched.num_steps
  with jax.ensure_compile_time_eval():
    a = sched.alpha[1:] / sched.alpha[:-1]
    xs = {'i': jnp.arange(n), 't': sched.t, 'alpha': sched.alpha[:-1],
          'sigma': sched.sigma[:-1], 'a': a, 'b': sched.sigma[1:] - a * sched.sigma[:-1]}
  return sched, xs


def _eps_fn(model_fn, prediction):
  """``eps(x, t, alpha, sigma)``: the model's prediction as eps, in x's dtype or wider.

  Unlike ``core.make_denoiser`` it does not cast to float32, so a float64 state (under
  ``jax.enable_x64(True)``) is inverted in float64.
  """

  def eps(x, t, alpha, sigma):
    t_b = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    out = jnp.asarray(model_fn(x, t_b))
    return processes.convert_prediction(out, x, alpha, sigma, source=prediction, target='eps')

  return eps


# EDICT's mixing weight, Wallace et al. (2023), and the step count it is kept up to.
MIX = 0.93
MIX_STEPS = 50


def default_mix(num_steps: int) -> float:
  """EDICT's p for ``num_steps``: 0.93 up to 50 steps, ``0.93^(50 / num_steps)`` beyond.

  The inverse mixing multiplies ``x - y`` by ``1 / p^2`` per step, so the inversion amplifies
  round-off in that direction by ``p^(-2 n)``: 1.4e3 at 50 steps with p = 0.93, but 5e12 at 200
  and 3e25 at 400, where the round trip failed (guided Gaussian oracle, float32: max |x - y| 361 /
  2e14 at 200 / 400 steps, round-trip RMS 2.6e-5 / 3.6e6; digits model at 200 steps: PSNR -9 dB).
  Beyond 50 steps this p keeps the amplification at its 50-step value (200 steps: p = 0.982).
  """
  return MIX if num_steps <= MIX_STEPS else MIX ** (MIX_STEPS / num_steps)


def _check_mix(mix, num_steps: int) -> float:
  if mix is None:
    return default_mix(num_steps)
  if not 0.5 <= float(mix) < 1.0:
    raise ValueError(f'EDICT: mix={mix!r} must lie in [0.5, 1) (Wallace et al. 2023 use 0.93; '
                     'None: default_mix); the inverse mixing divides by it, and mix = 1 uncouples '
                     'the two states.')
  return float(mix)


def edict_sample(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, y_T: jax.Array, *,
                 num_steps: int, prediction: str = 'eps', t_start: float | None = None,
                 mix: float | None = None, grid: str | None = None, spacing: str | None = None,
                 times=None, return_trajectory: bool = False, callback=None
                 ) -> tuple[tuple[jax.Array, jax.Array], dict]:
  """EDICT sampling (Wallace et al. 2023): the coupled DDIM updates from ``(x_T, y_T)``.

  Per step ``t_i -> t_{i+1}`` (module docstring; ``a, b`` from ``_edict_schedule``)::

      x' = a x + b eps(y, t_i)          y' = a y + b eps(x', t_i)
      x'' = p x' + (1 - p) y'           y'' = p y' + (1 - p) x''

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B]) -> prediction`` (guidance applied).
    process: any process of the contract.
    x_T, y_T: [B, ...] the coupled start (``edict_invert``'s result; plain sampling starts both
      at the same noise).
    num_steps: grid times; NFE = 2 num_steps.
    prediction: the model's prediction type.
    t_start: the time of the start (default t_max); the grid spans ``[t_min, t_start]``.
    mix: the mixing weight p in [0.5, 1); None: ``default_mix(num_steps)`` (0.93 up to 50 steps).
    grid, spacing, times: the grid (``core.make_schedule``), quadratic by default as ``ddim``.
    return_trajectory, callback: see ``core.scan_steps`` (the trajectory of x).

  Returns:
    ``((x_0, y_0), info)``, both [B, ...] in the dtype of x_T (float32, or float64 under x64),
    info with 'nfe'.
  """
  sched, xs = _edict_schedule(process, num_steps, grid=grid, spacing=spacing, times=times,
                              t_start=t_start, method='edict')
  p = _check_mix(mix, sched.num_steps)
  eps = _eps_fn(model_fn, prediction)

  def step(c, s):
    x, y = c
    x_mid = s['a'] * x + s['b'] * eps(y, s['t'], s['alpha'], s['sigma'])
    y_mid = s['a'] * y + s['b'] * eps(x_mid, s['t'], s['alpha'], s['sigma'])
    x_new = p * x_mid + (1 - p) * y_mid
    y_new = p * y_mid + (1 - p) * x_new
    return (x_new, y_new), x_new

  out, info = core.scan_steps(step, (x_T, y_T), xs, x_T=x_T, num_steps=sched.num_steps,
                              return_trajectory=return_trajectory, callback=callback)
  return out, {'nfe': 2 * sched.num_steps, **info}


def edict_invert(model_fn: Callable[..., jax.Array], process, x_0: jax.Array, *, num_steps: int,
                 prediction: str = 'eps', t_end: float | None = None,
                 mix: float | None = None,
                 grid: str | None = None, spacing: str | None = None, times=None,
                 return_trajectory: bool = False, callback=None
                 ) -> tuple[tuple[jax.Array, jax.Array], dict]:
  """EDICT inversion: the coupled start whose ``edict_sample`` is ``(x_0, x_0)``.

  Runs ``edict_sample``'s steps backwards, each update inverted exactly (module docstring)::

      y' = (y'' - (1 - p) x'') / p      x' = (x'' - (1 - p) y') / p
      y = (y' - b eps(x', t_i)) / a     x = (x' - b eps(y, t_i)) / a

  so the model sees the same states in both directions and the round trip is exact up to
  round-off. The inverted pair drifts apart (the mixing's inverse has eigenvalue ``1 / p^2`` on
  ``x - y``), which the sampler contracts back.

  Args:
    x_0: [B, ...] float data; both states start there.
    t_end: the time to invert to (default t_max): the ``t_start`` of ``edict_sample``.
    Others as ``edict_sample``.

  Returns:
    ``((x_T, y_T), info)`` in x_0's dtype, info with 'nfe' (2 num_steps).
  """
  sched, xs = _edict_schedule(process, num_steps, grid=grid, spacing=spacing, times=times,
                              t_start=t_end, method='edict_invert')
  p = _check_mix(mix, sched.num_steps)
  with jax.ensure_compile_time_eval():
    xs = {k: v[::-1] for k, v in xs.items()}
    xs['i'] = jnp.arange(sched.num_steps)
  eps = _eps_fn(model_fn, prediction)

  def step(c, s):
    x_new, y_new = c
    y_mid = (y_new - (1 - p) * x_new) / p
    x_mid = (x_new - (1 - p) * y_mid) / p
    y = (y_mid - s['b'] * eps(x_mid, s['t'], s['alpha'], s['sigma'])) / s['a']
    x = (x_mid - s['b'] * eps(y, s['t'], s['alpha'], s['sigma'])) / s['a']
    return (x, y), x

  out, info = core.scan_steps(step, (x_0, x_0), xs, x_T=x_0, num_steps=sched.num_steps,
                              return_trajectory=return_trajectory, callback=callback)
  return out, {'nfe': 2 * sched.num_steps, **info}


# The methods ``sampling.invert`` accepts: deterministic ones whose update runs backwards. Euler
# without churn is DDIM on the same grid (karras.py), so it inverts as DDIM.
INVERSIONS: dict[str, Callable[..., tuple[jax.Array, dict]]] = {
    'ddim': invert_ddim,
    'euler': invert_ddim,
    'dpmpp_2m': invert_dpmpp_2m,
}
