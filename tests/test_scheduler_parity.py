"""diffusers' schedulers against ours through ``pipelines.schedulers``, step for step (issue 17).

For each config, diffusers' own loop (``set_timesteps``, ``init_noise_sigma``,
``scale_model_input``, ``step``) runs in torch float32 on a fixed model of (x, timestep) written
twice, in torch and in JAX (a random linear map of x through tanh, plus x, plus cosines of the
timestep: nothing of ours), and ``sampling.sample`` runs our method with
``Scheduler.sample_options`` from the same latents. Checked: the timesteps the model sees (equal;
Euler's fractional ones within 1e-4, see ``check_parity``) and the final latents (within 1e-4 of
the largest entry). Measured (this file's 132 runs, 1-50 steps): at most 1.2e-6 relative, but
9e-6 for PNDM's one step from timestep 999 and 8.4e-6 for Euler at zero terminal SNR, which is
compared with diffusers run in float64: diffusers' own float32 run is 3.3e-4 (one step) and 6e-5
(three) away from that, losing digits to cancellation at sigma_max = 4096.
"""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax import sampling
from diffusion_jax.pipelines import schedulers
from diffusion_jax.sampling import core

D = 8  # features per example
_rng = np.random.RandomState(0)
W = (_rng.randn(D, D) / np.sqrt(D)).astype(np.float32)
PHASE = _rng.uniform(0, 6, D).astype(np.float32)
LATENTS = np.random.RandomState(1).randn(2, D).astype(np.float32)
COND = np.random.RandomState(2).randn(2, D).astype(np.float32)

# SD 1.5's scheduler_config.json (a PNDMScheduler config; the other classes read the same keys).
SD15 = {'beta_start': 0.00085, 'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
        'num_train_timesteps': 1000, 'steps_offset': 1, 'set_alpha_to_one': False,
        'clip_sample': False, 'skip_prk_steps': True, 'timestep_spacing': 'leading',
        'trained_betas': None}
CLASSES = ('DDIMScheduler', 'DPMSolverMultistepScheduler', 'EulerDiscreteScheduler',
           'PNDMScheduler', 'UniPCMultistepScheduler')


def torch_model(x, t, cond=None, dtype=torch.float32):
  """The fixed model in torch: x [B, D], t [B] (diffusers' timestep), cond [B, D] or None."""
  w, ph = torch.from_numpy(W).to(dtype), torch.from_numpy(PHASE).to(dtype)
  out = 0.5 * torch.tanh(x @ w) + 0.3 * x + 0.2 * torch.cos(t.to(dtype)[:, None] / 200.0 + ph)
  if cond is not None:
    out = out + 0.3 * torch.tanh(cond.to(dtype))
  return out


def jax_model(x, t, cond=None):
  """The same model in JAX."""
  out = 0.5 * jnp.tanh(x @ W) + 0.3 * x + 0.2 * jnp.cos(t[:, None] / 200.0 + PHASE)
  if cond is not None:
    out = out + 0.3 * jnp.tanh(cond)
  return out


def diffusers_run(config, num_steps, *, guidance_scale=None, dtype=torch.float32):
  """diffusers' loop as its pipelines run it; returns (final latents, timesteps seen)."""
  sched = getattr(diffusers, config['_class_name']).from_config(config)
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(LATENTS).to(dtype) * sched.init_noise_sigma
  seen = []
  for t in sched.timesteps:
    x_in = sched.scale_model_input(x, t)
    t_b = torch.full((x.shape[0],), float(t), dtype=dtype)
    if guidance_scale is None:
      out = torch_model(x_in, t_b, dtype=dtype)
    else:
      cond = torch.cat([torch.zeros(COND.shape), torch.from_numpy(COND)])
      both = torch_model(torch.cat([x_in, x_in]), torch.cat([t_b, t_b]), cond, dtype=dtype)
      uncond, cond_out = both.chunk(2)
      out = uncond + guidance_scale * (cond_out - uncond)
    seen.append(float(t))
    x = sched.step(out, t, x).prev_sample
  return x.double().numpy(), np.asarray(seen, np.float64)


