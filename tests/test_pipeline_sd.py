"""Stable Diffusion pipelines against diffusers' own, on tiny random pipelines saved by diffusers.

For each scheduler the issue names (DDIM, DPM-Solver multistep, Euler, PNDM, UniPC), the same
prompts, negative prompts and start latents go through diffusers' ``StableDiffusionPipeline`` (and
``StableDiffusionXLPipeline``) in PyTorch float32 and through ``pipelines.load_pretrained`` of the
directory it saved: final latents and images must agree to 1e-3.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sd_fixtures
from diffusion_jax import pipelines

SCHEDULERS = ('DDIMScheduler', 'DPMSolverMultistepScheduler', 'EulerDiscreteScheduler',
              'PNDMScheduler', 'UniPCMultistepScheduler')
PROMPTS = ['a photo of an astronaut riding a horse', 'A RED fox in the snow, déjà vu! 🚀']
NEGATIVE = ['blurry', 'ugly, low resolution']
TOL = 1e-3


def _latents(batch: int, seed: int = 0) -> np.ndarray:
  """Start noise NHWC [B, 8, 8, 4], float32."""
  return np.random.default_rng(seed).standard_normal((batch, 8, 8, 4)).astype(np.float32)


def _diffusers_run(pipe, latents, *, num_steps, guidance_scale, output_type, negative=True,
                   **kwargs):
  with torch.no_grad():
    out = pipe(PROMPTS, negative_prompt=NEGATIVE if negative else None,
               num_inference_steps=num_steps, guidance_scale=guidance_scale,
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
               output_type=output_type, height=16, width=16, **kwargs)
  images = out.images
  if output_type == 'latent':
    return images.numpy().transpose(0, 2, 3, 1)
  return np.asarray(images)


@pytest.fixture(scope='module', params=SCHEDULERS)
def sd_dir(request, tmp_path_factory):
  path = tmp_path_factory.mktemp('sd') / 'pipe'
  pipe = sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler=request.param)
  return path, pipe


def test_sd_text_to_image_matches_diffusers(sd_dir):
  path, ref = sd_dir
  ours = pipelines.load_pretrained(path)
  latents = _latents(len(PROMPTS))
  expected = _diffusers_run(ref, latents, num_steps=4, guidance_scale=7.5, output_type='latent')
  got = np.asarray(ours.text_to_image(PROMPTS, negative_prompt=NEGATIVE, num_steps=4,
                                      guidance_scale=7.5, latents=latents, height=16, width=16,
                                      output_type='latent'))
  assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()
  if type(ref.scheduler).__name__ == 'DDIMScheduler':  # the decode, once
    images = np.asarray(ours.decode_latents(got))
    expected = _diffusers_run(ref, latents, num_steps=4, guidance_scale=7.5, output_type='np')
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
    assert np.abs(images - expected).max() <= TOL


@pytest.fixture(scope='module')
def sdxl_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('sdxl') / 'pipe'
  pipe = sd_fixtures.make_sd_pipeline(path, kind='sdxl', scheduler='EulerDiscreteScheduler')
  return path, pipe


@pytest.mark.parametrize('negative', [True, False])
def test_sdxl_text_to_image_matches_diffusers(sdxl_dir, negative):
  path, ref = sdxl_dir
  ours = pipelines.load_pretrained(path)
  latents = _latents(len(PROMPTS), seed=1)
  expected = _diffusers_run(ref, latents, num_steps=4, guidance_scale=5.0, output_type='latent',
                            negative=negative)
  got = np.asarray(ours.text_to_image(PROMPTS, negative_prompt=NEGATIVE if negative else None,
                                      num_steps=4, guidance_scale=5.0, latents=latents,
                                      height=16, width=16, output_type='latent'))
  assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()


def test_guidance_rescale_and_no_guidance_match_diffusers(tmp_path):
  path = tmp_path / 'pipe'
  ref = sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='DDIMScheduler')
  ours = pipelines.load_pretrained(path)
  latents = _latents(len(PROMPTS), seed=2)
  for guidance_scale, rescale in ((7.5, 0.7), (1.0, 0.0)):
    expected = _diffusers_run(ref, latents, num_steps=3, guidance_scale=guidance_scale,
                              output_type='latent', guidance_rescale=rescale)
    got = np.asarray(ours.text_to_image(PROMPTS, negative_prompt=NEGATIVE, num_steps=3,
                                        guidance_scale=guidance_scale, guidance_rescale=rescale,
                                        latents=latents, height=16, width=16,
                                        output_type='latent'))
    assert np.abs(got - expected).max() <= TOL * np.abs(expected).max(), (guidance_scale, rescale)


def test_every_method_runs_on_the_same_pipeline(tmp_path):
  path = tmp_path / 'pipe'
  sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='DDIMScheduler')
  ours = pipelines.load_pretrained(path)
  for method in ('heun', 'dpmpp_2m_sde'):  # two evaluations a step; stochastic
    out = np.asarray(ours.text_to_image(PROMPTS[:1], num_steps=4, method=method, height=16,
                                        width=16, key=jax.random.key(3)))
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all(), method


def test_bad_input_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='model_index.json'):
    pipelines.load_pretrained(tmp_path)
  path = tmp_path / 'pipe'
  sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='DDIMScheduler')
  ours = pipelines.load_pretrained(path)
  with pytest.raises(ValueError, match='negative prompts'):
    ours.text_to_image(PROMPTS, negative_prompt=['a', 'b', 'c'], num_steps=2, height=16, width=16)
  with pytest.raises(ValueError, match='multiples of the VAE factor 2'):
    ours.text_to_image(PROMPTS, num_steps=2, height=15, width=16)
  with pytest.raises(ValueError, match=r'latents have shape \(2, 8, 8, 3\)'):
    ours.text_to_image(PROMPTS, num_steps=2, height=16, width=16,
                       latents=np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match='unknown method'):
    ours.text_to_image(PROMPTS, num_steps=2, height=16, width=16, method='nope')
  broken = tmp_path / 'broken'
  shutil.copytree(path, broken)
  shutil.rmtree(broken / 'vae')
  with pytest.raises(FileNotFoundError, match='vae'):
    pipelines.load_pretrained(broken)
  index = json.loads((path / 'model_index.json').read_text())
  index['_class_name'] = 'KandinskyPipeline'
  (broken / 'model_index.json').write_text(json.dumps(index))
  with pytest.raises(ValueError, match='KandinskyPipeline'):
    pipelines.load_pretrained(broken)


def test_bfloat16_pipeline_runs_close(tmp_path):
  path = tmp_path / 'pipe'
  sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='DDIMScheduler')
  latents = _latents(1, seed=4)
  f32 = pipelines.load_pretrained(path)
  bf16 = pipelines.load_pretrained(path, dtype=jnp.bfloat16)
  a = np.asarray(f32.text_to_image(PROMPTS[:1], num_steps=3, latents=latents, height=16, width=16))
  b = np.asarray(bf16.text_to_image(PROMPTS[:1], num_steps=3, latents=latents, height=16, width=16))
  assert b.dtype == np.float32
  # bfloat16 keeps 8 bits of mantissa (0.4% per rounding), amplified by guidance 7.5: measured
  # mean |difference| 0.0055 and 0.0082 on two seeds' pipelines (images in [0, 1]); a wrong
  # dtype path (e.g. bf16 sampling state) gives far more.
  assert np.abs(a - b).mean() < 0.02


def _open_clip_state(transformers_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers' CLIP text keys (no prefix) -> OpenCLIP's, fusing q/k/v (SDXL's second tower)."""
  renames = (('embeddings.token_embedding.weight', 'token_embedding.weight'),
             ('embeddings.position_embedding.weight', 'positional_embedding'),
             ('final_layer_norm.', 'ln_final.'), ('encoder.layers.', 'transformer.resblocks.'),
             ('.layer_norm1.', '.ln_1.'), ('.layer_norm2.', '.ln_2.'),
             ('.self_attn.out_proj.', '.attn.out_proj.'), ('.mlp.fc1.', '.mlp.c_fc.'),
             ('.mlp.fc2.', '.mlp.c_proj.'))
  out, qkv = {}, {}
  for key, value in transformers_state.items():
    if key == 'text_projection.weight':
      # contiguous: safetensors' NumPy writer copies the buffer, not the strides of a view.
      out['text_projection'] = np.ascontiguousarray(value.T)
    elif '.self_attn.' in key and '.out_proj.' not in key:
      layer = key.split('.')[2]
      proj, kind = key.split('.')[-2:]
      qkv.setdefault((layer, kind), {})[proj] = value
    else:
      for old, new in renames:
        key = key.replace(old, new)
      out[key] = value
  for (layer, kind), parts in qkv.items():
    out[f'transformer.resblocks.{layer}.attn.in_proj_{kind}'] = np.concatenate(
        [parts['q_proj'], parts['k_proj'], parts['v_proj']])
  return out


