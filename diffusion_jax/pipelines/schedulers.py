"""diffusers scheduler configs as our process, sampler and options: diffusers' result, step by step.

```
s = schedulers.from_config(json.load(open('sd15/scheduler/scheduler_config.json')))
x0 = sampling.sample(lambda x, t, c: unet(x, s.model_timestep(t), c), s.process,
                     method=s.method, num_steps=n, x_T=s.x_T(latents, num_steps=n),
                     prediction=s.prediction, cond=..., null_cond=..., guidance_scale=...,
                     **s.sample_options(s.method, n))
```

``from_config`` reads a diffusers ``scheduler/scheduler_config.json`` dict (missing keys take the
class's defaults, as ``SchedulerMixin.from_config`` does). Five classes are reproduced exactly,
each by the sampler of ours that runs the same algorithm, given diffusers' timesteps as ``times``
and its noise levels as ``levels`` (``sampling.core.Levels``):

- DDIMScheduler (eta = 0) -> ``ddim``: steps end at ``alphas_cumprod[t - N // n]`` (``alpha_to``:
  not the next timestep's with 'linspace' spacing), the last at ``final_alpha_cumprod``.
- DPMSolverMultistepScheduler ('dpmsolver++') -> ``dpmpp_2m`` (``dpmpp_3m`` for
  ``solver_order=3``, with the reference code's third-order term, ``reference_third_order``):
  its sigmas (Karras too), its per-step orders (``orders``: warm start, ``lower_order_final``,
  ``euler_at_final``, ``final_sigmas_type``) and ``solver_type`` (midpoint / heun).
- EulerDiscreteScheduler -> ``euler``: its fractional timesteps and sigmas (linear in the
  timestep, or Karras); ``x_T`` carries ``init_noise_sigma``.
- PNDMScheduler (``skip_prk_steps``) -> ``plms``: the pseudo-Heun start and AB of the raw model
  outputs, every step ending at ``alphas_cumprod[t - N // n]`` (the last at
  ``final_alpha_cumprod``), the correction starting at ``t_1 + N // n`` (as DDIM, not the grid's
  neighbours with 'linspace' spacing).
- UniPCMultistepScheduler (``predict_x0``) -> ``unipc``: its sigmas (Karras too),
  ``solver_order``, ``solver_type`` (bh1 / bh2), ``lower_order_final``.

Others map to the nearest method of ours on our own grid (``Scheduler.exact`` False, ``note`` says
why): DDPMScheduler -> ``ddpm``, EulerAncestralDiscreteScheduler -> ``ddim`` with eta = 1 (the
same ancestral step), HeunDiscreteScheduler and KDPM2DiscreteScheduler -> ``heun``,
LMSDiscreteScheduler -> ``plms`` (iPNDM), DPMSolverSinglestepScheduler and DEISMultistepScheduler
-> ``dpmpp_2m``; so do the supported classes with options whose exact form is not implemented
(e.g. PNDM without ``skip_prk_steps``, DPM-Solver's 'dpmsolver' / SDE algorithms). Any other
class, or an option that changes what the model is given (learned variance, flow sigmas), raises
ValueError listing the supported classes.

How diffusers' numbers map onto ours:

- **Time.** diffusers' timestep ``k`` in ``0..N-1`` indexes ``alphas_cumprod[k]``, which is
  ``alpha(k + 1)^2`` of our ``DiscreteVP`` (whose t = 0 is the data). The samplers are given the
  times ``k + 1`` and the model must see ``model_timestep(t) = t - 1``: for every integer
  timestep (DDIM, PNDM, DPM-Solver, UniPC, Euler with 'leading' / 'trailing') that is diffusers'
  timestep exactly; Euler's fractional ones ('linspace', Karras) are equal up to one ulp of
  ``k + 1`` in float32 (6.1e-5 at 512-1024) and, for Karras, the last bit of the sigmas they
  invert: torch's float32 sqrt is not correctly rounded (NumPy's is; they differ by one ulp in
  190 of SD's 1000 sigmas), which ``_sigma_to_t`` amplifies to <= 6.1e-5 (measured, 1-100
  steps; 1.2e-3, 1.3e-5 relative, at zero terminal SNR). Our own grids use the same map.
- **Noise levels.** diffusers does not tie its sigmas to its timesteps by one process (Euler
  interpolates sigma linearly between integer timesteps, the Karras schedules round the
  timesteps but not the sigmas), so the samplers get the levels explicitly
  (``sampling.core.Levels``), computed as diffusers computes them: float32 betas (torch's
  ``linspace``), ``cumprod`` accumulated in float64 as torch's, the ``2**-24`` clamp of zero
  terminal SNR in Euler, DPM-Solver and UniPC.
- **Start.** ``latents`` are the unit-variance noise diffusers' pipelines draw; they multiply by
  ``init_noise_sigma``. DDIM, PNDM, DPM-Solver and UniPC have 1 and a VP state; Euler's state is
  diffusers' "VE" ``x / alpha``, so our VP start is ``latents * init_noise_sigma * alpha_0`` with
  ``alpha_0 = 1 / sqrt(1 + sigma_0^2)``: ``sigma_max / sqrt(1 + sigma_max^2)`` (0.99765 for SD)
  with 'linspace' / 'trailing' spacing, 1 with 'leading' (``x_T``).
- **Process.** ``process`` is the ``DiscreteVP`` of the config's betas (float64, with the same
  clamp), for any other method of ours on its own grid.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes
from diffusion_jax.sampling import core

_COMMON = {
    'num_train_timesteps': 1000, 'beta_start': 0.0001, 'beta_end': 0.02,
    'beta_schedule': 'linear', 'trained_betas': None, 'prediction_type': 'epsilon',
    'steps_offset': 0, 'rescale_betas_zero_snr': False,
}

# Each class's defaults for the keys read here (diffusers 0.42 ``__init__`` signatures).
DEFAULTS: dict[str, dict[str, Any]] = {
    'DDIMScheduler': dict(_COMMON, clip_sample=True, set_alpha_to_one=True, thresholding=False,
                          clip_sample_range=1.0, timestep_spacing='leading'),
    'PNDMScheduler': dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False,
                          timestep_spacing='leading'),
    'EulerDiscreteScheduler': dict(
        _COMMON, interpolation_type='linear', use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_spacing='linspace', timestep_type='discrete', final_sigmas_type='zero'),
    'DPMSolverMultistepScheduler': dict(
        _COMMON, solver_order=2, thresholding=False, algorithm_type='dpmsolver++',
        solver_type='midpoint', lower_order_final=True, euler_at_final=False,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, final_sigmas_type='zero',
        lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing='linspace',
        use_dynamic_shifting=False),
    'UniPCMultistepScheduler': dict(
        _COMMON, solver_order=2, thresholding=False, predict_x0=True, solver_type='bh2',
        lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
        timestep_spacing='linspace', final_sigmas_type='zero', use_dynamic_shifting=False,
        sigma_min=None, sigma_max=None),
}
METHODS = {'DDIMScheduler': 'ddim', 'DPMSolverMultistepScheduler': 'dpmpp_2m',
           'EulerDiscreteScheduler': 'euler', 'PNDMScheduler': 'plms',
           'UniPCMultistepScheduler': 'unipc'}
# The nearest method of ours (on our own grid) for the classes not reproduced step for step.
NEAREST: dict[str, tuple[str, dict[str, Any]]] = {
    'DDPMScheduler': ('ddpm', {}),
    'EulerAncestralDiscreteScheduler': ('ddim', {'eta': 1.0}),
    'HeunDiscreteScheduler': ('heun', {}),
    'KDPM2DiscreteScheduler': ('heun', {}),
    'LMSDiscreteScheduler': ('plms', {'warm_start': 'ab'}),
    'DPMSolverSinglestepScheduler': ('dpmpp_2m', {}),
    'DEISMultistepScheduler': ('dpmpp_2m', {}),
}
_PREDICTIONS = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}
SPACINGS = ('leading', 'trailing', 'linspace')


def model_timestep(t: jax.typing.ArrayLike) -> jax.Array:
  """diffusers' timestep for our ``DiscreteVP`` time t: ``t - 1`` (module docstring)."""
  return jnp.asarray(t, jnp.float32) - 1.0


