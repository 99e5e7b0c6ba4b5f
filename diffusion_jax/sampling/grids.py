"""Time grids for the fixed-step samplers.

Every grid function returns float32 times ``[num_steps]`` in the process's time domain, decreasing
from ``process.t_max`` (or near it) to ``process.t_min`` (or near it). The model is evaluated at
these times; after the last one the sampler takes a final step to clean data (alpha = 1,
sigma = 0, "denoise to zero"), which is not a grid time.

Grids (``GRIDS`` maps the names to the functions):

- ``'uniform'``: uniform in t, with diffusers' ``timestep_spacing`` conventions (``spacing=``):
  ``'linspace'`` spans ``[t_min, t_max]`` (ends at t_min); ``'trailing'`` is ``t_max * (1 - i / n)``
  (starts at t_max; its final step to the data is as long as the others, as in DDIM/PNDM);
  ``'leading'`` is ``t_min + i * floor((N) / n)`` reversed (the DDIM-code convention; never reaches
  t_max). For ``DiscreteVP`` the times are rounded to integer steps, as the model was trained on
  them, and ``num_steps == N`` gives exactly ``N, N - 1, ..., 1`` with any spacing (Ho et al. 2020,
  Algorithm 2).
- ``'logsnr'``: uniform in log-SNR lambda = log(alpha^2 / sigma^2) (Lu et al. 2022, DPM-Solver's
  ``logSNR`` skip type).
- ``'karras'``: the rho = 7 schedule of Karras et al. (2022), eq. 5, in the noise level
  sigma / alpha of the scaled ODE.
- ``'quadratic'``: quadratic in t, dense near the data (Song et al. 2021a, DDIM, Appendix D.2);
  not rounded to integer steps.
"""

from __future__ import annotations

from typing import Callable, Literal

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


def uniform(process, num_steps: int, *, spacing: Spacing = 'trailing') -> jnp.ndarray:
  """Times uniform in t (Ho et al. 2020; Song et al. 2021a), with a ``timestep_spacing`` convention.

  Args:
    process: any process of the contract.
    num_steps: n, the number of model evaluations of a one-evaluation-per-step sampler.
    spacing: 'trailing', 'linspace' or 'leading' (see the module docstring).

  Returns:
    float32 ``[n]``, decreasing.
  """
  n = _check_num_steps(num_steps)
  if spacing not in SPACINGS:
    raise ValueError(f'spacing={spacing!r} is not known; use one of {SPACINGS}.')
  t_min, t_max = float(process.t_min), float(process.t_max)
  discrete = _is_discrete(process)
  if spacing == 'linspace':
    t = np.linspace(t_max, t_min, n) if n > 1 else np.array([t_max])
  elif spacing == 'trailing':
    t = t_max * (1.0 - np.arange(n) / n)
  else:  # leading
    if discrete:
      ratio = max(int(t_max) // n, 1)
      t = t_min + ratio * np.arange(n)[::-1]
    else:
      t = t_min + (t_max - t_min) * np.arange(n)[::-1] / n
  if discrete:
    t = np.round(t)
  return jnp.asarray(np.clip(t, t_min, t_max), jnp.float32)


def logsnr(process, num_steps: int) -> jnp.ndarray:
  """Times uniform in log-SNR between ``t_max`` and ``t_min`` (Lu et al. 2022, Sec. 3.4)."""
  n = _check_num_steps(num_steps)
  lam_hi = process.log_snr(jnp.float32(process.t_min))
  lam_lo = process.log_snr(jnp.float32(process.t_max))
  lam = jnp.linspace(lam_lo, lam_hi, n) if n > 1 else lam_lo[None]
  t = process.t_from_log_snr(lam)
  # Pin the ends: the inverse's interpolation error must not leave the domain.
  t = t.at[0].set(process.t_max)
  if n > 1:
    t = t.at[-1].set(process.t_min)
  return jnp.clip(t, process.t_min, process.t_max).astype(jnp.float32)


def karras(process, num_steps: int, *, rho: float = 7.0) -> jnp.ndarray:
  """The schedule of Karras et al. (2022), eq. 5, in the scaled noise level sigma / alpha.

  ``s_i = (s_max^(1/rho) + i / (n - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` with
  ``s = sigma / alpha`` at ``t_max`` and ``t_min``, mapped back to times through log-SNR = -2 log s.
  """
  n = _check_num_steps(num_steps)
  s_min = jnp.exp(-0.5 * process.log_snr(jnp.float32(process.t_min)))
  s_max = jnp.exp(-0.5 * process.log_snr(jnp.float32(process.t_max)))
  u = jnp.linspace(0.0, 1.0, n) if n > 1 else jnp.zeros((1,))
  s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
  t = process.t_from_log_snr(-2.0 * jnp.log(s))
  t = t.at[0].set(process.t_max)
  if n > 1:
    t = t.at[-1].set(process.t_min)
  return jnp.clip(t, process.t_min, process.t_max).astype(jnp.float32)


def quadratic(process, num_steps: int) -> jnp.ndarray:
  """Times quadratic in the step index, dense near the data (Song et al. 2021a, App. D.2)."""
  n = _check_num_steps(num_steps)
  t_min, t_max = float(process.t_min), float(process.t_max)
  u = np.linspace(1.0, 0.0, n) if n > 1 else np.ones((1,))
  # Not rounded for DiscreteVP: rounding would repeat times near t_min once n is large.
  t = t_min + (t_max - t_min) * u**2
  return jnp.asarray(np.clip(t, t_min, t_max), jnp.float32)


GRIDS: dict[str, Callable[..., jnp.ndarray]] = {
    'uniform': uniform,
    'logsnr': logsnr,
    'karras': karras,
    'quadratic': quadratic,
}


def make_grid(process, num_steps: int, grid: str, *, spacing: Spacing = 'trailing') -> jnp.ndarray:
  """The grid named ``grid`` (a key of ``GRIDS``); ``spacing`` applies to 'uniform' only."""
  if grid not in GRIDS:
    raise ValueError(f'grid={grid!r} is not known; use one of {sorted(GRIDS)}.')
  if spacing not in SPACINGS:
    raise ValueError(f'spacing={spacing!r} is not known; use one of {SPACINGS}.')
  if grid == 'uniform':
    return uniform(process, num_steps, spacing=spacing)
  return GRIDS[grid](process, num_steps)
