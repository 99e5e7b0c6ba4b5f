"""Exact log-likelihoods through the probability-flow ODE, and bits per dimension.

The probability-flow ODE ``dx/dt = f~(x, t) = f(t) x - g(t)^2/2 score(x, t)`` (Song et al. 2021,
eq. 13) is a continuous normalizing flow (Chen et al. 2018), so by the instantaneous change of
variables ``d log p_t(x_t)/dt = -div f~(x_t, t)`` and

    log p_{t0}(x) = log p_T(x_T) + int_{t0}^{T} div f~(x_t, t) dt,

with ``x_t`` the ODE's solution from ``x_{t0} = x`` (Song et al. 2021, Sec. 4.3 and App. D.2).
``log_likelihood`` integrates ``[x_t, int div]`` together with the adaptive Dormand-Prince solver of
``sampling/ode.py`` inside ``jit``, and replaces ``p_T`` by the process's prior. The divergence is
exact (D forward-mode Jacobian-vector products, for small D) or the Hutchinson-Skilling estimate
``eps^T (d f~/dx) eps`` with one fixed ``eps`` per solve (Grathwohl et al. 2019, FFJORD, Sec. 3.1),
which makes the log-likelihood an unbiased estimate.

What it measures: the model density of the data at ``t0 = t_start`` (default ``process.t_min``), the
ODE being stopped short of t = 0 for stability as in score_sde. With a perfect score this is the
density of the data noised to ``(alpha(t0), sigma(t0))``; score_sde's ``likelihood.py`` uses
``eps = 1e-5`` for every SDE.

The ODE solver controls the error of each example separately and steps all of them together, so
``log_likelihood`` is jittable and runs sharded over the batch under ``jit`` (no ``pmap``).
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes
from diffusion_jax import sde as sde_lib

# The module, not the package attribute: `diffusion_jax.sampling.ode` is the sampler function once
# sampling/__init__.py has run (`from .ode import ode`), so `from diffusion_jax.sampling import ode`
# returns the function whenever the package was imported first (as by the trainer).
ode_lib = importlib.import_module('diffusion_jax.sampling.ode')
guidance = importlib.import_module('diffusion_jax.sampling.guidance')

DIVERGENCES = ('hutchinson', 'exact')
NOISES = ('rademacher', 'gaussian')
DEQUANTIZATIONS = ('uniform', None)
_BITS_8 = 256  # levels of 8-bit data


def _divergence_exact(fn: Callable[[jax.Array], jax.Array], x: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """``fn(x)`` and its exact divergence per example, by one JVP per input dimension.

  ``fn`` must act on each example separately. Memory and time grow with D: for small data.
  x: [B, ...] -> ([B, ...], [B]).
  """
  b = x.shape[0]
  d = math.prod(x.shape[1:])
  basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
  basis = jnp.broadcast_to(basis, (d,) + x.shape)  # [D, B, ...], e_j in every example

  def jvp(v):
    return jax.jvp(fn, (x,), (v,))

  out, jv = jax.vmap(jvp)(basis)  # [D, B, ...] each
  # sum_j (J e_j)_j, per example.
  diag = jnp.einsum('jbj->b', jv.reshape(d, b, d))
  return out[0], diag


def _divergence_hutchinson(fn: Callable[[jax.Array], jax.Array], x: jax.Array, noise: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """``fn(x)`` and ``noise^T (dfn/dx) noise`` per example, by one forward-mode JVP."""
  out, jv = jax.jvp(fn, (x,), (noise,))
  return out, jnp.sum((jv * noise).reshape(x.shape[0], -1), axis=-1)


def log_likelihood(model_fn: Callable[..., jax.Array], process, x: jax.Array, *,
                   key: jax.Array | None, prediction: processes.Prediction = 'eps',
                   cond: Any = None, divergence: str = 'hutchinson', noise: str = 'rademacher',
                   rtol: float = 1e-5, atol: float = 1e-5, t_start: float | None = None,
                   max_steps: int = 4096, return_info: bool = False):
  """log p(x) in nats under the model's probability-flow ODE (Song et al. 2021, Sec. 4.3).

  Args:
    model_fn: ``model_fn(x, t, cond) -> prediction``, x: [B, ...], t: [B]; it must treat the
      examples of a batch independently (the divergence is taken through it).
    process: any process of the contract (the SDEs of ``sde.py`` or a ``DiscreteVP``).
    x: [B, ...] data, in the range and scale the model was trained on.
    key: PRNG key for the Hutchinson noise (unused, may be None, with ``divergence='exact'``).
    prediction: what model_fn returns: 'eps', 'x0', 'v' or 'score'.
    cond: the conditioning passed to every model call: a pytree whose leaves have the batch B of
      x as leading axis, or None (an unconditional model); log p(x | cond).
    divergence: 'exact' (D JVPs per evaluation; small D) or 'hutchinson' (one JVP, unbiased).
    noise: the Hutchinson probe, 'rademacher' (lower variance) or 'gaussian'.
    rtol, atol: the ODE solver's tolerances (1e-5 as score_sde).
    t_start: where the ODE starts, in ``(0, t_max)``; ``process.t_min`` when None. Below
      ``t_min`` the model is evaluated outside the times it was sampled at (score_sde trains its
      continuous models down to 1e-5 and evaluates likelihoods there).
    max_steps: the most solver step attempts.
    return_info: also return a dict with ``z`` (x_T, [B, ...]), ``delta_logp`` ([B], the
      integral), ``prior_logp`` ([B]), ``nfe`` (int32; one evaluation is one model call and its
      JVP) and ``success``.

  Returns:
    logp [B] in nats, or ``(logp, info)`` when ``return_info``.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f'divergence={divergence!r} is not known; use one of {DIVERGENCES}.')
  if noise not in NOISES:
    raise ValueError(f'noise={noise!r} is not known; use one of {NOISES}.')
  if divergence == 'hutchinson' and key is None:
    raise ValueError("divergence='hutchinson' draws its probe noise: pass key=jax.random.key(...) "
                     "(or use divergence='exact' for small data).")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f'rtol and atol must be positive; got rtol={rtol}, atol={atol}.')
  t0 = process.t_min if t_start is None else t_start
  if not 0 < float(t0) < float(process.t_max):
    raise ValueError(f't_start must lie in (0, t_max = {process.t_max}); got {t_start}.')
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 2:
    raise ValueError(f'x must be a batch [B, ...] with at least one data axis; got shape '
                     f'{x.shape}.')
  guidance.check_cond(cond, x.shape[0])
  if divergence == 'exact':
    probe = None
  elif noise == 'rademacher':
    probe = jax.random.rademacher(key, x.shape, jnp.float32)
  else:
    probe = jax.random.normal(key, x.shape, jnp.float32)
  logp, info = _solve(model_fn, process, x, probe, jnp.float32(t0), cond, prediction=prediction,
                      divergence=divergence, rtol=rtol, atol=atol, max_steps=max_steps)
  return (logp, info) if return_info else logp