@pytest.mark.parametrize('kind', ['sd', 'sdxl'])
def test_single_file_checkpoint_equals_its_directory(tmp_path, kind):
  """An LDM-layout single file written from a directory's weights loads to the same pipeline."""
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  from diffusion_jax.weights import clip as clip_weights  # pylint: disable=import-outside-toplevel
  from diffusion_jax.weights import unet as unet_weights  # pylint: disable=import-outside-toplevel
  from diffusion_jax.weights import vae as vae_weights  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'pipe'
  sd_fixtures.make_sd_pipeline(path, kind=kind, scheduler='DDIMScheduler')
  ref = pipelines.load_pretrained(path)
  state = dict(unet_weights.ldm_state(ref.params['unet'], ref.unet))
  n = len(ref.vae.block_out_channels)
  state.update({'first_stage_model.' + vae_weights.ldm_vae_key(k, num_levels=n): v
                for k, v in vae_weights.vae_state(ref.params['vae']).items()})
  if kind == 'sd':
    state.update(clip_weights.text_encoder_state(ref.params['text_encoder'],
                                                 prefix=clip_weights.SD1_PREFIX + 'text_model.'))
  else:
    state.update(clip_weights.text_encoder_state(
        ref.params['text_encoder'], prefix=clip_weights.SDXL_CLIP_L_PREFIX + 'text_model.'))
    tower = _open_clip_state(clip_weights.text_encoder_state(ref.params['text_encoder_2'],
                                                             prefix=''))
    state.update({clip_weights.SDXL_OPEN_CLIP_PREFIX + k: v for k, v in tower.items()})
  single = tmp_path / 'model.safetensors'
  st_numpy.save_file(state, str(single))
  ours = pipelines.load_single_file(single, config=path)
  latents = _latents(1, seed=5)
  a = np.asarray(ref.text_to_image(PROMPTS[:1], num_steps=2, latents=latents, height=16, width=16))
  b = np.asarray(ours.text_to_image(PROMPTS[:1], num_steps=2, latents=latents, height=16, width=16))
  np.testing.assert_array_equal(a, b)
  other = tmp_path / 'other'
  sd_fixtures.make_sd_pipeline(other, kind='sdxl' if kind == 'sd' else 'sd')
  with pytest.raises(ValueError, match='same family'):
    pipelines.load_single_file(single, config=other)


