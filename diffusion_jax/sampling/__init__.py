"""Samplers: one entry point, ``sample``, over the methods of ``METHODS``, and ``invert``.

```
x_0 = sampling.sample(model_fn, process, method='dpmpp_2m', num_steps=20, key=key, shape=(16, 2))
x_0 = sampling.sample(model_fn, process, method='ddim', num_steps=50, key=key, shape=(16, 2),
                      cond={'label': labels}, null_cond={'label': jnp.full((1,), 10)},
                      guidance_scale=4.0)
```

``model_fn(x, t, cond)`` is always called with three arguments; ``cond`` is any pytree whose leaves
have the batch as leading axis, or None, passed through untouched. Classifier-free guidance
(``guidance.py``) concatenates ``[cond, null_cond]`` leaf by leaf and calls the model once per
evaluation on the doubled batch.

Every fixed-step method is one ``lax.scan`` over its steps (one compiled step body whatever
``num_steps`` is), its time grid made by a function of ``grids.py`` (``grid=``, with a default per
method), and ends with a step to the data (alpha = 1, sigma = 0). ``sample`` is traceable: jit it
with the model closed over, e.g.
``jax.jit(lambda x: sample(model_fn, process, method=..., num_steps=..., x_T=x))``. Called
eagerly, every call traces and compiles its loop anew: for a digits-sized U-Net (ch 32, 8x8,
batch 16), ``dpmpp_2m`` / ``unipc`` at 10 steps took 1.2 / 1.8 s a call eagerly and 0.05 s jitted
after the first call, on a 2-core CPU (``experiments/bench_eager_sample.py``). Jit it when
sampling more than one batch.

Defaults (``defaults.py``, issue 22): called with only ``method`` and ``num_steps``, a method
takes the grid, spacing, order, ``lower_order_final``, ... chosen for its NFE band (5, 10, 20, 50)
on a panel of exact Gaussian-mixture oracles (2-64 dimensions, linear and cosine schedules, VE
SDE; ``experiments/sampler_panel.py``): among the option sets within 2x DDIM's error at the same
NFE on every oracle, the one with the smallest worst-case ratio to the best of all methods. What
the caller passes wins; explicit ``times`` replace only the grid, explicit ``levels`` take no
defaults. ``ddpm`` keeps the
uniform grid (trailing spacing), on which ``num_steps == N`` is exactly Algorithm 2 of Ho et al.
(2020); the other stochastic methods keep their signatures' defaults. The held-out results
against diffusers are in ``docs/benchmarks.md``.

A grid fitted to one model (``gits.py``, GITS, Chen et al. 2024): ``gits.calibrate`` runs a
teacher from a small calibration batch once per model, and ``calibration.times(n)`` is the
n-step grid whose DDIM steps stay closest to the teacher, passed as ``times=`` (with ``plms``,
``order=3, warm_start='ab'``: iPNDM). Not a default: it costs a calibration, and on some oracles
it loses to the defaults (``docs/benchmarks.md``).

Composable options of every fixed-step method (ddpm, ddim, plms, euler, heun, dpmpp_*, unipc,
pc), all inside the one scan:

- ``times=``: the grid itself instead of ``grid`` / ``spacing``: 1-D, strictly decreasing, within
  ``[t_min, t_max]``, concrete. It holds one time per step, the times the model is evaluated at
  before the final step to the data, so ``num_steps`` must equal ``len(times)`` (``pc``: its
  ``num_steps + 1`` times bound its predictor steps); a mismatch raises ValueError saying what
  ``num_steps`` to pass. A named grid's own times give that grid's samples, bit for bit.
- ``levels=`` (with ``times``; ddim, euler, heun, dpmpp_2m / 3m, unipc, plms): the noise levels
  (``core.Levels``) to convert the model's predictions with instead of the process's at
  ``times``, and where the last step ends: another library's schedule step for step
  (``pipelines.schedulers`` reproduces diffusers' schedulers with it).
- ``t_start`` (a keyword of ``sample``): ``x_T`` is the state at the intermediate time
  ``t_start`` (img2img / SDEdit, Meng et al. 2022: ``x_T = alpha x_0 + sigma z`` there, not prior
  noise), and the named grid is laid out over ``[t_min, t_start]``. ``t_start = t_max`` is the
  default run, bit for bit. ``ode`` integrates from ``t_start``; ``plms``'s
  ``analytic_first_step`` refuses starts not close to pure noise.
- ``shift`` (a keyword of ``sample``): SD3's time shift of the method's named grid
  (``grids.make_grid``; Esser et al. 2024, eq. 23), for rectified flow at high resolution; the
  shifted grid reaches the method as its ``times``, so it does not combine with ``times=``, and
  ``pc`` / ``ode`` (which lay out no named grid) refuse it.
- Repeated grid times (a grid rounded to integer steps with more steps than the process has)
  are dropped: ``num_steps=2500, grid='uniform'`` on ``DiscreteVP`` with N = 1000 runs the 1000
  distinct times, and ``info['nfe']`` says so (``core.make_schedule``). Only 'uniform' is
  rounded on ``DiscreteVP`` (``grids``); the other grids, the defaults' among them, query the
  model between its integer training steps (its alpha, sigma interpolated), so they run all
  ``num_steps``.
- ``step_hook(x, i, t, alpha, sigma) -> x``: called after every step with the state reached, the
  step index, the time reached and its alpha, sigma; the sampler continues from what it returns.
  After the final step to the data ``t = 0``, ``alpha = 1``, ``sigma = 0``. An identity hook
  leaves the samples unchanged, bit for bit. ``ode`` (adaptive) takes neither ``times`` nor
  ``step_hook`` (TypeError, as for any option a method does not take).

``invert`` runs ``ddim`` / ``euler`` / ``dpmpp_2m`` backwards on the same grid (``inversion.py``):
``sample(..., t_start=t_end, x_T=invert(..., x_0, t_end=t_end))`` returns x_0 up to the methods'
discretization error, which shrinks with ``num_steps``.

The method signature (what a new entry of ``METHODS`` must follow)::

    fn(model_fn, process, x_T, *, num_steps: int, key: jax.Array | None, prediction: str,
       t_start: float | None, **options) -> tuple[x_0, dict]

- ``model_fn(x, t) -> prediction``: conditioning and guidance are already applied by ``sample``
  (the method never sees ``cond``); ``x: [B, ...]``, ``t: [B]`` in the process's time domain.
- ``x_T: [B, ...]`` float32, the validated start.
- the dict carries at least ``'nfe'`` (model evaluations, counted per batch) and, when the method
  was called with ``return_trajectory=True``, ``'trajectory'``: the states
  ``[num_steps + 1, B, ...]``.
- options every method accepts: ``return_trajectory``, ``callback`` (``callback(step, num_steps)``
  under jit via an ordered ``jax.debug.callback``), ``clip_x0``, ``dynamic_threshold`` (see
  ``core.make_denoiser``); every fixed-step method ``times`` and ``step_hook``; each method
  documents its own (``grid``, ``spacing``, ``eta``, ``order``, ...). An option a method does not
  take raises ``TypeError``.
- invalid arguments (an order the method does not have, a stochastic method without a key)
  raise ``ValueError`` naming the problem; an order above what ``num_steps`` allows falls back
  to the warm start's lower orders.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax import processes
from diffusion_jax.sampling import core, defaults, gits, grids, karras
from diffusion_jax.sampling.ddim import ddim, ddpm
from diffusion_jax.sampling.dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m
from diffusion_jax.sampling.guidance import classifier_free_guidance
from diffusion_jax.sampling.inversion import INVERSIONS
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

# The grid each fixed-step method function lays out when called directly without one;
# ``sample`` passes the grid of ``defaults.DEFAULTS`` for the run's band instead.
DEFAULT_GRIDS = {name: 'quadratic' for name in METHODS if name not in ('pc', 'ode')}
DEFAULT_GRIDS['ddpm'] = 'uniform'

__all__ = ['METHODS', 'INVERSIONS', 'DEFAULT_GRIDS', 'sample', 'invert', 'grids', 'gits',
           'options_for']


def _check_key(key) -> None:
  """None, or one typed PRNG key (``jax.random.key``) or raw uint32 one (``jax.random.PRNGKey``),
  not a batch of them (``jax.random.split(key, n)``)."""
  if key is None:
    return
  dtype = getattr(key, 'dtype', None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  if not (typed or dtype == jnp.uint32):
    got = f'an array of dtype {dtype}' if dtype is not None else f'{type(key).__name__} {key!r}'
    raise ValueError(f'key must be a PRNG key, e.g. jax.random.PRNGKey(0) or jax.random.key(0); '
                     f'got {got}.')
  if tuple(key.shape) != (() if typed else (2,)):
    raise ValueError(f'key must be one PRNG key (shape {() if typed else (2,)} for a '
                     f'{"typed" if typed else "raw uint32"} key), got shape {tuple(key.shape)}; '
                     'sample draws the whole batch from one key.')


def _check_shape(shape) -> tuple[int, ...]:
  """``shape`` as a tuple of positive ints with a batch axis; ValueError naming it otherwise."""
  try:
    dims = tuple(core.as_int(d) for d in shape)
  except TypeError:  # not iterable
    dims = ()
  if not dims or any(d is None or d < 1 for d in dims):
    raise ValueError(f'shape must be a tuple of positive ints [B, ...] with the batch first, '
                     f'e.g. (16, 8, 8, 1); got {shape!r}.')
  return dims


def _start(process, key, x_T, shape, t_start) -> jax.Array:
  """Validates the start arguments and returns x_T as float32."""
  _check_key(key)
  if x_T is None:
    if t_start is not None:
      raise ValueError(f't_start={t_start} needs x_T, the noisy state at t_start (e.g. '
                       'alpha x_0 + sigma z there, processes.q_sample); it is not drawn from the '
                       'prior.')
    if shape is None or key is None:
      raise ValueError('give either x_T (the start noise) or both shape and key '
                       '(to draw x_T = process.prior_sample(key, shape)).')
    return process.prior_sample(key, _check_shape(shape)).astype(jnp.float32)
  _check_batch_array(x_T, 'x_T')
  if shape is not None and _check_shape(shape) != tuple(x_T.shape):
    raise ValueError(f'x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)} was given.')
  return jnp.asarray(x_T, jnp.float32)


def _check_batch_array(x, name: str) -> None:
  if not hasattr(x, 'dtype') or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{name} must be a floating-point array, got '
                     f'{getattr(x, "dtype", type(x).__name__)}.')
  if x.ndim < 1:
    raise ValueError(f'{name} must have a batch axis [B, ...], got shape {x.shape}.')


def _check_common(num_steps, prediction) -> int:
  try:  # None, NaN, inf and strings get the same message as 0 or 2.5
    ok = (not isinstance(num_steps, (bool, str)) and math.isfinite(float(num_steps))
          and int(num_steps) == num_steps and num_steps >= 1)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    if isinstance(num_steps, jax.core.Tracer):
      raise ValueError(f'num_steps must be a concrete integer >= 1 (it sets the grid and the '
                       f'scan length), got the traced {num_steps!r}: under jax.jit pass it as a '
                       'static argument (static_argnums / static_argnames) or close over it.')
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}.')
  if prediction not in processes.PREDICTIONS:
    raise ValueError(f'prediction={prediction!r} is not known; use one of {processes.PREDICTIONS}.')
  return int(num_steps)


def sample(model_fn: Callable[..., jax.Array], process, *, method: str, num_steps: int,
           key: jax.Array | None = None, x_T: jax.Array | None = None,
           shape: tuple[int, ...] | None = None, prediction: str = 'eps', cond: Any = None,
           null_cond: Any = None, guidance_scale: float | jax.Array = 1.0,
           guidance_rescale: float = 0.0, t_start: float | None = None, shift: float = 1.0,
           return_info: bool = False, **options: Any):
  """Draws samples by the named method (DESIGN.md's sampling contract).

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B], cond) -> prediction``, t in the process's time
      domain (DiscreteVP: DDPM steps in [1, N]; SDEs: [eps, 1]); always called with 3 arguments.
    process: any process of the contract.
    method: a key of ``METHODS``.
    num_steps: the number of steps (>= 1); see each method for its NFE.
    key: PRNG key: draws ``x_T = process.prior_sample(key, shape)`` when x_T is not given, and
      the noise of stochastic methods (step i from ``fold_in(key, i)``).
    x_T: [B, ...] explicit start: noise at the prior's scale, or the noisy state at ``t_start``.
    shape: the shape of x_T to draw (with ``key``), or checked against ``x_T``.
    prediction: what ``model_fn`` predicts: 'eps', 'x0', 'v', 'score' or 'flow'.
    cond: the conditioning, any pytree whose leaves are ``[B, ...]`` (B = x_T's batch), or None.
    null_cond: the unconditional conditioning for guidance: cond's tree structure, each leaf with
      batch B or 1 (broadcast), cast to cond's leaf dtype (``guidance.py``).
    guidance_scale: classifier-free guidance scale w (Ho & Salimans 2022), ``uncond +
      w (cond - uncond)`` in float32: a number, or an array of shape [B] (one w per example);
      1.0 (a Python number) is the plain conditional model, one call per evaluation on the
      plain batch. Other values need ``null_cond``.
    guidance_rescale: phi of Lin et al. (2024), eq. 16 (see ``guidance.py``), a number or [B];
      needs ``null_cond``.
    t_start: the time of ``x_T``, in ``(t_min, t_max]``: start at an intermediate time (img2img,
      SDEdit); the grid is laid out over ``[t_min, t_start]``. Needs ``x_T``.
    shift: SD3's time shift of the method's grid (module docstring; ``grids.make_grid``); 1.0
      (the default) leaves the grid alone.
    return_info: also return the method's info dict ('nfe', 'trajectory').
    **options: the method's options (``return_trajectory``, ``callback``, ``clip_x0``,
      ``dynamic_threshold``, ``grid``, ``spacing``, ``times``, ``step_hook``, ``eta``,
      ``order``, ...; module docstring).

  Returns:
    x_0 [B, ...] float32, or ``(x_0, info)`` when ``return_info``.

  Raises:
    ValueError: an unknown method or prediction, a bad start, a cond leaf whose batch is not
      x_T's, guidance without ``null_cond``, or a method's invalid option (naming it).
    TypeError: an option the method does not take, naming it and those the method takes
      (``method_options(method)``).
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not known; use one of {sorted(METHODS)}.')
  num_steps = _check_common(num_steps, prediction)
  _check_options('sample', method, options, method_options(method),
                 see=' (sampling.method_options(method))')
  options = _with_defaults(process, method, num_steps, t_start, shift, options)
  # x_T = prior_sample(key, shape) as the contract says; a stochastic method draws its step noise
  # from fold_in(key, i), a different stream.
  x_T = _start(process, key, x_T, shape, t_start)
  fn = classifier_free_guidance(model_fn, batch_size=x_T.shape[0], cond=cond,
                                null_cond=null_cond, guidance_scale=guidance_scale,
                                guidance_rescale=guidance_rescale)
  if grids.check_shift(shift) != 1.0:
    num_steps, t_start, options = _shifted(process, method, num_steps, t_start, float(shift),
                                           options)
  x_0, info = METHODS[method](fn, process, x_T, num_steps=num_steps, key=key,
                              prediction=prediction, t_start=t_start, **options)
  return (x_0, info) if return_info else x_0


