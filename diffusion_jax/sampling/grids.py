"""Time grids for the fixed-step samplers.

Every grid function returns float32 times ``[num_steps]`` in the process's time domain, decreasing
from ``process.t_max`` (or near it) to ``process.t_min`` (or near it). The model is evaluated at
these times; after the last one the sampler takes a final step to clean data (alpha = 1,
sigma = 0, "denoise to zero"), which is not a grid time.

Grids (``GRIDS`` maps the names to the functions):

- ``'uniform'``: uniform in t, with diffusers' ``timestep_spacing`` conventions (``spacing=``):
  ``'linspace'`` spans ``[t_min, t_max]`` (ends at t_min); ``'trailing'`` is ``t_max * (1 - i / n)``
  on ``DiscreteVP`` (diffusers' convention) and ``t_min + (t_max - t_min) (1 - i / n)`` on
  continuous processes (starts at t_max; its final step to the data is as long as the others, as
  in DDIM/PNDM);
  ``'leading'`` is ``t_min + i * floor((N) / n)`` reversed (the DDIM-code convention; never reaches
  t_max). For ``DiscreteVP`` the times are rounded to integer steps, as the model was trained on
  them (a ``t_start`` between steps stays the first time), and ``num_steps == N`` gives exactly
  ``N, N - 1, ..., 1`` with any spacing (Ho et al. 2020, Algorithm 2).
- ``'logsnr'``: uniform in log-SNR lambda = log(alpha^2 / sigma^2) (Lu et al. 2022, DPM-Solver's
  ``logSNR`` skip type).
- ``'karras'``: the rho = 7 schedule of Karras et al. (2022), eq. 5, in the noise level
  sigma / alpha of the scaled ODE.
- ``'quadratic'``: quadratic in t, dense near the data (Song et al. 2021a, DDIM, Appendix D.2);
  not rounded to integer steps.
- ``'cosine'``: uniform in the time of a cosine schedule (Nichol & Dhariwal 2021) with its
  log-SNR shifted and widened (``cosine``), mapped to the process's times through log-SNR: steps
  densest around a fixed noise level whatever the process's own time parametrization.
- ``'optimized'``: the cosine grid with a table of log-SNR offsets fitted for few steps on the
  oracle panel that chooses the sampler defaults (``optimized``; in the spirit of Align Your
  Steps, Sabour et al. 2024).

``spacing`` for the others: ``'linspace'`` (their default) runs the n times from ``t_max`` to
``t_min`` inclusive, so the last model evaluation is at ``t_min``, where the final step to the data
is tiny; ``'trailing'`` lays out n + 1 times the same way and evaluates the first n, so the final
step to the data is as long as its neighbours, as uniform 'trailing' does. With few steps that
evaluation is worth having: on the mixture oracle at 5 NFE, DPM-Solver++(2M) on the quadratic grid
has RMS error 0.275 with 'linspace' and 0.155 with 'trailing' (``experiments/bench_samplers.py``).
As n grows 'linspace' converges with the solver's full order; 'trailing' ends its last step at a
noise level that shrinks with n, so it is for few steps. 'leading' is for 'uniform' only.

``shift`` (every grid, ``make_grid``): the time shift of Esser et al. (2024), SD3, eq. 23,
``t' = shift t / (1 + (shift - 1) t)``, applied to the grid's times rescaled from ``[t_min, t_hi]``
to ``[0, 1]`` (``t_hi``: t_max or t_start), so both ends stay where they were; for
``RectifiedFlow`` (t in [1e-3, 0.999]) it is SD3's formula on t up to 1e-3. ``shift > 1`` moves
the times toward the noise (SD3 uses 3.0 at 1024^2); 1 leaves the grid unchanged, bit for bit.
On a grid rounded to integer steps (``DiscreteVP``, 'uniform') the shifted times are rounded
again, and the repeats this may make are dropped by the samplers (``core.make_schedule``).

``t_start`` (every grid): lay the grid out over ``[t_min, t_start]`` instead of ``[t_min, t_max]``,
for a sampler that starts from a state at an intermediate time (img2img, SDEdit: Meng et al.
2022). ``t_start = t_max`` gives the same times as ``None``, bit for bit.
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

Spacing = Literal['trailing', 'linspace', 'leading']
SPACINGS = ('trailing', 'linspace', 'leading')


def _is_discrete(process) -> bool:
  """A process with integer DDPM steps (``DiscreteVP``): its model was trained on integer t."""
  return hasattr(process, 'num_timesteps') and hasattr(process, 'betas')


def _check_num_steps(num_steps: int) -> int:
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}.')
  return int(num_steps)


def _t_hi(process, t_start: float | None) -> float:
  """The grid's upper end: ``t_max``, or ``t_start`` (checked by ``check_t_start``)."""
  return float(process.t_max) if t_start is None else float(t_start)