def test_txt2img_command_writes_images_and_prompts(tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = tmp_path / 'pipe'
  sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='PNDMScheduler')
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a photo of an astronaut\n\nA RED fox in the snow\n')
  base = [sys.executable, '-m', 'diffusion_jax.main', f'--config={repo}/configs/sd.py',
          '--mode=txt2img', f'--config.pretrained={path}']
  run = subprocess.run(base + [f'--workdir={tmp_path / "run"}',
                               f'--config.sampling.prompts_file={prompts}',
                               '--config.sampling.num_samples=2', '--config.sampling.num_steps=3'],
                       capture_output=True, text=True, check=False, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  out = np.load(tmp_path / 'run' / 'samples' / 'txt2img_plms_3.npz')
  assert out['images'].shape == (4, 16, 16, 3) and out['images'].dtype == np.uint8
  assert list(out['prompts']) == ['a photo of an astronaut'] * 2 + ['A RED fox in the snow'] * 2
  assert (tmp_path / 'run' / 'samples' / 'txt2img_plms_3.png').exists()
  bad = subprocess.run(base + [f'--workdir={tmp_path / "run2"}'], capture_output=True, text=True,
                       check=False, cwd=tmp_path)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith('error: --mode=txt2img needs exactly one')
  assert not (tmp_path / 'run2').exists()


@pytest.mark.parametrize('scheduler', ['DDIMScheduler', 'EulerDiscreteScheduler',
                                       'DPMSolverMultistepScheduler', 'UniPCMultistepScheduler'])
def test_image_to_image_matches_diffusers(tmp_path, scheduler):
  """diffusers' img2img pipeline with latents as its image (so it draws nothing but the noise)."""
  import diffusers  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'pipe'
  ref = diffusers.StableDiffusionImg2ImgPipeline(
      **sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler=scheduler).components)
  ours = pipelines.load_pretrained(path)
  x0 = _latents(2, seed=6)
  for strength in (0.3, 1.0):  # a cut schedule and the whole one
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
      expected = ref(PROMPTS, image=torch.from_numpy(x0.transpose(0, 3, 1, 2).copy()),
                     strength=strength, negative_prompt=NEGATIVE, num_inference_steps=6,
                     guidance_scale=7.5, generator=torch.Generator().manual_seed(7),
                     output_type='latent').images.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(ours.image_to_image(PROMPTS, x0, strength=strength, negative_prompt=NEGATIVE,
                                         num_steps=6, noise=noise.numpy().transpose(0, 2, 3, 1),
                                         output_type='latent'))
    assert np.abs(got - expected).max() <= TOL * np.abs(expected).max(), strength
  assert np.array_equal(np.asarray(ours.image_to_image(PROMPTS, x0, strength=0.0, num_steps=6,
                                                       output_type='latent')), x0)