# One compilation per (model_fn, settings, shapes): an eval loop that passes the same model_fn for
# every batch compiles once. Under jit the start time is traced, so a t_start below t_min is not
# refused by the process's check of concrete times (which guards the public API, not the solver).
@functools.partial(jax.jit, static_argnames=('model_fn', 'prediction', 'divergence', 'rtol',
                                             'atol', 'max_steps'))
def _solve(model_fn, process, x, probe, t0, cond, *, prediction, divergence, rtol, atol,
           max_steps):
  """The augmented PF-ODE from t0 to t_max: logp [B] and the info dict of ``log_likelihood``."""
  score_fn = ode_lib.score_fn_from_model(lambda x, t: model_fn(x, t, cond), process,
                                         prediction=prediction)

  def vector_field(t, state):
    x_t, _ = state
    drift = lambda y: sde_lib.probability_flow_drift(process, score_fn, y, t)
    if divergence == 'exact':
      return _divergence_exact(drift, x_t)
    return _divergence_hutchinson(drift, x_t, probe)

  state0 = (x, jnp.zeros(x.shape[:1], jnp.float32))
  sol = ode_lib.solve_ode(vector_field, state0, t0, process.t_max, rtol=rtol, atol=atol,
                          max_steps=max_steps)
  z, delta_logp = sol.y
  prior_logp = process.prior_logp(z)
  return prior_logp + delta_logp, {'z': z, 'delta_logp': delta_logp, 'prior_logp': prior_logp,
                                   'nfe': sol.nfe, 'success': sol.success}


def _to_8bit_levels(x) -> np.ndarray:
  """Levels 0..255 of 8-bit data given as ints or scaled to [-1, 1]; ValueError otherwise."""
  x_np = np.asarray(x)
  if np.issubdtype(x_np.dtype, np.integer):
    if x_np.size and (x_np.min() < 0 or x_np.max() > _BITS_8 - 1):
      raise ValueError(f'integer data must be 8-bit levels in [0, 255]; got values in '
                       f'[{x_np.min()}, {x_np.max()}].')
    return x_np.astype(np.float32)
  levels = (x_np.astype(np.float64) + 1.0) * (_BITS_8 - 1) / 2.0
  on_grid = np.abs(levels - np.round(levels)) < 1e-3
  if not (np.all(on_grid) and levels.min() > -1e-3 and levels.max() < _BITS_8 - 1 + 1e-3):
    raise ValueError(
        "dequantize='uniform' needs 8-bit data: uint8 levels in [0, 255], or floats k/127.5 - 1 "
        'in [-1, 1]; these values are not on that grid (e.g. continuous or already dequantized '
        'data). For continuous data pass dequantize=None: bits/dim is then -log2 p(x)/D of a '
        'density, which is not comparable to 8-bit bits/dim and can be negative.')
  return np.round(levels).astype(np.float32)


