"""Editing (diffusion_jax/editing.py) on exact Gaussian oracles, and the CLI's editing modes.

For Gaussian data N(mu, C) the eps-prediction is closed form, ``eps = sigma (alpha^2 C +
sigma^2 I)^-1 (x - alpha mu)``, so what is measured is the editing method, not a network: the
round trip of an inversion, the distribution img2img and inpainting sample from (against the
data's moments and the exact conditional of a correlated Gaussian), and the closed-form expected
distance of an img2img edit from its input. The numbers in the docstrings were measured with these
tests' seeds on CPU (float32).
"""

import functools
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import editing, processes, sampling, training
from diffusion_jax.sampling import inversion
from diffusion_jax.training import inference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import tiny  # pylint: disable=wrong-import-position

PROCESS = processes.DiscreteVP.linear()


def gauss_model(mu, cov, process=PROCESS):
  """The exact ``model_fn(x, t, cond=None) -> eps`` of N(mu, cov) data, x: [B, D]."""
  lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
  mu, lam, u = (jnp.asarray(v, jnp.float32) for v in (mu, lam, u))

  def fn(x, t, cond=None):
    del cond
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    return s * (((x - a * mu) @ u) / (a**2 * lam + s**2)) @ u.T

  return fn


# Data whose mean is linear in the conditioning, N(M_a a + M_b b, S I): guidance of its exact model
# is the model at the guided cond (tests/test_sampling.py), a Gaussian ODE again.
M_A = np.array([[1.0, 0.5], [-0.3, 0.8]])
M_B = np.array([[0.2, -0.4], [0.6, 0.1]])
S = 0.25


def affine_cond_model(process=PROCESS):
  m_a, m_b = jnp.asarray(M_A, jnp.float32), jnp.asarray(M_B, jnp.float32)

  def fn(x, t, cond):
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    m = cond['a'] @ m_a.T + cond['b'] @ m_b.T
    return s * (x - a * m) / (a**2 * S + s**2)

  return fn


@functools.lru_cache(maxsize=None)
def guided_setup(b=64):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
  cond = {'a': 0.5 * jax.random.normal(k1, (b, 2)), 'b': 0.5 * jax.random.normal(k2, (b, 2))}
  null = {'a': jnp.array([[0.3, -0.2]]), 'b': jnp.array([[0.1, 0.2]])}
  mean = cond['a'] @ M_A.T + cond['b'] @ M_B.T
  x0 = (mean + np.sqrt(S) * jax.random.normal(k3, (b, 2))).astype(jnp.float32)
  return cond, null, x0


def rms(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean(np.sum((x - ref)**2, -1))))


# --- inversion ------------------------------------------------------------------------------------


def _round_trip(method, n, w, **options):
  cond, null, x0 = guided_setup()
  kw = dict(method=method, num_steps=n, cond=cond, null_cond=null, guidance_scale=w, **options)
  model = affine_cond_model()
  back = jax.jit(lambda x: editing.regenerate(
      model, PROCESS, editing.invert(model, PROCESS, x, **kw), **kw))(x0)
  return rms(back, x0)


def test_edict_round_trip_is_exact_where_ddim_drifts_with_guidance():
  """Guidance w = 3 on the linear-in-cond Gaussian, RMS of sample(invert(x_0)) - x_0 over 64
  points. Measured: DDIM 0.548 / 0.285 / 0.145 at 10 / 20 / 40 steps (order 1: the error halves
  per doubling; at w = 1: 0.226 / 0.118 / 0.060, at w = 7.5: 1.6 / 0.83 / 0.42, so guidance
  multiplies the drift); DPM-Solver++(2M) 0.106 / 0.021 / 0.0024; EDICT (p = 0.93) 4.5e-4 at 10
  steps, 6.4e-6 at 40, float32 round-off amplified by the first steps' ``1 / a = alpha_t /
  alpha_{t+1}`` (up to 7 at 10 steps), not a discretization error."""
  ns = (10, 20, 40)
  # One grid for every step count (the quadratic one these figures were measured on): the
  # sampler's defaults change grid between step-count bands, which would blur the order.
  ddim = [_round_trip('ddim', n, 3.0, grid='quadratic') for n in ns]
  slope = np.log(ddim[1] / ddim[2]) / np.log(2)
  assert abs(slope - 1.0) < 0.2 and ddim[0] > 0.3, ddim
  assert _round_trip('ddim', 10, 1.0, grid='quadratic') < 0.6 * ddim[0]  # guidance: more drift
  edict = [_round_trip('edict', n, 3.0) for n in (10, 40)]
  assert edict[0] < 2e-3 and edict[1] < 5e-5, edict
  assert edict[0] < ddim[0] / 100 and edict[1] < ddim[2] / 1000