def our_run(config, num_steps, *, guidance_scale=None, method=None):
  """``sampling.sample`` with the scheduler's method and options; (final latents, timesteps)."""
  sched = schedulers.from_config(config)
  method = method or sched.method
  seen = []

  def model_fn(x, t, cond):
    timestep = sched.model_timestep(t)
    jax.debug.callback(lambda v: seen.append(np.asarray(v)), timestep, ordered=True)
    return jax_model(x, timestep, cond)

  kwargs = {}
  if guidance_scale is not None:
    kwargs = dict(cond=COND, null_cond=np.zeros((1, D), np.float32),
                  guidance_scale=guidance_scale)
  x = sampling.sample(model_fn, sched.process, method=method, num_steps=num_steps,
                      x_T=sched.x_T(LATENTS, method=method, num_steps=num_steps),
                      prediction=sched.prediction, **kwargs,
                      **sched.sample_options(method, num_steps))
  jax.effects_barrier()
  # With guidance the model sees the doubled batch; its first half is the conditional one.
  return np.asarray(x, np.float64), np.asarray([v[0] for v in seen], np.float64)


def check_parity(config, num_steps, *, guidance_scale=None, reference_dtype=torch.float32):
  ref, ref_t = diffusers_run(config, num_steps, guidance_scale=guidance_scale,
                             dtype=reference_dtype)
  out, out_t = our_run(config, num_steps, guidance_scale=guidance_scale)
  assert out_t.shape == ref_t.shape, (out_t, ref_t)
  if config['_class_name'] == 'EulerDiscreteScheduler':
    # Fractional timesteps: ours is float32(k + 1) - 1, within one ulp of k + 1 (6.1e-5 at
    # 512-1024); Karras timesteps invert sigmas whose last bit differs where torch's float32
    # sqrt is not correctly rounded (190 of SD's 1000 sigmas): measured <= 6.1e-5 up to 100
    # steps, 1.2e-3 (1.3e-5 relative) at zero terminal SNR with Karras sigmas (not tested here).
    np.testing.assert_allclose(out_t, ref_t, rtol=0, atol=1e-4)
  else:
    np.testing.assert_array_equal(out_t, ref_t)
  assert np.all(np.isfinite(out))
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert err < 1e-4, f'{config} at {num_steps} steps: relative error {err:.3g}'
  return err


VARIANTS = [
    ({}, (1, 5, 20)),
    ({'timestep_spacing': 'trailing'}, (1, 5, 20)),
    ({'timestep_spacing': 'linspace'}, (1, 5, 20)),
    ({'prediction_type': 'v_prediction'}, (1, 5, 20)),
    ({'set_alpha_to_one': True, 'final_sigmas_type': 'sigma_min'}, (5,)),
]


@pytest.mark.parametrize('name', CLASSES)
@pytest.mark.parametrize('variant,steps', VARIANTS,
                         ids=['sd15', 'trailing', 'linspace', 'v', 'final_level'])
def test_parity(name, variant, steps):
  config = dict(SD15, _class_name=name, **variant)
  for n in steps:
    check_parity(config, n)


@pytest.mark.parametrize('name', ['DDIMScheduler', 'PNDMScheduler'])
def test_uneven_spacing(name):
  """Steps of N // n from timesteps not N // n apart ('linspace', 'trailing' with n not dividing
  N): diffusers' DDIM and PNDM end each step off the next timestep's level (``Levels``)."""
  for spacing in ('linspace', 'trailing'):
    for n in (3, 7):
      check_parity(dict(SD15, _class_name=name, timestep_spacing=spacing), n)


def test_parity_50_steps():
  for name in ('PNDMScheduler', 'DPMSolverMultistepScheduler'):
    check_parity(dict(SD15, _class_name=name), 50)


@pytest.mark.parametrize('name', CLASSES)
def test_zero_terminal_snr(name):
  """rescale_betas_zero_snr with trailing spacing and v-prediction (Lin et al. 2024)."""
  config = dict(SD15, _class_name=name, rescale_betas_zero_snr=True,
                timestep_spacing='trailing', prediction_type='v_prediction')
  # diffusers' Euler in float32 loses up to 3.3e-4 at sigma_max = 4096 (measured against its
  # own float64 run); ours is within 8.4e-6 of that run, so Euler is compared with it.
  dtype = torch.float64 if name == 'EulerDiscreteScheduler' else torch.float32
  for n in (1, 5, 20):
    if name == 'PNDMScheduler':
      # PNDM has no rescale_betas_zero_snr (diffusers ignores the key): its plain schedule.
      assert not schedulers.from_config(config).config['rescale_betas_zero_snr']
    check_parity(config, n, reference_dtype=dtype)


