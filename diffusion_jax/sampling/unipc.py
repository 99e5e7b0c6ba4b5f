"""UniPC: the unified predictor-corrector of Zhao et al. (2023), data-prediction form.

With ``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s`` and ``hh = -h``, both the
predictor UniP-p and the corrector UniC-p update

    x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(hh) m_s - alpha_t B(h) sum_k rho_k D_k,

where ``D_k = (m_k - m_s) / r_k`` are divided differences of earlier data predictions ``m_k`` at
``r_k = (lambda_k - lambda_s) / h``, ``B(h) = hh`` ('bh1') or ``expm1(hh)`` ('bh2'), and the weights
``rho`` solve ``R rho = b`` with ``R_jk = r_k^(j-1)`` and ``b_j = (j - 1)! phi_j(hh) / B(h)``
(Zhao et al. 2023, Algorithms 1-3 and Appendix; the ``b`` recursion and the fixed rho = 1/2 of
UniP-2 and UniC-1 follow their reference code). The corrector reuses the evaluation at the
predicted point, so it costs no extra NFE and raises the order from p to p + 1. NFE = num_steps.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sampling import core

_K = 3  # the largest order, the size of the history


def _b_vector(h: jax.Array, variant: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(b [K], B(h), expm1(hh))`` of the UniPC update for a step of log-SNR length h.

  ``b_a = (a + 1)! g_a / B(h)`` with ``g_a = (e^hh - sum_{j <= a + 1} hh^j / j!) / hh^(a + 1)``
  ``= hh R_{a + 2}(hh)`` (``core.exp_remainder``): as ``b_a = (a + 1)! R_{a + 2}(hh) / R_1(hh)``
  for 'bh2' (``B = expm1(hh) = hh R_1(hh)``) and ``(a + 1)! R_{a + 2}(hh)`` for 'bh1', exact to
  float32 rounding at any h, ``1 / (a + 2)`` at h = 0. (The reference code's recursion divides
  a rounding error by hh once per order: b_3 is 0.4% off at h = 0.1 and NaN at h = 0.)
  """
  hh = -h
  h_phi_1 = jnp.expm1(hh)
  b_h = hh if variant == 'bh1' else h_phi_1
  ratio = 1.0 if variant == 'bh1' else core.exp_remainder(hh, 1)  # B(h) / hh
  b = [math.factorial(a + 1) * core.exp_remainder(hh, a + 2) / ratio for a in range(_K)]
  return jnp.stack(b), b_h, h_phi_1


def _solve(r: jax.Array, b: jax.Array, size: jax.Array) -> jax.Array:
  """rho [K] solving ``sum_k r_k^a rho_k = b_a`` for a, k < size (traced); zeros beyond."""
  idx = jnp.arange(_K)
  mat = jnp.power(r[None, :], idx[:, None].astype(r.dtype))  # [a, k] = r_k^a
  used = idx < size
  mat = jnp.where(used[:, None] & used[None, :], mat, jnp.eye(_K, dtype=r.dtype))
  rhs = jnp.where(used, b, 0.0)
  return jnp.where(used, jnp.linalg.solve(mat, rhs), 0.0)