def test_edict_default_mix_stays_exact_at_many_steps():
  """Wallace et al.'s p = 0.93 (for 50 steps) amplifies round-off along x - y by p^(-2n) during
  inversion: at 400 steps the round trip diverges (measured RMS 3.6e6). The default p =
  0.93^(50 / n) beyond 50 steps keeps it exact (measured 2.6e-5 at 200 with 0.93, 4.3e-6 with
  0.97; 1.2e-5 at 400 with 0.99)."""
  assert inversion.default_mix(50) == 0.93 and inversion.default_mix(10) == 0.93
  assert abs(inversion.default_mix(200) - 0.93**0.25) < 1e-12
  assert _round_trip('edict', 400, 3.0) < 1e-4
  assert not _round_trip('edict', 400, 3.0, mix=0.93) < 1.0


def _edict_round_trip(dtype, n=20):
  """max |round trip - x_0| of EDICT on the guided model written out (w = 3), in ``dtype``."""
  cond, null, x0 = guided_setup(16)
  m_a, m_b = jnp.asarray(M_A, dtype), jnp.asarray(M_B, dtype)
  mean = lambda c: c['a'].astype(dtype) @ m_a.T + c['b'].astype(dtype) @ m_b.T
  m = mean(null) + 3.0 * (mean(cond) - mean(null))

  def fn(x, t):
    a = PROCESS.alpha(t).astype(dtype)[:, None]
    s = PROCESS.sigma(t).astype(dtype)[:, None]
    return s * (x - a * m) / (a**2 * S + s**2)

  x = jnp.asarray(x0, dtype)
  (x_T, y_T), info = inversion.edict_invert(fn, PROCESS, x, num_steps=n)
  (back, back_y), _ = inversion.edict_sample(fn, PROCESS, x_T, y_T, num_steps=n)
  assert x_T.dtype == back.dtype == dtype and info['nfe'] == 2 * n
  return max(float(jnp.max(jnp.abs(back - x))), float(jnp.max(jnp.abs(back_y - x))))


def test_edict_is_exact_up_to_round_off():
  """The same EDICT round trip in float32 and float64 (the model too): the error scales with the
  machine epsilon (ratio 1.9e-9), so it is round-off, and inversion inverts the sampler exactly.
  Measured max errors: 1.4e-5 (float32), 1.7e-12 (float64)."""
  e32 = _edict_round_trip(jnp.float32)
  with jax.enable_x64(True):
    e64 = _edict_round_trip(jnp.float64)
  assert e64 < 1e-10 and e64 < 1e-6 * e32, (e32, e64)


def test_edict_inversion_approximates_the_pf_ode_map():
  """EDICT's x_T is the state at t_max: both of its states approach the exact inverse PF-ODE
  map of the guided Gaussian (linear: ``(y - m) / sqrt(S + rho^2)`` is constant along it, m the
  guided mean) as the steps grow, as DDIM inversion does. Measured RMS at 10 / 20 / 40 / 80
  steps: EDICT x 0.69 / 0.33 / 0.15 / 0.040, DDIM 0.54 / 0.27 / 0.13 / 0.067."""
  cond, null, x0 = guided_setup()
  mean = lambda c: np.asarray(c['a'] @ M_A.T + c['b'] @ M_B.T, np.float64)
  m = mean(null) + 3.0 * (mean(cond) - mean(null))
  a, s = float(PROCESS.alpha(PROCESS.t_max)), float(PROCESS.sigma(PROCESS.t_max))
  exact = a * (m + np.sqrt((S + (s / a)**2) / S) * (np.asarray(x0, np.float64) - m))
  errs = []
  for n in (20, 40):
    pair = editing.invert(affine_cond_model(), PROCESS, x0, method='edict', num_steps=n,
                          cond=cond, null_cond=null, guidance_scale=3.0)
    errs.append((rms(pair.x, exact), rms(pair.y, exact)))
  assert errs[0][0] < 0.5 and errs[1][0] < errs[0][0] / 1.7 and errs[1][1] < errs[0][1] / 1.7, errs