@pytest.mark.parametrize('name,variant', [
    ('EulerDiscreteScheduler', {'use_karras_sigmas': True}),
    ('EulerDiscreteScheduler', {'use_karras_sigmas': True, 'timestep_spacing': 'trailing'}),
    ('DPMSolverMultistepScheduler', {'use_karras_sigmas': True}),
    ('UniPCMultistepScheduler', {'use_karras_sigmas': True}),
    ('DPMSolverMultistepScheduler', {'solver_order': 3}),
    ('DPMSolverMultistepScheduler', {'solver_order': 3, 'lower_order_final': False}),
    ('DPMSolverMultistepScheduler', {'euler_at_final': True, 'final_sigmas_type': 'sigma_min'}),
    ('DPMSolverMultistepScheduler', {'solver_type': 'heun', 'solver_order': 3}),
    ('UniPCMultistepScheduler', {'solver_order': 3}),
    ('UniPCMultistepScheduler', {'solver_type': 'bh1', 'final_sigmas_type': 'sigma_min'}),
    ('DDIMScheduler', {'beta_schedule': 'squaredcos_cap_v2', 'prediction_type': 'sample'}),
    ('EulerDiscreteScheduler', {'beta_schedule': 'linear', 'beta_start': 1e-4,
                                'beta_end': 0.02}),
])
def test_parity_options(name, variant):
  config = dict(SD15, _class_name=name, **variant)
  for n in (1, 5, 20):
    check_parity(config, n)


def test_dpmsolver_third_order_past_15_steps():
  """At >= 15 steps DPM-Solver++(3M) keeps order 3 until its first-order last step."""
  config = dict(SD15, _class_name='DPMSolverMultistepScheduler', solver_order=3)
  opts = schedulers.from_config(config).sample_options('dpmpp_3m', 20)
  np.testing.assert_array_equal(opts['orders'], [1, 2] + [3] * 17 + [1])
  check_parity(config, 20)


@pytest.mark.parametrize('name', CLASSES)
def test_parity_with_guidance(name):
  check_parity(dict(SD15, _class_name=name), 5, guidance_scale=7.5)


@pytest.mark.parametrize('name', CLASSES)
def test_parity_under_jit(name):
  """The whole sampler jitted with the model closed over, as a pipeline's one program."""
  config = dict(SD15, _class_name=name, final_sigmas_type='sigma_min')
  sched = schedulers.from_config(config)
  opts = sched.sample_options(sched.method, 5)
  run = jax.jit(lambda x: sampling.sample(
      lambda x, t, c: jax_model(x, sched.model_timestep(t)), sched.process, method=sched.method,
      num_steps=5, x_T=sched.x_T(x, num_steps=5), prediction=sched.prediction, **opts))
  ref, _ = diffusers_run(config, 5)
  out = np.asarray(run(LATENTS), np.float64)
  assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_init_noise_sigma_and_start():
  """Euler's VE start in our VP state: latents * init_noise_sigma / sqrt(1 + sigma_0^2)."""
  for spacing in ('leading', 'linspace', 'trailing'):
    config = dict(SD15, _class_name='EulerDiscreteScheduler', timestep_spacing=spacing)
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(20)
    sched = schedulers.from_config(config)
    assert sched.init_noise_sigma(20) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    sigma0 = float(ref.sigmas[0])
    want = LATENTS * float(ref.init_noise_sigma) / np.sqrt(1 + sigma0**2)
    np.testing.assert_allclose(sched.x_T(LATENTS, num_steps=20), want, rtol=1e-6)
    # Another method of ours starts from the latents themselves.
    np.testing.assert_array_equal(sched.x_T(LATENTS, method='ddim'), LATENTS)
  for name in ('DDIMScheduler', 'PNDMScheduler', 'DPMSolverMultistepScheduler'):
    np.testing.assert_array_equal(
        schedulers.from_config(dict(SD15, _class_name=name)).x_T(LATENTS), LATENTS)