def check_t_start(process, t_start, *, name: str = 't_start') -> float | None:
  """``t_start`` as a float in ``(t_min, t_max]``, or None; ValueError naming the domain.

  It must be concrete (a Python or NumPy number, not a traced value): the grid is laid out while
  tracing.
  """
  if t_start is None:
    return None
  try:
    if isinstance(t_start, (str, bytes, bool)):
      raise TypeError
    value = float(t_start)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    raise ValueError(f'{name} must be a concrete number (the grid is laid out while tracing), '
                     f'got {t_start!r}.') from None
  lo, hi = float(process.t_min), float(process.t_max)
  if not lo < value <= hi:
    raise ValueError(f'{name}={value} must lie in (t_min, t_max] = ({lo}, {hi}] of '
                     f'{type(process).__name__}.')
  return value


def _open_or_closed(num_steps: int, spacing: Spacing | None) -> tuple[int, int]:
  """(points to lay out, points to keep) for a non-uniform grid's ``spacing``."""
  n = _check_num_steps(num_steps)
  spacing = spacing or 'linspace'
  if spacing == 'linspace':
    return n, n
  if spacing == 'trailing':
    return n + 1, n
  raise ValueError(f"spacing={spacing!r} is for the 'uniform' grid only; the log-SNR, Karras "
                   "and quadratic grids take 'linspace' or 'trailing'.")


