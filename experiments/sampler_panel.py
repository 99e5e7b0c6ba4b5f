"""Sampler defaults chosen on a panel of exact oracles, reported on another, against diffusers.

    python experiments/sampler_panel.py                    # choose, then report (~15 min, 2 CPUs)
    python experiments/sampler_panel.py --phase=choose     # writes the choice (JSON, --choice)
    python experiments/sampler_panel.py --phase=report     # held-out + target tables, defaults only
    python experiments/sampler_panel.py --phase=trained --digits-workdir=runs/digits  # a digits model
    python experiments/sampler_panel.py --phase=sweep      # defaults at 1-100 steps vs DDIM

Issue 22. Every oracle is a Gaussian mixture with diagonal component covariances (dimension 2-64,
component std 0.03-1, mean spread 0.5-3, zero or non-zero mean; plus ``SINGLES`` off-centre
single Gaussians per process) under a process: the discrete
linear and cosine schedules, the VP and VE SDEs (and, held out only, SD's scaled-linear schedule
and the continuous VP SDE). The error of a run is the RMS (over samples and coordinates) distance
to the exact probability-flow map from the same x_T (float64 SciPy, integrated in log sigma/alpha
down to 1e-7 and finished with Tweedie's formula), so it is pure discretization error.

- ``choose``: on the CHOOSING panel (seed 0), every deterministic method of ours at NFE 5, 10,
  20, 50 with every candidate option set (grid, spacing, order, lower_order_final, variant,
  warm start, ...); per (method, NFE) the option set with the smallest worst-case ratio to the
  best of all candidates on each mixture, among those within 2x DDIM's error on every oracle,
  the single Gaussians included (``bound_only``). ``euler`` is DDIM when deterministic (same update,
  tests/test_sampling.py), so it takes DDIM's choice. The cosine grid (``grids.cosine``) is tried
  in 9 shapes, registered as 'cosine@center,width'; ``--cosine-shapes`` limits the ones the choice
  may take (the library's grid='cosine' is the shape -0.5,2, and the choice names it so).
  ``--nfes`` with ``--errors`` runs some bands again (e.g. with a larger ``--batch``) and keeps
  the others' errors from that file: the library's 10-NFE band (8, 10, 14) was chosen with
  ``--batch=1024``, the other bands with 256 (docs/benchmarks.md).
  ``--choose-digits-workdir``: a trained digits model joins the choosing panel as one more entry
  (``choose_trained``: against a 1000-step reference, on each method's ``--trained-shortlist``
  best option sets per band on the oracles, since every option set compiles the U-Net sampler).
- ``report``: on the HELD-OUT panel (other seeds, other mixtures, two more schedules) and on the
  TARGET mixtures (issue 22's 8-D example and others, outside both panels): each method with
  ``sampling.sample(method=..., num_steps=...)`` and nothing else (the library's defaults), and
  diffusers' schedulers (DDIM, DPM++ 2M, DPM++ 3M, UniPC, Euler, Heun, PNDM) with their usual
  settings and every ``timestep_spacing``, one setting per scheduler, NFE and entry (the best
  geometric mean over a process's mixtures, or over its single Gaussians). NFE counts model
  evaluations (Heun: 2 per step less one; PNDM: one more than steps); ours and theirs at the
  largest step count whose NFE fits.
- ``sweep``: no silent blow-up between the bands' NFEs: on the panels of ``--sweep-panels``,
  each deterministic method with its defaults at every num_steps of ``SWEEP_STEPS``, its error
  per oracle against DDIM's (defaults) at the NFE the run spent; with ``--recheck-batch`` the
  cells over 2x again with more samples and other x_T.

diffusers' schedulers run on the process's discrete schedule: DiscreteVP's own betas; for the
SDEs, ``trained_betas`` whose alphas_cumprod are the process's ``alpha^2 / (alpha^2 + sigma^2)``
at 1000 times spread over ``[t_min, t_max]`` (VE: the variance-preserving twin of the same
probability-flow ODE in ``y = x / alpha``, ``rho = sigma / alpha``), started from the same
``y_T``. The oracle is evaluated at the scheduler's own noise level, in float64.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

NFES = (5, 10, 20, 50)
# The NFEs each band's choice is made on (sampling/defaults.py: a band's options serve every NFE
# up to its limit, 7 / 14 / 31 / beyond), pooled: one option set for the whole band.
BAND_RUNS = {5: (5, 7), 10: (8, 10, 14), 20: (16, 20, 30), 50: (40, 50)}
DIMS = (2, 4, 8, 16, 32, 64)
SPACINGS = ('linspace', 'leading', 'trailing')
RHO_END = 1e-7  # where the reference integration stops; Tweedie's formula finishes it
# Single Gaussians per process: no other mode to send a sample to, so the errors within a mode
# (sampler_single_gaussian.py) are not hidden behind the mixtures' mode flips. On the choosing
# panel they enter only the 2x-DDIM bound (no silent blow-up), not the worst-case ratio to the
# best candidate: there high-order methods are nearly exact (DDIM up to 38.8x the best), and
# choosing on those ratios too was worse on the held-out and target panels (docs/benchmarks.md).
SINGLES = 2
CHOOSE_SEED = 100  # x_T of the choosing panel's runs (sampler_grid_fit.py reuses their errors)


# --- the oracles --------------------------------------------------------------------------------


class Oracle:
  """A diagonal Gaussian mixture: weights [K], means [K, D], stds [K, D]."""

  def __init__(self, weights, means, stds, name):
    self.weights = np.asarray(weights, np.float64)
    self.means = np.asarray(means, np.float64)
    self.stds = np.asarray(stds, np.float64)
    self.name = name

  @property
  def dim(self):
    return self.means.shape[1]

  def eps_y(self, y, rho):
    """E[eps | y] for y = x_0 + rho eps, y: [B, D], float64 (closed form)."""
    var = self.stds**2 + rho**2  # [K, D]
    diff = y[:, None, :] - self.means[None]  # [B, K, D]
    logp = np.log(self.weights) - 0.5 * np.sum(np.log(var) + diff**2 / var, -1)
    logp -= logp.max(1, keepdims=True)
    resp = np.exp(logp)
    resp /= resp.sum(1, keepdims=True)
    return rho * np.einsum('bk,bkd->bd', resp, diff / var)

  def pf_map(self, y_T, rho_T):
    """The exact PF-ODE map from y_T = x_T / alpha_T at rho_T to the data (float64)."""
    from scipy import integrate  # pylint: disable=import-outside-toplevel
    shape = y_T.shape

    def rhs(s, flat):  # s = log rho: dy/ds = rho eps
      rho = np.exp(s)
      return rho * self.eps_y(flat.reshape(shape), rho).ravel()

    sol = integrate.solve_ivp(rhs, (np.log(rho_T), np.log(RHO_END)), y_T.ravel(),
                              method='DOP853', rtol=1e-10, atol=1e-10)
    if not sol.success:
      raise RuntimeError(sol.message)
    y = sol.y[:, -1].reshape(shape)
    return y - RHO_END * self.eps_y(y, RHO_END)


def random_oracle(rng, name, *, dim=None, k=None, std=None, spread=None, zero_mean=None):
  dim = dim or int(rng.choice(DIMS))
  k = k or int(rng.integers(2, 9))
  if std is None:
    lo = float(np.exp(rng.uniform(np.log(0.03), np.log(0.6))))
    std = (lo, min(1.0, lo * float(np.exp(rng.uniform(0.0, np.log(8.0))))))
  spread = spread if spread is not None else float(rng.uniform(0.5, 3.0))
  zero_mean = bool(rng.integers(2)) if zero_mean is None else zero_mean
  weights = rng.dirichlet(2.0 * np.ones(k))
  means = spread * rng.standard_normal((k, dim))
  stds = np.exp(rng.uniform(np.log(std[0]), np.log(std[1]), (k, dim)))
  if zero_mean:
    means -= weights @ means
  else:
    means += rng.uniform(-1.0, 1.0, dim)
  desc = (f'{name}: D={dim} K={k} std {std[0]:.2f}-{std[1]:.2f} spread {spread:.1f} '
          f'{"zero" if zero_mean else "non-zero"} mean')
  return Oracle(weights, means, stds, desc)


def make_process(name):
  """The process of a panel entry: 'linear', 'cosine', 'scaled_linear', 'vp', 've' (an entry
  'linear/single' holds that process's single-Gaussian oracles)."""
  from diffusion_jax import processes, sde  # pylint: disable=import-outside-toplevel
  name = name.split('/')[0]
  if name == 'linear':
    return processes.DiscreteVP.linear()
  if name == 'cosine':
    return processes.DiscreteVP.cosine()
  if name == 'scaled_linear':  # Stable Diffusion's
    return processes.DiscreteVP.from_betas(np.linspace(0.00085**0.5, 0.012**0.5, 1000)**2)
  if name == 'vp':
    return sde.VPSDE()
  if name == 've':
    return sde.VESDE()
  raise ValueError(name)


def bound_only(entry):
  """Whether a choosing-panel entry enters only the 2x-DDIM bound of the choice (``SINGLES``)."""
  return entry.endswith('/single')


def panel(kind, per_process):
  """{entry: [Oracle]} of the 'choose', 'heldout' or 'target' panel: per process ``per_process``
  mixtures (entry: the process's name) and, on the choosing and held-out panels, ``SINGLES``
  off-centre single Gaussians (entry '<process>/single', a batch and random stream of their own,
  so the mixtures' draws and x_T are those of the panel without them)."""
  if kind == 'choose':
    names, seed = ('linear', 'cosine', 've'), 0
  elif kind == 'heldout':
    names, seed = ('linear', 'cosine', 'scaled_linear', 'vp', 've'), 1
  else:
    names, seed = ('linear', 'cosine'), 2
  out = {}
  for j, name in enumerate(names):
    rng = np.random.default_rng([seed, j])
    oracles = []
    if kind == 'target' and name == 'linear':  # issue 22's example
      oracles.append(random_oracle(rng, 'issue22', dim=8, k=6, std=(0.05, 0.3), spread=1.5,
                                   zero_mean=False))
    while len(oracles) < per_process:
      oracles.append(random_oracle(rng, f'{kind}/{name}/{len(oracles)}'))
    out[name] = oracles
    if kind != 'target':
      rng = np.random.default_rng([seed, j, 1])
      out[f'{name}/single'] = [random_oracle(rng, f'{kind}/{name}/single{i}', k=1,
                                             zero_mean=False) for i in range(SINGLES)]
  return out


def mixture_model(process, logw, means, var):
  """``model(x, t, cond) -> eps`` (float32, exact) of diagonal Gaussian mixtures: log-weights
  ``[..., K]``, means and variances ``[..., K, D]``, one mixture for the batch or one per row."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def model(x, t, cond=None):
    del cond
    a = process.alpha(t)[:, None, None]
    s = process.sigma(t)[:, None, None]
    vt = a * a * var + s * s
    diff = x[:, None] - a * means
    logp = logw - 0.5 * jnp.sum(jnp.log(vt) + diff * diff / vt, -1)
    r = jax.nn.softmax(logp, -1)
    return s[:, 0] * jnp.einsum('rk,rkd->rd', r, diff / vt)  # eps = -sigma score

  return model


class Batch:
  """The oracles of one process stacked into one batch of rows, padded to the largest D and K.

  Padded coordinates have data exactly 0 and x_T = 0 there, so every sampler keeps them at 0 and
  they leave the responsibilities unchanged; padded components have weight 0.
  """

  def __init__(self, process, oracles, batch, seed):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    self.process, self.oracles, self.batch = process, oracles, batch
    d = max(o.dim for o in oracles)
    k = max(len(o.weights) for o in oracles)
    n = len(oracles)
    logw = np.full((n, k), -1e30)
    means = np.zeros((n, k, d))
    var = np.ones((n, k, d))
    mask = np.zeros((n, d))
    for i, o in enumerate(oracles):
      logw[i, :len(o.weights)] = np.log(o.weights)
      means[i, :len(o.weights), :o.dim] = o.means
      var[i, :len(o.weights), :o.dim] = o.stds**2
      var[i, :, o.dim:] = 0.0
      mask[i, :o.dim] = 1.0
    rows = np.repeat(np.arange(n), batch)
    self.rows = rows
    self.mask = mask[rows]
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n * batch, d)), np.float64)
    alpha_T, sigma_T = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
    self.rho_T = sigma_T / alpha_T
    # Prior noise at the process's scale (VE: sigma_max z), zero in the padded coordinates.
    self.x_T = (np.sqrt(alpha_T**2 + sigma_T**2) * z * self.mask).astype(np.float32)
    y_T = self.x_T.astype(np.float64) / alpha_T
    self.ref = np.zeros_like(y_T)
    for i, o in enumerate(oracles):
      sl = slice(i * batch, (i + 1) * batch)
      self.ref[sl, :o.dim] = o.pf_map(y_T[sl, :o.dim], self.rho_T)
    self.y_T = y_T
    c_logw = jnp.asarray(logw[rows], jnp.float32)
    c_means = jnp.asarray(means[rows], jnp.float32)
    c_var = jnp.asarray(var[rows], jnp.float32)

    self.model = mixture_model(process, c_logw, c_means, c_var)

  def eps_y(self, y, rho):
    """E[eps | y] at rho for every row (float64), for diffusers' runs."""
    out = np.zeros_like(y)
    for i, o in enumerate(self.oracles):
      sl = slice(i * self.batch, (i + 1) * self.batch)
      out[sl, :o.dim] = o.eps_y(y[sl, :o.dim], rho)
    return out

  def errors(self, x0):
    """[O] RMS error per oracle, over its samples and coordinates."""
    d2 = (np.asarray(x0, np.float64) - self.ref)**2 * self.mask
    out = []
    for i, o in enumerate(self.oracles):
      sl = slice(i * self.batch, (i + 1) * self.batch)
      out.append(float(np.sqrt(d2[sl].sum() / (self.batch * o.dim))))
    return np.array(out)


# --- ours ---------------------------------------------------------------------------------------


GRIDS6 = (('uniform', 'trailing'), ('quadratic', None), ('quadratic', 'trailing'),
          ('logsnr', None), ('logsnr', 'trailing'), ('karras', None))
GRIDS4 = (('quadratic', None), ('quadratic', 'trailing'), ('logsnr', None),
          ('logsnr', 'trailing'))


def _with_grid(opts, grid):
  o = dict(opts, grid=grid[0])
  if grid[1]:
    o['spacing'] = grid[1]
  return o


COSINE_SHAPES = tuple((c, w) for c in (-1.0, -0.5, 0.0) for w in (1.5, 2.0, 2.5))
COSINE_SHAPES_FIRST_ORDER = ((-0.5, 1.5), (-0.5, 2.0), (-1.0, 2.5))


def register_cosine_shapes():
  """Registers 'cosine@c,w' in grids.GRIDS for every shape tried (grids.cosine)."""
  import functools  # pylint: disable=import-outside-toplevel
  from diffusion_jax.sampling import grids  # pylint: disable=import-outside-toplevel
  for c, w in COSINE_SHAPES:
    grids.GRIDS.setdefault(f'cosine@{c:g},{w:g}',
                           functools.partial(grids.cosine, center=c, width=w))


def _cosine(shapes):
  return tuple((f'cosine@{c:g},{w:g}', 'trailing') for c, w in shapes)


# Per method, the non-grid options the cosine shapes are tried with: those of the defaults chosen
# before the cosine grid existed (every other grid is tried with every option set above).
COSINE_WITH = {
    'ddim': [{}],
    'heun': [{}],
    'plms': [{'order': 3, 'warm_start': 'ab'}, {'order': 4, 'warm_start': 'heun'}],
    'dpmpp_2m': [{'lower_order_final': True}, {'lower_order_final': False}],
    'dpmpp_3m': [{'lower_order_final': True, 'order': 2},
                 {'lower_order_final': False, 'order': 3, 'reference_third_order': True},
                 {'lower_order_final': False, 'order': 3, 'reference_third_order': False}],
    'unipc': [{'lower_order_final': True, 'order': 2, 'variant': 'bh2'},
              {'lower_order_final': False, 'order': 3, 'variant': 'bh2'},
              {'lower_order_final': True, 'order': 3, 'variant': 'bh2'}],
}


# plms's warm start and order sets, and the grids they are tried on besides the cosine shapes.
PLMS_SETS = ({'warm_start': 'heun', 'order': 4}, {'warm_start': 'ab', 'order': 3},
             {'warm_start': 'ab', 'order': 4})
PLMS_GRIDS = GRIDS4[:2] + (('logsnr', 'trailing'), ('uniform', 'trailing'))


def candidates():
  """{method: [options]}: the option sets the choice is made among.

  The grids each method is tried on are those that won somewhere in a first, wider search (all
  six grids for every method; 'quadratic' with its default 'linspace' ends never did); the
  third-order methods also at second order, their fall-back where the grid is coarse. The cosine
  shapes and grid='optimized' (fitted on this panel: ``sampler_grid_fit.py``) with the option
  sets of ``COSINE_WITH``.
  """
  trail3 = (('logsnr', 'trailing'), ('quadratic', 'trailing'), ('uniform', 'trailing'))
  out = {
      'ddim': [_with_grid({}, g) for g in GRIDS6],
      'heun': [_with_grid({}, g) for g in GRIDS6],
      'plms': [_with_grid(o, g) for o in PLMS_SETS for g in PLMS_GRIDS],
      'dpmpp_2m': [_with_grid({'lower_order_final': l}, g)
                   for l in (True, False) for g in GRIDS6],
      'dpmpp_3m': [_with_grid(dict(o, lower_order_final=l), g)
                   for o in ({'order': 3, 'reference_third_order': False},
                             {'order': 3, 'reference_third_order': True}, {'order': 2})
                   for l in (True, False) for g in trail3],
      'unipc': [_with_grid({'order': p, 'variant': 'bh2', 'lower_order_final': l}, g)
                for p in (2, 3) for l in (True, False) for g in trail3]
               + [_with_grid({'order': 3, 'variant': 'bh1', 'lower_order_final': l},
                             ('logsnr', 'trailing')) for l in (True, False)],
  }
  for method in out:
    shapes = COSINE_SHAPES_FIRST_ORDER if method in ('ddim', 'heun') else COSINE_SHAPES
    out[method] += [_with_grid(o, g) for o in COSINE_WITH[method] for g in _cosine(shapes)]
  for method in out:  # appended last: the indices of the sets above stay those of older runs
    out[method] += [_with_grid(o, ('optimized', 'trailing')) for o in COSINE_WITH[method]]
  # iPNDM's start (warm_start='ab', and PNDM's fall-back to it where the first step is long)
  # with a last step of at most second order at every num_steps (plms.LOWER_ORDER_FINAL_BELOW
  # sets it below 5 steps only): added after the 10-NFE band's first 1024-sample choice, whose
  # iPNDM-4 sent 342 of 4096 samples of a held-out mixture to another mode at 8 steps (DDIM: 90).
  out['plms'] += [_with_grid(dict(o, lower_order_final=True), g) for o in PLMS_SETS
                  for g in PLMS_GRIDS + _cosine(COSINE_SHAPES) + (('optimized', 'trailing'),)]
  return out


def nfe_of(process, method, n, opts):
  """The model evaluations of ``method`` with ``num_steps=n`` (checked against info['nfe'])."""
  from diffusion_jax.sampling import core, karras  # pylint: disable=import-outside-toplevel
  if method not in ('heun', 'plms') or (method == 'plms' and opts.get('warm_start') == 'ab'):
    return n
  sched = core.make_schedule(process, n, grid=opts.get('grid'), spacing=opts.get('spacing'))
  rho = np.asarray(sched.rho, np.float64)
  n = sched.num_steps
  if method == 'heun':
    return karras.heun_nfe(sched)
  if n == 1 or opts.get('order', 4) == 1 or not core.short_steps(rho[:2])[0]:
    return n
  return n + 1


def steps_for(process, method, nfe, opts):
  """The most steps whose NFE is at most ``nfe``, or None."""
  best = None
  for n in range(1, nfe + 1):
    try:
      if nfe_of(process, method, n, opts) <= nfe:
        best = n
    except ValueError:
      pass
  return best


def fit_steps(run, nfe):
  """``run(n) -> (result, NFE spent)`` at the most steps whose NFE is at most ``nfe`` (searched
  down from ``nfe`` by half the overshoot: heun spends up to 2 n - 2), or None."""
  n = nfe
  while n >= 1:
    out, used = run(n)
    if used <= nfe:
      return out, used
    n -= max(1, (used - nfe) // 2)
  return None


def run_ours(b: Batch, method, nfe, opts):
  """(errors [O], nfe) of one run, or (None, message); ``opts`` None: the library's defaults."""
  if opts is None:  # the library's defaults: search num_steps by the returned NFE
    def one(n):
      x0, info = _sample(b, method, n, {})
      return x0, int(info['nfe'])
    fitted = fit_steps(one, nfe)
    if fitted is None:
      return None, 'no step count fits'
    return b.errors(fitted[0]), fitted[1]
  n = steps_for(b.process, method, nfe, opts)
  if n is None:
    return None, 'no step count fits'
  try:
    x0, info = _sample(b, method, n, opts)
  except ValueError as e:
    return None, str(e)
  assert int(info['nfe']) == nfe_of(b.process, method, n, opts), (method, n, opts, info['nfe'])
  return b.errors(x0), int(info['nfe'])


def _sample(b, method, n, opts):
  import jax  # pylint: disable=import-outside-toplevel
  from diffusion_jax import sampling  # pylint: disable=import-outside-toplevel
  fn = jax.jit(lambda x: sampling.sample(b.model, b.process, method=method, num_steps=n, x_T=x,
                                         return_info=True, **opts))
  x0, info = fn(b.x_T)
  if not np.all(np.isfinite(np.asarray(x0))):
    return np.full(b.x_T.shape, np.inf), info
  return x0, info


# --- diffusers ----------------------------------------------------------------------------------


def diffusers_configs():
  """{name: [config variants]} with their usual settings (the spacing is added per run)."""
  import diffusers  # pylint: disable=import-outside-toplevel
  return {
      'DDIM': (diffusers.DDIMScheduler, [dict(clip_sample=False, set_alpha_to_one=True)]),
      'PNDM': (diffusers.PNDMScheduler, [dict(skip_prk_steps=True, set_alpha_to_one=s)
                                         for s in (False, True)]),
      'DPM++2M': (diffusers.DPMSolverMultistepScheduler,
                  [dict(solver_order=2, use_karras_sigmas=k) for k in (False, True)]),
      'DPM++3M': (diffusers.DPMSolverMultistepScheduler,
                  [dict(solver_order=3, use_karras_sigmas=k) for k in (False, True)]),
      'UniPC': (diffusers.UniPCMultistepScheduler,
                [dict(solver_order=o, solver_type=v) for o in (2, 3) for v in ('bh2', 'bh1')]),
      'Euler': (diffusers.EulerDiscreteScheduler,
                [dict(use_karras_sigmas=k) for k in (False, True)]),
      'Heun': (diffusers.HeunDiscreteScheduler,
               [dict(use_karras_sigmas=k) for k in (False, True)]),
  }


def diffusers_betas(process):
  """The scheduler config's schedule: DiscreteVP's betas, else trained_betas of the VP twin."""
  if hasattr(process, 'betas') and hasattr(process, 'num_timesteps'):
    return np.asarray(process.betas, np.float64)
  t = np.linspace(float(process.t_min), float(process.t_max), 1000)
  a, s = np.asarray(process.alpha(t), np.float64), np.asarray(process.sigma(t), np.float64)
  abar = a**2 / (a**2 + s**2)
  return 1.0 - abar / np.concatenate([[1.0], abar[:-1]])


def diffusers_steps(cls, nfe):
  """The ``set_timesteps`` count that spends ``nfe`` calls (Heun: 2 per step less one; PNDM:
  one more than steps)."""
  if cls.__name__ == 'HeunDiscreteScheduler':
    return (nfe + 1) // 2
  if cls.__name__ == 'PNDMScheduler':
    return nfe - 1
  return nfe


def drive_scheduler(torch, sched, x, eps_y, alphas_cumprod):
  """Runs a diffusers scheduler (``set_timesteps`` done) from ``x`` (torch, at its
  ``init_noise_sigma``) with an exact eps oracle; returns (x0 as float64 NumPy, calls).

  ``eps_y(y, rho)``: E[eps | y] for ``y = x_0 + rho eps`` (float64); ``alphas_cumprod``: the
  float64 schedule. Each call is evaluated at the scheduler's own noise level: ``sigmas[i]`` where
  it has them (Euler-type schedulers scale x by sqrt(1 + rho^2), the others not), else
  ``alphas_cumprod[t]``.
  """
  ve_scaled = type(sched).__name__ in ('EulerDiscreteScheduler', 'HeunDiscreteScheduler',
                                       'LMSDiscreteScheduler')
  has_sigmas = getattr(sched, 'sigmas', None) is not None
  calls = 0
  for i, t in enumerate(sched.timesteps):
    x_in = sched.scale_model_input(x, t)
    if has_sigmas:  # the scheduler's own noise level sigma / alpha for this evaluation
      rho = float(sched.sigmas[i])
      y = x.double().numpy() * (1.0 if ve_scaled else np.sqrt(1.0 + rho**2))
    else:
      a = np.sqrt(alphas_cumprod[int(t)])
      rho = np.sqrt(1 - alphas_cumprod[int(t)]) / a
      y = x_in.double().numpy() / a
    eps = eps_y(y, rho) if rho > 0 else np.zeros_like(y)
    calls += 1
    x = sched.step(torch.tensor(eps, dtype=torch.float32), t, x).prev_sample
  return x.double().numpy(), calls


def run_diffusers(b: Batch, cls, config, nfe, betas):
  """(errors [O], calls) of one diffusers scheduler on every row, or None if it refuses."""
  import torch  # pylint: disable=import-outside-toplevel
  steps = diffusers_steps(cls, nfe)
  if steps < 1:
    return None
  try:
    sched = cls(num_train_timesteps=1000, trained_betas=betas.tolist(), **config)
    sched.set_timesteps(steps)
  except Exception:  # pylint: disable=broad-except  # a configuration it rejects
    return None
  abar = sched.alphas_cumprod.double().numpy()
  x = torch.tensor(b.y_T / np.sqrt(1.0 + b.rho_T**2), dtype=torch.float32)  # the VP twin's x_T
  x = x * float(sched.init_noise_sigma)
  try:
    x0, calls = drive_scheduler(torch, sched, x, b.eps_y, abar)
  except Exception:  # pylint: disable=broad-except
    return None
  if not np.all(np.isfinite(x0)):
    return np.full(len(b.oracles), np.inf), calls
  return b.errors(x0), calls


def best_diffusers(b: Batch, nfe):
  """{scheduler: (errors [O], calls, setting)}: per scheduler the setting with the best geometric
  mean over the batch's oracles at ``nfe``."""
  betas = diffusers_betas(b.process)
  out = {}
  for name, (cls, variants) in diffusers_configs().items():
    best = None
    for variant, spacing in itertools.product(variants, SPACINGS):
      r = run_diffusers(b, cls, dict(variant, timestep_spacing=spacing), nfe, betas)
      if r is None or r[1] > nfe:
        continue
      g = _gmean(r[0])
      if best is None or g < best[0]:
        best = (g, r[0], r[1], f'{spacing} {_short(variant)}')
    if best is not None:
      out[name] = best[1:]
  return out


def _short(variant):
  return ' '.join(f'{k}={v}' for k, v in variant.items() if k not in ('clip_sample',
                                                                       'skip_prk_steps'))


def _gmean(v):
  v = np.asarray(v, np.float64)
  return float(np.exp(np.mean(np.log(v)))) if np.all(np.isfinite(v)) else float('inf')


# --- phases -------------------------------------------------------------------------------------


def _choose_process(job):
  """Worker: every candidate at every NFE on one process's choosing oracles."""
  pname, per_process, batch, methods, nfes, shapes, done = job
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  register_cosine_shapes()
  cands = candidates()
  b = Batch(make_process(pname), panel('choose', per_process)[pname], batch, seed=CHOOSE_SEED)
  out = {}
  for method in methods:
    for i, opts in enumerate(cands[method]):
      for nfe in nfes:
        if f'{method}|{i}|{nfe}' in done:  # run before (--missing-only)
          continue
        if not _shape_allowed(opts, shapes):
          out[f'{method}|{i}|{nfe}'] = [float('inf')] * len(b.oracles)
          continue
        e, _ = run_ours(b, method, nfe, opts)
        out[f'{method}|{i}|{nfe}'] = (e if e is not None else np.full(len(b.oracles), np.inf)
                                     ).tolist()
  return pname, out


def choose(args):
  """Runs every candidate on the choosing panel; returns and saves the choice.

  Per (method, NFE): among the option sets within 2x DDIM's chosen defaults at that NFE on every
  oracle, the single Gaussians included (no silent blow-up), the one with the smallest
  worst-case ratio to the best candidate of all methods on the mixtures (worst cases within 10%
  of it tied, the tie to the best geometric mean); when none is within 2x DDIM, the one closest
  to that bound.
  """
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  import multiprocessing  # pylint: disable=import-outside-toplevel
  cands = candidates()
  t0 = time.time()
  names = list(panel('choose', args.per_process))
  methods = tuple(args.methods.split(',')) if args.methods else tuple(cands)
  nfes = (tuple(int(n) for n in args.nfes.split(',')) if args.nfes
          else tuple(n for runs in BAND_RUNS.values() for n in runs))
  raw = {}
  if args.missing_only:  # only the candidates the earlier errors lack (new option sets)
    with open(args.missing_only) as f:
      raw = json.load(f)
  jobs = [(p, args.per_process, args.batch, methods, nfes, args.cosine_shapes,
           set(raw.get(p, {}))) for p in names]
  if (args.methods or args.nfes) and args.errors and os.path.exists(args.errors):
    with open(args.errors) as f:  # the other runs' errors from an earlier run
      raw = {p: {k: v for k, v in out.items()
                 if k.split('|')[0] not in methods or int(k.split('|')[2]) not in nfes}
             for p, out in json.load(f).items()}
  with concurrent.futures.ProcessPoolExecutor(
      args.jobs, mp_context=multiprocessing.get_context('spawn')) as pool:
    for pname, out in pool.map(_choose_process, jobs):
      raw.setdefault(pname, {}).update(out)
      print(f'# {pname} done at {time.time() - t0:.0f} s', flush=True)
  return _select_with_trained(raw, args)


def _select_with_trained(raw, args):
  """The choice from ``raw``, with the digits model of ``--choose-digits-workdir`` added first
  (the shortlisted runs ``raw`` lacks); writes the raw errors to ``--errors``."""
  if args.choose_digits_workdir:
    raw = choose_trained(raw, args)
  if args.errors:
    with open(args.errors, 'w') as f:
      json.dump(raw, f)
  return select(raw, args)


TIE = 1.1
OPTIMIZED_BAND = 10  # the band whose step counts grid='optimized' was fitted at


def _pool(raw, args):
  """``({(method, index, band NFE): (errors, best, DDIM at the NFE spent)}, {band NFE:
  objective})``: each candidate's errors at the band's NFEs that were run, over every process's
  oracles (a process, such as the trained model, that ran only some candidates counts the others
  as inf), per entry the best of all candidates, and DDIM's error at the NFE the run spent where
  that is below the entry's NFE and was measured (``raw['<process>:ddim']``, the digits model),
  NaN elsewhere; per band that was run, whether each entry counts in the worst case (False:
  ``bound_only``, the 2x-DDIM bound alone), the same for every candidate."""
  cands = candidates()
  procs = sorted(p for p in raw if not p.endswith(':ddim'))
  ran = sorted({int(k.split('|')[2]) for p in procs for k in raw[p]})
  # Every candidate at every NFE run: those an older file lacks count as inf.
  keys = [f'{m}|{i}|{n}' for m, opts in cands.items() for i in range(len(opts)) for n in ran]
  errs, spent_ddim, objective = {}, {}, []
  for pname in procs:
    size = len(next(iter(raw[pname].values())))
    meta = raw.get(pname + ':ddim', {})
    objective.append(np.full(size, not bound_only(pname)))
    for key in keys:
      method, i, nfe = key.split('|')
      k = (method, int(i), int(nfe))
      errs.setdefault(k, []).append(np.asarray(raw[pname].get(key, [float('inf')] * size),
                                               np.float64))
      spent_ddim.setdefault(k, []).append(np.full(size, meta.get(key, np.nan), np.float64))
  errs = {k: np.concatenate(v) for k, v in errs.items()}
  spent_ddim = {k: np.concatenate(v) for k, v in spent_ddim.items()}
  objective = np.concatenate(objective)
  for (m, i, nfe), v in errs.items():
    if not _shape_allowed(cands[m][i], getattr(args, 'cosine_shapes', None)):
      errs[m, i, nfe] = np.full_like(v, np.inf)  # only the allowed cosine shapes may be chosen
    # The last band takes every larger step count: its options must keep the method's
    # convergence order (tests/test_sampling.py), which lower_order_final and the reference
    # code's third-order coefficient give up.
    if nfe in BAND_RUNS[NFES[-1]] and (cands[m][i].get('lower_order_final')
                                       or cands[m][i].get('reference_third_order')):
      errs[m, i, nfe] = np.full_like(v, np.inf)
    # grid='optimized' was fitted at the 10-NFE band's step counts (sampler_grid_fit.py); at
    # other step counts its table is extrapolated (unipc at 5 steps on it: 2.3x DDIM's error on
    # tests/test_sampler_defaults.py's 5-D VE oracle).
    if cands[m][i].get('grid') == 'optimized' and nfe not in BAND_RUNS[OPTIMIZED_BAND]:
      errs[m, i, nfe] = np.full_like(v, np.inf)
  # Per band, the errors at its NFEs that were run, concatenated; the best of all candidates.
  ran = sorted({k[2] for k in errs})
  pooled, objectives = {}, {}
  for nfe, runs in BAND_RUNS.items():
    runs = [r for r in runs if r in ran]
    if runs:
      objectives[nfe] = np.concatenate([objective] * len(runs))
    best_r = {r: np.min(np.stack([v for k, v in errs.items() if k[2] == r]), axis=0)
              for r in runs}
    for (m, i, r), v in errs.items():
      if r in runs:
        pooled.setdefault((m, i, nfe), [[], [], []])
        pooled[m, i, nfe][0].append(v)
        pooled[m, i, nfe][1].append(best_r[r])
        pooled[m, i, nfe][2].append(spent_ddim[m, i, r])
  return {k: tuple(np.concatenate(a) for a in v) for k, v in pooled.items()}, objectives


def _ranking(pooled, objectives):
  """``{band NFE: {method: [option index, ...]}}``, the choice first.

  Per band DDIM's choice is made first, by the same rule without the 2x bound; then per (method,
  band) the option sets within 2x that choice's errors at the same NFE on every
  entry (at the NFE the run spent where that was measured: ``_pool``) come first, by their
  worst-case ratio to the best candidate of all methods over the entries of ``objectives`` (not
  ``bound_only``; worst cases within ``TIE`` of the smallest tied, the tie going to the best
  geometric mean); then the others by their worst ratio to DDIM. Also returns ``{band NFE:
  (errors {(method, i): [E]}, best [E], to_ddim(method, i): the worst ratio to DDIM, objective
  [E] bool)}``.
  """
  cands = candidates()
  out, arrays = {}, {}
  for nfe in NFES:
    if nfe not in objectives:  # a band not run (--nfes)
      continue
    obj = objectives[nfe]
    errs_b = {(m, i): v[0] for (m, i, n), v in pooled.items() if n == nfe}
    spent = {(m, i): v[2] for (m, i, n), v in pooled.items() if n == nfe}
    best = next(v[1] for (m, i, n), v in pooled.items() if n == nfe)
    worst = lambda m, i, ref: float(np.max((errs_b[m, i] / ref)[obj]))
    # DDIM's own choice first (the smallest worst case, ties to the best geometric mean): the
    # reference of every other method's 2x rule, as in tests/test_sampler_defaults.py.
    gmean = lambda m, i: _gmean((errs_b[m, i] / best)[obj])
    out.setdefault(nfe, {})['ddim'] = _tie_order(
        sorted((False, worst('ddim', i, best), i) for i in range(len(cands['ddim']))),
        lambda i: gmean('ddim', i))
    ddim = errs_b['ddim', out[nfe]['ddim'][0]]

    def to_ddim(m, i, errs_b=errs_b, spent=spent, ddim=ddim):
      return float(np.max(errs_b[m, i] / np.where(np.isnan(spent[m, i]), ddim, spent[m, i])))

    arrays[nfe] = (errs_b, best, to_ddim, obj)
    for method, opts_list in cands.items():
      if method == 'ddim':  # ranked above, without the bound it sets
        continue
      over = lambda i, m=method: to_ddim(m, i) > 2.0
      scored = sorted((over(i), to_ddim(method, i) if over(i) else worst(method, i, best), i)
                      for i in range(len(opts_list)))
      out[nfe][method] = _tie_order(scored, lambda i, m=method: gmean(m, i))
  return out, arrays


def _tie_order(scored, gmean):
  """The option indices of ``scored`` (sorted ``(over 2x DDIM, worst ratio, index)``) with the
  worst cases within ``TIE`` of the first one's tied (DDIM at 50 NFE: 2449.7 / 2451.1 / 2466.6,
  set by one oracle), the tie going to the best geometric mean ``gmean(index)``."""
  tied = sorted((i for flag, w, i in scored if flag == scored[0][0] and w <= TIE * scored[0][1]),
                key=gmean)
  return tied + [i for _, _, i in scored if i not in tied]


def select(raw, args):
  """The choice from the raw errors ``{process: {'method|index|nfe': [errors]}}``."""
  cands = candidates()
  ran = sorted({int(k.split('|')[2]) for out in raw.values() for k in out})
  print('choice on the NFEs ' + ', '.join(f'{n}: {[r for r in runs if r in ran]}'
                                          for n, runs in BAND_RUNS.items()))
  ranking, arrays = _ranking(*_pool(raw, args))
  choice, table = {}, []
  for nfe in (n for n in NFES if n in arrays):  # the bands that were run
    errs_b, best, to_ddim, obj = arrays[nfe]
    for method, opts_list in cands.items():
      i = ranking[nfe][method][0]
      choice.setdefault(method, {})[str(nfe)] = _library_name(opts_list[i])
      ratio = (errs_b[method, i] / best)[obj]
      table.append((method, nfe, opts_list[i], float(np.max(ratio)), _gmean(ratio),
                    to_ddim(method, i)))
  choice['euler'] = choice['ddim']  # the same update when deterministic
  print('\n## choice (choosing panel: worst / geometric-mean ratio to the best candidate of '
        'all methods, per oracle; worst ratio to DDIM\'s choice)\n')
  print('| method | NFE | options | worst ratio | geo-mean ratio | worst / DDIM |')
  print('|---|---|---|---|---|---|')
  for method, nfe, opts, w, gm, wd in sorted(table, key=lambda r: (list(cands).index(r[0]), r[1])):
    print(f'| {method} | {nfe} | {_fmt(opts)} | {w:.2f} | {gm:.2f} | {wd:.2f} |')
  with open(args.choice, 'w') as f:
    json.dump(choice, f, indent=1, sort_keys=True)
  print(f'\nwrote {args.choice}', flush=True)
  return choice


def _shape_allowed(opts, shapes):
  """Whether ``opts``'s grid is not a cosine shape, or one of ``shapes`` ('c,w;c,w'; None: all)."""
  grid = opts.get('grid', '')
  return not shapes or not grid.startswith('cosine@') or grid[7:] in shapes.split(';')


def _library_name(opts):
  """``opts`` with the shape of grid='cosine' (grids.COSINE_CENTER / WIDTH) under that name."""
  from diffusion_jax.sampling import grids  # pylint: disable=import-outside-toplevel
  if opts.get('grid') == f'cosine@{grids.COSINE_CENTER:g},{grids.COSINE_WIDTH:g}':
    return dict(opts, grid='cosine')
  return opts


def _fmt(opts):
  return ', '.join(f'{k}={v}' for k, v in opts.items())


OURS = ('ddim', 'euler', 'heun', 'plms', 'dpmpp_2m', 'dpmpp_3m', 'unipc')


def report(args, kind):
  """Ours with defaults vs diffusers on the held-out or target panel; prints the tables."""
  t0 = time.time()
  rows = {}  # nfe -> list over processes of (ours {m: errs}, peers {name: errs}, labels)
  for pname, oracles in panel(kind, args.per_process).items():
    b = Batch(make_process(pname), oracles, args.batch, seed=200)
    for nfe in NFES:
      ours = {}
      for m in OURS:
        e, used = run_ours(b, m, nfe, None)
        ours[m] = e if e is not None else np.full(len(oracles), np.inf)
      peers = best_diffusers(b, nfe)
      rows.setdefault(nfe, []).append((pname, ours, peers))
    print(f'# {kind}/{pname} done at {time.time() - t0:.0f} s', flush=True)
  names = [o.name for ors in panel(kind, args.per_process).values() for o in ors]
  print(f'\n## {kind} panel: {len(names)} oracles, B = {args.batch} each\n')
  for name in names:
    print(f'- {name}')
  print('\n### ours (defaults: method and num_steps only) vs diffusers\n')
  print('Per oracle, the error of the best of ours and of the best diffusers scheduler (each '
        'scheduler at its best setting over each entry: a process\'s mixtures, its single '
        'Gaussians); ratio = ours / diffusers, geometric '
        'mean and worst over the oracles; a ratio below 1 is ours ahead.\n')
  print('| NFE | ours best (geo-mean err) | diffusers best (geo-mean err) | ratio geo-mean | '
        'ratio worst | best of ours, most often | best diffusers, most often |')
  print('|---|---|---|---|---|---|---|')
  summary, ratios = {}, {}
  for nfe in NFES:
    o_best, p_best, o_who, p_who = [], [], [], []
    for _, ours, peers in rows[nfe]:
      om = np.stack([ours[m] for m in OURS])
      pn = list(peers)
      pm = np.stack([peers[n][0] for n in pn])
      o_best.append(om.min(0))
      p_best.append(pm.min(0))
      o_who += [OURS[i] for i in om.argmin(0)]
      p_who += [pn[i] for i in pm.argmin(0)]
    o_best, p_best = np.concatenate(o_best), np.concatenate(p_best)
    ratio = o_best / p_best
    summary[nfe] = (_gmean(ratio), float(np.max(ratio)))
    ratios[nfe] = ratio
    print(f'| {nfe} | {_gmean(o_best):.2e} | {_gmean(p_best):.2e} | {_gmean(ratio):.2f} | '
          f'{np.max(ratio):.2f} | {_mode(o_who)} | {_mode(p_who)} |')
  single = np.array(['/single' in n for n in names])
  if single.any():
    print()
    for label, mask in (('mixtures', ~single), ('single Gaussians', single)):
      print(f'- the {mask.sum()} {label}: ratio geo-mean (worst) ' + ' / '.join(
          f'{_gmean(ratios[nfe][mask]):.2f} ({np.max(ratios[nfe][mask]):.2f})' for nfe in NFES)
            + f' at NFE {" / ".join(map(str, NFES))}')
  print('\n### each method / scheduler: geometric-mean error over the panel, and its ratio to '
        'the best diffusers scheduler per oracle\n')
  peer_names = list(diffusers_configs())
  print('| | ' + ' | '.join(f'NFE {n}' for n in NFES) + ' |\n|' + '---|' * (len(NFES) + 1))
  for m in OURS + tuple(peer_names):
    cells = []
    for nfe in NFES:
      vals, ref = [], []
      for _, ours, peers in rows[nfe]:
        pm = np.stack([peers[n][0] for n in peers]).min(0)
        if m in OURS:
          vals.append(ours[m])
        elif m in peers:
          vals.append(peers[m][0])
        else:
          vals.append(np.full_like(pm, np.inf))
        ref.append(pm)
      v, r = np.concatenate(vals), np.concatenate(ref)
      cells.append(f'{_gmean(v):.2e} ({_gmean(v / r):.2f}x)' if np.all(np.isfinite(v))
                   else 'inf')
    label = f'ours {m}' if m in OURS else f'diffusers {m}'
    print(f'| {label} | ' + ' | '.join(cells) + ' |')
  print('\nsettings of diffusers chosen per NFE (first process shown): ')
  for nfe in NFES:
    _, _, peers = rows[nfe][0]
    print(f'- NFE {nfe}: ' + '; '.join(f'{n} [{v[2]}, {v[1]} calls]' for n, v in peers.items()))
  print(f'\n({time.time() - t0:.0f} s)', flush=True)
  if args.errors:  # per oracle, every method's and scheduler's error at each NFE
    dump = {}
    if os.path.exists(args.errors):
      with open(args.errors) as f:
        dump = json.load(f)
    dump[kind] = {
        'oracles': names,
        'errors': {str(nfe): {name: np.concatenate([
            ours[name] if name in OURS else peers[name][0] if name in peers
            else np.full(len(ours[OURS[0]]), np.inf) for _, ours, peers in rows[nfe]]).tolist()
                              for name in OURS + tuple(diffusers_configs())} for nfe in NFES}}
    with open(args.errors, 'w') as f:
      json.dump(dump, f)
  return summary


class _TrainedRows:
  """A trained model's samples as ``run_diffusers`` / ``best_diffusers`` see a ``Batch``: rows
  ``[B, D]`` of one 'oracle' whose error is the RMS to the reference ``ref`` (variance-preserving
  processes only: x_T is already at the twin's scale)."""

  def __init__(self, process, x_T, eps_y, ref):
    alpha_T, sigma_T = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
    self.process, self.oracles, self.shape, self.ref = process, [None], x_T.shape, ref
    self.y_T = np.asarray(x_T, np.float64).reshape(x_T.shape[0], -1) / alpha_T
    self.rho_T = sigma_T / alpha_T
    self._eps_y = eps_y

  def eps_y(self, y, rho):
    return self._eps_y(y.reshape(self.shape), rho).reshape(y.shape)

  def errors(self, x0):
    return np.array([np.sqrt(np.mean((np.reshape(x0, self.shape) - self.ref)**2))])


class Digits:
  """The digits model of a ``configs/digits.py`` workdir (its EMA params) and ``batch`` samples
  from a fixed x_T, with its 1000-step reference: UniPC-3 on the log-SNR grid.

  ``run(method, n, **opts) -> (x0 [B, ...] float64, NFE)``: ours; ``error(x0)``: RMS over samples
  and pixels to the reference; ``check``: DPM-Solver++(3M) with 1000 steps on the same grid, the
  reference's accuracy.
  """

  def __init__(self, workdir, batch, seed=300):
    import importlib.util  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    from diffusion_jax import preconditioning  # pylint: disable=import-outside-toplevel
    from diffusion_jax.training import builders  # pylint: disable=import-outside-toplevel
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location('digits_config',
                                                  os.path.join(root, 'configs', 'digits.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    st, params, self.step = builders.restore_ema_params(config, workdir)
    st.checkpointer.close()
    self.workdir, self.process = workdir, st.process
    self.model_fn = preconditioning.make_model_fn(
        st.network_fn, params, self.process, parameterization=config.model.parameterization,
        noise_input_kind=config.model.noise_input)
    self.prediction = preconditioning.prediction_type(config.model.parameterization)
    self.x_T = self.process.prior_sample(jax.random.PRNGKey(seed),
                                         (batch,) + tuple(st.element_shape))
    self.ref, _ = self.run('unipc', 1000, grid='logsnr', order=3)
    self.check = self.error(self.run('dpmpp_3m', 1000, grid='logsnr')[0])

  def run(self, method, n, **opts):
    import jax  # pylint: disable=import-outside-toplevel
    from diffusion_jax import sampling  # pylint: disable=import-outside-toplevel
    fn = jax.jit(lambda x: sampling.sample(self.model_fn, self.process, method=method,
                                           num_steps=n, x_T=x, prediction=self.prediction,
                                           return_info=True, **opts))
    x0, info = fn(self.x_T)
    return np.asarray(x0, np.float64), int(info['nfe'])

  def error(self, x0):
    return float(np.sqrt(np.mean((x0 - self.ref)**2)))


def choose_trained(raw, args):
  """Adds the digits model of ``--choose-digits-workdir`` to the choosing panel's raw errors.

  Each option set compiles the U-Net sampler anew (~3 s here), so the model runs only the
  ``--trained-shortlist`` best option sets per (method, band) on the oracles (``_ranking``), at
  the band's NFEs; the others count as inf there, so the choice is made among the shortlist with
  the model as one more entry of the worst case. A run that spends fewer NFE than its entry's
  (heun's guard takes Euler steps where the grid is coarse) is held to 2x DDIM's error at the NFE
  it spent, as tests/test_sampler_defaults.py holds it: DDIM with its top option set of that
  band is run there too (``raw['trained/digits:ddim']``).
  """
  from diffusion_jax.sampling import defaults  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  register_cosine_shapes()
  cands = candidates()
  # The model's runs ``raw`` has (an earlier choice on the same model) are kept and only the
  # shortlisted ones it lacks run; the shortlist is ranked on the oracles alone either way.
  out = dict(raw.get('trained/digits', {}))
  spent_ddim = dict(raw.get('trained/digits:ddim', {}))
  oracles = {p: v for p, v in raw.items() if not p.startswith('trained/')}
  ranking, _ = _ranking(*_pool(oracles, args))
  todo = [(method, i, r) for nfe, per_method in ranking.items()
          for method, order in per_method.items() for i in order[:args.trained_shortlist]
          for r in BAND_RUNS[nfe]
          if f'{method}|{i}|{r}' not in out and any(f'{method}|{i}|{r}' in v
                                                     for v in oracles.values())]
  print(f'# digits model: {len(out)} runs kept, {len(todo)} to run', flush=True)
  if not todo:
    return raw
  digits = Digits(args.choose_digits_workdir, args.digits_batch)
  print(f'# digits model {args.choose_digits_workdir} (step {digits.step}), B = '
        f'{args.digits_batch}: reference ready at {time.time() - t0:.0f} s (3M check RMS '
        f'{digits.check:.1e})', flush=True)
  ddim_at = {}
  for method, i, r in todo:  # each (method, option set, NFE) once: a NFE is in one band only
    key = f'{method}|{i}|{r}'
    n = steps_for(digits.process, method, r, cands[method][i])
    if n is None:
      out[key] = [float('inf')]
      continue
    x0, used = digits.run(method, n, **cands[method][i])
    assert used == nfe_of(digits.process, method, n, cands[method][i]), (method, n, used)
    if used < r:
      if used not in ddim_at:
        band_nfe = NFES[defaults.band('ddim', used)]
        if band_nfe in ranking:
          ddim_opts = cands['ddim'][ranking[band_nfe]['ddim'][0]]
        else:  # a band this choice does not run (--nfes): DDIM's defaults in the library
          ddim_opts = defaults.default_options('ddim', used)
        ddim_at[used] = digits.error(digits.run('ddim', used, **ddim_opts)[0])
      spent_ddim[key] = ddim_at[used]
    e = digits.error(x0)
    out[key] = [e if np.isfinite(e) else float('inf')]
    if len(out) % 20 == 0:
      print(f'# digits model: {len(out)} runs at {time.time() - t0:.0f} s', flush=True)
  print(f'# digits model: {len(out)} runs done at {time.time() - t0:.0f} s', flush=True)
  raw = dict(raw)
  raw['trained/digits'], raw['trained/digits:ddim'] = out, spent_ddim
  return raw


SWEEP_STEPS = tuple(range(1, 17)) + (18, 20, 22, 25, 28, 32, 36, 40, 50, 64, 80, 100)


def _far(b, x0):
  """[O] how many of each oracle's samples end more than half its closest pair of component
  means away from the exact map's endpoint: sent to another mode."""
  d = np.sqrt(np.sum((np.asarray(x0, np.float64) - b.ref)**2 * b.mask, -1))
  out = []
  for i, o in enumerate(b.oracles):
    gap = np.linalg.norm(o.means[:, None] - o.means[None], axis=-1)
    half = 0.5 * np.min(gap[~np.eye(len(o.means), dtype=bool)], initial=np.inf)  # K = 1: inf
    out.append(int(np.sum(d[i * b.batch:(i + 1) * b.batch] > half)))
  return np.array(out)


def _cell(b, method, n, ddim):
  """(NFE, errors [O], samples sent to another mode [O]) of ``method``'s defaults at ``n`` steps;
  ``ddim``: {NFE: (errors, far)} of DDIM's defaults, filled in at the NFE the run spent."""
  x0, info = _sample(b, method, n, {})
  nfe = int(info['nfe'])
  if nfe not in ddim:
    x_d = _sample(b, 'ddim', nfe, {})[0]
    ddim[nfe] = (b.errors(x_d), _far(b, x_d))
  return nfe, b.errors(x0), _far(b, x0)


def _recheck(args, kind, pname, oracles, cells, rechecked):
  """The cells of entry ``pname`` over 2x DDIM, run again at ``--recheck-batch`` samples of each
  oracle alone (x_T from seed 201): a mode flip of one sample in 256 makes a ratio by itself."""
  names = {o.name.split(':')[0]: j for j, o in enumerate(oracles)}
  bad = [(m, c) for (k, m), cs in cells.items() if k == kind for c in cs
         if not c[0] <= 2.0 and c[1] in names]
  for j in sorted({names[c[1]] for _, c in bad}):
    b = Batch(make_process(pname), [oracles[j]], args.recheck_batch, seed=201)
    ddim = {}
    for m, c in bad:
      if names[c[1]] != j:
        continue
      nfe, e, far = _cell(b, m, c[2], ddim)
      rechecked.append((kind, m, c[1], c[2], nfe, c[0], float(e[0] / ddim[nfe][0][0]),
                        int(far[0]), int(ddim[nfe][1][0])))


def _print_rechecked(args, rechecked):
  """The table of ``_recheck``'s cells and a count per (panel, method)."""
  print(f'\n## cells > 2x DDIM at B = {args.batch}, again at B = {args.recheck_batch} with '
        'other x_T (seed 201): ratio to DDIM, samples sent to another mode (ours / DDIM)\n')
  print(f'| panel | method | oracle | num_steps | NFE | ratio, B = {args.batch} | ratio, B = '
        f'{args.recheck_batch} | another mode, B = {args.recheck_batch} |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rechecked:
    print(f'| {r[0]} | {r[1]} | {r[2].split("/", 1)[1]} | {r[3]} | {r[4]} | {r[5]:.2f} | '
          f'{r[6]:.2f} | {r[7]} / {r[8]} |')
  for (kind, m) in sorted({(r[0], r[1]) for r in rechecked}):
    rs = [r for r in rechecked if r[:2] == (kind, m)]
    print(f'- {kind} {m}: {sum(not r[6] <= 2.0 for r in rs)} of {len(rs)} over 2x at B = '
          f'{args.recheck_batch} (worst {max(r[6] for r in rs):.2f})')


def sweep(args):
  """Each method's defaults at every num_steps of ``SWEEP_STEPS`` against DDIM's defaults at the
  NFE spent, per oracle of the ``--sweep-panels``; prints the worst ratio per method and panel,
  where it is, how many (oracle, num_steps) exceed 2x, and those cells with the samples each
  run sent to another mode (``_far``). ``--recheck-batch``: those cells again with more samples
  (``_recheck``). ``--errors``: writes every cell there (JSON)."""
  t0 = time.time()
  cells = {}  # (panel, method) -> [(ratio, oracle, num_steps, nfe, far, far_ddim)]
  raw = {}
  rechecked = []  # (panel, method, oracle, num_steps, nfe, ratio, ratio at recheck_batch, far's)
  steps = (tuple(int(n) for n in args.sweep_steps.split(',')) if args.sweep_steps
           else SWEEP_STEPS)
  for kind in args.sweep_panels.split(','):
    for pname, oracles in panel(kind, args.per_process).items():
      if args.sweep_entries and not any(e in pname for e in args.sweep_entries.split(',')):
        continue
      b = Batch(make_process(pname), oracles, args.batch,
                seed=CHOOSE_SEED if kind == 'choose' else 200)
      ddim = {}
      for m in OURS[1:]:
        if args.methods and m not in args.methods.split(','):
          continue
        for n in steps:
          nfe, e, far = _cell(b, m, n, ddim)
          r = e / ddim[nfe][0]
          raw.setdefault(f'{kind}/{pname}', {})[f'{m}|{n}'] = {
              'nfe': nfe, 'error': e.tolist(), 'ddim': ddim[nfe][0].tolist(),
              'far': far.tolist(), 'far_ddim': ddim[nfe][1].tolist()}
          for j, o in enumerate(oracles):
            cells.setdefault((kind, m), []).append(
                (float(r[j]) if r[j] <= np.inf else np.inf, o.name.split(':')[0], n, nfe,
                 int(far[j]), int(ddim[nfe][1][j])))
      if args.recheck_batch:
        _recheck(args, kind, pname, oracles, cells, rechecked)
      print(f'# {kind}/{pname} done at {time.time() - t0:.0f} s', flush=True)
  if rechecked:
    _print_rechecked(args, rechecked)
    raw['recheck'] = [list(r) for r in rechecked]
  if args.errors:
    with open(args.errors, 'w') as f:
      json.dump(raw, f)
  print(f'\n## no silent blow-up: defaults at num_steps {steps[0]}-{steps[-1]} '
        f'({len(steps)} counts), RMS error / DDIM\'s (defaults) at the NFE spent, per '
        f'oracle; B = {args.batch}\n')
  print('| panel | method | worst ratio | at (oracle, num_steps, NFE) | cells > 2x | cells |')
  print('|---|---|---|---|---|---|')
  for (kind, m), c in cells.items():
    w = max(c)
    print(f'| {kind} | {m} | {w[0]:.2f} | {w[1]}, {w[2]}, {w[3]} | '
          f'{sum(not x[0] <= 2.0 for x in c)} | {len(c)} |')
  print('\ncells > 2x DDIM (ratio, oracle, num_steps, NFE, samples sent to another mode: ours '
        '/ DDIM):')
  for (kind, m), c in cells.items():
    bad = sorted(x for x in c if not x[0] <= 2.0)
    if bad:
      print(f'- {kind} {m}: ' + '; '.join(f'{x[0]:.1f}x {x[1].split("/", 1)[1]} n={x[2]} '
                                         f'({x[3]} NFE) {x[4]}/{x[5]}' for x in bad))
  print(f'\n({time.time() - t0:.0f} s)', flush=True)


def trained_errors(digits, nfes=NFES):
  """{(name, NFE): RMS error} of a ``Digits`` model: ours with defaults ('ours <method>') and
  diffusers' schedulers ('diffusers <name>', each at its best setting), at ``nfes``.

  diffusers' schedulers evaluate the model at the time whose noise level is theirs
  (``t_from_log_snr``).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  process, model_fn = digits.process, digits.model_fn
  errs = {}
  for m in OURS:
    for nfe in nfes:
      fitted = fit_steps(lambda n, m=m: digits.run(m, n), nfe)
      if fitted is not None:
        errs[f'ours {m}', nfe] = digits.error(fitted[0])
  eps_fn = jax.jit(lambda x, t: model_fn(x, t))

  def eps_y(y, rho):  # the model's eps at the noise level rho = sigma / alpha, y = x / alpha
    t = float(process.t_from_log_snr(jnp.float32(-2.0 * np.log(rho))))
    t = min(max(t, float(process.t_min)), float(process.t_max))
    a = float(process.alpha(t))
    x = jnp.asarray(y * a, jnp.float32)
    return np.asarray(eps_fn(x, jnp.full((y.shape[0],), t, jnp.float32)), np.float64)

  rows = _TrainedRows(process, digits.x_T, eps_y, digits.ref)
  for nfe in nfes:
    for name, (e, _, _) in best_diffusers(rows, nfe).items():
      errs[f'diffusers {name}', nfe] = float(e[0])
  return errs


def report_trained(args):
  """The digits model of ``--digits-workdir`` (trained by configs/digits.py) against a 1000-step
  reference: ours with defaults and diffusers' schedulers, RMS over samples and pixels.

  The reference is UniPC-3 with 1000 steps on the log-SNR grid; DPM-Solver++(3M) with 1000
  steps on the same grid is printed beside it as a check of its accuracy (``trained_errors``).
  """
  t0 = time.time()
  digits = Digits(args.digits_workdir, args.digits_batch)
  print(f'\n## trained digits model ({args.digits_workdir}, step {digits.step}), '
        f'B = {args.digits_batch}\n')
  print(f'reference: unipc 1000 steps (log-SNR); dpmpp_3m 1000 steps differs by RMS '
        f'{digits.check:.1e} (data in [-1, 1])\n')
  errs = trained_errors(digits, NFES)
  print('| | ' + ' | '.join(f'NFE {n}' for n in NFES) + ' |\n|' + '---|' * (len(NFES) + 1))
  names = [f'ours {m}' for m in OURS] + [f'diffusers {n}' for n in diffusers_configs()]
  for name in names:
    print(f'| {name} | ' + ' | '.join(f'{errs[name, n]:.2e}' if (name, n) in errs else '-'
                                      for n in NFES) + ' |')
  print('\n| NFE | ours best | diffusers best (its best setting) | ratio |\n|---|---|---|---|')
  for nfe in NFES:
    o = min((v, k) for (k, n), v in errs.items() if n == nfe and k.startswith('ours'))
    d = min((v, k) for (k, n), v in errs.items() if n == nfe and k.startswith('diffusers'))
    print(f'| {nfe} | {o[0]:.2e} ({o[1][5:]}) | {d[0]:.2e} ({d[1][10:]}) | {o[0] / d[0]:.2f} |')
  print(f'\n({time.time() - t0:.0f} s)', flush=True)


def _mode(xs):
  vals, counts = np.unique(xs, return_counts=True)
  return str(vals[np.argmax(counts)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--phase', default='all', choices=('all', 'choose', 'report', 'trained', 'sweep'))
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--per-process', type=int, default=6)
  parser.add_argument('--choice', default='/tmp/sampler_panel_choice.json')
  parser.add_argument('--panels', default='heldout,target')
  parser.add_argument('--jobs', type=int, default=1, help='worker processes for --phase=choose')
  parser.add_argument('--errors', default=None,
                      help='also write the raw errors there (JSON; --phase=report: per oracle '
                      'and panel, each of ours and each diffusers scheduler)')
  parser.add_argument('--methods', default=None,
                      help='choose: run only these (comma-separated), keeping the others\' '
                      'errors from --errors; sweep: sweep only these')
  parser.add_argument('--digits-workdir', default='runs/digits',
                      help="--phase=trained: the workdir of a configs/digits.py run (its EMA "
                      "params); its samples' error against a 1000-step reference")
  parser.add_argument('--digits-batch', type=int, default=128,
                      help='samples of the digits model (--phase=trained, '
                      '--choose-digits-workdir)')
  parser.add_argument('--choose-digits-workdir', default=None,
                      help='choose: add this digits model (configs/digits.py workdir) to the '
                      'choosing panel, run on the --trained-shortlist best option sets per '
                      'method and band (default: oracles only)')
  parser.add_argument('--trained-shortlist', type=int, default=3,
                      help='choose: option sets per (method, band) the digits model runs')
  parser.add_argument('--nfes', default=None,
                      help='choose: run only these NFEs (comma-separated), keeping the others\' '
                      'errors from --errors (default: every NFE of BAND_RUNS); report / '
                      'trained: only these of NFES')
  parser.add_argument('--cosine-shapes', default=None,
                      help="the shapes 'center,width' of the cosine grid the choice may take, "
                      "';'-separated (default: every shape tried)")
  parser.add_argument('--missing-only', default=None,
                      help='choose: start from the raw errors in this file (--errors) and run '
                      'only the candidates it lacks, such as option sets added since')
  parser.add_argument('--select-from', default=None,
                      help='make the choice from raw errors written by --errors, no runs on '
                      'the oracles (the digits model of --choose-digits-workdir still runs '
                      'unless they have it)')
  parser.add_argument('--sweep-panels', default='choose,heldout',
                      help="--phase=sweep: the panels ('choose', 'heldout', 'target')")
  parser.add_argument('--recheck-batch', type=int, default=0,
                      help='--phase=sweep: run the cells over 2x DDIM again with this many '
                      'samples of the oracle alone, other x_T (0: no recheck)')
  parser.add_argument('--sweep-steps', default=None,
                      help='--phase=sweep: these num_steps (comma-separated) instead of '
                      'SWEEP_STEPS')
  parser.add_argument('--sweep-entries', default=None,
                      help="--phase=sweep: only the panel entries whose name contains one of "
                      "these (comma-separated; e.g. 'single', 'linear')")
  args = parser.parse_args()
  if args.missing_only and (args.methods or args.nfes):
    # The --methods / --nfes merge would replace the errors --missing-only starts from.
    parser.error('--missing-only runs every candidate the file lacks; give it without '
                 '--methods / --nfes (or run those without --missing-only).')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_enable_x64', False)
  if args.nfes and args.phase in ('report', 'trained'):
    global NFES  # pylint: disable=global-statement
    NFES = tuple(int(n) for n in args.nfes.split(','))
  if args.select_from:
    with open(args.select_from) as f:
      _select_with_trained(json.load(f), args)
  elif args.phase in ('all', 'choose'):
    choose(args)
  if args.phase in ('all', 'report'):
    for kind in args.panels.split(','):
      report(args, kind)
  if args.phase == 'trained':
    report_trained(args)
  if args.phase == 'sweep':
    sweep(args)


if __name__ == '__main__':
  main()