def test_process_matches_alphas_cumprod():
  """The process's alpha(k + 1)^2 is diffusers' alphas_cumprod[k] (the time map)."""
  for name in CLASSES:
    config = dict(SD15, _class_name=name)
    ref = getattr(diffusers, name).from_config(config).alphas_cumprod.double().numpy()
    sched = schedulers.from_config(config)
    np.testing.assert_array_equal(sched.alphas_cumprod, ref.astype(np.float32))
    k = np.arange(1000)
    got = np.asarray(sched.process.alpha(k + 1.0), np.float64) ** 2
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert float(sched.model_timestep(k[5] + 1.0)) == 5.0


@pytest.mark.parametrize('method',
                         ['ddim', 'euler', 'heun', 'dpmpp_2m', 'dpmpp_3m', 'unipc', 'plms'])
def test_other_methods_run_on_the_same_process(method):
  """Methods other than the config's own run on our grid with the same process and model."""
  config = dict(SD15, _class_name='PNDMScheduler', prediction_type='v_prediction')
  sched = schedulers.from_config(config)
  assert sched.sample_options(method, 10) == {} or method == sched.method
  out, seen = our_run(config, 10, method=method)
  assert np.all(np.isfinite(out))
  assert seen.min() >= 0 and seen.max() <= 999


def test_nearest_and_unsupported_classes():
  sched = schedulers.from_config({'_class_name': 'EulerAncestralDiscreteScheduler'})
  assert (sched.method, sched.exact) == ('ddim', False)
  assert sched.sample_options('ddim', 10) == {'eta': 1.0}
  sched = schedulers.from_config(dict(SD15, _class_name='DPMSolverMultistepScheduler',
                                      algorithm_type='sde-dpmsolver++'))
  assert (sched.method, sched.exact) == ('dpmpp_2m_sde', False) and 'SDE' in sched.note
  sched = schedulers.from_config(dict(SD15, _class_name='PNDMScheduler', skip_prk_steps=False))
  assert not sched.exact and 'Runge-Kutta' in sched.note
  with pytest.raises(ValueError, match='not reproduced step for step'):
    sched.schedule(10)
  with pytest.raises(ValueError, match='DDIMScheduler'):
    schedulers.from_config({'_class_name': 'LCMScheduler'})
  with pytest.raises(ValueError, match='flow'):
    schedulers.from_config({'_class_name': 'UniPCMultistepScheduler', 'use_flow_sigmas': True})
  with pytest.raises(ValueError, match='beta_schedule'):
    schedulers.from_config({'_class_name': 'DDIMScheduler', 'beta_schedule': 'sigmoid'})
  with pytest.raises(ValueError, match='prediction_type'):
    schedulers.from_config({'_class_name': 'DDIMScheduler', 'prediction_type': 'flow'})
  with pytest.raises(ValueError, match='exceeds num_train_timesteps'):
    schedulers.from_config(dict(SD15, _class_name='DDIMScheduler')).sample_options('ddim', 1001)


def test_levels_are_validated():
  process = schedulers.from_config(dict(SD15, _class_name='DDIMScheduler')).process
  fn = lambda x, t: jnp.zeros_like(x)
  x_T = jnp.zeros((1, D))
  levels = core.Levels(np.full(3, 0.5), np.full(3, 0.5))
  with pytest.raises(ValueError, match='pass times'):
    sampling.METHODS['ddim'](fn, process, x_T, num_steps=2, levels=levels)
  with pytest.raises(ValueError, match=r'shape \(3,\)'):
    sampling.METHODS['ddim'](fn, process, x_T, num_steps=2, times=np.array([900.0, 500.0]),
                             levels=core.Levels(np.full(2, 0.5), np.full(2, 0.5)))
  with pytest.raises(ValueError, match="'ddim' and 'plms' only"):
    sampling.METHODS['euler'](fn, process, x_T, num_steps=2, times=np.array([900.0, 500.0]),
                              levels=core.Levels(np.full(3, 0.5), np.full(3, 0.5),
                                                 np.full(2, 0.5), np.full(2, 0.5)))
  with pytest.raises(ValueError, match="'plms' only"):
    sampling.METHODS['ddim'](fn, process, x_T, num_steps=2, times=np.array([900.0, 500.0]),
                             levels=core.Levels(np.full(3, 0.5), np.full(3, 0.5),
                                                alpha_heun=0.5, sigma_heun=0.5))