def uniform(process, num_steps: int, *, spacing: Spacing | None = 'trailing',
            t_start: float | None = None) -> jnp.ndarray:
  """Times uniform in t (Ho et al. 2020; Song et al. 2021a), with a ``timestep_spacing`` convention.

  Args:
    process: any process of the contract.
    num_steps: n, the number of model evaluations of a one-evaluation-per-step sampler.
    spacing: 'trailing', 'linspace' or 'leading' (see the module docstring).
    t_start: the upper end instead of ``t_max`` (module docstring).

  Returns:
    float32 ``[n]``, decreasing.
  """
  n = _check_num_steps(num_steps)
  spacing = spacing or 'trailing'
  if spacing not in SPACINGS:
    raise ValueError(f'spacing={spacing!r} is not known; use one of {SPACINGS}.')
  t_min, t_max = float(process.t_min), _t_hi(process, t_start)
  discrete = _is_discrete(process)
  if spacing == 'linspace':
    t = np.linspace(t_max, t_min, n) if n > 1 else np.array([t_max])
  elif spacing == 'trailing':
    if discrete:
      t = t_max * (1.0 - np.arange(n) / n)  # diffusers' 'trailing' on the steps 1..N
    else:  # n + 1 points of [t_min, t_max], the first n: all of them above t_min
      t = t_min + (t_max - t_min) * (1.0 - np.arange(n) / n)
  else:  # leading
    if discrete:
      ratio = max(int(t_max) // n, 1)
      t = t_min + ratio * np.arange(n)[::-1]
    else:
      t = t_min + (t_max - t_min) * np.arange(n)[::-1] / n
  if discrete:
    # Integer steps, as the model was trained on; a t_start between steps stays the first time
    # (x_T's), so sampling starts where x_T is.
    start_between = spacing != 'leading' and t_max != round(t_max)
    t = np.round(t)
    if start_between:
      t[0] = t_max
  return jnp.asarray(np.clip(t, t_min, t_max), jnp.float32)


def _times_from_log_snr(process, lam: jnp.ndarray, n: int, t_hi: float) -> jnp.ndarray:
  """The first ``n`` of the times at log-SNRs ``lam`` (laid out from t_hi to t_min), float32.

  The ends are pinned to t_hi and t_min: the inverse's interpolation error must not leave the
  domain.
  """
  t = process.t_from_log_snr(lam)
  t = t.at[0].set(t_hi)
  if lam.shape[0] > 1:
    t = t.at[-1].set(process.t_min)
  return jnp.clip(t[:n], process.t_min, t_hi).astype(jnp.float32)


# The lowest log-SNR log(alpha^2 / sigma^2) the log-SNR grid spaces its steps from: below the
# usual schedules' ends (DDPM linear -10.1, VE SDE -7.8, rectified flow -13.8, the improved-DDPM
# cosine schedule -19.8), so it only acts on zero-terminal-SNR schedules.
LOGSNR_FLOOR = -20.0


def logsnr(process, num_steps: int, *, spacing: Spacing | None = None,
           t_start: float | None = None) -> jnp.ndarray:
  """Times uniform in log-SNR between ``t_max`` (or ``t_start``) and ``t_min`` (Lu et al. 2022,
  Sec. 3.4).

  Below ``LOGSNR_FLOOR`` the spacing starts at the floor (the first time stays ``t_max``): on a
  zero-terminal-SNR schedule (log-SNR(t_max) ~ -47) uniform spacing from t_max put half of 10
  steps where alpha < 1e-3 and x_t says next to nothing about the data, and PNDM's steps there
  blew up (issue 22). ``spacing``: 'linspace' (default) or 'trailing' (see the module docstring).
  """
  m, n = _open_or_closed(num_steps, spacing)
  t_hi = _t_hi(process, t_start)
  lam_hi = process.log_snr(jnp.float32(process.t_min))
  lam_lo = process.log_snr(jnp.float32(t_hi))
  lam_lo = jnp.where(lam_hi > LOGSNR_FLOOR, jnp.maximum(lam_lo, LOGSNR_FLOOR), lam_lo)
  if _traced(lam_lo, lam_hi):  # a traced process (a jit argument)
    lam = jnp.linspace(lam_lo, lam_hi, m) if m > 1 else lam_lo[None]
  else:  # NumPy: the same times eagerly, under jit and in make_schedule (jnp's differ by an ulp)
    lam = np.linspace(float(lam_lo), float(lam_hi), m)
  return _times_from_log_snr(process, jnp.asarray(lam, jnp.float32), n, t_hi)


def karras(process, num_steps: int, *, rho: float = 7.0, spacing: Spacing | None = None,
           t_start: float | None = None) -> jnp.ndarray:
  """The schedule of Karras et al. (2022), eq. 5, in the scaled noise level sigma / alpha.

  ``s_i = (s_max^(1/rho) + i / (n - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` with
  ``s = sigma / alpha`` at ``t_max`` (or ``t_start``) and ``t_min``, mapped back to times through
  log-SNR = -2 log s. ``spacing``: 'linspace' (default) or 'trailing' (see the module docstring).
  """
  m, n = _open_or_closed(num_steps, spacing)
  t_hi = _t_hi(process, t_start)
  s_min = jnp.exp(-0.5 * process.log_snr(jnp.float32(process.t_min)))
  s_max = jnp.exp(-0.5 * process.log_snr(jnp.float32(t_hi)))
  u = jnp.linspace(0.0, 1.0, m) if m > 1 else jnp.zeros((1,))
  s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
  return _times_from_log_snr(process, -2.0 * jnp.log(s), n, t_hi)


def quadratic(process, num_steps: int, *, spacing: Spacing | None = None,
              t_start: float | None = None) -> jnp.ndarray:
  """Times quadratic in the step index, dense near the data (Song et al. 2021a, App. D.2).

  ``spacing``: 'linspace' (default) or 'trailing' (see the module docstring); ``t_start``: the
  upper end instead of ``t_max``.
  """
  m, n = _open_or_closed(num_steps, spacing)
  t_min, t_max = float(process.t_min), _t_hi(process, t_start)
  u = (np.linspace(1.0, 0.0, m) if m > 1 else np.ones((1,)))[:n]
  # Not rounded for DiscreteVP: rounding would repeat times near t_min once n is large.
  t = t_min + (t_max - t_min) * u**2
  return jnp.asarray(np.clip(t, t_min, t_max), jnp.float32)


# The shape of grid='cosine', chosen among center in {-1, -0.5, 0} x width in {1.5, 2, 2.5} on the
# choosing panel of experiments/sampler_panel.py (issue 22): steps densest at sigma / alpha ~ 1.6,
# spread over about twice the cosine schedule's range of log-SNR.
COSINE_CENTER = -0.5
COSINE_WIDTH = 2.0


def cosine(process, num_steps: int, *, spacing: Spacing | None = None,
           t_start: float | None = None, center: float = COSINE_CENTER,
           width: float = COSINE_WIDTH) -> jnp.ndarray:
  """Times uniform in the time u of a cosine schedule whose log-SNR is shifted and scaled.

  The cosine schedule (Nichol & Dhariwal 2021, without its offset) has ``lambda(u) = log(alpha /
  sigma) = log cot(pi u / 2)``; uniform in u it spends its steps around lambda = 0 with a density
  ``sech(lambda)`` in lambda. This grid takes ``lambda(u) = center + width log cot(pi u / 2)``
  (shifted as in Hoogeboom et al. 2023's shifted cosine schedule, and widened by ``width``), u
  uniform between the values at ``t_max`` (or ``t_start``) and ``t_min``, mapped back to the
  process's times through its log-SNR: on any process it places the steps where a model trained
  with that cosine schedule would have them. Equivalently ``lambda = center + width gd^-1(y)``, y
  uniform, with the Gudermannian ``gd(x) = 2 arctan(tanh(x / 2))``. The defaults (-0.5, 2,
  ``COSINE_CENTER`` / ``COSINE_WIDTH``) are the shape chosen on the oracle panel; center 0 and
  width 1 give the cosine schedule's own uniform times.

  Args:
    process: any process of the contract.
    num_steps: n.
    spacing: 'linspace' (default) or 'trailing' (see the module docstring).
    t_start: the upper end instead of ``t_max``.
    center: the lambda = log(alpha / sigma) the steps are densest at (0: sigma = alpha).
    width: the scale of lambda (1: the cosine schedule's own density).

  Returns:
    float32 ``[n]``, decreasing.

  Raises:
    ValueError: a width that is not positive, or a spacing other than 'linspace' / 'trailing'.
  """
  m, n = _open_or_closed(num_steps, spacing)
  if not width > 0:
    raise ValueError(f'width must be positive, got {width!r}.')
  t_hi, lam_lo, lam_hi = _lambda_ends(process, t_start)
  lam = _cosine_log_snr(lam_lo, lam_hi, m, center, width)
  return _times_from_log_snr(process, jnp.asarray(2.0 * lam, jnp.float32), n, t_hi)


def _lambda_ends(process, t_start: float | None):
  """The grid's upper time and lambda = log(alpha / sigma) at it and at ``t_min``: floats, or
  float32 tracers where the process is traced (a jit argument)."""
  t_hi = _t_hi(process, t_start)
  lam_lo = 0.5 * process.log_snr(jnp.float32(t_hi))
  lam_hi = 0.5 * process.log_snr(jnp.float32(process.t_min))
  if _traced(lam_lo, lam_hi):
    return t_hi, lam_lo, lam_hi
  return t_hi, float(lam_lo), float(lam_hi)


def _traced(*values) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in values)


