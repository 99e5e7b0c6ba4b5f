"""Samplers: one entry point, ``sample``, over the methods of ``METHODS``.

```
x_0 = sampling.sample(model_fn, process, method='dpmpp_2m', num_steps=20, key=key, shape=(16, 2))
```

Every fixed-step method is one ``lax.scan`` over its steps (one compiled step body whatever
``num_steps`` is), its time grid made by a function of ``grids.py`` (``grid=``, with a default per
method), and ends with a step to the data (alpha = 1, sigma = 0). ``sample`` is traceable: jit it
with the model closed over, e.g.
``jax.jit(lambda x: sample(model_fn, process, method=..., num_steps=..., x_T=x))``.

Default grids, measured (experiments/bench_samplers.py: DiscreteVP.linear(), the mixture oracle,
RMS error against the exact PF-ODE map, B = 256): the quadratic grid of DDIM is the most accurate
for every deterministic method from 10 NFE on, e.g. at 20 / 50 NFE

    dpmpp_3m   quadratic 0.026 / 0.0010   logsnr 0.043 / 0.0037   uniform-trailing 0.084 / 0.016
    unipc-bh2  quadratic 0.038 / 0.0019   logsnr 0.050 / 0.0054   uniform-trailing 0.069 / 0.0094
    heun       quadratic 0.072 / 0.0070   logsnr 0.158 / 0.0147   karras 0.222 / 0.040

so it is the default of ddim, plms, euler, heun, dpmpp_* and unipc. ``ddpm`` keeps the uniform
grid (trailing spacing), on which ``num_steps == N`` is exactly Algorithm 2 of Ho et al. (2020).
At <= 10 NFE pass ``spacing='trailing'`` (the quadratic grid's last step to the data as long as
the others): at 5 NFE DDIM, DPM-Solver++ 2M/3M, UniPC-bh2 and iPNDM reach 0.13-0.24 with it,
0.17-0.43 with the default 'linspace' ends and 0.31-0.36 on the uniform-trailing grid; Heun (3
steps at 5 NFE) is the exception, best on the uniform grid (0.37).
At <= 20 NFE the most accurate configuration measured is iPNDM, ``method='plms',
warm_start='ab', spacing='trailing'`` on the quadratic grid: 0.134 (order 3) / 0.044 / 0.0066 at
5 / 10 / 20 NFE, against 0.155 / 0.054 / 0.0072 for the best of the others; with
``analytic_first_step=True`` (one more step for the same NFE, see ``plms``) 0.114 (order 3) /
0.038 / 0.0060 (order 4).

The method signature (what a new entry of ``METHODS`` must follow)::

    fn(model_fn, process, x_T, *, num_steps: int, key: jax.Array | None, prediction: str,
       **options) -> tuple[x_0, dict]

- ``model_fn(x, t) -> prediction``: guidance is already applied by ``sample`` (the method never
  sees labels); ``x: [B, ...]``, ``t: [B]`` in the process's time domain.
- ``x_T: [B, ...]`` float32, the validated start.
- the dict carries at least ``'nfe'`` (model evaluations, counted per batch) and, when the method
  was called with ``return_trajectory=True``, ``'trajectory'``: the states
  ``[num_steps + 1, B, ...]``.
- options every method accepts: ``return_trajectory``, ``callback`` (``callback(step, num_steps)``
  under jit via an ordered ``jax.debug.callback``), ``clip_x0``, ``dynamic_threshold`` (see
  ``core.make_denoiser``); each method documents its own (``grid``, ``spacing``, ``eta``,
  ``order``, ...). An option a method does not take raises ``TypeError``.
- invalid arguments (an order higher than ``num_steps`` allows, a stochastic method without a
  key) raise ``ValueError`` naming the problem.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax import processes
from diffusion_jax.sampling import grids
from diffusion_jax.sampling.ddim import ddim, ddpm
from diffusion_jax.sampling.dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m
from diffusion_jax.sampling.guidance import classifier_free_guidance
from diffusion_jax.sampling.karras import euler, heun
from diffusion_jax.sampling.ode import ode
from diffusion_jax.sampling.pc import pc
from diffusion_jax.sampling.plms import plms
from diffusion_jax.sampling.unipc import unipc

METHODS: dict[str, Callable[..., tuple[jax.Array, dict]]] = {
    'ddpm': ddpm,
    'ddim': ddim,
    'plms': plms,
    'euler': euler,
    'heun': heun,
    'dpmpp_2m': dpmpp_2m,
    'dpmpp_3m': dpmpp_3m,
    'dpmpp_2m_sde': dpmpp_2m_sde,
    'unipc': unipc,
    'pc': pc,
    'ode': ode,
}

__all__ = ['METHODS', 'sample', 'grids']


def _start(process, key, x_T, shape) -> jax.Array:
  """Validates the start arguments and returns x_T as float32."""
  if x_T is None:
    if shape is None or key is None:
      raise ValueError('give either x_T (the start noise) or both shape and key '
                       '(to draw x_T = process.prior_sample(key, shape)).')
    return process.prior_sample(key, tuple(shape)).astype(jnp.float32)
  if not hasattr(x_T, 'dtype') or not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f'x_T must be a floating-point array, got '
                     f'{getattr(x_T, "dtype", type(x_T).__name__)}.')
  if x_T.ndim < 1:
    raise ValueError(f'x_T must have a batch axis [B, ...], got shape {x_T.shape}.')
  if shape is not None and tuple(shape) != tuple(x_T.shape):
    raise ValueError(f'x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)} was given.')
  return jnp.asarray(x_T, jnp.float32)


def sample(model_fn: Callable[..., jax.Array], process, *, method: str, num_steps: int,
           key: jax.Array | None = None, x_T: jax.Array | None = None,
           shape: tuple[int, ...] | None = None, prediction: str = 'eps',
           guidance_scale: float | None = None, labels: jax.Array | None = None,
           null_label: int | None = None, guidance_rescale: float = 0.0,
           return_info: bool = False, **options: Any):
  """Draws samples by the named method (DESIGN.md's sampling contract).

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B], y=None) -> prediction``, t in the process's time
      domain (DiscreteVP: DDPM steps in [1, N]; SDEs: [eps, 1]).
    process: any process of the contract.
    method: a key of ``METHODS``.
    num_steps: the number of steps (>= 1); see each method for its NFE.
    key: PRNG key: draws ``x_T = process.prior_sample(key, shape)`` when x_T is not given, and
      the noise of stochastic methods (step i from ``fold_in(key, i)``).
    x_T: [B, ...] explicit start noise at the prior's scale.
    shape: the shape of x_T to draw (with ``key``), or checked against ``x_T``.
    prediction: what ``model_fn`` predicts: 'eps', 'x0', 'v' or 'score'.
    guidance_scale: classifier-free guidance scale w (Ho & Salimans 2022), ``uncond +
      w (cond - uncond)``; 1.0 is the plain conditional model. Needs ``labels`` and ``null_label``.
    labels: [B] int class labels. Without ``guidance_scale`` the model is called conditionally.
    null_label: the label of the unconditional model.
    guidance_rescale: phi of Lin et al. (2024), eq. 16 (see ``guidance.py``).
    return_info: also return the method's info dict ('nfe', 'trajectory').
    **options: the method's options (``return_trajectory``, ``callback``, ``clip_x0``,
      ``dynamic_threshold``, ``grid``, ``spacing``, ``eta``, ``order``, ...).

  Returns:
    x_0 [B, ...] float32, or ``(x_0, info)`` when ``return_info``.
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not known; use one of {sorted(METHODS)}.')
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}.')
  if prediction not in processes.PREDICTIONS:
    raise ValueError(f'prediction={prediction!r} is not known; use one of {processes.PREDICTIONS}.')
  # x_T = prior_sample(key, shape) as the contract says; a stochastic method draws its step noise
  # from fold_in(key, i), a different stream.
  x_T = _start(process, key, x_T, shape)
  fn = classifier_free_guidance(model_fn, batch_size=x_T.shape[0], guidance_scale=guidance_scale,
                                labels=labels, null_label=null_label,
                                guidance_rescale=guidance_rescale)
  x_0, info = METHODS[method](fn, process, x_T, num_steps=int(num_steps), key=key,
                              prediction=prediction, **options)
  return (x_0, info) if return_info else x_0


def method_options(method: str) -> list[str]:
  """The keyword options ``method`` accepts (for configs and error messages)."""
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not known; use one of {sorted(METHODS)}.')
  params = inspect.signature(METHODS[method]).parameters
  return [p for p in params if p not in ('model_fn', 'process', 'x_T', 'num_steps', 'key',
                                         'prediction')]
