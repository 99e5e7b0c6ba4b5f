"""GITS: a time grid fitted to one model by dynamic programming over a teacher trajectory.

Chen, Zhou, Ye, Xiao & Yu (2024), "On the Trajectory Regularity of ODE-based Diffusion Sampling"
(ICML; geometry-inspired time scheduling, github.com/zju-pi/diff-sampler): the probability-flow
trajectories of one model are alike, so a grid good for a few of them is good for all. A teacher
run on a fine grid (``num_teacher_steps`` times) from a small calibration batch gives the state at
every fine time; the cost of a coarse step from fine time i to fine time j (or to the data) is the
distance between a DDIM step from the teacher's state at i and the teacher's state at j, and
dynamic programming finds the ``num_steps`` steps from the first fine time to the data with the
smallest total cost. The coarse grid goes to a sampler as its ``times``::

    calibration = gits.calibrate(model_fn, process, key=key, shape=(64, 8, 8, 1))  # once per model
    x_0 = sampling.sample(model_fn, process, method='plms', num_steps=10,
                          times=calibration.times(10), order=3, warm_start='ab', key=key,
                          shape=(1024, 8, 8, 1))

The calibration costs ``2 num_teacher_steps`` evaluations of the calibration batch (the teacher's,
and the data predictions at its states), once per model, conditioning and guidance scale; every
run on its times then costs what its method spends. ``docs/benchmarks.md`` has the measurements
(oracle panels of ``experiments/sampler_gits.py``): which method to pair with the times, and where
the fitted grid loses to the defaults.

Distances (``metric``, ``scale``): by default the mean over the calibration batch of the squared
difference, in the state scaled to unit prior variance, ``x / sqrt(alpha^2 + sigma^2)``
('prior'); the paper's own is the mean Euclidean norm ('l2') in EDM's state ``x / alpha``
('edm'), whose size grows as sigma / alpha at high noise, so that its costs are dominated by the
first steps. The defaults were chosen on the choosing panel of ``experiments/sampler_gits.py``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sampling import core, grids
from diffusion_jax.sampling.guidance import classifier_free_guidance


METRICS = ('mse', 'l2')
SCALES = ('prior', 'edm')


class Calibration(NamedTuple):
  """What ``calibrate`` measured; ``times(n)`` lays out an n-step grid from it.

  Attributes:
    teacher_times: float32 ``[M]`` the fine grid (decreasing; the teacher's model-evaluation
      times, its last step goes to the data).
    cost: float64 ``[M + 1, M + 1]`` cost of a DDIM step from fine point i to fine point j
      (index M: the data); inf where j <= i.
    nfe: model evaluations spent on the calibration batch (``2 M``).
    coeff: the weight per step of the dynamic programme (GITS's ``coeff``): step s from the start
      counts ``coeff**s`` times its cost.
  """
  teacher_times: np.ndarray
  cost: np.ndarray
  nfe: int
  coeff: float

  def times(self, num_steps: int) -> np.ndarray:
    """The ``num_steps`` model-evaluation times of the cheapest path: float32 NumPy
    ``[num_steps]``, decreasing, starting at ``teacher_times[0]``; pass them as ``sample(...,
    times=...)`` (``pc`` takes ``num_steps + 1`` times: ``times(n + 1)`` for n steps). NumPy, so
    a jitted function can call this or close over the result.

    Raises:
      ValueError: ``num_steps`` not an integer in ``[1, M]``.
    """
    m = len(self.teacher_times)
    n = core.as_int(num_steps)
    if n is None or not 1 <= n <= m:
      raise ValueError(f'num_steps must be an integer in [1, {m}] (the teacher\'s steps), got '
                       f'{num_steps!r}; calibrate with num_teacher_steps >= num_steps for more.')
    path = cheapest_path(self.cost, n, coeff=self.coeff)
    return self.teacher_times[np.asarray(path[:-1])].astype(np.float32)


def cheapest_path(cost: np.ndarray, num_steps: int, *, coeff: float = 1.0) -> list[int]:
  """The path ``0 = p_0 < p_1 < ... < p_n = M`` minimizing ``sum_s coeff**s cost[p_s, p_s+1]``.

  Args:
    cost: ``[M + 1, M + 1]`` step costs, inf where a step is not allowed (j <= i).
    num_steps: n, in ``[1, M]``.
    coeff: the weight per step (1: the plain sum).

  Returns:
    The n + 1 indices of the path (dynamic programming, O(n M^2)).
  """
  cost = np.asarray(cost, np.float64)
  m = cost.shape[0] - 1
  # value[s, i]: the cheapest weighted cost from point i to M in exactly s steps.
  value = np.full((num_steps + 1, m + 1), np.inf)
  value[0, m] = 0.0
  choice = np.zeros((num_steps + 1, m + 1), np.int64)
  for s in range(1, num_steps + 1):
    total = cost + coeff * value[s - 1][None, :]
    choice[s] = np.argmin(total, axis=1)
    value[s] = total[np.arange(m + 1), choice[s]]
  path = [0]
  for s in range(num_steps, 0, -1):
    path.append(int(choice[s, path[-1]]))
  return path


def calibrate(model_fn: Callable[..., jax.Array], process, *, key: jax.Array | None = None,
              x_T: jax.Array | None = None, shape: tuple[int, ...] | None = None,
              prediction: str = 'eps', cond: Any = None, null_cond: Any = None,
              guidance_scale: float = 1.0, num_teacher_steps: int = 100,
              teacher_grid: str = 'cosine', coeff: float = 1.0, metric: str = 'mse',
              scale: str = 'prior', callback: Callable[[int, int], Any] | None = None
              ) -> Calibration:
  """Runs the teacher and measures every coarse step's cost (GITS, module docstring).

  Args:
    model_fn: ``model_fn(x, t, cond)`` as for ``sampling.sample``.
    process: any process of the contract.
    key, x_T, shape: the calibration batch's start, as for ``sampling.sample`` (e.g. 64 samples).
    prediction, cond, null_cond, guidance_scale: as for ``sampling.sample``; the grid is fitted
      to the model with this conditioning and guidance.
    num_teacher_steps: M, the fine grid's size: the coarse times are M of its points.
    teacher_grid: the named grid (``grids.make_grid``, trailing spacing) of the fine times.
    coeff: GITS's weight per step of the dynamic programme (``Calibration``).
    metric: 'mse' (mean squared difference) or 'l2' (mean Euclidean norm per sample).
    scale: the state the distance is taken in: 'prior' (``x / sqrt(alpha^2 + sigma^2)``) or
      'edm' (``x / alpha``, Karras et al. 2022's state, as in the paper).
    callback: ``callback(step, num_teacher_steps)`` after each teacher step (progress).

  Returns:
    The ``Calibration``.

  Raises:
    ValueError: fewer than 2 teacher steps, a coeff that is not positive, an unknown metric or
      scale, a step cost that is not finite (a data prediction that is not, e.g. an 'eps' model
      at alpha = 0), or what ``sampling.sample`` raises for the start, conditioning or
      prediction.
  """
  from diffusion_jax import sampling  # pylint: disable=import-outside-toplevel
  m = core.as_int(num_teacher_steps)
  if m is None or m < 2:
    raise ValueError(f'num_teacher_steps must be an integer >= 2, got {num_teacher_steps!r}.')
  try:
    positive = float(coeff) > 0
  except (TypeError, ValueError):
    positive = False
  if not positive:
    raise ValueError(f'coeff must be a positive number, got {coeff!r}.')
  if metric not in METRICS:
    raise ValueError(f'metric={metric!r} is not known; use one of {METRICS}.')
  if scale not in SCALES:
    raise ValueError(f'scale={scale!r} is not known; use one of {SCALES}.')
  with jax.ensure_compile_time_eval():
    fine = np.asarray(core._drop_repeats(  # pylint: disable=protected-access
        grids.make_grid(process, m, teacher_grid, spacing='trailing')), np.float32)
  if fine.shape[0] < 2:
    raise ValueError(f'the {teacher_grid!r} grid has {fine.shape[0]} distinct time(s) at '
                     f'num_teacher_steps={m}; use another teacher_grid.')
  m = int(fine.shape[0])
  _, info = sampling.sample(model_fn, process, method='unipc', num_steps=m, key=key, x_T=x_T,
                            shape=shape, prediction=prediction, cond=cond, null_cond=null_cond,
                            guidance_scale=guidance_scale, times=fine, order=3, variant='bh2',
                            lower_order_final=True, return_info=True, return_trajectory=True,
                            callback=callback)
  states = info['trajectory']  # [M + 1, B, ...]: the states at the fine times, then the data
  batch = states.shape[1]
  fn = classifier_free_guidance(model_fn, batch_size=batch, cond=cond, null_cond=null_cond,
                                guidance_scale=guidance_scale)
  denoise = core.make_denoiser(fn, process, prediction=prediction)
  t = jnp.asarray(fine)
  alpha = jnp.concatenate([process.alpha(t), jnp.ones((1,))]).astype(jnp.float32)
  sigma = jnp.concatenate([process.sigma(t), jnp.zeros((1,))]).astype(jnp.float32)
  x0 = jax.lax.map(lambda a: denoise(a[0], a[1])[0], (states[:-1], t))  # [M, B, ...]
  rows = np.asarray(_costs(states, x0, alpha, sigma, metric=metric, scale=scale),
                    np.float64)  # [M, M + 1]
  bad = ~np.isfinite(np.where(np.tri(m, m + 1, 0, bool), 0.0, rows))  # the steps j > i
  if bad.any():
    i = int(np.nonzero(bad)[0][0])
    raise ValueError(f'the cost of a step from t = {fine[i]} is not finite: the model\'s data '
                     f'prediction there is not (prediction={prediction!r}, alpha = '
                     f'{float(alpha[i]):.3g}); check the model at that time, or use a prediction '
                     "that stays finite where alpha is near 0 ('flow', 'v').")
  cost = np.concatenate([rows, np.full((1, m + 1), np.inf)])
  cost[np.tril_indices(m + 1)] = np.inf
  return Calibration(teacher_times=fine, cost=cost, nfe=2 * m, coeff=float(coeff))


@functools.partial(jax.jit, static_argnames=('metric', 'scale'))
def _costs(states, x0, alpha, sigma, *, metric, scale):
  """``[M, M + 1]``: the distance (``metric`` in the ``scale``d state) between a DDIM step from
  the teacher's state i to point j and the teacher's state j."""
  # The data (the last point) has alpha = 1, sigma = 0: both scales are 1 there.
  scale = 1.0 / (jnp.sqrt(alpha**2 + sigma**2) if scale == 'prior' else alpha)

  def row(args):
    x_i, x0_i, a_i, s_i = args
    eps_i = (x_i - a_i * x0_i) / s_i
    step = core.bcast(alpha, states) * x0_i[None] + core.bcast(sigma, states) * eps_i[None]
    d = ((step - states) * core.bcast(scale, states)).reshape(states.shape[:2] + (-1,))
    if metric == 'l2':
      return jnp.mean(jnp.sqrt(jnp.sum(d**2, axis=2)), axis=1)
    return jnp.mean(d**2, axis=(1, 2))

  return jax.lax.map(row, (states[:-1], x0, alpha[:-1], sigma[:-1]))