def test_invert_dispatch_and_errors():
  cond, null, x0 = guided_setup()
  model = affine_cond_model()
  plain = sampling.invert(model, PROCESS, x0, method='dpmpp_2m', num_steps=5, cond=cond)
  np.testing.assert_array_equal(
      editing.invert(model, PROCESS, x0, method='dpmpp_2m', num_steps=5, cond=cond), plain)
  pair = editing.invert(model, PROCESS, x0, method='edict', num_steps=5, cond=cond)
  assert isinstance(pair, editing.Coupled) and pair.x.shape == x0.shape
  with pytest.raises(ValueError, match=r"method='ddpm' is not known.*'edict'"):
    editing.invert(model, PROCESS, x0, method='ddpm', num_steps=5, cond=cond)
  with pytest.raises(ValueError, match='Coupled pair'):
    editing.regenerate(model, PROCESS, pair, method='ddim', num_steps=5, cond=cond)
  with pytest.raises(ValueError, match=r'mix=1.0 must lie in \[0.5, 1\)'):
    editing.invert(model, PROCESS, x0, method='edict', num_steps=5, cond=cond, mix=1.0)
  with pytest.raises(ValueError, match='needs null_cond'):
    editing.invert(model, PROCESS, x0, method='edict', num_steps=5, cond=cond,
                   guidance_scale=2.0)
  # A plain start: EDICT sampling from noise, both states at x_T.
  x = editing.regenerate(model, PROCESS, jax.random.normal(jax.random.PRNGKey(0), x0.shape),
                         method='edict', num_steps=5, cond=cond)
  assert x.shape == x0.shape and bool(jnp.all(jnp.isfinite(x)))


# --- img2img --------------------------------------------------------------------------------------


def _diffusers_kept(n, strength, spacing):
  """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps on its DDIMScheduler."""
  import diffusers  # pylint: disable=import-outside-toplevel
  scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
  scheduler.set_timesteps(n)
  fake = types.SimpleNamespace(scheduler=scheduler)
  timesteps, count = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(fake, n, strength,
                                                                            'cpu')
  assert len(timesteps) == count
  return np.asarray(timesteps.numpy(), np.float32)


@pytest.mark.parametrize('spacing', ['leading', 'trailing'])
def test_strength_keeps_diffusers_steps(spacing):
  """The kept steps are diffusers' (our DDPM step t is diffusers' timestep t - 1), including the
  rounding of ``int(num_steps * strength)`` (10 * 0.7 = 7.000000000000001 -> 7)."""
  for n in (1, 7, 10, 50):
    for strength in (0.0, 0.05, 0.3, 0.5, 0.7, 0.75, 0.99, 1.0):
      ours = editing.strength_times(PROCESS, method='ddim', num_steps=n, strength=strength,
                                    grid='uniform', spacing=spacing)
      np.testing.assert_array_equal(ours, _diffusers_kept(n, strength, spacing) + 1,
                                    err_msg=f'n={n}, strength={strength}')


def test_img2img_ends_and_errors():
  mu, c = np.array([0.5, -0.3]), np.array([0.6, 0.2])
  model = gauss_model(mu, np.diag(c))
  x0 = jnp.asarray(mu + np.sqrt(c) * np.random.default_rng(0).normal(size=(8, 2)), jnp.float32)
  key = jax.random.PRNGKey(1)
  # strength 0 (and too few steps for the strength) returns the input itself.
  np.testing.assert_array_equal(editing.img2img(model, PROCESS, x0, strength=0.0, method='ddim',
                                                num_steps=10, key=key), x0)
  np.testing.assert_array_equal(editing.img2img(model, PROCESS, x0, strength=0.09,
                                                method='ddim', num_steps=10, key=key), x0)
  # strength 1: plain sampling over the whole grid from the noised input at t_max.
  z = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
  out, info = editing.img2img(model, PROCESS, x0, strength=1.0, method='dpmpp_2m', num_steps=10,
                              key=key, noise=z, return_info=True)
  x_T = PROCESS.alpha(PROCESS.t_max) * x0 + PROCESS.sigma(PROCESS.t_max) * z
  np.testing.assert_array_equal(out, sampling.sample(model, PROCESS, method='dpmpp_2m',
                                                     num_steps=10, x_T=x_T))
  assert info['nfe'] == 10 and info['times'][0] == PROCESS.t_max
  call = functools.partial(editing.img2img, model, PROCESS, x0, method='ddim', num_steps=10,
                           key=key)
  for bad in (-0.1, 1.5, float('nan')):
    with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
      call(strength=bad)
  with pytest.raises(ValueError, match="method='ode' lays out no named time grid"):
    editing.img2img(model, PROCESS, x0, strength=0.5, method='ode', num_steps=10, key=key)
  with pytest.raises(ValueError, match='t_start is set by strength'):
    call(strength=0.5, t_start=500.0)
  with pytest.raises(ValueError, match='times has 2 entries but num_steps=10'):
    call(strength=0.5, times=np.array([900.0, 500.0]))
  # times: the full grid, cut by strength as a named grid is.
  full = np.asarray(sampling.grids.make_grid(PROCESS, 10, 'quadratic'))
  np.testing.assert_array_equal(
      editing.strength_times(PROCESS, method='ddim', num_steps=10, strength=0.5, times=full),
      full[5:])
  np.testing.assert_array_equal(call(strength=0.5, times=full),
                                call(strength=0.5, grid='quadratic'))
  with pytest.raises(ValueError, match=r'noise has shape \(3, 2\)'):
    call(strength=0.5, noise=jnp.zeros((3, 2)))