def _unipc_update(x_s, m, lam_hist, lam_s, lam_t, sigma_s, alpha_t, sigma_t, order, variant, *,
                  model_t=None):
  """One UniP (``model_t`` None) or UniC step of order ``order`` (traced, 1..K) from s to t.

  Args:
    x_s: [B, ...] the state at s.
    m: [K, B, ...] data predictions, m[0] at s, then older.
    lam_hist: [K] their lambdas (lam_hist[0] = lam_s).
    model_t: the data prediction at the predicted x_t, for the corrector.
  """
  h = lam_t - lam_s
  b, b_h, h_phi_1 = _b_vector(h, variant)
  # A step of zero length in log-SNR (float32 lambdas that tie) returns x_s: B(h) = expm1(hh) = 0
  # and the r_k are taken with h = 1 so that nothing is 0 / 0.
  h_safe = jnp.where(h == 0, 1.0, h)
  # r_k for the older predictions m[1..K-1]; the corrector adds r = 1 for model_t at position
  # order - 1.
  idx = jnp.arange(_K)
  r_old = (lam_hist - lam_s) / h_safe  # [K]: r_old[k] for m[k], k >= 1
  r_d = jnp.concatenate([r_old[1:], jnp.ones((1,), r_old.dtype)])  # [K], D_k uses m[k + 1]
  r_d = jnp.where(idx < order - 1, r_d, jnp.where(idx == order - 1, 1.0, 2.0 + idx))
  safe_r = jnp.where(r_d == 0, 1.0, r_d)
  d = (m[1:] - m[:1]) / core.bcast(safe_r[:_K - 1], m[1:])  # [K - 1, B, ...]
  base = (sigma_t / sigma_s) * x_s - alpha_t * h_phi_1 * m[0]
  if model_t is None:
    rhos = _solve(r_d, b, order - 1)
    rhos = jnp.where(order == 2, jnp.array([0.5, 0.0, 0.0]), rhos)
    res = jnp.tensordot(rhos[:_K - 1], d, axes=1)
  else:
    rhos = _solve(r_d, b, order)
    rhos = jnp.where(order == 1, jnp.array([0.5, 0.0, 0.0]), rhos)
    # rhos[order - 1] multiplies D_t = model_t - m_s; the others the history differences.
    mask = (idx[:_K - 1] < order - 1).astype(rhos.dtype)
    res = (jnp.tensordot(rhos[:_K - 1] * mask, d, axes=1)
           + rhos[jnp.clip(order - 1, 0, _K - 1)] * (model_t - m[0]))
  return jnp.where(h == 0, base, base - alpha_t * b_h * res)