def _check_options(caller: str, method: str, options: dict, accepted: list[str], *,
                   see: str = '') -> None:
  """TypeError naming the options ``method`` does not take, and the ones it does."""
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise TypeError(f'{caller}: method={method!r} takes no option {", ".join(unknown)}; its '
                    f'options are {", ".join(accepted)}{see}.')


def options_for(process, method: str, num_steps: int, *, t_start=None, shift: float = 1.0,
                **options) -> dict:
  """The options ``sample`` runs ``method`` with for these ones: ``options`` completed with the
  chosen defaults (``defaults.py``), e.g. the grid and spacing of a plain ``sample`` call, for
  code that lays out the same grid itself (``editing.strength_times``)."""
  return _with_defaults(process, method, num_steps, t_start, shift, options)


def _heun_defaults(process, num_steps, t_start, shift, options, chosen):
  """Heun's defaults by the NFE it spends on the chosen grid: its guard (``karras.heun``) takes
  Euler steps where the noise level shrinks by more than ``core.MAX_CORRECTED_RATIO``, so 5
  steps on the VE SDE's uniform grid spend 5 NFE, not 9, and take the options chosen at 5."""
  try:
    with jax.ensure_compile_time_eval():
      sched = core.make_schedule(process, num_steps, grid=chosen.get('grid') or
                                 DEFAULT_GRIDS['heun'], spacing=chosen.get('spacing'),
                                 t_start=t_start, shift=grids.check_shift(shift), method='heun')
      nfe = karras.heun_nfe(sched)
  except (ValueError, TypeError, jax.errors.ConcretizationTypeError):
    return chosen  # the method reports the bad argument itself
  if defaults.band('heun', num_steps, nfe=nfe) == defaults.band('heun', num_steps):
    return chosen
  return defaults.with_defaults('heun', num_steps, options, nfe=nfe)


