"""Editing with any diffusion model: inversion, img2img (SDEdit) and inpainting (RePaint).

Every function works over a ``model_fn(x, t, cond) -> prediction`` (DESIGN.md's contract: ``x``
of any shape ``[B, ...]``, pixels or latents; ``cond`` any pytree with the batch as leading axis,
or None) and any process, with classifier-free guidance as ``sampling.sample`` applies it
(``cond`` / ``null_cond`` / ``guidance_scale``). A latent pipeline calls them with its U-Net's
``model_fn`` on latents and encodes / decodes around them.

```
x_T = editing.invert(model_fn, process, x_0, method='edict', num_steps=50, cond=c,
                     null_cond=u, guidance_scale=3.0)
x_0 = editing.regenerate(model_fn, process, x_T, method='edict', num_steps=50, cond=c,
                         null_cond=u, guidance_scale=3.0)      # x_0 back up to round-off
x = editing.img2img(model_fn, process, x_0, strength=0.6, method='ddim', num_steps=50, key=key)
x = editing.inpaint(model_fn, process, x_known, mask, method='ddpm', num_steps=250, key=key,
                    resample=10)                              # mask 1 = keep
```

- ``invert`` / ``regenerate``: the deterministic samplers of ``sampling.INVERSIONS`` run backwards
  (DDIM inversion, Song et al. 2021a; the round trip errs by the methods' discretization error,
  which guidance enlarges), or ``method='edict'``: EDICT (Wallace et al. 2023), exact up to
  round-off (``sampling/inversion.py``), whose start is a pair ``Coupled(x, y)``.
- ``img2img``: SDEdit (Meng et al. 2022) with diffusers' step count
  (``StableDiffusionImg2ImgPipeline.get_timesteps``): the method's grid of ``num_steps`` times,
  of which the last ``int(num_steps * strength)`` are kept; x_0 is noised to the first kept time
  by the process's marginal ``alpha x_0 + sigma z`` and sampled back over the kept times.
- ``inpaint``: the known region is replaced by the forward-noised input after every step
  (``sampling.sample``'s ``step_hook``), so it comes back exactly; with ``resample > 1`` each step
  is repeated after noising its result back up one step (RePaint, Lugmayr et al. 2022,
  Algorithm 1 with jump length 1), which lets the generated region agree with the known one.

Mask convention: **1 = keep** (the known pixels), 0 = generate. diffusers' inpainting pipelines
take the opposite (white = repaint): pass ``1 - mask_image`` from there.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes, sampling
from diffusion_jax.sampling import core, grids, guidance, inversion
from diffusion_jax.sampling.ddim import check_eta

# The inversions ``invert`` offers: the samplers' own (``sampling.INVERSIONS``) and EDICT.
INVERT_METHODS = tuple(sorted(sampling.INVERSIONS)) + ('edict',)


class Coupled(NamedTuple):
  """EDICT's pair of states (Wallace et al. 2023); ``x`` is the image at the end of sampling.

  Attributes:
    x: [B, ...]
    y: [B, ...]
  """

  x: jax.Array
  y: jax.Array


def _guided(model_fn, batch_size, cond, null_cond, guidance_scale, guidance_rescale):
  return guidance.classifier_free_guidance(model_fn, batch_size=batch_size, cond=cond,
                                           null_cond=null_cond, guidance_scale=guidance_scale,
                                           guidance_rescale=guidance_rescale)


def _check_x(x, name: str) -> jax.Array:
  if not hasattr(x, 'dtype') or not jnp.issubdtype(x.dtype, jnp.floating) or jnp.ndim(x) < 1:
    raise ValueError(f'{name} must be a floating-point array [B, ...], got '
                     f'{getattr(x, "dtype", type(x).__name__)} of shape {jnp.shape(x)}.')
  return jnp.asarray(x)


# --- inversion ------------------------------------------------------------------------------------


def invert(model_fn: Callable[..., jax.Array], process, x_0: jax.Array, *, method: str = 'ddim',
           num_steps: int, prediction: str = 'eps', cond: Any = None, null_cond: Any = None,
           guidance_scale: float | jax.Array = 1.0, guidance_rescale: float = 0.0,
           t_end: float | None = None, mix: float | None = None, return_info: bool = False,
           **options: Any):
  """The start at ``t_end`` from which ``regenerate`` with the same arguments returns ``x_0``.

  Args:
    model_fn, process, prediction, cond, null_cond, guidance_scale, guidance_rescale: as
      ``sampling.sample``; guidance inverts the guided ODE.
    x_0: [B, ...] float data (float64 under ``jax.enable_x64(True)`` keeps EDICT's states
      in float64).
    method: one of ``INVERT_METHODS``: 'ddim', 'euler', 'dpmpp_2m' (``sampling.invert``: round
      trip up to discretization error) or 'edict' (exact up to round-off, 2 NFE per step).
    num_steps: grid times.
    t_end: the time to invert to, in ``(t_min, t_max]`` (default t_max).
    mix: EDICT's mixing weight p in [0.5, 1); None: 0.93 (Wallace et al.) up to 50 steps, closer
      to 1 beyond (``inversion.default_mix``: 0.93 diverged at 200 steps); 'edict' only.
    return_info: also return the info dict ('nfe', 'trajectory').
    **options: grid options (``grid``, ``spacing``, ``times``), ``return_trajectory``,
      ``callback``; for the samplers' inversions also ``order``, ``step_hook``
      (``sampling.invert``).

  Returns:
    x_T [B, ...] (a ``Coupled`` pair for 'edict'), or ``(x_T, info)``.

  Raises:
    ValueError: an unknown method (listing ``INVERT_METHODS``), a bad mix, bad cond.
  """
  if method not in INVERT_METHODS:
    raise ValueError(f'invert: method={method!r} is not known; use one of {INVERT_METHODS}.')
  if method != 'edict':
    return sampling.invert(model_fn, process, x_0, method=method, num_steps=num_steps,
                           prediction=prediction, cond=cond, null_cond=null_cond,
                           guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                           t_end=t_end, return_info=return_info, **options)
  x_0 = _check_x(x_0, 'x_0')
  num_steps = sampling._check_common(num_steps, prediction)  # pylint: disable=protected-access
  if not jnp.issubdtype(x_0.dtype, jnp.float64):
    x_0 = x_0.astype(jnp.float32)
  fn = _guided(model_fn, x_0.shape[0], cond, null_cond, guidance_scale, guidance_rescale)
  (x, y), info = inversion.edict_invert(fn, process, x_0, num_steps=num_steps,
                                        prediction=prediction, t_end=t_end, mix=mix, **options)
  return (Coupled(x, y), info) if return_info else Coupled(x, y)


def regenerate(model_fn: Callable[..., jax.Array], process, x_T, *, method: str = 'ddim',
               num_steps: int, prediction: str = 'eps', cond: Any = None,
               null_cond: Any = None, guidance_scale: float | jax.Array = 1.0,
               guidance_rescale: float = 0.0, t_start: float | None = None,
               mix: float | None = None, return_info: bool = False, **options: Any):
  """Samples back from ``invert``'s result: the inverse of ``invert`` with the same arguments.

  ``method`` 'edict' takes the ``Coupled`` pair (a plain array starts both states there, EDICT
  sampling from noise) and returns its ``x``; any other method is ``sampling.sample`` from
  ``x_T`` at ``t_start`` (``invert``'s ``t_end``). Arguments as ``invert``; returns x_0 [B, ...]
  or ``(x_0, info)``.
  """
  if method != 'edict':
    if isinstance(x_T, Coupled):
      raise ValueError(f"regenerate: x_T is EDICT's Coupled pair but method={method!r}; use "
                       "method='edict' (as invert had).")
    return sampling.sample(model_fn, process, method=method, num_steps=num_steps, x_T=x_T,
                           prediction=prediction, cond=cond, null_cond=null_cond,
                           guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                           t_start=t_start, return_info=return_info, **options)
  pair = x_T if isinstance(x_T, Coupled) else Coupled(x_T, x_T)
  x = _check_x(pair.x, 'x_T')
  num_steps = sampling._check_common(num_steps, prediction)  # pylint: disable=protected-access
  fn = _guided(model_fn, x.shape[0], cond, null_cond, guidance_scale, guidance_rescale)
  (x_0, _), info = inversion.edict_sample(fn, process, x, jnp.asarray(pair.y, x.dtype),
                                          num_steps=num_steps, prediction=prediction,
                                          t_start=t_start, mix=mix, **options)
  return (x_0, info) if return_info else x_0


# --- img2img (SDEdit) -----------------------------------------------------------------------------


def check_strength(strength) -> float:
  """``strength`` as a float in [0, 1]; ValueError otherwise."""
  try:
    value = float(strength)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    raise ValueError(f'strength must be a concrete number in [0, 1], got {strength!r}.') from None
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'strength={strength!r} must lie in [0, 1] (0 returns the input, 1 samples '
                     'from the noised input at t_max).')
  return value


def strength_times(process, *, method: str, num_steps: int, strength: float,
                   grid: str | None = None, spacing: str | None = None, shift: float = 1.0,
                   times=None) -> np.ndarray:
  """The times img2img samples over: the last ``int(num_steps * strength)`` of the method's grid.

  As diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``: ``init = min(int(num_steps *
  strength), num_steps)`` and the grid from index ``num_steps - init`` on. The grid is the one
  ``sampling.sample`` lays out (``sampling.options_for``), or ``grid`` / ``spacing`` / ``shift``,
  or ``times``, the full grid itself (``[num_steps]`` decreasing times, e.g. a scheduler's
  timesteps mapped to the process's time domain); repeated times (a rounded grid with more steps
  than the process has) are dropped after the cut.

  Returns:
    float32 ``[k]``, decreasing, possibly empty (strength 0, or too few steps).

  Raises:
    ValueError: a method without a named grid ('pc', 'ode'), a bad strength or num_steps.
  """
  if method not in sampling.DEFAULT_GRIDS:
    raise ValueError(f'img2img: method={method!r} lays out no named time grid; use one of '
                     f'{sorted(sampling.DEFAULT_GRIDS)}.')
  strength = check_strength(strength)
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}.')
  num_steps = int(num_steps)
  init = min(int(num_steps * strength), num_steps)
  if times is not None:
    if grid is not None or spacing is not None or shift != 1.0:
      raise ValueError('img2img: give either the full grid as times or grid / spacing / shift, '
                       'not both.')
    t = np.asarray(core.check_times(process, times, num_steps=num_steps, method='img2img'),
                   np.float32)
  else:
    # The grid a plain sample() call lays out (the chosen defaults where grid/spacing are None),
    # so that strength 1 is sampling from noise.
    chosen = sampling.options_for(process, method, num_steps, shift=shift, grid=grid,
                                  spacing=spacing)
    with jax.ensure_compile_time_eval():
      t = np.asarray(grids.make_grid(process, num_steps,
                                     chosen.get('grid') or sampling.DEFAULT_GRIDS[method],
                                     spacing=chosen.get('spacing'), shift=shift), np.float32)
  t = t[num_steps - init:]
  if t.size:
    t = t[np.concatenate([[True], np.diff(t) != 0])]
  return t


def img2img(model_fn: Callable[..., jax.Array], process, x_0: jax.Array, *, strength: float,
            method: str, num_steps: int, key: jax.Array, cond: Any = None, null_cond: Any = None,
            guidance_scale: float | jax.Array = 1.0, guidance_rescale: float = 0.0,
            prediction: str = 'eps', noise: jax.Array | None = None, grid: str | None = None,
            spacing: str | None = None, shift: float = 1.0, times=None,
            return_info: bool = False, **options: Any):
  """SDEdit (Meng et al. 2022): noise x_0 part of the way, then sample back.

  The kept times ``t_k = strength_times(...)`` (diffusers' count); ``x = alpha(t_k[0]) x_0 +
  sigma(t_k[0]) z`` (``processes.q_sample``), then ``sampling.sample(..., x_T=x,
  times=t_k)``. strength 0 (or ``int(num_steps * strength) = 0``) returns x_0 unchanged;
  strength 1 samples over the whole grid from ``alpha(t_max) x_0 + sigma(t_max) z`` (as diffusers:
  a trace ``alpha(t_max)`` of x_0 remains, 0.0064 for ``DiscreteVP.linear()``, 0.068 for
  Stable Diffusion's schedule). Traceable with ``strength`` and ``num_steps`` concrete.

  Args:
    model_fn, process, cond, null_cond, guidance_scale, guidance_rescale, prediction: as
      ``sampling.sample``.
    x_0: [B, ...] float, the input (at the model's scale: pixels in [-1, 1], or latents).
    strength: in [0, 1], how far to noise.
    method: a key of ``sampling.DEFAULT_GRIDS`` (every fixed-step method).
    num_steps: the steps of the full grid; ``len(t_k)`` of them run.
    key: PRNG key: the start noise z (unless ``noise``) and a stochastic method's noise.
    noise: [B, ...] the start noise z itself (e.g. to match another implementation's draw).
    grid, spacing, shift, times: the full grid of ``num_steps`` times (``strength_times``),
      which strength cuts.
    return_info: also return the info dict: the method's ('nfe', ...) plus 'times', the kept
      times.
    **options: the method's options (``eta``, ``order``, ``step_hook``, ``clip_x0``, ...);
      not ``t_start``, which strength sets.

  Returns:
    [B, ...] float32, or ``(x, info)``.

  Raises:
    ValueError: strength outside [0, 1], a method without a grid, noise of another shape,
      ``t_start`` in options, and whatever ``sampling.sample`` raises.
  """
  x_0 = _check_x(x_0, 'x_0').astype(jnp.float32)
  if 't_start' in options:
    raise ValueError('img2img: t_start is set by strength; pass strength (and grid / spacing or '
                     'times for the full grid) instead.')
  t_k = strength_times(process, method=method, num_steps=num_steps, strength=strength,
                       grid=grid, spacing=spacing, shift=shift, times=times)
  if t_k.size == 0:
    return (x_0, {'nfe': 0, 'times': t_k}) if return_info else x_0
  k_noise, k_sample = jax.random.split(key)
  if noise is None:
    noise = jax.random.normal(k_noise, x_0.shape, jnp.float32)
  elif jnp.shape(noise) != x_0.shape:
    raise ValueError(f'img2img: noise has shape {jnp.shape(noise)}; it must be x_0\'s, '
                     f'{x_0.shape}.')
  t0 = jnp.full(x_0.shape[:1], t_k[0], jnp.float32)
  x_t = processes.q_sample(process, x_0, t0, jnp.asarray(noise, jnp.float32))
  out = sampling.sample(model_fn, process, method=method, num_steps=int(t_k.size), key=k_sample,
                        x_T=x_t, prediction=prediction, cond=cond, null_cond=null_cond,
                        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                        times=t_k, return_info=return_info, **options)
  if return_info:
    x, info = out
    return x, {**info, 'times': t_k}
  return out


# --- inpainting (replacement, RePaint) ------------------------------------------------------------

# The methods ``inpaint`` repeats steps of (resample > 1): DDIM's update with eta (ddpm: eta = 1,
# the posterior of Ho et al., on the uniform grid), in a loop of its own.
RESAMPLE_METHODS = ('ddim', 'ddpm')


def _check_mask(mask, x_known: jax.Array) -> jax.Array:
  """``mask`` as a bool array broadcasting against x_known; True = keep."""
  if not hasattr(mask, 'shape'):
    mask = np.asarray(mask)
  try:
    shape = jnp.broadcast_shapes(jnp.shape(mask), x_known.shape)
  except ValueError:
    shape = None
  if shape != x_known.shape:
    raise ValueError(f'inpaint: mask has shape {jnp.shape(mask)}, which does not broadcast to '
                     f'x_known\'s {x_known.shape}; give e.g. [B, H, W, 1] or [H, W, 1] for images '
                     '(1 = keep, 0 = generate).')
  if not isinstance(mask, jax.core.Tracer):
    values = np.asarray(mask)
    if not np.all((values == 0) | (values == 1)):
      raise ValueError('inpaint: mask must hold only 0 (generate) and 1 (keep); got values in '
                       f'[{values.min()}, {values.max()}]. Threshold a soft mask first '
                       "(diffusers' masks are the opposite: white = repaint, pass 1 - mask).")
  return jnp.asarray(mask) == 1


def inpaint(model_fn: Callable[..., jax.Array], process, x_known: jax.Array, mask, *,
            method: str, num_steps: int, key: jax.Array, cond: Any = None,
            null_cond: Any = None, guidance_scale: float | jax.Array = 1.0,
            guidance_rescale: float = 0.0, prediction: str = 'eps', resample: int = 1,
            return_info: bool = False, **options: Any):
  """Fills the region where ``mask == 0`` consistently with ``x_known`` where ``mask == 1``.

  After every step, reaching time t with noise levels (alpha, sigma), the known region is set to
  ``alpha x_known + sigma z`` with fresh noise z (at the data: x_known itself, so the known values
  come back exactly); the start is the prior draw with the known region at the marginal of
  ``t_max``. With ``resample = U > 1`` (RePaint, Lugmayr et al. 2022, Algorithm 1, jump length 1)
  each step but the last to the data is taken U times, its result noised back to the step's start
  by ``q(x_t | x_s)`` in between, so the generated region adapts to the known one; NFE =
  ``(num_steps - 1) U + 1``.

  Args:
    model_fn, process, cond, null_cond, guidance_scale, guidance_rescale, prediction: as
      ``sampling.sample``.
    x_known: [B, ...] float, the image (its values where mask == 0 are ignored).
    mask: broadcasting to x_known ([B, H, W, 1], [H, W, 1], ...), only 0 and 1: **1 = keep**
      (diffusers' convention is the opposite).
    method: with resample == 1 any fixed-step method (``sampling.DEFAULT_GRIDS``); with
      resample > 1 one of ``RESAMPLE_METHODS``.
    num_steps: grid times.
    key: PRNG key: the prior draw, the known region's noise, the method's noise.
    resample: U >= 1, RePaint's resamplings per step.
    return_info: also return the info dict ('nfe', ...).
    **options: resample == 1: the method's options (``eta``, ``grid``, ``times``, ...; not
      ``step_hook``, which inpainting is); resample > 1: ``grid``, ``spacing``, ``times``,
      ``clip_x0``, ``dynamic_threshold`` and ``eta`` ('ddim', default 0).

  Returns:
    [B, ...] float32, equal to x_known where mask == 1; or ``(x, info)``.

  Raises:
    ValueError: a mask that does not broadcast or is not 0/1, a bad resample or method,
      ``step_hook`` in options.
  """
  x_known = _check_x(x_known, 'x_known').astype(jnp.float32)
  keep = _check_mask(mask, x_known)
  if isinstance(resample, bool) or not isinstance(resample, numbers.Integral) or resample < 1:
    raise ValueError(f'inpaint: resample must be an integer >= 1 (RePaint\'s U), got '
                     f'{resample!r}.')
  if 'step_hook' in options:
    raise ValueError('inpaint: step_hook is how inpainting replaces the known region; it takes '
                     'none of its own.')
  if method not in sampling.DEFAULT_GRIDS:
    raise ValueError(f'inpaint: method={method!r} is not a fixed-step method; use one of '
                     f'{sorted(sampling.DEFAULT_GRIDS)}.')
  if resample > 1 and method not in RESAMPLE_METHODS:
    raise ValueError(f'inpaint: resample={resample} repeats steps of {RESAMPLE_METHODS} only; '
                     f'got method={method!r}.')
  k_prior, k_start, k_known, k_sample = jax.random.split(key, 4)
  x_T = process.prior_sample(k_prior, x_known.shape).astype(jnp.float32)
  t_max = jnp.full(x_known.shape[:1], process.t_max, jnp.float32)
  z_T = jax.random.normal(k_start, x_known.shape, jnp.float32)
  x_T = jnp.where(keep, processes.q_sample(process, x_known, t_max, z_T), x_T)

  def known_at(alpha, sigma, k):
    z = jax.random.normal(k, x_known.shape, jnp.float32)
    return alpha * x_known + sigma * z

  if resample == 1:
    def hook(x, i, t, alpha, sigma):
      del t
      return jnp.where(keep, known_at(alpha, sigma, jax.random.fold_in(k_known, i)), x)

    return sampling.sample(model_fn, process, method=method, num_steps=num_steps, key=k_sample,
                           x_T=x_T, prediction=prediction, cond=cond, null_cond=null_cond,
                           guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                           step_hook=hook, return_info=return_info, **options)

  num_steps = sampling._check_common(num_steps, prediction)  # pylint: disable=protected-access
  fn = _guided(model_fn, x_known.shape[0], cond, null_cond, guidance_scale, guidance_rescale)
  x, info = _repaint(fn, process, x_T, keep, known_at, num_steps=num_steps, method=method,
                     key_known=k_known, key=k_sample, prediction=prediction, resample=resample,
                     **options)
  return (x, info) if return_info else x


def _repaint(fn, process, x_T, keep, known_at, *, num_steps, method, key_known, key, prediction,
             resample, grid=None, spacing=None, times=None, eta=None, clip_x0=False,
             dynamic_threshold=None):
  """RePaint's loop over DDIM-eta steps (``inpaint`` with resample > 1)."""
  if method == 'ddpm':
    if eta is not None:
      raise TypeError("inpaint(method='ddpm') takes no eta (it is 1); use method='ddim'.")
    eta, default_grid = 1.0, 'uniform'
  else:
    eta, default_grid = (0.0 if eta is None else float(eta)), 'quadratic'
  check_eta(eta)
  sched = core.make_schedule(process, num_steps, grid=grid, spacing=spacing, times=times,
                             default_grid=default_grid, method=f'inpaint({method!r})')
  n = sched.num_steps
  denoise = core.make_denoiser(fn, process, prediction=prediction, clip_x0=clip_x0,
                               dynamic_threshold=dynamic_threshold)
  xs = {'i': jnp.arange(n), 't': sched.t, 'alpha': sched.alpha[:-1], 'sigma': sched.sigma[:-1],
        'alpha_next': sched.alpha[1:], 'sigma_next': sched.sigma[1:],
        'repeats': jnp.asarray(np.where(np.arange(n) == n - 1, 1, resample))}

  def one_step(x, s, k):
    """DDIM-eta (Song et al. 2021a, eq. 12) from s['t'] to the next level, known region set."""
    x0, eps = denoise(x, s['t'], s['alpha'], s['sigma'])
    a_t, s_t, a_s, s_s = s['alpha'], s['sigma'], s['alpha_next'], s['sigma_next']
    c2 = jnp.square(eta * s_s / s_t) * jnp.maximum(s_t**2 - jnp.square(a_t * s_s / a_s), 0.0)
    k_step, k_known = jax.random.split(k)
    x_next = (a_s * x0 + jnp.sqrt(jnp.maximum(s_s**2 - c2, 0.0)) * eps
              + jnp.sqrt(c2) * jax.random.normal(k_step, x.shape, jnp.float32))
    return jnp.where(keep, known_at(a_s, s_s, k_known), x_next)

  def step(x, s):
    k_i = jax.random.fold_in(key, s['i'])

    def body(u, x):
      k_u = jax.random.fold_in(k_i, u)
      x_next = one_step(x, s, jax.random.fold_in(k_u, 0))
      # Back to the step's start by q(x_t | x_s) (Kingma et al. 2021, eq. 9), unless it was the
      # last repetition.
      a_ts = s['alpha'] / s['alpha_next']
      var = jnp.maximum(s['sigma']**2 - jnp.square(a_ts * s['sigma_next']), 0.0)
      back = a_ts * x_next + jnp.sqrt(var) * jax.random.normal(jax.random.fold_in(k_u, 1),
                                                               x.shape, jnp.float32)
      return jnp.where(u + 1 < s['repeats'], back, x_next)

    x = jax.lax.fori_loop(0, s['repeats'], body, x)
    return x, x

  x, info = core.scan_steps(step, x_T, xs, x_T=x_T, num_steps=n)
  return x, {'nfe': (n - 1) * resample + 1, **info}


def psnr(x: jax.typing.ArrayLike, ref: jax.typing.ArrayLike, *, data_range: float = 2.0
         ) -> np.ndarray:
  """Peak signal-to-noise ratio per example in dB, ``10 log10(range^2 / MSE)``.

  x, ref: [B, ...]; data_range: the span of the values (2 for images in [-1, 1]). Returns [B]
  float64 (inf where equal).
  """
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  mse = np.mean(np.square(x - ref).reshape(x.shape[0], -1), axis=1)
  with np.errstate(divide='ignore'):
    return 10.0 * np.log10(data_range**2 / mse)


__all__ = ['Coupled', 'INVERT_METHODS', 'RESAMPLE_METHODS', 'check_strength', 'img2img',
           'inpaint', 'invert', 'psnr', 'regenerate', 'strength_times']