def unipc(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *, num_steps: int,
          key: jax.Array | None = None, prediction: str = 'eps', t_start: float | None = None,
          order: int = 2, variant: Literal['bh1', 'bh2'] = 'bh2', corrector: bool = True,
          grid: str | None = None, spacing: str | None = None, times=None,
          levels: core.Levels | None = None, step_hook: core.StepHook | None = None,
          lower_order_final: bool | None = None,
          clip_x0: bool = False, dynamic_threshold: float | None = None,
          return_trajectory: bool = False, callback=None) -> tuple[jax.Array, dict]:
  """UniPC (Zhao et al. 2023): multistep UniP-p predictor with the UniC corrector.

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B]) -> prediction``.
    process: any process of the contract.
    x_T: [B, ...] start noise (the state at ``t_start`` when given).
    num_steps: model evaluations (one per grid time).
    key: unused (deterministic).
    prediction: the model's prediction type.
    t_start: the time of x_T; the grid is laid out over [t_min, t_start] (default t_max).
    order: p in {1, 2, 3}, the predictor's order (the corrector adds one); warm start
      ``min(p, i + 1)``.
    variant: 'bh1' or 'bh2' (the paper recommends bh1 unconditionally with few steps, bh2 with
      guidance).
    corrector: apply UniC after every evaluation (no extra NFE).
    grid, spacing: the time grid (``grids.make_grid``), quadratic by default.
    times: instead of grid/spacing, the grid itself: ``[num_steps]`` decreasing times
      (``core.make_schedule``).
    levels: with ``times``, explicit noise levels (``core.Levels``), e.g. diffusers'
      UniPCMultistepScheduler with Karras sigmas (``pipelines.schedulers``); when they end off
      the data (sigma > 0) the final step is the predictor's regular update onto that level.
    step_hook: ``step_hook(x, i, t, alpha, sigma) -> x`` after each step (``core.apply_hook``),
      on the predicted state, where the model is evaluated next; the corrector then refines that
      state from the previous (corrected) one, as diffusers' UniPC does with a pipeline's
      replacement of its output.
    lower_order_final: first-order final step to the data; default: only below
      ``dpm_solver.LOWER_ORDER_FINAL_BELOW`` steps.
    clip_x0, dynamic_threshold: see ``core.make_denoiser``.
    return_trajectory, callback: see ``core.scan_steps``.

  Returns:
    x_0 [B, ...] float32 and an info dict with 'nfe'.
  """
  from diffusion_jax.sampling import dpm_solver  # pylint: disable=import-outside-toplevel
  del key
  n = num_steps
  order = core.check_order(order, (1, 2, 3), method='unipc')
  if variant not in ('bh1', 'bh2'):
    raise ValueError(f"unipc: variant={variant!r} is not known; use 'bh1' or 'bh2'.")
  sched = core.make_schedule(process, n, grid=grid, spacing=spacing, times=times, t_start=t_start,
                             method='unipc', levels=levels)
  n = sched.num_steps  # repeated grid times dropped (core.make_schedule)
  to_data = levels is None or sched.to_data
  if lower_order_final is None:
    lower_order_final = n < dpm_solver.LOWER_ORDER_FINAL_BELOW
  denoise = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)
  lam = sched.log_snr
  steps = jnp.arange(n)
  orders = np.minimum(order, np.arange(n) + 1)
  if lower_order_final:
    orders = np.minimum(orders, n - np.arange(n))
  final_order = min(1 if lower_order_final else min(order + int(corrector), 2), n)  # dpm_solver
  if to_data:  # the last iteration's prediction (onto a dummy lambda) is discarded
    lam_next = jnp.concatenate([lam[1:], lam[-1:] + 1.0])
    alpha_next = jnp.concatenate([sched.alpha[1:-1], sched.alpha[-2:-1]])
    sigma_next = jnp.concatenate([sched.sigma[1:-1], sched.sigma[-2:-1]])
  else:  # it is the final step, onto the last level
    lam_next = jnp.log(sched.alpha[1:]) - jnp.log(sched.sigma[1:])
    alpha_next, sigma_next = sched.alpha[1:], sched.sigma[1:]
  if levels is None and order >= 3:  # coarse steps at most second order (dpm_solver)
    orders = dpm_solver.cap_third_order(orders, sched)
  orders = jnp.asarray(orders)
  xs = {'i': steps, 't': sched.t, 'lam': lam,
        'lam_next': lam_next,
        'lam_prev': jnp.concatenate([lam[:1] - 1.0, lam[:-1]]),  # i = 0: a dummy, unused
        'sigma': sched.sigma[:-1],
        'sigma_prev': jnp.concatenate([sched.sigma[:1], sched.sigma[:-2]]),
        'alpha': sched.alpha[:-1],
        'alpha_next': alpha_next, 'sigma_next': sigma_next,
        'order': orders, 'prev_order': jnp.concatenate([orders[:1], orders[:-1]])}
  if step_hook is not None:
    xs.update(t_reached=sched.reached_t(), last=sched.is_last())
  # carry: the (corrected) previous state, the predicted current state, the histories.
  carry = (x_T, x_T, jnp.zeros((_K,) + x_T.shape, jnp.float32), jnp.zeros((_K,), jnp.float32))

  def step(c, s):
    x_prev, x, m, lam_hist = c
    m_t, _ = denoise(x, s['t'], s['alpha'], s['sigma'])
    if corrector:
      x_corr = _unipc_update(x_prev, m, lam_hist, s['lam_prev'], s['lam'], s['sigma_prev'],
                             s['alpha'], s['sigma'], s['prev_order'], variant, model_t=m_t)
      x = jnp.where(s['i'] > 0, x_corr, x)
    m = core.push(m, m_t)
    lam_hist = core.push(lam_hist, s['lam'])
    # The last iteration's prediction (onto a dummy lambda) is discarded: the final step to the
    # data follows the scan.
    x_pred = _unipc_update(x, m, lam_hist, s['lam'], s['lam_next'], s['sigma'], s['alpha_next'],
                           s['sigma_next'], s['order'], variant)
    if step_hook is not None:
      x_pred = core.apply_hook(step_hook, x_pred, s['i'], s['t_reached'], s['alpha_next'],
                               s['sigma_next'], skip=s['last'] if to_data else None)
    return (x, x_pred, m, lam_hist), x_pred

  (x, x_pred, m, _), info = core.scan_steps(step, carry, xs, x_T=x_T, num_steps=n,
                                            return_trajectory=return_trajectory,
                                            callback=callback)
  if not to_data:
    return x_pred, {'nfe': n, **info}
  # The (corrected) state at the last grid time and the schedule's noise levels (weights
  # computed while tracing).
  with jax.ensure_compile_time_eval():
    x = core.extrapolate_to_data(m, sched.rho_history(_K), final_order, y=x / sched.alpha[-2])
  x = core.apply_hook(step_hook, x, n - 1, 0.0, 1.0, 0.0)  # the step to the data
  if return_trajectory:
    info['trajectory'] = info['trajectory'].at[-1].set(x)
  return x, {'nfe': n, **info}