@jax.jit
def _dequantize(levels: jax.Array, key: jax.Array) -> jax.Array:
  """8-bit levels ``k`` -> ``(k + u)/128 - 1`` in [-1, 1), ``u ~ U[0, 1)``."""
  u = jax.random.uniform(key, levels.shape, jnp.float32)
  return (levels + u) / (_BITS_8 / 2) - 1.0


def bits_per_dim(model_fn: Callable[..., jax.Array], process, x, *, key: jax.Array,
                 num_draws: int = 4, dequantize: str | None = 'uniform',
                 prediction: processes.Prediction = 'eps', cond: Any = None,
                 divergence: str = 'hutchinson',
                 noise: str = 'rademacher', rtol: float = 1e-5, atol: float = 1e-5,
                 t_start: float | None = None) -> tuple[float, float]:
  """Bits per dimension of 8-bit data (or of continuous data), with its standard error.

  With ``dequantize='uniform'`` (Theis et al. 2016; Ho et al. 2019, Flow++, Sec. 3.1), each 8-bit
  level ``k in {0..255}`` becomes ``y = (k + u)/256 in [0, 1)``, ``u ~ U[0, 1)``, then the model's
  range ``z = 2y - 1 = (k + u)/128 - 1``. The 8-bit bin of ``k`` has width ``1/128`` in z, so
  ``log P(k) >= E_u[log p(z)] - D log 128`` (Jensen) and

      bpd = -log P(k) / (D ln 2) <= E_u[-log p(z)] / (D ln 2) + log2(128) = ... + 7.

  This is score_sde's ``bpd = -logp/(D ln 2) + 7`` (its ``offset = 7 - inverse_scaler(-1)``, 7 for
  data centered to [-1, 1] and 8 for data in [0, 1], where the bin width is 1/256); the estimate is
  an upper bound on the true bits/dim in expectation. A model trained on ``k/127.5 - 1`` sees the
  dequantized data in ``[-1, 1)`` squeezed by 255/256, as score_sde's models do.

  Without dequantization the density of discrete points is unbounded, and bits/dim can come out
  negative (score_sde issue #24), so 8-bit data with ``dequantize=None`` is refused; continuous
  data needs ``dequantize=None`` and then gets ``-log2 p(x)/D`` without offset.

  Args:
    model_fn: ``model_fn(x, t, cond) -> prediction`` on data in [-1, 1].
    process: any process of the contract.
    x: [B, ...] 8-bit data as integer levels in [0, 255] or floats ``k/127.5 - 1``; or, with
      ``dequantize=None``, continuous data in the model's range.
    key: PRNG key: draw d uses ``fold_in(key, d)`` for its dequantization and Hutchinson noise.
    num_draws: draws averaged per example (dequantization noise and Hutchinson probes).
    dequantize: 'uniform' or None (continuous data).
    prediction, cond, divergence, noise, rtol, atol, t_start: as ``log_likelihood``.

  Returns:
    ``(bpd_mean, bpd_stderr)`` as floats: the mean over examples of each example's mean over the
    draws, and its standard error over the examples (over the draws when B = 1).
  """
  if dequantize not in DEQUANTIZATIONS:
    raise ValueError(f'dequantize={dequantize!r} is not known; use one of {DEQUANTIZATIONS}.')
  if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
    raise ValueError(f'num_draws must be a positive int; got {num_draws!r}.')
  x_np = np.asarray(x)
  if dequantize is None:
    if np.issubdtype(x_np.dtype, np.integer):
      raise ValueError(
          'bits/dim of 8-bit (integer) data needs dequantize=\'uniform\': without dequantization '
          'the density of discrete data is unbounded and bits/dim can be negative '
          '(score_sde issue #24).')
    data = jnp.asarray(x_np, jnp.float32)
    offset = 0.0
  else:
    data = jnp.asarray(_to_8bit_levels(x_np))
    offset = math.log2(_BITS_8 / 2)  # log2 of 1 / (bin width 1/128 in [-1, 1]): 7 bits
  b = data.shape[0]
  d = math.prod(data.shape[1:])
  if b < 1 or d < 1:
    raise ValueError(f'x must be a non-empty batch [B, ...]; got shape {data.shape}.')

  def one_draw(k):
    k_deq, k_div = jax.random.split(k)
    z = data if dequantize is None else _dequantize(data, k_deq)
    logp = log_likelihood(model_fn, process, z, key=k_div, prediction=prediction, cond=cond,
                          divergence=divergence, noise=noise, rtol=rtol, atol=atol,
                          t_start=t_start)
    return -logp / (d * math.log(2.0)) + offset

  bpd = np.stack([np.asarray(one_draw(jax.random.fold_in(key, i))) for i in range(num_draws)])
  per_example = bpd.mean(axis=0)  # [B]
  if b > 1:
    stderr = per_example.std(ddof=1) / math.sqrt(b)
  elif num_draws > 1:
    stderr = bpd[:, 0].std(ddof=1) / math.sqrt(num_draws)
  else:
    stderr = float('nan')
  return float(per_example.mean()), float(stderr)