# --- betas and alphas_cumprod as diffusers computes them ------------------------------------------


def _cosine_betas(n: int) -> np.ndarray:
  """diffusers' ``betas_for_alpha_bar(n)`` (the 'squaredcos_cap_v2' schedule), float64."""
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
  """``torch.linspace(start, end, n, dtype=float32)`` bit for bit (on CPUs with FMA).

  torch computes ``start + step * i`` for the first half and ``end - step * (n - 1 - i)`` for the
  second, in float32 with a fused multiply-add (one rounding, emulated here in float64);
  NumPy's float64 linspace rounded to float32 differs in the last bit for ~15% of SD's betas.
  """
  a, b = np.float32(start), np.float32(end)
  step = np.float64(np.float32((b - a) / np.float32(max(n - 1, 1))))
  i = np.arange(n, dtype=np.float64)
  lo = np.float64(a) + step * i
  hi = np.float64(b) - step * (n - 1 - i)
  return np.where(i < n // 2, lo, hi).astype(np.float32)


def _cumprod(x: np.ndarray) -> np.ndarray:
  """``torch.cumprod`` of a float32 array: accumulated in float64, rounded once (measured)."""
  return np.cumprod(x.astype(np.float64)).astype(x.dtype)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. (2024), Algorithm 1, in the dtype of ``betas`` (diffusers runs it in float32)."""
  abar_sqrt = np.sqrt(_cumprod(1 - betas))
  first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
  abar_sqrt = (abar_sqrt - last) * (first / (first - last))
  abar = abar_sqrt**2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1 - alphas


def _betas(cfg: Mapping[str, Any], dtype) -> np.ndarray:
  n = int(cfg['num_train_timesteps'])
  if cfg['trained_betas'] is not None:
    betas = np.asarray(cfg['trained_betas'], np.float64)
  elif cfg['beta_schedule'] == 'linear':
    betas = (_linspace32(cfg['beta_start'], cfg['beta_end'], n) if dtype == np.float32
             else np.linspace(cfg['beta_start'], cfg['beta_end'], n))
  elif cfg['beta_schedule'] == 'scaled_linear':
    # torch.linspace(sqrt(start), sqrt(end), n, float32) ** 2 in diffusers.
    if dtype == np.float32:
      betas = _linspace32(cfg['beta_start']**0.5, cfg['beta_end']**0.5, n) ** 2
    else:
      betas = np.linspace(cfg['beta_start']**0.5, cfg['beta_end']**0.5, n) ** 2
  elif cfg['beta_schedule'] == 'squaredcos_cap_v2':
    betas = _cosine_betas(n)
  else:
    raise ValueError(f"beta_schedule={cfg['beta_schedule']!r} is not supported; use 'linear', "
                     "'scaled_linear', 'squaredcos_cap_v2' or trained_betas.")
  betas = betas.astype(dtype)
  if cfg['rescale_betas_zero_snr']:
    betas = _rescale_zero_terminal_snr(betas)
  return betas


def _clamps_zero_snr(cls: str, cfg) -> bool:
  """Euler, DPM-Solver and UniPC set ``alphas_cumprod[-1] = 2**-24`` at zero terminal SNR."""
  return bool(cfg['rescale_betas_zero_snr']) and cls in (
      'EulerDiscreteScheduler', 'DPMSolverMultistepScheduler', 'UniPCMultistepScheduler')


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """diffusers' ``_sigma_to_t``: the timestep of a sigma, interpolating log sigma linearly."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  lo, hi = log_sigmas[low], log_sigmas[low + 1]
  w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
  return (1 - w) * low + w * (low + 1)


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. (2022), eq. 5, as diffusers' ``_convert_to_karras`` (float64)."""
  ramp = np.linspace(0, 1, n)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def _vp(sigma) -> tuple[np.ndarray, np.ndarray]:
  """(alpha, sigma) of the VP state for diffusers' VE sigma, as ``_sigma_to_alpha_sigma_t``."""
  sigma = np.asarray(sigma, np.float64)
  alpha = 1 / np.sqrt(sigma**2 + 1)
  return alpha.astype(np.float32), (sigma * alpha).astype(np.float32)


def _from_abar(abar) -> tuple[np.ndarray, np.ndarray]:
  """(alpha, sigma) = (sqrt(abar), sqrt(1 - abar)), float32."""
  abar = np.asarray(abar, np.float64)
  return np.sqrt(abar).astype(np.float32), np.sqrt(1 - abar).astype(np.float32)


# --- the scheduler ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Scheduler:
  """A diffusers scheduler config as our process, method and prediction (module docstring).

  Attributes:
    class_name: the config's ``_class_name``.
    config: the class's defaults updated by the config (read-only).
    process: ``DiscreteVP`` of the config's betas (float64).
    method: the method of ``sampling.METHODS`` that reproduces the class (or its nearest).
    prediction: 'eps', 'v' or 'x0' (``prediction_type``).
    exact: whether ``method`` with ``sample_options(method, n)`` is diffusers' loop step for step.
    note: why not, when not exact.
    alphas_cumprod: [N] float32, diffusers' (clamped at zero terminal SNR as the class does).
    nearest_options: the options of ``method`` for a class mapped to its nearest method.
  """

  class_name: str
  config: Mapping[str, Any]
  process: processes.DiscreteVP
  method: str
  prediction: str
  exact: bool
  note: str
  alphas_cumprod: np.ndarray
  nearest_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_train_timesteps(self) -> int:
    return int(self.config['num_train_timesteps'])

  def model_timestep(self, t: jax.typing.ArrayLike) -> jax.Array:
    """diffusers' timestep for our time t (``t - 1``); see the module docstring."""
    return model_timestep(t)

  # --- diffusers' set_timesteps ---------------------------------------------------------------

  def _check_steps(self, num_steps: int) -> int:
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
      raise ValueError(f'num_steps must be an integer >= 1, got {num_steps!r}.')
    if num_steps > self.num_train_timesteps:
      raise ValueError(f'num_steps={num_steps} exceeds num_train_timesteps='
                       f'{self.num_train_timesteps} of the {self.class_name} config.')
    return int(num_steps)

  def _ddim_timesteps(self, n: int) -> np.ndarray:
    """DDIM's and PNDM's integer timesteps ``[n]`` by ``timestep_spacing``, decreasing."""
    big_n, spacing = self.num_train_timesteps, self.config['timestep_spacing']
    if spacing == 'linspace':
      ts = np.linspace(0, big_n - 1, n).round()[::-1]
    elif spacing == 'leading':
      ts = (np.arange(0, n) * (big_n // n)).round()[::-1] + self.config['steps_offset']
    else:  # trailing
      ts = np.round(np.arange(big_n, 0, -big_n / n)) - 1
    return ts.astype(np.int64)

  def schedule(self, num_steps: int) -> tuple[np.ndarray, core.Levels]:
    """diffusers' timesteps ``[n]`` (what the model sees, float32) and the levels of its loop.

    Raises:
      ValueError: for a class this module does not reproduce (``exact`` False).
    """
    n = self._check_steps(num_steps)
    if not self.exact:
      raise ValueError(f'{self.class_name} is not reproduced step for step: {self.note}')
    cls, cfg, abar = self.class_name, self.config, self.alphas_cumprod.astype(np.float64)
    if cls in ('DDIMScheduler', 'PNDMScheduler'):
      # PNDM lays 'linspace' and 'trailing' out ascending and reverses them: the same numbers.
      ts = self._ddim_timesteps(n)
      final = 1.0 if cfg['set_alpha_to_one'] else abar[0]
      prev = ts - self.num_train_timesteps // n
      abar_to = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
      alpha, sigma = _from_abar(np.concatenate([abar[ts], abar_to[-1:]]))
      alpha_to, sigma_to = _from_abar(abar_to)
      if cls == 'PNDMScheduler' and n > 1:
        # Its pseudo-Heun correction steps from timestep ts[1] + N // n back to ts[1].
        heun = ts[1] + self.num_train_timesteps // n
        if heun >= self.num_train_timesteps:
          raise ValueError(f'PNDMScheduler at {n} steps: its pseudo-Heun correction starts at '
                           f'timestep {heun}, past num_train_timesteps (diffusers indexes out of '
                           'range there).')
        a_h, s_h = _from_abar(abar[heun])
        return ts.astype(np.float32), core.Levels(alpha, sigma, alpha_to, sigma_to,
                                                  a_h, s_h)
      return ts.astype(np.float32), core.Levels(alpha, sigma, alpha_to, sigma_to)
    sigmas_full = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)  # float32
    log_sigmas = np.log(sigmas_full)
    if cls == 'EulerDiscreteScheduler':
      ts = self._euler_timesteps(n)
      sig = np.interp(ts, np.arange(len(sigmas_full)), sigmas_full)
      if cfg['use_karras_sigmas']:
        sig = _karras(cfg['sigma_min'] if cfg['sigma_min'] is not None else sig[-1],
                      cfg['sigma_max'] if cfg['sigma_max'] is not None else sig[0], n)
        ts = _sigma_to_t(sig, log_sigmas)
      last = sigmas_full[0] if cfg['final_sigmas_type'] == 'sigma_min' else 0.0
    else:  # DPM-Solver, UniPC
      ts = self._dpm_timesteps(n)
      if cfg['use_karras_sigmas']:
        lo, hi = sigmas_full[0], sigmas_full[-1]
        if cls == 'UniPCMultistepScheduler':
          lo = cfg['sigma_min'] if cfg['sigma_min'] is not None else lo
          hi = cfg['sigma_max'] if cfg['sigma_max'] is not None else hi
        sig = _karras(float(lo), float(hi), n)
        ts = _sigma_to_t(sig, log_sigmas)
        if cls == 'UniPCMultistepScheduler' or cfg['beta_schedule'] != 'squaredcos_cap_v2':
          ts = ts.round()
        ts = ts.astype(np.int64)
        kmin = sig[-1] if cls == 'UniPCMultistepScheduler' else sigmas_full[0]
      else:
        sig = np.interp(ts, np.arange(len(sigmas_full)), sigmas_full)
        kmin = sigmas_full[0]
      last = kmin if cfg['final_sigmas_type'] == 'sigma_min' else 0.0
    sig = np.concatenate([sig, [last]]).astype(np.float32)
    alpha, sigma = _vp(sig)
    return np.asarray(ts).astype(np.float32), core.Levels(alpha, sigma)

  def _euler_timesteps(self, n: int) -> np.ndarray:
    big_n, spacing = self.num_train_timesteps, self.config['timestep_spacing']
    if spacing == 'linspace':
      return np.linspace(0, big_n - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == 'leading':
      ts = (np.arange(0, n) * (big_n // n)).round()[::-1].astype(np.float32)
      return ts + self.config['steps_offset']
    return np.arange(big_n, 0, -big_n / n).round().astype(np.float32) - 1

  def _dpm_timesteps(self, n: int) -> np.ndarray:
    big_n, spacing = self.num_train_timesteps, self.config['timestep_spacing']
    last = big_n
    if self.class_name == 'DPMSolverMultistepScheduler':
      abar = self.alphas_cumprod.astype(np.float32)
      lam = np.log(np.sqrt(abar)) - np.log(np.sqrt(1 - abar))
      last = big_n - int(np.searchsorted(lam[::-1], self.config['lambda_min_clipped']))
    if spacing == 'linspace':
      return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == 'leading':
      ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64)
      return ts + self.config['steps_offset']
    return np.arange(last, 0, -big_n / n).round().astype(np.int64) - 1

  # --- what a pipeline passes to sampling.sample ---------------------------------------------

  def init_noise_sigma(self, num_steps: int | None = None) -> float:
    """diffusers' ``init_noise_sigma`` after ``set_timesteps(num_steps)`` (1 but for Euler)."""
    if self.class_name != 'EulerDiscreteScheduler' or not self.exact:
      return 1.0
    sig0 = self._euler_sigma0(num_steps)
    if self.config['timestep_spacing'] in ('linspace', 'trailing'):
      return sig0
    return float(np.sqrt(np.float64(sig0) ** 2 + 1))

  def _euler_sigma0(self, num_steps: int | None) -> float:
    # sigma_0 is the largest sigma; it does not depend on n but for 'linspace' at n = 1
    # (np.linspace(0, N - 1, 1) is [0]) and for 'leading' (whose factor is 1 anyway).
    _, levels = self.schedule(2 if num_steps is None else num_steps)
    a, s = np.float64(levels.alpha[0]), np.float64(levels.sigma[0])
    return float(np.float32(s / a))

  def x_T(self, latents: jax.typing.ArrayLike, *, method: str | None = None,
          num_steps: int | None = None) -> jax.Array:
    """Our start ``x_T`` for diffusers' unit-variance ``latents`` ([B, ...], any layout).

    ``latents * init_noise_sigma * alpha_0`` for ``self.method`` (module docstring), the latents
    themselves for any other method of ours (its grid starts at t_max, prior N(0, I)).
    ``num_steps`` matters only for Euler with 'linspace' spacing at one step; None means >= 2.
    """
    x = jnp.asarray(latents, jnp.float32)
    if (method is not None and method != self.method) or not self.exact:
      return x
    if self.class_name != 'EulerDiscreteScheduler':
      return x
    sig0 = self._euler_sigma0(num_steps)
    init = self.init_noise_sigma(num_steps)
    return x * np.float32(init / np.sqrt(1 + np.float64(sig0) ** 2))

  def sample_options(self, method: str, num_steps: int) -> dict[str, Any]:
    """The options of ``sampling.sample(..., method=method, num_steps=num_steps)``.

    For ``self.method`` (when ``exact``): diffusers' timesteps as ``times`` (+1, module docstring)
    with its ``levels`` and the algorithm's settings, so the run is diffusers' loop step for
    step; for a class mapped to its nearest method, that method's options on our grid; for any
    other method, ``{}`` (our own grid and defaults, same process and prediction).
    """
    if method != self.method:
      return {}
    if not self.exact:
      self._check_steps(num_steps)
      return dict(self.nearest_options)
    ts, levels = self.schedule(num_steps)
    n = ts.shape[0]
    times = (ts.astype(np.float64) + 1.0).astype(np.float32)
    opts: dict[str, Any] = {'times': times, 'levels': levels}
    cfg = self.config
    if self.class_name == 'DPMSolverMultistepScheduler':
      p = int(cfg['solver_order'])
      opts['orders'] = _dpm_orders(n, p, lower_order_final=bool(cfg['lower_order_final']),
                                   euler_at_final=bool(cfg['euler_at_final']),
                                   final_zero=cfg['final_sigmas_type'] == 'zero')
      opts['order'] = min(p, n)
      opts['solver_type'] = cfg['solver_type']
      if p == 3:
        opts['reference_third_order'] = True
    elif self.class_name == 'UniPCMultistepScheduler':
      opts.update(order=min(int(cfg['solver_order']), n), variant=cfg['solver_type'],
                  lower_order_final=bool(cfg['lower_order_final']), corrector=True)
    elif self.class_name == 'PNDMScheduler':
      opts.update(order=4, warm_start='heun')
    return opts


def _dpm_orders(n: int, p: int, *, lower_order_final: bool, euler_at_final: bool,
                final_zero: bool) -> np.ndarray:
  """The order of each of DPMSolverMultistepScheduler's n steps (its ``step``'s branches)."""
  orders = []
  for i in range(n):
    lof = i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_zero)
    los = i == n - 2 and lower_order_final and n < 15
    if p == 1 or i < 1 or lof:
      orders.append(1)
    elif p == 2 or i < 2 or los:
      orders.append(2)
    else:
      orders.append(3)
  return np.asarray(orders, np.int32)


def _unsupported(cls: str, cfg: Mapping[str, Any]) -> str | None:
  """Why ``cls`` with ``cfg`` is not reproduced step for step (None when it is)."""
  if cfg['prediction_type'] == 'sample' and cls == 'PNDMScheduler':
    return 'PNDM takes epsilon or v_prediction.'
  if cls == 'DDIMScheduler':
    if cfg['thresholding'] or cfg['clip_sample']:
      return ("DDIM's clip_sample / thresholding clip x0 without recomputing eps; our clip_x0 "
              'recomputes it.')
  elif cls == 'PNDMScheduler':
    if not cfg['skip_prk_steps']:
      return ('PNDM with its Runge-Kutta warm-up (skip_prk_steps=False) has no counterpart; '
              "ours is the pseudo-Heun start of skip_prk_steps=True.")
  elif cls == 'EulerDiscreteScheduler':
    if cfg['interpolation_type'] != 'linear':
      return f"Euler's interpolation_type={cfg['interpolation_type']!r} is not implemented."
    if cfg['use_exponential_sigmas'] or cfg['use_beta_sigmas']:
      return 'exponential and beta sigmas are not implemented (Karras sigmas are).'
    if cfg['timestep_type'] != 'discrete':
      return "timestep_type='continuous' is not implemented."
  elif cls == 'DPMSolverMultistepScheduler':
    if cfg['algorithm_type'] != 'dpmsolver++':
      return (f"algorithm_type={cfg['algorithm_type']!r}: only 'dpmsolver++' is reproduced "
              '(the SDE variants draw torch noise; dpmsolver predicts noise).')
    if cfg['solver_order'] not in (1, 2, 3):
      return f"solver_order={cfg['solver_order']} is not 1, 2 or 3."
    if cfg['thresholding']:
      return 'thresholding is not implemented.'
    if cfg['use_lu_lambdas'] or cfg['use_exponential_sigmas'] or cfg['use_beta_sigmas']:
      return 'Lu lambdas, exponential and beta sigmas are not implemented (Karras sigmas are).'
  elif cls == 'UniPCMultistepScheduler':
    if not cfg['predict_x0']:
      return 'predict_x0=False (the noise-prediction UniPC) is not implemented.'
    if cfg['solver_order'] not in (1, 2, 3):
      return f"solver_order={cfg['solver_order']} is not 1, 2 or 3."
    if cfg['thresholding'] or cfg['disable_corrector']:
      return 'thresholding and disable_corrector are not implemented.'
    if cfg['use_exponential_sigmas'] or cfg['use_beta_sigmas']:
      return 'exponential and beta sigmas are not implemented (Karras sigmas are).'
    if not cfg['lower_order_final'] and cfg['final_sigmas_type'] == 'zero':
      return ("lower_order_final=False with final sigma 0: diffusers' last step divides by "
              'h = inf (not finite); ours extrapolates to the data instead.')
  return None


def _caveat(cls: str, cfg: Mapping[str, Any]) -> str:
  """Where an exact mapping still differs from diffusers (a note; '' when nowhere)."""
  if (cls == 'UniPCMultistepScheduler' and cfg['solver_type'] == 'bh1'
      and cfg['final_sigmas_type'] == 'zero'):
    return ("diffusers' bh1 last step onto sigma 0 computes B(h) * 0 with B(h) = -h = -inf and "
            'returns NaN; ours returns the data prediction there (the limit of the step). '
            'Every earlier step is equal.')
  return ''



def from_config(config: Mapping[str, Any]) -> Scheduler:
  """The ``Scheduler`` of a diffusers ``scheduler_config.json`` dict (module docstring).

  Args:
    config: the JSON dict, with ``_class_name``; missing keys take the class's defaults, unknown
      keys are ignored (as diffusers does).

  Raises:
    ValueError: an unknown class (listing the supported ones), an unknown beta schedule,
      prediction type or spacing, or an option that changes what the model is given (learned
      variance, flow sigmas, dynamic shifting).
  """
  if not isinstance(config, Mapping):
    raise ValueError(f'config must be a mapping (the scheduler_config.json dict), got '
                     f'{type(config).__name__}.')
  cls = config.get('_class_name')
  if cls not in METHODS and cls not in NEAREST:
    raise ValueError(f'scheduler _class_name={cls!r} is not supported; reproduced step for step: '
                     f'{sorted(METHODS)}; mapped to the nearest method: {sorted(NEAREST)}.')
  cfg = dict(DEFAULTS.get(cls, _COMMON))
  cfg.update({k: v for k, v in config.items() if not k.startswith('_')})
  # What the classes' __init__ do with these keys.
  if cls == 'PNDMScheduler':
    cfg['rescale_betas_zero_snr'] = False  # PNDM has no such option: the key is ignored
  elif cls == 'DPMSolverMultistepScheduler':
    if cfg['algorithm_type'] == 'deis':
      cfg['algorithm_type'] = 'dpmsolver++'
    if cfg['solver_type'] in ('logrho', 'bh1', 'bh2'):
      cfg['solver_type'] = 'midpoint'
  elif cls == 'UniPCMultistepScheduler' and cfg['solver_type'] in ('midpoint', 'heun', 'logrho'):
    cfg['solver_type'] = 'bh2'
  if cfg['prediction_type'] not in _PREDICTIONS:
    raise ValueError(f"prediction_type={cfg['prediction_type']!r} is not supported; use one of "
                     f'{sorted(_PREDICTIONS)} (flow models are not DiscreteVP).')
  if cfg.get('timestep_spacing', 'leading') not in SPACINGS:
    raise ValueError(f"timestep_spacing={cfg['timestep_spacing']!r} is not known; use one of "
                     f'{SPACINGS}.')
  for key in ('use_flow_sigmas', 'use_dynamic_shifting'):
    if cfg.get(key):
      raise ValueError(f'{cls} with {key}=True is a flow-matching schedule, not a DiscreteVP; '
                       'not supported.')
  if cfg.get('variance_type') is not None:
    raise ValueError(f"variance_type={cfg['variance_type']!r}: a model with learned variance "
                     'outputs twice the channels; not supported.')
  if cfg.get('solver_p') is not None:
    raise ValueError('UniPC with solver_p is not supported.')
  prediction = _PREDICTIONS[cfg['prediction_type']]
  abar32 = _cumprod(1 - _betas(cfg, np.float32))
  betas64 = _betas(cfg, np.float64)
  if _clamps_zero_snr(cls, cfg):
    abar32[-1] = np.float32(2.0**-24)
    abar64 = np.cumprod(1 - betas64)
    betas64[-1] = 1 - 2.0**-24 / abar64[-2]
  process = processes.DiscreteVP.from_betas(betas64)
  if cls in NEAREST:
    method, options = NEAREST[cls]
    return Scheduler(class_name=cls, config=types.MappingProxyType(cfg), process=process,
                     method=method, prediction=prediction, exact=False,
                     note=f'{cls} is not implemented here; {method!r} is the nearest method.',
                     alphas_cumprod=abar32, nearest_options=options)
  method = METHODS[cls]
  if cls == 'DPMSolverMultistepScheduler' and cfg['solver_order'] == 3:
    method = 'dpmpp_3m'
  why = _unsupported(cls, cfg)
  if why is not None and cls == 'DPMSolverMultistepScheduler' and cfg['algorithm_type'].startswith(
      'sde'):
    method = 'dpmpp_2m_sde'
  return Scheduler(class_name=cls, config=types.MappingProxyType(cfg), process=process,
                   method=method, prediction=prediction, exact=why is None,
                   note=why or _caveat(cls, cfg), alphas_cumprod=abar32)


__all__ = ['Scheduler', 'from_config', 'model_timestep', 'METHODS', 'NEAREST', 'DEFAULTS']