def _with_defaults(process, method, num_steps, t_start, shift, options):
  """``options`` completed with the method's chosen defaults (``defaults.py``).

  The band is that of the distinct grid times: a grid rounded to integer steps with more steps
  than the process has runs its distinct times (``core.make_schedule``), and takes the defaults
  of that many steps, so that e.g. 2500 steps on N = 1000 are the 1000-step run.
  """
  chosen = defaults.with_defaults(method, num_steps, options)
  if method == 'heun' and options.get('times') is None and options.get('levels') is None:
    return _heun_defaults(process, num_steps, t_start, shift, options, chosen)
  grid = chosen.get('grid')
  if grid != 'uniform' or not grids._is_discrete(process):  # pylint: disable=protected-access
    return chosen
  try:
    with jax.ensure_compile_time_eval():
      t = grids.make_grid(process, num_steps, grid, spacing=chosen.get('spacing'),
                          t_start=t_start, shift=grids.check_shift(shift))
      distinct = int(core._drop_repeats(t).shape[0])  # pylint: disable=protected-access
  except (ValueError, TypeError):
    return chosen  # the method reports the bad argument itself
  if defaults.band(method, distinct) == defaults.band(method, num_steps):
    return chosen
  return defaults.with_defaults(method, distinct, options)


def _shifted(process, method, num_steps, t_start, shift, options):
  """``(num_steps, t_start, options)`` with the method's grid, shifted, as explicit ``times``."""
  if method not in DEFAULT_GRIDS:
    raise ValueError(f'shift={shift} needs a method with a named time grid; {method!r} lays out '
                     f'none (use one of {sorted(DEFAULT_GRIDS)}).')
  if options.get('times') is not None:
    raise ValueError(f'shift={shift} and times were both given; shift the times yourself '
                     '(grids.shift_times) or pass a named grid.')
  options = dict(options)
  grid = options.pop('grid', None) or DEFAULT_GRIDS[method]
  spacing = options.pop('spacing', None)
  options.pop('times', None)
  with jax.ensure_compile_time_eval():
    t = grids.make_grid(process, num_steps, grid, spacing=spacing, t_start=t_start, shift=shift)
    t = core._drop_repeats(t)  # pylint: disable=protected-access
  options['times'] = t
  # The times start at t_start (the time of x_T), so the method takes them without it.
  return int(t.shape[0]), None, options


