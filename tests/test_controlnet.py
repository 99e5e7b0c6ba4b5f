"""ControlNet against diffusers' (PyTorch), on tiny random networks saved by diffusers.

The ControlNets are diffusers' ``ControlNetModel`` s for the tiny SD U-Net of ``sd_fixtures``
(``from_unet``, then every parameter random, the zero convolutions included, so that no residual
is trivially zero), saved with ``save_pretrained`` and read by ``weights.controlnet``. Residuals
must agree within 1e-4 (float32), and diffusers' ``StableDiffusionControlNetPipeline`` with the
same prompts, start latents and control images must give our final latents within 1e-3 (one
ControlNet at scale 0.5, two at once; SDXL at 0.7). Training: a few steps of the ControlNet objective on
a frozen U-Net lower the loss and leave the U-Net's tree bitwise unchanged.
"""

from __future__ import annotations

import functools
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import sd_fixtures
from diffusion_jax import pipelines
from diffusion_jax import processes
from diffusion_jax import sampling
from diffusion_jax.models import controlnet as controlnet_lib
from diffusion_jax.pipelines import controlnet as cn_pipeline
from diffusion_jax.pipelines import schedulers
from diffusion_jax.training import step as step_lib
from diffusion_jax.training.state import TrainState
from diffusion_jax.weights import controlnet as cn_weights
from diffusion_jax.weights import unet as unet_weights

PROMPTS = ['a photo of an astronaut riding a horse', 'A RED fox in the snow']
NEGATIVE = ['blurry', 'ugly, low resolution']
TOL = 1e-4
PIPE_TOL = 1e-3
# The tiny SD U-Net's 16x16 images are 8x8 latents: a conditioning embedding with one stride-2
# step (two widths) brings the control image to the latent size.
EMBED_CHANNELS = (8, 16)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _diffusers_controlnet(unet, seed: int):
  net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED_CHANNELS)
  return sd_fixtures._randomize(net, seed)  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A tiny SD pipeline (DDIM) and two random ControlNets for its U-Net, saved by diffusers."""
  root = tmp_path_factory.mktemp('controlnet')
  pipe = sd_fixtures.make_sd_pipeline(root / 'pipe', kind='sd', scheduler='DDIMScheduler')
  nets = []
  for k in range(2):
    net = _diffusers_controlnet(pipe.unet, seed=10 + k)
    net.save_pretrained(root / f'cn{k}', safe_serialization=True)
    nets.append(net)
  return root, pipe, nets


def _inputs(batch: int, seed: int = 0, context_dim: int = 32, size: int = 8):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
  t = np.array([3.0, 517.5, 999.0][:batch], np.float32)
  context = rng.standard_normal((batch, 7, context_dim)).astype(np.float32)
  image = rng.uniform(size=(batch, 2 * size, 2 * size, 3)).astype(np.float32)
  return x, t, context, image


def _max_err(ours, theirs) -> tuple[float, float]:
  down, mid = ours
  ref_down, ref_mid = theirs
  assert len(down) == len(ref_down)
  errs = [np.abs(np.asarray(a) - _nhwc(b)).max() for a, b in zip(down, ref_down)]
  errs.append(np.abs(np.asarray(mid) - _nhwc(ref_mid)).max())
  scale = max(np.abs(_nhwc(b)).max() for b in list(ref_down) + [ref_mid])
  return max(errs), scale


@pytest.mark.parametrize('scale,guess_mode', [(1.0, False), (0.5, False), (0.8, True)])
def test_residuals_match_diffusers(saved, scale, guess_mode):
  root, _, nets = saved
  module, params = cn_weights.load_controlnet(root / 'cn0')
  assert module.num_residuals == 4
  x, t, context, image = _inputs(3)
  ours = module.apply({'params': params}, x, t, context, image, conditioning_scale=scale,
                      guess_mode=guess_mode)
  with torch.no_grad():
    theirs = nets[0](_nchw(x), torch.from_numpy(t), torch.from_numpy(context), _nchw(image),
                     conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
  err, ref_scale = _max_err(ours, theirs)
  print(f'residuals: max error {err:.2e}, max |residual| {ref_scale:.2f}')
  assert ref_scale > 1.0 and err <= TOL, err


def test_sdxl_controlnet_residuals_match_diffusers(tmp_path):
  """SDXL's layout: text_time added embedding, linear projections, depth per level, bgr order."""
  net = diffusers.ControlNetModel(
      block_out_channels=(16, 32), layers_per_block=2,
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), cross_attention_dim=64,
      transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), norm_num_groups=8,
      use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=8,
      projection_class_embeddings_input_dim=8 * 6 + 32, mid_block_type='UNetMidBlock2DCrossAttn',
      conditioning_embedding_out_channels=(8, 8, 16), controlnet_conditioning_channel_order='bgr')
  net = sd_fixtures._randomize(net, 3)  # pylint: disable=protected-access
  net.save_pretrained(tmp_path / 'cn', safe_serialization=True)
  module, params = cn_weights.load_controlnet(tmp_path / 'cn')
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 6, 4, 4)).astype(np.float32)  # non-square, odd level sizes
  t = np.array([10.0, 700.25], np.float32)
  context = rng.standard_normal((2, 5, 64)).astype(np.float32)
  image = rng.uniform(size=(2, 24, 16, 3)).astype(np.float32)
  pooled = rng.standard_normal((2, 32)).astype(np.float32)
  time_ids = np.array([[16, 16, 0, 0, 16, 16], [32, 24, 2, 4, 16, 8]], np.float32)
  ours = module.apply({'params': params}, x, t, context, image, conditioning_scale=0.7,
                      added_cond_kwargs={'text_embeds': pooled, 'time_ids': time_ids})
  with torch.no_grad():
    theirs = net(_nchw(x), torch.from_numpy(t), torch.from_numpy(context), _nchw(image),
                 conditioning_scale=0.7, return_dict=False,
                 added_cond_kwargs={'text_embeds': torch.from_numpy(pooled),
                                    'time_ids': torch.from_numpy(time_ids)})
  err, ref_scale = _max_err(ours, theirs)
  print(f'residuals: max error {err:.2e}, max |residual| {ref_scale:.2f}')
  assert ref_scale > 1.0 and err <= TOL, err