N_STAT = 16384


@pytest.mark.parametrize('strength', [0.1, 0.5, 1.0])
def test_img2img_samples_the_data_and_stays_close(strength):
  """x_0 ~ N(mu, diag(c)), 16384 draws, DPM-Solver++(2M) over 50 quadratic steps' kept times (the
  grid these figures were measured on). The output
  has the data's mean and variance within 4 standard errors (mean: sqrt(c / N); variance: c
  sqrt(2 / N), 1.1%); the discretization bias measured is below 2.2% of the variance. Its mean
  squared distance to the input is the closed form of the exact PF-ODE map from ``t_k``,
  ``E (out - x_0)^2 = 2 c (1 - sqrt(c / (c + rho^2)))`` with ``rho = sigma / alpha`` there,
  within 4 relative standard errors (sqrt(2 / N)): it grows with strength from ~0 (measured
  ratios to the closed form 0.98-1.02)."""
  mu, c = np.array([0.5, -0.3, 0.2, 0.0]), np.array([0.6, 0.2, 1.0, 0.05])
  model = gauss_model(mu, np.diag(c))
  x0 = mu + np.sqrt(c) * np.asarray(jax.random.normal(jax.random.PRNGKey(1), (N_STAT, 4)))
  out, info = jax.jit(lambda x: editing.img2img(
      model, PROCESS, x, strength=strength, method='dpmpp_2m', num_steps=50, grid='quadratic',
      key=jax.random.PRNGKey(2), return_info=True))(jnp.asarray(x0, jnp.float32))
  out = np.asarray(out, np.float64)
  assert info['nfe'] == int(50 * strength)
  se_mean = np.sqrt(c / N_STAT)
  np.testing.assert_array_less(np.abs(out.mean(0) - mu), 4 * se_mean + 1e-3)
  np.testing.assert_array_less(np.abs(out.var(0) / c - 1), 4 * np.sqrt(2 / N_STAT) + 0.01)
  t0 = float(info['times'][0])
  rho2 = (float(PROCESS.sigma(t0)) / float(PROCESS.alpha(t0)))**2
  expected = 2 * c * (1 - np.sqrt(c / (c + rho2)))
  ratio = np.mean((out - x0)**2, 0) / expected
  np.testing.assert_array_less(np.abs(ratio - 1), 4 * np.sqrt(2 / N_STAT) + 0.01)
  if strength == 0.1:
    assert np.all(np.mean((out - x0)**2, 0) < 0.05 * c)  # close to the input


# --- inpainting -----------------------------------------------------------------------------------


