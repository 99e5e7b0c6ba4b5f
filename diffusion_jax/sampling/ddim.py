"""Ancestral DDPM sampling (Ho et al. 2020) and DDIM (Song et al. 2021a).

Both evaluate the model once per grid time, so NFE = num_steps, and end with the step to the data,
where the posterior collapses onto the predicted x0.
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes
from diffusion_jax.sampling import core


def _require_key(key, method: str):
  if key is None:
    raise ValueError(f'method {method!r} is stochastic and needs a PRNG `key`.')
  return key


def ddpm(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
         key: jax.Array | None, prediction: str = 'eps', t_start: float | None = None,
         variance: Literal['small', 'large'] = 'small', grid: str | None = None,
         spacing: str | None = None, times=None, step_hook: core.StepHook | None = None,
         clip_x0: bool = False, dynamic_threshold: float | None = None,
         return_trajectory: bool = False, callback=None) -> tuple[jax.Array, dict]:
  """Ancestral sampling: Algorithm 2 of Ho et al. (2020), on any grid of any process.

  Each step samples ``q(x_s | x_t, x0 = x0_hat)`` (``processes.posterior``, Kingma et al. 2021
  eqs. 31-33); for DiscreteVP with ``num_steps == N`` on the uniform grid this steps through
  ``t = N, ..., 1`` and is exactly Ho et al.'s algorithm. The last step returns the predicted x0
  without noise, as Algorithm 2 at t = 1.

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B]) -> prediction``.
    process: any process of the contract.
    x_T: [B, ...] start noise at the prior's scale (the state at ``t_start`` when given).
    num_steps: model evaluations.
    key: PRNG key; step i draws its noise from ``fold_in(key, i)``.
    prediction: the model's prediction type.
    t_start: the time of x_T; the grid is laid out over [t_min, t_start] (default t_max).
    variance: 'small', the posterior variance beta_tilde (Ho et al. eq. 7), or 'large', beta
      (generalized to skipped steps as the variance of q(x_t | x_s), Ho et al. Sec. 3.2).
    grid, spacing: the time grid (``grids.make_grid``); 'uniform' by default.
    times: instead of grid/spacing, the grid itself: ``[num_steps]`` decreasing times
      (``core.make_schedule``).
    step_hook: ``step_hook(x, i, t, alpha, sigma) -> x`` after each step (``core.apply_hook``).
    clip_x0, dynamic_threshold: see ``core.make_denoiser``.
    return_trajectory, callback: see ``core.scan_steps``.

  Returns:
    x_0 [B, ...] float32 and an info dict with 'nfe'.
  """
  key = _require_key(key, 'ddpm')
  if variance not in ('small', 'large'):
    raise ValueError(f"variance={variance!r} is not known; use 'small' or 'large'.")
  sched = core.make_schedule(process, num_steps, grid=grid, spacing=spacing, times=times,
                             t_start=t_start, default_grid='uniform', method='ddpm')
  num_steps = sched.num_steps  # repeated grid times dropped (core.make_schedule)
  denoise = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)

  def step(x, xs):
    x0, _ = denoise(x, xs['t'], xs['alpha'], xs['sigma'])
    mean, var = processes.posterior(process, x, x0, xs['t'], xs['t_next'])
    if variance == 'large':
      _, var = processes.transition(process, xs['t'], xs['t_next'])
    z = core.noise(key, xs['i'], x)
    x_next = mean + jnp.sqrt(var) * z
    x_next = jnp.where(xs['last'], x0, x_next)
    if step_hook is not None:
      x_next = core.apply_hook(step_hook, x_next, xs['i'], xs['t_reached'], xs['alpha_next'],
                               xs['sigma_next'])
    return x_next, x_next

  xs = {'i': jnp.arange(num_steps), 't': sched.t, 't_next': sched.next_t(), 'last': sched.is_last(),
        'alpha': sched.alpha[:-1], 'sigma': sched.sigma[:-1]}
  if step_hook is not None:
    xs.update(t_reached=sched.reached_t(), alpha_next=sched.alpha[1:],
              sigma_next=sched.sigma[1:])
  x, info = core.scan_steps(step, x_T, xs, x_T=x_T, num_steps=num_steps,
                            return_trajectory=return_trajectory, callback=callback)
  return x, {'nfe': num_steps, **info}


def check_eta(eta) -> None:
  """Raises ValueError unless the (concrete) DDIM eta lies in [0, 1]; NaN is refused too.

  Above 1 the step's noise ``c`` can exceed ``sigma_s``, the noise level the step reaches
  (``sqrt(sigma_s^2 - c^2)`` is then imaginary): samples come out noisier than the marginal.
  """
  if not np.all((np.asarray(eta) >= 0) & (np.asarray(eta) <= 1)):
    raise ValueError(f'eta must lie in [0, 1] (0: deterministic DDIM, 1: the DDPM posterior '
                     f'variance), got {eta}.')


def ddim(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
         key: jax.Array | None = None, prediction: str = 'eps', t_start: float | None = None,
         eta: float = 0.0, grid: str | None = None, spacing: str | None = None, times=None,
         levels: core.Levels | None = None, step_hook: core.StepHook | None = None,
         clip_x0: bool = False, dynamic_threshold: float | None = None,
         return_trajectory: bool = False, callback=None) -> tuple[jax.Array, dict]:
  """DDIM: Song et al. (2021a), eq. 12, written for any alpha, sigma.

  ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with
  ``c = eta * (sigma_s / sigma_t) * sqrt(sigma_t^2 - alpha_t^2 sigma_s^2 / alpha_s^2)``: eta = 0 is
  the deterministic DDIM (Euler's method on the probability-flow ODE in ``sigma / alpha``, Karras et
  al. 2022, Sec. 3), eta = 1 the DDPM posterior variance.

  Args:
    eta: in [0, 1]; needs ``key`` when > 0 (noise of step i from ``fold_in(key, i)``).
    grid: the quadratic grid by default.
    levels: with ``times``, explicit noise levels (``core.Levels``): the state's at each time
      and where each step ends (``alpha_to``, ``sigma_to`` too), e.g. diffusers' DDIMScheduler
      (``pipelines.schedulers``), whose last step ends at ``alphas_cumprod[0]`` unless
      ``set_alpha_to_one``.
    Others as ``ddpm``.

  Returns:
    x_0 [B, ...] float32 and an info dict with 'nfe'.
  """
  traced = isinstance(eta, jax.core.Tracer)
  if not traced:  # a concrete array is checked as a number is
    check_eta(eta)
  stochastic = traced or bool(np.any(np.asarray(eta) > 0))
  if stochastic:
    key = _require_key(key, 'ddim with eta > 0')
  sched = core.make_schedule(process, num_steps, grid=grid, spacing=spacing, times=times,
                             t_start=t_start, method='ddim', levels=levels, levels_to=True)
  num_steps = sched.num_steps  # repeated grid times dropped (core.make_schedule)
  denoise = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)

  def step(x, xs):
    x0, eps = denoise(x, xs['t'], xs['alpha'], xs['sigma'])
    a_t, s_t, a_s, s_s = xs['alpha'], xs['sigma'], xs['alpha_next'], xs['sigma_next']
    x_next = a_s * x0
    if stochastic:
      c2 = jnp.square(eta * s_s / s_t) * jnp.maximum(s_t**2 - jnp.square(a_t * s_s / a_s), 0.0)
      x_next = (x_next + jnp.sqrt(jnp.maximum(s_s**2 - c2, 0.0)) * eps
                + jnp.sqrt(c2) * core.noise(key, xs['i'], x))
    else:
      x_next = x_next + s_s * eps
    if step_hook is not None:
      x_next = core.apply_hook(step_hook, x_next, xs['i'], xs['t_reached'], a_s, s_s)
    return x_next, x_next

  alpha_to, sigma_to = sched.step_ends()
  xs = {'i': jnp.arange(num_steps), 't': sched.t, 'alpha': sched.alpha[:-1],
        'sigma': sched.sigma[:-1], 'alpha_next': alpha_to, 'sigma_next': sigma_to}
  if step_hook is not None:
    xs['t_reached'] = sched.reached_t()
  x, info = core.scan_steps(step, x_T, xs, x_T=x_T, num_steps=num_steps,
                            return_trajectory=return_trajectory, callback=callback)
  return x, {'nfe': num_steps, **info}