def test_image_to_image_encodes_rgb_images_as_diffusers_vae(tmp_path):
  path = tmp_path / 'pipe'
  ref = sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='DDIMScheduler')
  ours = pipelines.load_pretrained(path)
  image = np.random.default_rng(8).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref.vae.encode(torch.from_numpy(image.transpose(0, 3, 1, 2) * 2 - 1)).latent_dist
  expected = dist.mean.numpy().transpose(0, 2, 3, 1) * ref.vae.config.scaling_factor
  latents = np.asarray(ours.encode_image(image))
  assert np.abs(latents - expected).max() <= 1e-4 * np.abs(expected).max()
  a = ours.image_to_image(PROMPTS, image, strength=0.5, num_steps=4, key=jax.random.key(1))
  b = ours.image_to_image(PROMPTS, latents, strength=0.5, num_steps=4, key=jax.random.key(1))
  assert a.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  with pytest.raises(ValueError, match='strength'):
    ours.image_to_image(PROMPTS, image, strength=1.5, num_steps=4)
  with pytest.raises(ValueError, match=r'image has shape \(2, 16, 16, 2\)'):
    ours.image_to_image(PROMPTS, image[..., :2], num_steps=4)


@pytest.mark.parametrize('inpainting,strength', [(True, 1.0), (False, 1.0), (False, 0.6)])
def test_inpaint_matches_diffusers(tmp_path, monkeypatch, inpainting, strength):
  """diffusers' inpainting pipeline, its VAE posterior draws replaced by the mean (as ours)."""
  import diffusers  # pylint: disable=import-outside-toplevel
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_lib  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(inpaint_lib, 'retrieve_latents',
                      lambda encoded, generator=None, sample_mode='sample':
                      encoded.latent_dist.mode())
  path = tmp_path / 'pipe'
  made = sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='DDIMScheduler',
                                      inpainting=inpainting)
  ref = diffusers.StableDiffusionInpaintPipeline(**made.components)
  ours = pipelines.load_pretrained(path)
  rng = np.random.default_rng(9)
  image = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  mask = np.zeros((2, 16, 16, 1), np.float32)
  mask[:, :, 8:] = 1.0  # repaint the right half
  noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    expected = ref(PROMPTS, image=torch.from_numpy(image.transpose(0, 3, 1, 2).copy()),
                   mask_image=torch.from_numpy(mask.transpose(0, 3, 1, 2).copy()),
                   negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5,
                   strength=strength, height=16, width=16,
                   generator=torch.Generator().manual_seed(3),
                   output_type='latent').images.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(ours.inpaint(PROMPTS, image, mask, negative_prompt=NEGATIVE, num_steps=5,
                                strength=strength, noise=noise.numpy().transpose(0, 2, 3, 1),
                                output_type='latent'))
  assert np.abs(got - expected).max() <= TOL * np.abs(expected).max()
  if not inpainting:  # replacement: the kept half's latents are the image's, exactly
    kept = np.asarray(ours.encode_image(image))[:, :, :4]
    np.testing.assert_allclose(got[:, :, :4], kept, atol=1e-6)


