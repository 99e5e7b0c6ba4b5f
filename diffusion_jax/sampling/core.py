"""What every fixed-step sampler shares: schedule, denoiser, final step, scan and step hook.

A sampler sees the model only through a *denoiser* ``denoise(x, t) -> (x0, eps)`` in float32,
built here from a ``model_fn`` of any prediction type, with the optional clipping or dynamic
thresholding of the predicted x0 (Saharia et al. 2022, Sec. 2.3).

The schedule holds the grid times ``t: [n]`` and ``alpha, sigma: [n + 1]`` whose last entry is the
data (alpha = 1, sigma = 0): step ``i`` goes from ``t[i]`` to ``t[i + 1]`` and the last step from
``t[n - 1]`` to the data ("denoise to zero"). ``make_schedule`` lays the times out on a named grid
(``grids.py``), over ``[t_min, t_start]`` for a start at an intermediate time, or takes them as
given (``times=``).

A ``step_hook(x, i, t, alpha, sigma) -> x`` (``apply_hook``) sees the state every step reaches and
returns the state the sampler continues from: step ``i`` in ``0 .. n - 1``, the time ``t`` it
reached and the noise levels there; after the final step to the data ``t = 0``, ``alpha = 1``,
``sigma = 0`` (0 marks the data, which is no time of the process's grid). Inpainting (RePaint's
replacement, Lugmayr et al. 2022), for instance, puts ``alpha v + sigma z`` into the known
coordinates.

The data is the limit of the data prediction along the probability-flow ODE as
``s = (sigma / alpha)^2 -> 0``, and both the scaled state ``y = x / alpha`` and the data
prediction are smooth functions of ``s`` there (Tweedie: ``x0_hat = y + s grad log p_s(y)``, and
the ODE reads ``dy/ds = (y - x0_hat) / (2 s)``). Solvers written in log-SNR (DPM-Solver++, UniPC)
cannot step to lambda = +inf at their order, and an Euler step (Karras et al. 2022, Algorithm 2's
last step) is first order. ``extrapolate_to_data`` instead extrapolates the last ``k`` data
predictions to ``s = 0`` by a polynomial in ``s``, which keeps order ``k``: its error is
``O(s_{n-1} ... s_{n-k})``, below float32 resolution for k = 2 on usual grids.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes
from diffusion_jax.sampling import grids as grids_lib

# The longest step, as the ratio of its noise levels sigma / alpha at start and end, that a
# second-order start takes (heun's corrector, PNDM's pseudo-Heun first step); longer steps fall
# back to the first-order DDIM step. Their correction multiplies the change of eps over the step
# by its length in sigma / alpha, ~sigma_T / alpha_T: on the mixture oracle (DiscreteVP.linear)
# heun's first step 1000 -> 1 of the 2-step quadratic grid gave RMS 108 against DDIM's 0.55 at
# 3 NFE, PNDM's 108 / 24 at 3 / 4 NFE, and both blow up at alpha_T = 0 (issue 22). With 4 heun is
# within 1.31x of DDIM at the same NFE on the quadratic, Karras and uniform grids from 2 to 51
# NFE (8: 1.53x, 16: 3.1x) and unchanged from 26 steps on (experiments: tests/test_sampling.py).
MAX_CORRECTED_RATIO = 4.0


def short_steps(rho):
  """[n] whether step i of a schedule with ``rho`` [n + 1] = sigma / alpha (``Schedule.rho``)
  shrinks the noise level by at most ``MAX_CORRECTED_RATIO``: the steps a second-order start
  (heun's corrector, PNDM's pseudo-Heun first step) may take. False for a step to rho = 0 or
  from rho = inf (alpha_T = 0). NumPy or JAX arrays."""
  return rho[1:] * MAX_CORRECTED_RATIO >= rho[:-1]

# denoise(x, t, alpha=None, sigma=None) -> (x0, eps); alpha, sigma: the process's at t (scalars or
# [B]) when the caller has them, to save recomputing them.
Denoiser = Callable[..., tuple[jax.Array, jax.Array]]


class Levels(NamedTuple):
  """Explicit noise levels for explicit ``times``: another library's schedule, step for step.

  A sampler given ``times`` and ``levels`` evaluates the model at ``times[i]`` (what the model
  sees) and converts its prediction with ``alpha[i]``, ``sigma[i]`` instead of the process's
  levels at ``times[i]``, so a schedule whose model times and noise levels are not tied by one
  process reproduces exactly: diffusers' Euler interpolates sigma / alpha linearly between integer
  timesteps, its Karras schedules pass rounded timesteps with unrounded sigmas, and DDIM / PNDM
  end at ``alphas_cumprod[0]`` rather than at the data (``pipelines/schedulers.py``).

  Attributes:
    alpha: [n + 1] alpha of the state at each of the n times, then where the final step ends
      (1: the data).
    sigma: [n + 1] sigma likewise (the last 0: the data).
    alpha_to: [n] or None: where step i ends when that is not the next time's level (diffusers'
      DDIM and PNDM with 'linspace' spacing step by N // n whatever the next timestep is); only
      ``ddim`` and ``plms`` take it. None: ``alpha[1:]``.
    sigma_to: [n] or None, likewise.
    alpha_heun, sigma_heun: ``plms`` only, scalars or None: the level its pseudo-Heun
      correction of the first step starts from (diffusers' PNDM: that of timestep
      ``t_1 + N // n``, not t_0's with 'linspace' spacing). None: ``alpha[0]``, ``sigma[0]``.
  """

  alpha: Any  # [n + 1]
  sigma: Any  # [n + 1]
  alpha_to: Any = None  # [n]
  sigma_to: Any = None  # [n]
  alpha_heun: Any = None  # scalar
  sigma_heun: Any = None  # scalar


class Schedule(NamedTuple):
  """Grid times and the noise levels of every step's start and end.

  Attributes:
    t: [n] float32 grid times, decreasing; the model is evaluated there.
    alpha: [n + 1] alpha at the grid times, then 1 (the data), or ``Levels.alpha``.
    sigma: [n + 1] sigma at the grid times, then 0 (the data), or ``Levels.sigma``.
    alpha_to, sigma_to: [n] where each step ends when not at ``alpha[1:]``, ``sigma[1:]``
      (``Levels``); None otherwise.
  """

  t: jax.Array  # [n]
  alpha: jax.Array  # [n + 1]
  sigma: jax.Array  # [n + 1]
  alpha_to: jax.Array | None = None  # [n]
  sigma_to: jax.Array | None = None  # [n]

  def step_ends(self) -> tuple[jax.Array, jax.Array]:
    """``(alpha, sigma)`` [n] where each step ends: ``alpha[1:]``, ``sigma[1:]`` unless given."""
    if self.alpha_to is None:
      return self.alpha[1:], self.sigma[1:]
    return self.alpha_to, self.sigma_to

  @property
  def to_data(self) -> bool:
    """Whether the final step ends at the data (sigma = 0); concrete schedules only."""
    with jax.ensure_compile_time_eval():
      return bool(np.asarray(self.sigma[-1]) == 0)

  @property
  def num_steps(self) -> int:
    return self.t.shape[0]

  @property
  def log_snr(self) -> jax.Array:
    """lambda = log(alpha / sigma) per grid time [n] (half the log-SNR, as in Lu et al. 2022)."""
    return jnp.log(self.alpha[:-1]) - jnp.log(self.sigma[:-1])

  @property
  def rho(self) -> jax.Array:
    """sigma / alpha [n + 1], the noise level of the scaled ODE (Karras et al. 2022); ends at 0."""
    return self.sigma / self.alpha

  def rho_history(self, k: int) -> jax.Array:
    """[k] sigma / alpha at the last k grid times, newest first, padded with 1 where there are
    fewer: the noise levels of a multistep method's last k evaluations, as its carried history
    holds them at the end of the scan (for ``extrapolate_to_data``, computed while tracing)."""
    with jax.ensure_compile_time_eval():
      return jnp.concatenate([self.rho[self.num_steps - 1::-1][:k],
                              jnp.ones((max(k - self.num_steps, 0),), jnp.float32)])

  def next_t(self) -> jax.Array:
    """[n] the time each step ends at; the last step (to data) repeats its own time as a dummy."""
    return jnp.concatenate([self.t[1:], self.t[-1:]])

  def reached_t(self) -> jax.Array:
    """[n] the time each step ends at, 0 for the last step (the data): what ``step_hook`` sees."""
    return jnp.concatenate([self.t[1:], jnp.zeros((1,), jnp.float32)])

  def is_last(self) -> jax.Array:
    return jnp.arange(self.num_steps) == self.num_steps - 1


def check_times(process, times, *, num_steps: int, num_points: int | None = None,
                method: str = 'the sampler', per_step: str = 'one model-evaluation time per '
                'step', strict: bool = True) -> jax.Array:
  """An explicit grid of times, validated: float32 ``[num_points]``.

  Args:
    process: the process whose ``[t_min, t_max]`` bounds the times.
    times: 1-D, strictly decreasing, concrete (NumPy or a constant array; the schedule is made
      while tracing).
    num_steps: the ``num_steps`` the caller was given, for the message.
    num_points: how many times the method takes (default ``num_steps``).
    method, per_step: name the method and what its times are, for the message.
    strict: require strictly decreasing times; False allows repeats (explicit ``Levels`` tell
      the steps apart: diffusers' Karras timesteps are rounded and may repeat).

  Raises:
    ValueError: naming the shape, the values or the count to pass.
  """
  num_points = num_steps if num_points is None else num_points
  try:
    t_np = np.asarray(times, np.float32)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    raise ValueError(f'times must be a concrete 1-D array of times (NumPy, or a constant), got '
                     f'{type(times).__name__}.') from None
  if t_np.ndim != 1 or t_np.size < 1:
    raise ValueError(f'times must be 1-D with at least one time, got shape {t_np.shape}.')
  if not np.all(np.isfinite(t_np)):
    raise ValueError(f'times must be finite, got {t_np}.')
  if t_np.size > 1 and not np.all(np.diff(t_np) < 0 if strict else np.diff(t_np) <= 0):
    raise ValueError(f'times must be {"strictly " if strict else ""}decreasing (from noise to '
                     f'data), got {t_np}.')
  lo, hi = np.float32(process.t_min), np.float32(process.t_max)
  if t_np.min() < lo or t_np.max() > hi:
    raise ValueError(f'times must lie in [t_min, t_max] = [{float(lo)}, {float(hi)}] of '
                     f'{type(process).__name__}; got values in [{t_np.min()}, {t_np.max()}].')
  if t_np.size != num_points:
    want = t_np.size - (num_points - num_steps)
    raise ValueError(f'{method}: times has {t_np.size} entries but num_steps={num_steps} needs '
                     f'{num_points} ({per_step}); pass num_steps={want}.')
  return jnp.asarray(t_np)


def _drop_repeats(t: jax.Array) -> jax.Array:
  """A named grid's times without repeats (concrete grids only; traced ones pass unchanged).

  A grid rounded to integer steps repeats times once ``num_steps`` exceeds the distinct steps it
  can hold (``DiscreteVP`` with N = 10 and 11 uniform steps; N = 1000 and 2500 steps, of which
  'leading' spacing also puts 1501 at t = N): a step between equal times is 0 / 0 for the
  log-SNR solvers (NaN) and does nothing for the others. Dropping the repeats keeps the distinct
  times, so such a run is the run with that many steps (2500 steps on N = 1000: the 1000-step
  uniform grid, bit for bit), and the methods report the NFE they spent. Non-increasing grids are
  not expected (every grid decreases); only exact repeats are dropped.
  """
  if isinstance(t, jax.core.Tracer):
    return t
  t_np = np.asarray(t)
  keep = np.concatenate([[True], np.diff(t_np) != 0])
  return t if keep.all() else jnp.asarray(t_np[keep])


def make_schedule(process, num_steps: int, *, grid: str | None = None,
                  spacing: str | None = None, times=None, t_start: float | None = None,
                  default_grid: str = 'quadratic', method: str = 'the sampler',
                  shift: float = 1.0, levels: Levels | None = None,
                  levels_to: bool = False) -> Schedule:
  """The schedule: the grid times plus the final step to the data.

  Args:
    process: any process of the contract.
    num_steps: n, the number of grid times.
    grid: a key of ``grids.GRIDS``; None: ``default_grid``.
    spacing: the grid's spacing (``grids.make_grid``).
    times: instead of ``grid`` and ``spacing``, the grid itself: ``[n]`` strictly decreasing
      times in ``[t_min, t_max]`` (``check_times``); ``num_steps`` must equal ``len(times)``.
      The named grid's own times give the named grid's schedule, bit for bit.
    t_start: lay the named grid out over ``[t_min, t_start]`` (``grids.check_t_start``).
    default_grid: the method's default grid.
    method: the method's name, for messages.
    shift: SD3's time shift of the named grid (``grids.make_grid``); 1: none.
    levels: with ``times``, the noise levels to use instead of the process's (``Levels``);
      the times may then repeat (non-increasing).
    levels_to: whether the method takes ``Levels.alpha_to`` / ``sigma_to`` (``ddim``, ``plms``).

  With a concrete process (closed over, not a jit argument) the schedule is computed at trace time
  and enters the program as constants: nothing of it is compiled.
  """
  if times is not None:
    if grid is not None or spacing is not None:
      raise ValueError(f'{method}: give either grid/spacing or times (the grid itself), not '
                       f'both; got grid={grid!r}, spacing={spacing!r} and times.')
    if t_start is not None:
      raise ValueError(f'{method}: times and t_start were both given; explicit times start at '
                       'times[0], the time of x_T: drop t_start.')
    if shift != 1.0:
      raise ValueError(f'{method}: times and shift={shift} were both given; shift the times '
                       'yourself (grids.shift_times) or pass a named grid.')
    t = check_times(process, times, num_steps=num_steps, method=method,
                    strict=levels is None)
    if levels is not None:
      return _schedule_from_levels(t, levels, method=method, levels_to=levels_to)
  elif levels is not None:
    raise ValueError(f'{method}: levels are the noise levels of explicit times; pass times= '
                     'with them (one per step), not a named grid.')
  else:
    with jax.ensure_compile_time_eval():
      t = grids_lib.make_grid(process, num_steps, grid or default_grid, spacing=spacing,
                              t_start=t_start, shift=shift)
    if t_start is not None and not isinstance(t, jax.core.Tracer):
      t_np = np.asarray(t)
      if t_np.size > 1 and not np.all(np.diff(t_np) < 0):
        raise ValueError(f'{method}: t_start={t_start} leaves too short a span for {num_steps} '
                         f'distinct times on the {grid or default_grid!r} grid (got {t_np}); '
                         'take fewer steps or a larger t_start.')
    t = _drop_repeats(t)
  with jax.ensure_compile_time_eval():
    alpha = jnp.concatenate([process.alpha(t).astype(jnp.float32), jnp.ones((1,), jnp.float32)])
    sigma = jnp.concatenate([process.sigma(t).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])
  return Schedule(t=t, alpha=alpha, sigma=sigma)


def _schedule_from_levels(t: jax.Array, levels, *, method: str, levels_to: bool) -> Schedule:
  """The schedule of explicit ``times`` and ``Levels``, validated (ValueError naming the field)."""
  if not isinstance(levels, Levels):
    levels = Levels(*levels)
  n = t.shape[0]
  arrays = {}
  for name, size in (('alpha', n + 1), ('sigma', n + 1), ('alpha_to', n), ('sigma_to', n)):
    value = getattr(levels, name)
    if value is None:
      continue
    try:
      v = np.asarray(value, np.float32)
    except (TypeError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError):
      raise ValueError(f'{method}: levels.{name} must be concrete (NumPy or a constant), got '
                       f'{type(value).__name__}.') from None
    if v.shape != (size,):
      raise ValueError(f'{method}: levels.{name} must have shape ({size},) for {n} times '
                       f'(one per time{", then the end of the final step" if size > n else ""}); '
                       f'got {v.shape}.')
    if not np.all(np.isfinite(v)) or np.any(v < 0):
      raise ValueError(f'{method}: levels.{name} must be finite and >= 0, got {v}.')
    arrays[name] = v
  if ('alpha_to' in arrays) != ('sigma_to' in arrays):
    raise ValueError(f'{method}: give both levels.alpha_to and levels.sigma_to, or neither.')
  if 'alpha_to' in arrays and not levels_to:
    raise ValueError(f'{method}: levels.alpha_to / sigma_to (steps that end off the next time\'s '
                     "level) are taken by 'ddim' and 'plms' only.")
  if levels.alpha_heun is not None and method != 'plms':
    raise ValueError(f"{method}: levels.alpha_heun / sigma_heun are taken by 'plms' only.")
  if np.any(arrays['sigma'][:-1] <= 0):
    raise ValueError(f'{method}: levels.sigma must be > 0 at every time (only the end of the '
                     f'final step may be the data, sigma = 0); got {arrays["sigma"]}.')
  # Constants even inside jit (a pipeline's whole program), so that to_data can read them.
  with jax.ensure_compile_time_eval():
    to = {k: jnp.asarray(arrays[k]) for k in ('alpha_to', 'sigma_to') if k in arrays}
    return Schedule(t=t, alpha=jnp.asarray(arrays['alpha']), sigma=jnp.asarray(arrays['sigma']),
                    **to)


# --- the denoiser ---------------------------------------------------------------------------------


def dynamic_threshold_x0(x0: jax.Array, percentile: float) -> jax.Array:
  """Dynamic thresholding of Saharia et al. (2022), Sec. 2.3 (Imagen).

  ``s`` is the ``percentile`` (in [0, 100]) of ``|x0|`` per example, at least 1; ``x0`` is clipped
  to ``[-s, s]`` and divided by ``s``. x0: [B, ...].
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)
  s = processes._bcast(s, x0)  # pylint: disable=protected-access
  return jnp.clip(x0, -s, s) / s


def model_output(out: Any, shape: tuple[int, ...], prediction: str | None = None) -> jax.Array:
  """``out``, what a ``model_fn`` returned for an input of ``shape``, as float32 (the samplers
  integrate in float32 always).

  Raises:
    TypeError: ``out`` is not one array (a tuple, dict, None, ...).
    ValueError: its shape is not ``shape`` (a scalar or a [D] output is not broadcast).
  """
  what = f'its {prediction!r} prediction' if prediction else 'its prediction'
  if not hasattr(out, 'shape'):
    raise TypeError(f'model_fn must return one array shaped like x {tuple(shape)} ({what}); '
                    f'got a {type(out).__name__}.')
  if tuple(out.shape) != tuple(shape):
    raise ValueError(f'model_fn returned shape {tuple(out.shape)} for x of shape '
                     f"{tuple(shape)}; it must return {what} with x's shape.")
  return jnp.asarray(out).astype(jnp.float32)


def check_flag(value, name: str) -> bool:
  """``value`` when it is a bool (NumPy's too); ValueError naming ``name`` otherwise."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{name} is True or False, got {value!r}.')
  return bool(value)


def as_int(value) -> int | None:
  """``value`` as a Python int if it is a concrete integer (NumPy's too; not a bool), else None."""
  if isinstance(value, bool):
    return None
  try:
    return operator.index(value)
  except TypeError:
    return None


def check_order(order, allowed: tuple[int, ...], *, method: str) -> int:
  """``order`` as a Python int when it is an integer in ``allowed`` (NumPy integers too).

  An order above ``num_steps`` is not refused: the multistep methods' warm start takes
  ``min(order, i + 1)`` at step i, so e.g. order 2 at one step is the first-order (DDIM) step, as
  diffusers' lower-order warm start does.

  Raises:
    ValueError: a bool, a float (``2.0``), a string or an order outside ``allowed``, naming them.
  """
  value = as_int(order)
  if value not in allowed:
    raise ValueError(f'{method}: order={order!r} is not supported; use an int, one of {allowed}.')
  return value


def make_denoiser(model_fn: Callable[..., jax.Array], process, *, prediction: str,
                  clip_x0: bool = False, dynamic_threshold: float | None = None) -> Denoiser:
  """``denoise(x, t, alpha=None, sigma=None) -> (x0, eps)``, float32, from ``model_fn``.

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B]) -> [B, ...]`` of type ``prediction``; any guidance
      is already inside it.
    process: the process whose alpha, sigma convert the prediction.
    prediction: 'eps', 'x0', 'v' or 'score'.
    clip_x0: clip the predicted x0 to [-1, 1] (for data known to lie there), then recompute eps.
    dynamic_threshold: a percentile in (0, 100]: Imagen's dynamic thresholding of x0 instead.
  """
  if prediction not in processes.PREDICTIONS:
    raise ValueError(f'prediction={prediction!r} is not known; use one of {processes.PREDICTIONS}.')
  check_flag(clip_x0, 'clip_x0')
  if dynamic_threshold is not None and not 0 < float(dynamic_threshold) <= 100:
    raise ValueError(f'dynamic_threshold is a percentile in (0, 100], got {dynamic_threshold}.')

  def denoise(x: jax.Array, t: jax.Array, alpha: jax.Array | None = None,
              sigma: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    t_b = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    if alpha is None or sigma is None:
      alpha, sigma = process.alpha(t), process.sigma(t)
    out = model_output(model_fn(x, t_b), x.shape, prediction)
    convert = functools.partial(processes.convert_prediction, out, x, alpha, sigma,
                                source=prediction)
    x0 = convert(target='x0')
    if clip_x0 or dynamic_threshold is not None:
      if dynamic_threshold is not None:
        x0 = dynamic_threshold_x0(x0, float(dynamic_threshold))
      else:
        x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - bcast(alpha, x) * x0) / bcast(sigma, x)
    else:
      eps = convert(target='eps')
    return x0, eps

  return denoise


# --- the final step -------------------------------------------------------------------------------


def lagrange_weights_at_zero(s: jax.Array, k: jax.Array) -> jax.Array:
  """Weights ``w: [K]``, ``p(0) = sum_j w_j f(s_j)``, of the polynomial through the first k points.

  Args:
    s: [K] abscissae, distinct among the first k.
    k: int (may be traced), 1 <= k <= K; entries j >= k get weight 0.
  """
  num = s.shape[0]
  idx = jnp.arange(num)
  used = idx < k
  weights = []
  for j in range(num):
    w = jnp.float32(1.0)
    for m in range(num):
      if m == j:
        continue
      denom = s[m] - s[j]
      safe = jnp.where(used[m] & (denom != 0), denom, 1.0)
      w = w * jnp.where(used[m], s[m] / safe, 1.0)
    weights.append(jnp.where(used[j], w, 0.0))
  return jnp.stack(weights)


def extrapolate_to_data(x0_hist: jax.Array, rho_hist: jax.Array, k: jax.Array,
                        y: jax.Array | None = None) -> jax.Array:
  """The data, extrapolated from the last k data predictions to ``(sigma/alpha)^2 = 0``.

  Args:
    x0_hist: [K, B, ...] data predictions along the trajectory, newest first.
    rho_hist: [K] sigma / alpha where each was made.
    k: how many to use (int, may be traced): k = 1 returns ``x0_hist[0]`` (the DDIM/Euler step).
    y: [B, ...] the scaled state ``x / alpha`` where ``x0_hist[0]`` was made. With k >= 2, when
      the last two points are too close for a well-conditioned extrapolation (``s_1 < 2 s_0``, a
      grid dense near the data), the step uses ``(y + x0_hat) / 2`` instead: the exact solution of
      ``dy/ds = (y - x0_hat(s)) / (2 s)`` for x0_hat linear in s and y smooth at s = 0, whose
      error O(s_0^2) is then negligible.

  Returns:
    [B, ...] the extrapolated data (see the module docstring for why ``s = rho^2``).
  """
  s = jnp.square(rho_hist.astype(jnp.float32))
  w = lagrange_weights_at_zero(s, k)
  out = jnp.tensordot(w, x0_hist, axes=1)
  if y is not None:
    close = (k >= 2) & (s[1] < 2.0 * s[0])
    out = jnp.where(close, 0.5 * (y + x0_hist[0]), out)
  return out


_SERIES_TERMS = 12  # exp_remainder's power series for |x| < 1: truncation < 1e-9 relative


def exp_remainder(x: jax.Array, k: int) -> jax.Array:
  """``R_k(x) = (e^x - sum_{j < k} x^j / j!) / x^k = sum_{m >= 0} x^m / (k + m)!`` (k >= 1).

  The phi functions of exponential integrators (DPM-Solver, UniPC) are these at ``x = -h``, h a
  step in log-SNR: ``expm1(x) = x R_1(x)``, DPM-Solver's ``phi2 = h R_2(-h)``. Computed as the
  quotient above they lose ~k digits per halving of |x| in float32 (the reference codes'
  recursion ``R_{k+1} = (R_k - 1 / k!) / x``: 0.4% error in UniPC's third-order weight at
  h = 0.1, NaN at h = 0); for |x| < 1 the series (12 terms, Horner's rule) instead, exact to
  float32 rounding at every x and ``1 / k!`` at x = 0.
  """
  small = jnp.abs(x) < 1.0
  xs = jnp.where(small, x, 0.0)
  series = jnp.zeros_like(xs)
  for m in reversed(range(_SERIES_TERMS)):
    series = series * xs + 1.0 / math.factorial(k + m)
  safe = jnp.where(small, 1.0, x)
  quotient = jnp.expm1(safe) / safe
  for j in range(1, k):
    quotient = (quotient - 1.0 / math.factorial(j)) / safe
  return jnp.where(small, series, quotient)


def push(hist: jax.Array, value: jax.Array) -> jax.Array:
  """Shifts a fixed-size history ``[K, ...]`` (newest first) by one and puts ``value`` in front."""
  return jnp.concatenate([value[None].astype(hist.dtype), hist[:-1]], axis=0)


# --- the step hook --------------------------------------------------------------------------------

# step_hook(x, i, t, alpha, sigma) -> x, see the module docstring.
StepHook = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def apply_hook(step_hook: StepHook | None, x: jax.Array, i, t, alpha, sigma, *,
               skip: jax.Array | None = None) -> jax.Array:
  """``step_hook(x, i, t, alpha, sigma)`` as float32 of x's shape; x itself without a hook.

  Args:
    step_hook: the hook, or None.
    x: [B, ...] the state a step reached.
    i: the step's index (int32 scalar); t: the time it reached (0 for the data); alpha, sigma:
      the noise levels there (float32 scalars).
    skip: a traced bool: when true (an iteration that takes no step, e.g. a multistep method's
      last one, whose final step follows the scan) the hook is not run (``lax.cond``).
  """
  if step_hook is None:
    return x
  args = (jnp.asarray(i, jnp.int32), jnp.asarray(t, jnp.float32),
          jnp.asarray(alpha, jnp.float32), jnp.asarray(sigma, jnp.float32))

  def run(x):
    out = step_hook(x, *args)
    if not hasattr(out, 'shape'):  # a tuple, a list, None: jnp.shape would try to convert it
      raise ValueError(f'step_hook must return the state, an array of shape {x.shape}; got '
                       f'{type(out).__name__}.')
    if jnp.shape(out) != x.shape:
      raise ValueError(f'step_hook must return the state, shape {x.shape}; got shape '
                       f'{jnp.shape(out)}.')
    return jnp.asarray(out).astype(jnp.float32)

  if skip is None:
    return run(x)
  return jax.lax.cond(skip, lambda x: x, run, x)


# --- the scan -------------------------------------------------------------------------------------


def scan_steps(body: Callable[[Any, Any], tuple[Any, jax.Array]], carry: Any, xs: Any, *,
               x_T: jax.Array, num_steps: int, return_trajectory: bool = False,
               callback: Callable[[int, int], Any] | None = None,
               trajectory_from: int = 0) -> tuple[Any, dict]:
  """One ``lax.scan`` of ``body(carry, xs_i) -> (carry, x_after_i)`` with trajectory and progress.

  Args:
    body: one step; returns the new carry and the state it reached.
    carry, xs: as for ``lax.scan``; ``xs`` must hold ``'i'``, the iteration index [L].
    x_T: [B, ...] the start, first entry of the trajectory.
    num_steps: n, reported to ``callback`` as its second argument.
    return_trajectory: collect the states; they come back as ``info['trajectory']``,
      ``[n + 1, B, ...]`` with x_T first.
    callback: ``callback(step, num_steps)``, called under jit through an ordered
      ``jax.debug.callback`` after each step, with ``step`` in 1..n.
    trajectory_from: iterations before this one are not steps (a two-evaluation warm start);
      their states are left out of the trajectory and they do not report progress.

  Returns:
    The final carry and the info dict (with 'trajectory' when asked).
  """

  check_flag(return_trajectory, 'return_trajectory')
  # The per-step float scalars (the schedule's coefficients) reach the step as one row of a
  # [L, K] table that the previous iteration fetched into the carry, not as slices of xs:
  # XLA:CPU fuses a dynamic slice of a constant into every elementwise consumer and recomputes
  # its index per element (results bitwise equal either way).
  length = jax.tree.leaves(xs)[0].shape[0]
  names = sorted(k for k, v in xs.items()
                 if v.ndim == 1 and jnp.issubdtype(v.dtype, jnp.floating))
  table = jnp.stack([xs[k] for k in names], axis=1) if names else None  # one dtype: promoted
  rest = {k: v for k, v in xs.items() if k not in names}

  def wrapped(c_and_row, x_rest):
    c, row = c_and_row
    x_i = dict(x_rest, **{k: row[j].astype(xs[k].dtype) for j, k in enumerate(names)})
    c, x_new = body(c, x_i)
    if table is not None:
      row = table[jnp.minimum(x_i['i'] + 1, length - 1)]
    c = (c, row)
    if callback is not None:
      step = x_i['i'] + 1 - trajectory_from

      def report(s):
        s = int(s)
        if s >= 1:
          callback(s, num_steps)

      jax.debug.callback(report, step, ordered=True)
    return c, (x_new if return_trajectory else None)

  row0 = table[0] if table is not None else jnp.zeros((0,))
  (carry, _), states = jax.lax.scan(wrapped, (carry, row0), rest)
  info = {}
  if return_trajectory:
    info['trajectory'] = jnp.concatenate([x_T[None].astype(jnp.float32),
                                          states[trajectory_from:]], axis=0)
  return carry, info


def noise(key: jax.Array, i: jax.Array, like: jax.Array) -> jax.Array:
  """Standard normal noise for step ``i``: ``fold_in(key, i)`` (STYLE.md 1)."""
  return jax.random.normal(jax.random.fold_in(key, i), like.shape, jnp.float32)


def bcast(a: jax.Array, x: jax.Array) -> jax.Array:
  """A scalar or ``[B]`` array shaped to broadcast against ``x: [B, ...]``."""
  return processes._bcast(a, x)  # pylint: disable=protected-access
