"""Adaptive-step probability-flow ODE sampling, and the Dormand-Prince solver it runs on.

The probability-flow ODE (Song et al. 2021, eq. 13) has the marginals of the forward process, so
integrating it from the prior at ``t_max`` down to ``t_min`` samples the data distribution
deterministically. As score_sde's ``ode`` sampler (which calls SciPy's RK45 on the host) it is
integrated by the Dormand-Prince 5(4) pair with error control, here inside ``jit`` as one
``lax.while_loop`` (``solve_ode``), so it runs on device, shards over the batch and compiles once.

``solve_ode`` is also what ``likelihood.py`` integrates the augmented ODE with.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes
from diffusion_jax import sde as sde_lib
from diffusion_jax.sampling import core
from diffusion_jax.sampling import grids

SOLVERS = ('dopri5',)

# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae", Table 2 (RK5(4)7M);
# Hairer, Norsett & Wanner, "Solving ODEs I", Table II.5.2.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# 5th-order weights are the last row of _A (FSAL); the error is y5 - y4, with weights b5 - b4.
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_ORDER = 5  # the exponent of the step-size controller uses min(5, 4) + 1


class ODESolution(NamedTuple):
  """The result of ``solve_ode``.

  Attributes:
    y: the state at ``t1`` (or where the solver stopped), same pytree as ``y0``.
    t: scalar, the time reached (``t1`` on success).
    nfe: int32 scalar, evaluations of the vector field.
    num_accepted: int32, accepted steps; num_rejected: int32, rejected steps.
    success: bool scalar, whether ``t1`` was reached within ``max_steps``.
  """

  y: Any
  t: jax.Array
  nfe: jax.Array
  num_accepted: jax.Array
  num_rejected: jax.Array
  success: jax.Array


def _lincomb(y, dt, coefs, ks):
  """``y + dt * sum_i coefs[i] * ks[i]`` over pytrees, skipping zero coefficients."""
  def leaf(y_leaf, *k_leaves):
    acc = jnp.zeros_like(y_leaf)
    for c, k in zip(coefs, k_leaves):
      if c != 0.0:
        acc = acc + c * k
    return y_leaf + dt * acc
  return jax.tree.map(leaf, y, *ks)


def _batch_rms(tree) -> jax.Array:
  """Per-example root-mean-square over all leaves ``[B, ...]``, then the max over the batch.

  Controlling the worst example, rather than the RMS over the whole batch as SciPy would on the
  flattened state, keeps every sample within tolerance whatever else is in the batch.
  """
  leaves = jax.tree.leaves(tree)
  b = leaves[0].shape[0]
  sq = sum(jnp.sum(jnp.square(l.reshape(b, -1)), axis=1) for l in leaves)
  n = sum(math.prod(l.shape[1:]) for l in leaves)
  return jnp.max(jnp.sqrt(sq / n))


def solve_ode(fn: Callable[[jax.Array, Any], Any], y0: Any, t0: float | jax.Array,
              t1: float | jax.Array, *, rtol: float = 1e-5, atol: float = 1e-5,
              max_steps: int = 4096, first_step: float | None = None) -> ODESolution:
  """Integrates ``dy/dt = fn(t, y)`` from ``t0`` to ``t1`` (either way) by Dormand-Prince 5(4).

  The embedded pair of Dormand & Prince (1980) with local extrapolation and FSAL (6 evaluations a
  step), the standard step-size controller ``h *= clip(0.9 err^(-1/5), 0.2, 10)`` (Hairer et al.,
  "Solving ODEs I", Sec. II.4) and their initial-step heuristic (2 evaluations). The error of a
  step is measured per example against ``atol + rtol * max(|y_n|, |y_{n+1}|)`` and the largest over
  the batch decides, so every leaf of ``y`` must carry the batch on its leading axis. Jittable: one
  ``lax.while_loop`` whose trip count is data dependent and at most ``max_steps`` attempts.

  Args:
    fn: the vector field ``fn(t, y) -> dy/dt``, ``t`` a float32 scalar, same pytree as ``y``.
    y0: the initial state, a pytree of float arrays ``[B, ...]``.
    t0, t1: start and end times.
    rtol, atol: tolerances.
    max_steps: the most step attempts (accepted or rejected).
    first_step: the first step's size; chosen by the heuristic when None.

  Returns:
    An ``ODESolution``.
  """
  t0 = jnp.asarray(t0, jnp.float32)
  t1 = jnp.asarray(t1, jnp.float32)
  direction = jnp.sign(t1 - t0)
  span = jnp.abs(t1 - t0)

  def scale(y_a, y_b=None):
    if y_b is None:
      return jax.tree.map(lambda a: atol + rtol * jnp.abs(a), y_a)
    return jax.tree.map(lambda a, b: atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)), y_a, y_b)

  def scaled_norm(tree, sc):
    return _batch_rms(jax.tree.map(lambda a, s: a / s, tree, sc))

  f0 = fn(t0, y0)
  nfe = jnp.int32(1)
  if first_step is None:
    # Hairer et al., Sec. II.4, "Starting step size".
    sc0 = scale(y0)
    d0, d1 = scaled_norm(y0, sc0), scaled_norm(f0, sc0)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6 * span, 0.01 * d0 / jnp.maximum(d1, 1e-30))
    h0 = jnp.minimum(h0, span)
    f1 = fn(t0 + direction * h0, _lincomb(y0, direction * h0, (1.0,), (f0,)))
    nfe += 1
    d2 = scaled_norm(jax.tree.map(lambda a, b: a - b, f1, f0), sc0) / jnp.maximum(h0, 1e-30)
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6 * span, h0 * 1e-3),
                   (0.01 / jnp.maximum(dmax, 1e-30)) ** (1.0 / _ORDER))
    h = jnp.minimum(jnp.minimum(100.0 * h0, h1), span)
  else:
    h = jnp.minimum(jnp.asarray(first_step, jnp.float32), span)

  def cond(carry):
    t, _, _, _, _, n_acc, n_rej = carry
    return (direction * (t1 - t) > 0) & (n_acc + n_rej < max_steps)

  def body(carry):
    t, y, k1, h, nfe, n_acc, n_rej = carry
    remaining = jnp.abs(t1 - t)
    last = h >= remaining
    h = jnp.minimum(h, remaining)
    dt = direction * h
    ks = [k1]
    for i in range(1, 7):
      y_i = _lincomb(y, dt, _A[i], ks)
      ks.append(fn(t + _C[i] * dt, y_i))
    y_new = y_i  # the 7th stage is evaluated at the 5th-order solution (FSAL)
    err = _lincomb(jax.tree.map(jnp.zeros_like, y), dt, _E, ks)
    err_norm = scaled_norm(err, scale(y, y_new))
    ok = jnp.isfinite(err_norm)
    accept = ok & (err_norm <= 1.0)
    factor = jnp.clip(0.9 * err_norm ** (-1.0 / _ORDER), 0.2, 10.0)
    factor = jnp.where(ok, jnp.where(accept, factor, jnp.minimum(factor, 1.0)), 0.2)
    t_new = jnp.where(accept, jnp.where(last, t1, t + dt), t)
    y_next = jax.tree.map(lambda a, b: jnp.where(accept, a, b), y_new, y)
    k_next = jax.tree.map(lambda a, b: jnp.where(accept, a, b), ks[6], k1)
    return (t_new, y_next, k_next, h * factor, nfe + 6, n_acc + accept.astype(jnp.int32),
            n_rej + (~accept).astype(jnp.int32))

  carry = (t0, y0, f0, h, nfe, jnp.int32(0), jnp.int32(0))
  t, y, _, _, nfe, n_acc, n_rej = jax.lax.while_loop(cond, body, carry)
  return ODESolution(y=y, t=t, nfe=nfe, num_accepted=n_acc, num_rejected=n_rej,
                     success=direction * (t1 - t) <= 0)


def score_fn_from_model(model_fn: Callable[..., jax.Array], process, *,
                        prediction: processes.Prediction) -> sde_lib.ScoreFn:
  """``score_fn(x, t)`` from ``model_fn(x, t) -> prediction`` (``processes.convert_prediction``)."""
  if prediction not in processes.PREDICTIONS:
    raise ValueError(f'prediction={prediction!r} is not known; use one of {processes.PREDICTIONS}.')

  def score_fn(x, t):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    pred = model_fn(x, t).astype(jnp.float32)
    return processes.convert_prediction(pred, x, process.alpha(t), process.sigma(t),
                                        source=prediction, target='score')

  return score_fn


def ode(model_fn: Callable[..., jax.Array], process, x_T: jax.Array, *,
        num_steps: int | None = None, key: jax.Array | None = None,
        prediction: processes.Prediction = 'eps', t_start: float | None = None,
        rtol: float = 1e-5, atol: float = 1e-5,
        solver: str = 'dopri5', max_steps: int = 4096, denoise: bool = True,
        return_trajectory: bool = False, callback: Callable[[int, int], Any] | None = None,
        clip_x0: bool = False, dynamic_threshold: float | None = None
        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Samples by the probability-flow ODE with adaptive steps (Song et al. 2021, Sec. 4.3).

  ``dx/dt = f(t) x - g(t)^2/2 score(x, t)`` (eq. 13) from ``t_max`` (or ``t_start``) to ``t_min``
  by ``solve_ode``
  (Dormand-Prince 5(4), the RK45 of score_sde's ODE sampler, rtol = atol = 1e-5 as there), for any
  process: for an SDE ``f`` and ``g`` are its own, for ``DiscreteVP`` they follow from its alpha and
  sigma (``sde.linear_sde_coefficients``). Deterministic: the same ``x_T`` gives the same ``x0``.
  Adaptive, it has no grid: ``times`` and ``step_hook`` (options of the fixed-step methods) are
  not accepted (TypeError).

  Args:
    model_fn: ``model_fn(x, t) -> prediction``, x: [B, ...], t: [B]; already guided.
    process: any process of the contract.
    x_T: [B, ...] start noise at the prior's scale (the state at ``t_start`` when given).
    num_steps: the solver picks its own steps; ``num_steps`` only sets how many equal pieces of
      ``[t_min, t_max]`` the trajectory is reported at when ``return_trajectory`` (else ignored).
    key: ignored (deterministic sampler).
    prediction: what model_fn returns: 'eps', 'x0', 'v' or 'score'.
    t_start: the time of x_T, in ``(t_min, t_max]``; the ODE is solved from there.
    rtol, atol: the solver's tolerances.
    solver: 'dopri5' (named ``solver``, not ``method``: ``sampling.sample`` takes ``method='ode'``).
    max_steps: the most step attempts; ``info['success']`` is False when they ran out.
    denoise: at ``t_min``, return the model's ``E[x0 | x_{t_min}]`` (one more evaluation; Tweedie's
      formula, ``x0 = (x + sigma^2 score) / alpha``) instead of ``x_{t_min}``, as score_sde's
      ``noise_removal``.
    return_trajectory: also return ``info['trajectory']``, ``[num_steps + 1, B, ...]``, the states
      at ``num_steps + 1`` equally spaced times from ``t_max`` to ``t_min``: the solve is then
      restarted at each of them (2 more evaluations per piece for the first step's size). With
      ``denoise`` the last entry is the returned x0, as for the other samplers.
    callback: ``callback(step, num_steps)`` after each piece (one piece without a trajectory).
    clip_x0, dynamic_threshold: applied to the model's x0 (``core.make_denoiser``); clipping
      changes the vector field, so an ODE with it has no longer the data's marginals.

  Returns:
    x0 [B, ...] and info: ``nfe`` (int32, model evaluations including the denoising one),
    ``num_accepted``, ``num_rejected``, ``success`` and, when asked, ``trajectory``.
  """
  del key
  if solver not in SOLVERS:
    raise ValueError(f'solver={solver!r} is not known; use one of {SOLVERS}.')
  if any(isinstance(v, jax.core.Tracer) for v in (rtol, atol)):
    raise ValueError('rtol and atol must be concrete numbers (they set the step-size '
                     'controller); under jax.jit close over them instead of passing them as '
                     'arguments.')
  if not (rtol > 0 and atol > 0):
    raise ValueError(f'rtol and atol must be positive; got rtol={rtol}, atol={atol}.')
  if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
    raise ValueError(f'max_steps must be a positive int; got {max_steps!r}.')
  pieces = 1
  if core.check_flag(return_trajectory, 'return_trajectory'):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError('return_trajectory=True reports the ODE at num_steps + 1 times: pass '
                       f'num_steps >= 1; got {num_steps!r}.')
    pieces = num_steps
  denoiser = core.make_denoiser(model_fn, process, prediction=prediction, clip_x0=clip_x0,
                                dynamic_threshold=dynamic_threshold)
  x_T = jnp.asarray(x_T, jnp.float32)

  def vector_field(t, x):
    def score_fn(x, t):
      _, eps = denoiser(x, t)
      return -eps / processes._bcast(process.sigma(t), x)  # pylint: disable=protected-access
    return sde_lib.probability_flow_drift(process, score_fn, x, t)

  t_start = grids.check_t_start(process, t_start)
  t_hi = process.t_max if t_start is None else t_start
  times = jnp.linspace(t_hi, process.t_min, pieces + 1, dtype=jnp.float32)

  def piece(carry, xs):
    x, nfe, n_acc, n_rej, success = carry
    i = xs['i']
    sol = solve_ode(vector_field, x, times[i], times[i + 1], rtol=rtol, atol=atol,
                    max_steps=max_steps)
    carry = (sol.y, nfe + sol.nfe, n_acc + sol.num_accepted, n_rej + sol.num_rejected,
             success & sol.success)
    return carry, sol.y

  zero = jnp.int32(0)
  carry = (x_T, zero, zero, zero, jnp.bool_(True))
  (x, nfe, n_acc, n_rej, success), info = core.scan_steps(
      piece, carry, {'i': jnp.arange(pieces)}, x_T=x_T, num_steps=pieces,
      return_trajectory=return_trajectory, callback=callback)
  if denoise:
    x, _ = denoiser(x, jnp.full(x.shape[:1], process.t_min, jnp.float32))
    nfe += 1
    if return_trajectory:
      info['trajectory'] = info['trajectory'].at[-1].set(x)
  info.update(nfe=nfe, num_accepted=n_acc, num_rejected=n_rej, success=success)
  # At run time (success is traced): an unfinished solve is not silent without return_info.
  jax.debug.callback(functools.partial(_warn_unfinished, max_steps=max_steps, rtol=rtol,
                                       atol=atol), success)
  return x, info


def _warn_unfinished(success, *, max_steps: int, rtol: float, atol: float) -> None:
  if not bool(np.all(success)):
    warnings.warn(f'ode: the solver used its max_steps={max_steps} step attempts before reaching '
                  't_min, so the samples are the unfinished state (info["success"] is False). '
                  f'Raise max_steps or loosen rtol={rtol} / atol={atol}.', RuntimeWarning,
                  stacklevel=2)