def _cosine_log_snr(lam_lo, lam_hi, m: int, center: float, width: float):
  """``m`` values of lambda = log(alpha / sigma) from ``lam_lo`` to ``lam_hi``, uniform in the
  shifted, widened cosine schedule's time (``cosine``): float64 NumPy, or float32 jnp from
  traced ends."""
  xp = jnp if _traced(lam_lo, lam_hi) else np
  gd = lambda x: 2.0 * xp.arctan(xp.tanh(x / 2.0))
  y = xp.linspace(gd((lam_lo - center) / width), gd((lam_hi - center) / width), m)
  return center + width * 2.0 * xp.arctanh(xp.tan(y / 2.0))


# grid='optimized': offsets in lambda = log(alpha / sigma) added to the interior times of the
# cosine grid (COSINE_CENTER, COSINE_WIDTH, 'trailing'), from the step after x_T's to the last
# model evaluation, at evenly spaced positions; other step counts interpolate them linearly in
# the position. Fitted by Nelder-Mead for UniPC-3 (bh2) at 8, 10 and 14 steps together on the
# choosing panel of experiments/sampler_panel.py (the worst log-ratio to the best candidate per
# oracle plus 0.2 x the mean log-ratio), starting from a fit at 10 steps alone; the commands are
# in experiments/sampler_grid_fit.py. Rounded to 0.01.
OPTIMIZED_OFFSETS = (0.12, -0.72, -0.53, -0.26, -0.5, -0.32, -0.07, 0.5, -0.39)
MIN_LOG_SNR_STEP = 0.05  # the optimized grid's smallest step in lambda (keeps its times distinct)