def test_save_round_trip_and_diffusers_reads_ours(saved, tmp_path):
  root, _, nets = saved
  module, params = cn_weights.load_controlnet(root / 'cn1')
  cn_weights.save_controlnet(tmp_path / 'ours', module, params)
  again, params2 = cn_weights.load_controlnet(tmp_path / 'ours')
  assert again == module
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  reread = diffusers.ControlNetModel.from_pretrained(tmp_path / 'ours')
  for (name, a), (name2, b) in zip(sorted(reread.state_dict().items()),
                                   sorted(nets[1].state_dict().items())):
    assert name == name2
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_from_unet_copies_the_encoder_and_starts_at_zero(saved):
  root, pipe, _ = saved
  unet, unet_params = unet_weights.load_unet(root / 'pipe' / 'unet')
  module, params = controlnet_lib.ControlNetModel.from_unet(
      unet, unet_params, conditioning_embedding_out_channels=EMBED_CHANNELS)
  reference = diffusers.ControlNetModel.from_unet(
      pipe.unet, conditioning_embedding_out_channels=EMBED_CHANNELS)
  ours = cn_weights.controlnet_state(params)
  theirs = {k: v.numpy() for k, v in reference.state_dict().items()}
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    # The conditioning embedding's hidden convs are freshly drawn on both sides; all else equal.
    if key.startswith('controlnet_cond_embedding.') and 'conv_out' not in key:
      assert ours[key].shape == value.shape
      continue
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
  x, t, context, image = _inputs(2)
  down, mid = module.apply({'params': params}, x, t, context, image)
  assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
  plain = unet.apply({'params': unet_params}, x, t, context)
  guided = unet.apply({'params': unet_params}, x, t, context,
                      down_block_additional_residuals=down, mid_block_additional_residual=mid)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(guided))