def invert(model_fn: Callable[..., jax.Array], process, x_0: jax.Array, *, method: str = 'ddim',
           num_steps: int, prediction: str = 'eps', cond: Any = None, null_cond: Any = None,
           guidance_scale: float | jax.Array = 1.0, guidance_rescale: float = 0.0,
           t_end: float | None = None, return_info: bool = False, **options: Any):
  """The start ``x_T`` at ``t_end`` that the deterministic sampler ``method`` maps to ``x_0``.

  Integrates the probability-flow ODE from the data up to ``t_end`` with the method's update on
  its own grid, reversed (``inversion.py``); ``sample(..., method=method, num_steps=num_steps,
  t_start=t_end, x_T=x_T)`` with the same grid options returns x_0 up to the discretization
  errors of both directions. Traceable, one ``lax.scan``.

  Args:
    model_fn, process, prediction, cond, null_cond, guidance_scale, guidance_rescale: as
      ``sample`` (guidance inverts the guided ODE).
    x_0: [B, ...] float data.
    method: a key of ``INVERSIONS``: 'ddim', 'euler' (DDIM when deterministic) or 'dpmpp_2m'.
    num_steps: grid times (model evaluations), as for ``sample``.
    t_end: the time to invert to, in ``(t_min, t_max]`` (default ``t_max``): the ``t_start`` of
      the sampler that maps x_T back.
    return_info: also return the info dict ('nfe', 'trajectory' from x_0 to x_T).
    **options: ``grid``, ``spacing``, ``times``, ``step_hook``, ``return_trajectory``,
      ``callback``; ``order`` (1 or 2) for 'dpmpp_2m'. Others raise TypeError naming them.

  Returns:
    x_T [B, ...] float32, the state at the grid's first time (``t_end``, or ``t_max``, on every
    grid but the uniform one with 'leading' spacing), or ``(x_T, info)`` when ``return_info``.

  Raises:
    ValueError: a method that has no inverse here (stochastic or unknown), listing those that do.
  """
  if method not in INVERSIONS:
    raise ValueError(f'invert: method={method!r} has no inverse here; use one of '
                     f'{sorted(INVERSIONS)} (deterministic samplers whose update runs backwards; '
                     'a stochastic sampler has no inverse map).')
  num_steps = _check_common(num_steps, prediction)
  t_end = grids.check_t_start(process, t_end, name='t_end')
  _check_batch_array(x_0, 'x_0')
  x_0 = jnp.asarray(x_0, jnp.float32)
  fn = classifier_free_guidance(model_fn, batch_size=x_0.shape[0], cond=cond,
                                null_cond=null_cond, guidance_scale=guidance_scale,
                                guidance_rescale=guidance_rescale)
  # The grid sample() lays out by default, so that sample(invert(x_0)) runs the same grid back.
  accepted = [p for p in inspect.signature(INVERSIONS[method]).parameters
              if p not in ('model_fn', 'process', 'x_0', 'num_steps', 'prediction', 't_end')]
  _check_options('invert', method, options, accepted)
  chosen = defaults.with_defaults(method, num_steps, options)
  options = {k: v for k, v in chosen.items() if k in options or k in accepted}
  x_T, info = INVERSIONS[method](fn, process, x_0, num_steps=num_steps, prediction=prediction,
                                 t_end=t_end, **options)
  return (x_T, info) if return_info else x_T


def method_options(method: str) -> list[str]:
  """The keyword options ``method`` accepts (for configs and error messages)."""
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not known; use one of {sorted(METHODS)}.')
  params = inspect.signature(METHODS[method]).parameters
  return [p for p in params if p not in ('model_fn', 'process', 'x_T', 'num_steps', 'key',
                                         'prediction', 't_start')]