def optimized(process, num_steps: int, *, spacing: Spacing | None = None,
              t_start: float | None = None) -> jnp.ndarray:
  """The cosine grid with per-position log-SNR offsets fitted on an oracle panel.

  In the spirit of Align Your Steps (Sabour et al. 2024): a fixed table of offsets
  (``OPTIMIZED_OFFSETS``, in lambda = log(alpha / sigma)) added to the interior points of
  ``cosine`` (its default shape), interpolated linearly in the relative
  position for any step count, so the ends stay those of the cosine grid. Offsets that would
  reorder the times are held at ``MIN_LOG_SNR_STEP`` apart. The table was fitted for few steps
  (8-14); the sampler defaults take this grid only where the panel chose it
  (``sampling/defaults.py``).

  Args:
    process: any process of the contract.
    num_steps: n.
    spacing: 'linspace' (default, as the other non-uniform grids) or 'trailing' (the table's
      fit and the sampler defaults; see the module docstring).
    t_start: the upper end instead of ``t_max``.

  Returns:
    float32 ``[n]``, decreasing.

  Raises:
    ValueError: a spacing other than 'linspace' / 'trailing'.
  """
  m, n = _open_or_closed(num_steps, spacing)
  t_hi, lam_lo, lam_hi = _lambda_ends(process, t_start)
  lam = _cosine_log_snr(lam_lo, lam_hi, m, COSINE_CENTER, COSINE_WIDTH)
  if m > 2:
    table = np.asarray(OPTIMIZED_OFFSETS, np.float64)
    offsets = np.interp(np.linspace(0.0, 1.0, m - 2), np.linspace(0.0, 1.0, len(table)), table)
    # NumPy (float64), or jnp (float32) where the process is traced (a jit argument).
    xp, running_max = ((jnp, jax.lax.cummax) if _traced(lam)
                       else (np, np.maximum.accumulate))
    interior = xp.clip(lam[1:m - 1] + offsets, lam_lo, lam_hi)
    # Distinct and increasing, the ends unchanged: lam[i] = max(lam[i], lam[i - 1] + step) for
    # 0 < i < m - 1, as a running maximum of lam[i] - i step.
    rise = MIN_LOG_SNR_STEP * xp.arange(m - 1)
    head = running_max(xp.concatenate([lam[:1], interior]) - rise) + rise
    hi_room = lam_hi - MIN_LOG_SNR_STEP * xp.arange(m - 1, -1, -1)
    lam = xp.minimum(xp.concatenate([head, lam[m - 1:]]), hi_room)
  return _times_from_log_snr(process, jnp.asarray(2.0 * lam, jnp.float32), n, t_hi)


GRIDS: dict[str, Callable[..., jnp.ndarray]] = {
    'uniform': uniform,
    'logsnr': logsnr,
    'karras': karras,
    'quadratic': quadratic,
    'cosine': cosine,
    'optimized': optimized,
}


def shift_times(t: jax.typing.ArrayLike, shift: float, t_lo: float, t_hi: float) -> jax.Array:
  """SD3's time shift (Esser et al. 2024, eq. 23) on ``[t_lo, t_hi]`` rescaled to [0, 1].

  ``u = (t - t_lo) / (t_hi - t_lo)``, ``u' = shift u / (1 + (shift - 1) u)``, returned as
  ``t_lo + (t_hi - t_lo) u'``: increasing, with both ends fixed. t: any shape, float32.
  """
  t = jnp.asarray(t, jnp.float32)
  u = (t - t_lo) / (t_hi - t_lo)
  u = shift * u / (1.0 + (shift - 1.0) * u)
  return jnp.clip(t_lo + (t_hi - t_lo) * u, t_lo, t_hi).astype(jnp.float32)


def check_shift(shift) -> float:
  """``shift`` as a positive float; ValueError otherwise (a bool or a string too)."""
  if isinstance(shift, (bool, str, bytes)):
    raise ValueError(f'shift must be a positive number (1 = no shift), got {shift!r}.')
  try:
    value = float(shift)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f'shift must be a concrete positive number, got {shift!r}.') from None
  if not value > 0 or not np.isfinite(value):
    raise ValueError(f'shift must be a positive number (1 = no shift), got {shift!r}.')
  return value


def make_grid(process, num_steps: int, grid: str, *, spacing: Spacing | None = None,
              t_start: float | None = None, shift: float = 1.0) -> jnp.ndarray:
  """The grid named ``grid`` (a key of ``GRIDS``) with ``spacing`` (None: the grid's default,
  'trailing' for 'uniform' and 'linspace' for the others), over ``[t_min, t_start]`` when
  ``t_start`` is given (``check_t_start``), else over ``[t_min, t_max]``, with SD3's time
  ``shift`` (module docstring; 1: none)."""
  if grid not in GRIDS:
    raise ValueError(f'grid={grid!r} is not known; use one of {sorted(GRIDS)}.')
  if spacing is not None and spacing not in SPACINGS:
    raise ValueError(f'spacing={spacing!r} is not known; use one of {SPACINGS}.')
  t_start = check_t_start(process, t_start)
  shift = check_shift(shift)
  t = GRIDS[grid](process, num_steps, spacing=spacing, t_start=t_start)
  if shift == 1.0:
    return t
  t = shift_times(t, shift, float(process.t_min), _t_hi(process, t_start))
  if grid == 'uniform' and _is_discrete(process):
    t = jnp.round(t)
  return t