def _control_images(seed: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(batch, 16, 16, 3)).astype(np.float32)


def _ours_latents(pipe, nets, nets_params, control, scales, latents, *, num_steps, guidance_scale):
  cond, null = pipe.encode_prompt(PROMPTS, NEGATIVE)
  control = cn_pipeline.prepare_control_images(
      control if len(nets) > 1 else control[0], num_controlnets=len(nets), batch=len(PROMPTS),
      height=16, width=16)
  cond = dict(cond, control=control)
  null = dict(null, control=control)
  s = pipe.scheduler
  method = s.method

  @jax.jit
  def run(unet_params, nets_params, cond, null, x_T, scales):
    model_fn = cn_pipeline.controlnet_model_fn(pipe.unet, unet_params, nets, nets_params,
                                               scales=scales, model_timestep=s.model_timestep)
    return sampling.sample(model_fn, s.process, method=method, num_steps=num_steps,
                           x_T=s.x_T(x_T, method=method, num_steps=num_steps),
                           prediction=s.prediction, cond=cond, null_cond=null,
                           guidance_scale=guidance_scale, **s.sample_options(method, num_steps))

  scales = jnp.asarray(cn_pipeline.control_scales(scales, len(nets)), jnp.float32)
  return np.asarray(run(pipe.params['unet'], nets_params, cond, null, jnp.asarray(latents),
                        tuple(scales)))