def test_inpaint_keeps_the_known_pixels_and_samples_the_rest():
  """Independent per-pixel Gaussian data, pixels 0 and 2 known (held at values 3-4 standard
  deviations off the mean), 16384 draws, DPM-Solver++(2M), 50 steps: the known pixels come back
  bit for bit; the unknown ones have the data's mean and variance within 4 standard errors
  (measured z-scores of the means 0.9 and -1.1, variance ratios 1.011 and 1.022; the
  discretization bias is below 2.2%)."""
  mu, c = np.array([0.5, -0.3, 0.2, 0.0]), np.array([0.6, 0.2, 1.0, 0.05])
  model = gauss_model(mu, np.diag(c))
  x_known = jnp.broadcast_to(jnp.array([3.5, 0.0, -3.5, 0.0]), (N_STAT, 4))
  mask = jnp.array([1.0, 0.0, 1.0, 0.0])
  out = jax.jit(lambda k: editing.inpaint(model, PROCESS, x_known, mask, method='dpmpp_2m',
                                          num_steps=50, key=k))(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(out[:, ::2], x_known[:, ::2])
  out = np.asarray(out, np.float64)[:, 1::2]
  mu_u, c_u = mu[1::2], c[1::2]
  np.testing.assert_array_less(np.abs(out.mean(0) - mu_u), 4 * np.sqrt(c_u / N_STAT))
  np.testing.assert_array_less(np.abs(out.var(0) / c_u - 1), 4 * np.sqrt(2 / N_STAT) + 0.01)
  # Every fixed-step method and RePaint's loop return the known pixels exactly too.
  small = x_known[:16]
  for method, resample in (('ddpm', 1), ('heun', 1), ('unipc', 1), ('ddpm', 3), ('ddim', 2)):
    out = editing.inpaint(model, PROCESS, small, mask, method=method, num_steps=6,
                          key=jax.random.PRNGKey(4), resample=resample)
    np.testing.assert_array_equal(out[:, ::2], small[:, ::2], err_msg=method)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_repaint_resampling_approaches_the_exact_conditional():
  """Correlated 2-D Gaussian, C = 0.5 [[1, 0.9], [0.9, 1]], x[0] = 1.2 known: the exact
  conditional of x[1] is N(1.08, 0.095). DDPM on 100 uniform steps, 4096 draws, KL(fit || exact)
  of the samples' Gaussian fit. Measured (16384 draws): replacement alone (resample 1) mean 0.73,
  variance 0.139, KL 0.68 (the generated pixel ignores much of the known one); RePaint resample
  2 / 5 / 10: KL 0.18 / 0.034 / 0.024 (10: mean 1.04, variance 0.073). DDIM (50 steps): 1.84
  without, 0.019 with 10 resamplings."""
  cov = 0.5 * np.array([[1.0, 0.9], [0.9, 1.0]])
  model = gauss_model(np.zeros(2), cov)
  v = 1.2
  cond_mean, cond_var = cov[1, 0] / cov[0, 0] * v, cov[1, 1] - cov[1, 0]**2 / cov[0, 0]
  x_known = jnp.broadcast_to(jnp.array([v, 0.0]), (4096, 2))
  mask = jnp.array([1.0, 0.0])

  def kl(resample):
    out = jax.jit(lambda k: editing.inpaint(model, PROCESS, x_known, mask, method='ddpm',
                                            num_steps=100, key=k, resample=resample))(
                                                jax.random.PRNGKey(3))
    assert np.all(np.asarray(out[:, 0]) == np.float32(v))
    x = np.asarray(out[:, 1], np.float64)
    m, var = x.mean(), x.var()
    return 0.5 * (var / cond_var + (m - cond_mean)**2 / cond_var - 1 + np.log(cond_var / var))

  plain, repaint = kl(1), kl(10)
  assert plain > 0.4 and repaint < 0.06 and repaint < plain / 10, (plain, repaint)


def test_inpaint_errors():
  model = gauss_model(np.zeros(2), np.eye(2))
  x = jnp.zeros((4, 2))
  call = functools.partial(editing.inpaint, model, PROCESS, x, method='ddpm', num_steps=4,
                           key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r'mask has shape \(3,\), which does not broadcast'):
    call(jnp.ones((3,)))
  with pytest.raises(ValueError, match='only 0 \\(generate\\) and 1 \\(keep\\)'):
    call(jnp.array([0.5, 1.0]))
  with pytest.raises(ValueError, match='resample must be an integer >= 1'):
    call(jnp.array([0.0, 1.0]), resample=0)
  with pytest.raises(ValueError, match=r"repeats steps of \('ddim', 'ddpm'\) only"):
    editing.inpaint(model, PROCESS, x, jnp.array([0.0, 1.0]), method='dpmpp_2m', num_steps=4,
                    key=jax.random.PRNGKey(0), resample=2)
  with pytest.raises(ValueError, match='step_hook is how inpainting'):
    call(jnp.array([0.0, 1.0]), step_hook=lambda x, *_: x)
  with pytest.raises(TypeError):
    call(jnp.array([0.0, 1.0]), resample=2, order=2)
  with pytest.raises(ValueError, match=r'eta must lie in \[0, 1\].*got nan'):
    editing.inpaint(model, PROCESS, x, jnp.array([0.0, 1.0]), method='ddim', num_steps=4,
                    key=jax.random.PRNGKey(0), resample=2, eta=float('nan'))


# --- the command line -----------------------------------------------------------------------------


def _digit_png(path, size=8, index=3):
  """Digit ``index`` of scikit-learn's digits as a grayscale PNG of ``size`` pixels."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  image = (load_digits().images[index] * (255 / 16)).astype(np.uint8)
  Image.fromarray(image, 'L').resize((size, size), Image.NEAREST).save(path)
  return str(path)


def _mask_png(path, size=8):
  mask = np.zeros((size, size), np.uint8)
  mask[:, :size // 2] = 255  # white = keep the left half
  Image.fromarray(mask, 'L').save(path)
  return str(path)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A class-conditional tiny model (4 steps), its config and input files."""
  root = tmp_path_factory.mktemp('edit')
  config = tiny.get_config()
  config.data.use_labels = True
  config.model.num_classes = 10
  config.sampling.image = _digit_png(root / 'three.png')
  config.sampling.mask = _mask_png(root / 'mask.png')
  config.sampling.guidance_scale = 2.0
  workdir = str(root / 'run')
  training.train_and_evaluate(config, workdir)
  return config, workdir


def test_cli_modes_write_edits(trained):
  config, workdir = trained
  x_in = inference._load_input(config, config.sampling.image)  # pylint: disable=protected-access
  with config.unlocked():
    config.sampling.strength = 0.5
  path = inference.img2img(config, workdir)
  data = np.load(path)
  assert os.path.basename(path) == 'img2img_ddim_3_s0.5_step4.npz'
  assert data['x'].shape == (6, 8, 8, 1) and data['images'].dtype == np.uint8
  np.testing.assert_array_equal(data['label'], np.arange(6) % 10)  # every class in turn
  np.testing.assert_array_equal(data['input'], x_in)
  assert os.path.exists(path[:-4] + '.png')

  with config.unlocked():
    config.sampling.label = 8
    config.sampling.resample = 2
  path = inference.inpaint(config, workdir)
  data = np.load(path)
  assert data['mask'].shape == (1, 8, 8, 1) and data['mask'][0, :, :4].all()
  assert not data['mask'][0, :, 4:].any()
  # White = keep: the left half is the input, exactly.
  np.testing.assert_array_equal(data['x'][:, :, :4], np.broadcast_to(x_in[:, :, :4],
                                                                     (6, 8, 4, 1)))
  assert not np.array_equal(data['x'][:, :, 4:], np.broadcast_to(x_in[:, :, 4:], (6, 8, 4, 1)))
  np.testing.assert_array_equal(data['label'], np.full(6, 8))
  assert os.path.basename(path) == 'inpaint_ddim_3_r2_step4.npz'

  with config.unlocked():
    config.sampling.num_steps = 20
  path = inference.invert(config, workdir)
  data = np.load(path)
  assert data['x_T'].shape == data['x'].shape == (1, 8, 8, 1)
  assert np.isfinite(float(data['psnr_db']))


def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'diffusion_jax.main', '--config=configs/tiny.py',
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_input_errors_one_line(tmp_path):
  image = _digit_png(tmp_path / 'three.png')
  big_mask = _mask_png(tmp_path / 'mask16.png', size=16)
  workdir = tmp_path / 'run'
  cases = [
      (['--mode=img2img', f'--config.sampling.image={tmp_path}/nope.png'],
       f'error: --config.sampling.image={tmp_path}/nope.png: no such file.'),
      (['--mode=inpaint', f'--config.sampling.image={image}', f'--config.sampling.mask={big_mask}'],
       f'error: --config.sampling.mask={big_mask} is 16x16 pixels but --config.sampling.image='
       f'{image} is 8x8: the mask must have the size of the image.'),
      (['--mode=img2img', f'--config.sampling.image={image}', '--config.sampling.strength=1.5'],
       'error: --config.sampling.strength: strength=1.5 must lie in [0, 1]'),
      (['--mode=inpaint', f'--config.sampling.image={image}'],
       'error: --config.sampling.mask is empty: give the path of an image file.'),
  ]
  for args, expected in cases:
    out = _main(f'--workdir={workdir}', *args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(expected), (lines[0], expected)
  assert not workdir.exists()