def test_pipeline_lora_methods_change_and_restore_the_images(tmp_path):
  """pipe.load_lora_weights / unload_lora_weights (adapters.lora; parity in tests/test_lora.py)."""
  from diffusion_jax.adapters import lora  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'pipe'
  sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='DDIMScheduler')
  pipe = pipelines.load_pretrained(path)
  adapter = lora.init_lora({'unet': pipe.params['unet']}, rank=2, key=jax.random.key(0))
  adapter = jax.tree.map(lambda x: x + 0.1 if hasattr(x, 'shape') else x, adapter)  # B != 0
  lora.save_lora(tmp_path / 'lora', adapter)
  latents = _latents(1, seed=10)
  run = lambda: np.asarray(pipe.text_to_image(PROMPTS[:1], num_steps=2, latents=latents,  # noqa: E731
                                              height=16, width=16))
  base = run()
  assert pipe.load_lora_weights(tmp_path / 'lora', scale=0.5) == 'default_0'
  assert np.abs(run() - base).max() > 1e-2
  pipe.unload_lora_weights()
  np.testing.assert_array_equal(run(), base)


@pytest.mark.parametrize('mode', ['img2img', 'inpaint'])
def test_editing_commands_with_a_pretrained_pipeline(tmp_path, mode):
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = tmp_path / 'pipe'
  sd_fixtures.make_sd_pipeline(path, kind='sd', scheduler='DDIMScheduler')
  rng = np.random.default_rng(11)
  Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / 'in.png')
  mask = np.zeros((16, 16), np.uint8)
  mask[:, :8] = 255  # white = keep the left half
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  run = subprocess.run(
      [sys.executable, '-m', 'diffusion_jax.main', f'--config={repo}/configs/sd.py',
       f'--mode={mode}', f'--config.pretrained={path}', f'--workdir={tmp_path / "run"}',
       '--config.sampling.prompt=a red fox', f'--config.sampling.image={tmp_path / "in.png"}',
       f'--config.sampling.mask={tmp_path / "mask.png"}', '--config.sampling.strength=0.5',
       '--config.sampling.num_steps=4'], capture_output=True, text=True, check=False,
      cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-2000:]
  out = np.load(tmp_path / 'run' / 'samples' / f'{mode}_ddim_4.npz')
  assert out['images'].shape == (1, 16, 16, 3) and list(out['prompts']) == ['a red fox']