def _diffusers_latents(ref, nets, control, scales, latents, *, num_steps, guidance_scale):
  cn = nets[0] if len(nets) == 1 else list(nets)  # a list: diffusers' MultiControlNetModel
  pipe = diffusers.StableDiffusionControlNetPipeline(
      vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
      controlnet=cn, scheduler=ref.scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  images = [_nchw(c) for c in control]
  with torch.no_grad():
    out = pipe(PROMPTS, negative_prompt=NEGATIVE, image=images[0] if len(nets) == 1 else images,
               num_inference_steps=num_steps, guidance_scale=guidance_scale,
               controlnet_conditioning_scale=scales, latents=_nchw(latents), height=16, width=16,
               output_type='latent')
  return _nhwc(out.images)


@pytest.mark.parametrize('which,scales', [((0,), 0.5), ((0, 1), [0.5, 0.8])])
def test_pipeline_matches_diffusers(saved, which, scales):
  root, ref, ref_nets = saved
  dirs = [root / f'cn{k}' for k in which]
  pipe = pipelines.load_pretrained(root / 'pipe', controlnet=dirs[0] if len(dirs) == 1 else dirs)
  control = [_control_images(20 + k) for k in which]
  latents = np.random.default_rng(5).standard_normal((2, 8, 8, 4)).astype(np.float32)
  kwargs = dict(num_steps=4, guidance_scale=7.5)
  ours = np.asarray(pipe.text_to_image(
      PROMPTS, negative_prompt=NEGATIVE, latents=latents, height=16, width=16,
      output_type='latent', control_image=control[0] if len(dirs) == 1 else control,
      controlnet_conditioning_scale=scales, **kwargs))
  expected = _diffusers_latents(ref, [ref_nets[k] for k in which], control, scales, latents,
                                **kwargs)
  err = np.abs(ours - expected).max()
  print(f'final latents: max error {err:.2e}, max |latent| {np.abs(expected).max():.2f}')
  assert err <= PIPE_TOL * np.abs(expected).max(), err
  if len(which) > 1:
    return
  # The ControlNet matters at this tolerance: without it the latents are far from diffusers'.
  plain = np.asarray(pipelines.load_pretrained(root / 'pipe').text_to_image(
      PROMPTS, negative_prompt=NEGATIVE, latents=latents, height=16, width=16,
      output_type='latent', **kwargs))
  assert np.abs(plain - expected).max() > 100 * PIPE_TOL * np.abs(expected).max()


def test_sdxl_pipeline_matches_diffusers(tmp_path):
  """StableDiffusionXLControlNetPipeline: the ControlNet also reads SDXL's pooled text and time ids."""
  ref = sd_fixtures.make_sd_pipeline(tmp_path / 'pipe', kind='sdxl', scheduler='EulerDiscreteScheduler')
  net = _diffusers_controlnet(ref.unet, seed=12)
  net.save_pretrained(tmp_path / 'cn', safe_serialization=True)
  pipe = pipelines.load_pretrained(tmp_path / 'pipe')
  nets, nets_params = cn_pipeline.load_controlnets(tmp_path / 'cn')
  control = _control_images(30)
  latents = np.random.default_rng(6).standard_normal((2, 8, 8, 4)).astype(np.float32)
  cond, null = pipe.encode_prompt(PROMPTS, NEGATIVE, height=16, width=16)
  cond = dict(cond, control=(control,))
  null = dict(null, control=(control,))
  s = pipe.scheduler
  model_fn = cn_pipeline.controlnet_model_fn(pipe.unet, pipe.params['unet'], nets, nets_params,
                                             scales=(0.7,), model_timestep=s.model_timestep,
                                             sdxl=True)
  ours = np.asarray(jax.jit(lambda x: sampling.sample(
      model_fn, s.process, method=s.method, num_steps=3, x_T=s.x_T(x, method=s.method, num_steps=3),
      prediction=s.prediction, cond=cond, null_cond=null, guidance_scale=5.0,
      **s.sample_options(s.method, 3)))(jnp.asarray(latents)))
  reference = diffusers.StableDiffusionXLControlNetPipeline(
      vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2,
      tokenizer=ref.tokenizer, tokenizer_2=ref.tokenizer_2, unet=ref.unet, controlnet=net,
      scheduler=ref.scheduler)
  with torch.no_grad():
    expected = _nhwc(reference(PROMPTS, negative_prompt=NEGATIVE, image=_nchw(control),
                               num_inference_steps=3, guidance_scale=5.0,
                               controlnet_conditioning_scale=0.7, latents=_nchw(latents),
                               height=16, width=16, output_type='latent').images)
  err = np.abs(ours - expected).max()
  print(f'final latents: max error {err:.2e}, max |latent| {np.abs(expected).max():.2f}')
  assert err <= PIPE_TOL * np.abs(expected).max(), err


def test_training_reduces_the_loss_and_leaves_the_unet_alone(saved):
  root, _, _ = saved
  unet, unet_params = unet_weights.load_unet(root / 'pipe' / 'unet')
  # On the device before from_unet copies them, so that aliasing would show under donation.
  frozen = {'unet': jax.tree.map(jnp.asarray, unet_params)}
  module, params = controlnet_lib.ControlNetModel.from_unet(
      unet, frozen['unet'], key=jax.random.key(1), conditioning_embedding_out_channels=EMBED_CHANNELS)
  params0 = jax.tree.map(np.array, params)
  before = jax.tree.map(np.array, frozen['unet'])
  rng = np.random.default_rng(0)
  batch = {'x': rng.standard_normal((4, 8, 8, 4)).astype(np.float32),
           'context': rng.standard_normal((4, 7, 32)).astype(np.float32),
           'control': rng.uniform(size=(4, 16, 16, 3)).astype(np.float32)}
  loss_fn = cn_pipeline.denoising_objective(
      unet=unet, controlnet=module, process=processes.DiscreteVP.linear(num_timesteps=1000),
      cond_fn=lambda frozen, batch: {'context': batch['context']},
      model_timestep=schedulers.model_timestep,
      null_cond={'context': np.zeros((1, 7, 32), np.float32)}, cond_dropout=0.2)
  state = TrainState.create(params=params, tx=optax.adam(3e-3))
  key = jax.random.key(0)

  @functools.partial(jax.jit, donate_argnums=(0,))  # donated as the trainer does
  def step(state, frozen):
    # The same step key every time: the loss is then a function of the params alone.
    return step_lib.train_step(state.replace(step=jnp.zeros((), jnp.int32)), batch, key, frozen,
                               loss_fn=loss_fn, ema_decay=0.9)

  losses = []
  for _ in range(6):
    state, metrics = step(state, frozen)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.9 * losses[0], losses
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, frozen['unet']))
  moved = cn_weights.controlnet_state(jax.tree.map(lambda a, b: a - b, state.params, params0))
  assert np.any(moved['controlnet_mid_block.weight']) and np.any(moved['conv_in.weight'])


# Architecture keys of the published SD 1.5 and SDXL ControlNet configs (lllyasviel/sd-controlnet-canny,
# diffusers/controlnet-canny-sdxl-1.0); the other keys are diffusers' defaults.
FULL = {
    'sd15': dict(cross_attention_dim=768),
    'sdxl': dict(down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type='text_time',
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}


@pytest.mark.parametrize('name', sorted(FULL))
def test_full_size_parameter_counts_equal_diffusers(name):
  with torch.device('meta'):
    reference = diffusers.ControlNetModel(**FULL[name])
  module = controlnet_lib.ControlNetModel.from_config(dict(reference.config))
  shapes = cn_weights.controlnet_shapes(module)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == sum(p.numel() for p in reference.parameters())
  assert count == {'sd15': 361_279_120, 'sdxl': 1_251_014_160}[name]


def test_bad_input_is_named(saved, tmp_path):
  root, _, _ = saved
  with pytest.raises(FileNotFoundError, match='config.json'):
    cn_weights.load_controlnet(tmp_path)
  config = json.loads((root / 'cn0' / 'config.json').read_text())
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'config.json').write_text(json.dumps(dict(config, _class_name='ControlNetXSAdapter')))
  with pytest.raises(ValueError, match='ControlNetXSAdapter'):
    cn_weights.load_controlnet(bad)
  (bad / 'config.json').write_text(json.dumps(dict(config, class_embed_type='timestep')))
  with pytest.raises(ValueError, match='class_embed_type'):
    cn_weights.load_controlnet(bad)
  (bad / 'config.json').write_text(json.dumps(dict(config, block_out_channels=[16, 64])))
  (bad / 'diffusion_pytorch_model.safetensors').write_bytes(
      (root / 'cn0' / 'diffusion_pytorch_model.safetensors').read_bytes())
  with pytest.raises(ValueError, match='shape'):
    cn_weights.load_controlnet(bad)
  module, params = cn_weights.load_controlnet(root / 'cn0')
  x, t, context, image = _inputs(2)
  with pytest.raises(ValueError, match=r'controlnet_cond has shape \(2, 8, 8, 3\)'):
    module.apply({'params': params}, x, t, context, image[:, :8, :8])
  with pytest.raises(ValueError, match='2 ControlNets'):
    cn_pipeline.prepare_control_images([image], num_controlnets=2, batch=2, height=16, width=16)
  with pytest.raises(ValueError, match=r'in \[0, 1\]'):
    cn_pipeline.prepare_control_images(image * 2 - 1, num_controlnets=1, batch=2, height=16,
                                       width=16)
  with pytest.raises(ValueError, match='resize'):
    cn_pipeline.prepare_control_images(image[:, :8], num_controlnets=1, batch=2, height=16,
                                       width=16)
  with pytest.raises(ValueError, match='controlnet_conditioning_scale'):
    cn_pipeline.control_scales([1.0, 0.5, 0.2], 2)
  unet, _ = unet_weights.load_unet(root / 'pipe' / 'unet')
  other = controlnet_lib.ControlNetModel(block_out_channels=(16, 48), norm_num_groups=8,
                                         down_block_types=('DownBlock2D', 'DownBlock2D'))
  with pytest.raises(ValueError, match='block_out_channels'):
    cn_pipeline.check_compatible(unet, [other])
