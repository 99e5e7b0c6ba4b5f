"""Latent text-to-image training (issue 18): both stages on tiny shapes, resumability, the cached
path against the uncached loss, truncated-caption counts, the exported autoencoder in diffusers,
and the discriminator's adaptive weight against plain autodiff."""

from __future__ import annotations

import json
import pathlib
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax import autoencoder_losses, input_pipeline, text_vocab, tokenization
from diffusion_jax.configs import default
from diffusion_jax.models.autoencoder_kl import AutoencoderKL
from diffusion_jax.training import builders, latent, loop
from tests import sd_fixtures


@pytest.fixture(scope='module')
def two_stage_run(tmp_path_factory):
  """Trains both stages (2 + 2 steps), then resumes stage 2 to 4 steps."""
  workdir = tmp_path_factory.mktemp('ldm')
  c = _base()
  loop.train_and_evaluate(c, str(workdir))
  vae_file = workdir / 'autoencoder' / 'vae' / 'diffusion_pytorch_model.safetensors'
  first_mtime = vae_file.stat().st_mtime_ns
  ae_metrics = (workdir / 'autoencoder' / 'metrics.jsonl').read_text()
  c.training.num_train_steps = 4
  c.training.checkpoint_every = 2
  loop.train_and_evaluate(c, str(workdir))
  return types.SimpleNamespace(workdir=workdir, config=c, first_mtime=first_mtime,
                               vae_file=vae_file, ae_metrics=ae_metrics)


def _base():
  c = default.get_config()
  c.data.source = 'digits_text'
  c.data.image_size = 32
  c.data.num_channels = 1
  c.training.task = 'ldm'
  a = c.autoencoder
  a.block_out_channels = (8, 8, 8)
  a.norm_num_groups = 4
  a.mid_block_add_attention = False
  a.num_train_steps = 2
  a.batch_size = 4
  a.scale_examples = 8
  u = c.model.cond_unet
  u.block_out_channels = (8, 16)
  u.norm_num_groups = 4
  u.attention_head_dim = 2
  u.mid_block_type = ''
  t = c.model.text_encoder
  t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads = 8, 16, 1, 2
  c.training.batch_size = 4
  c.training.num_train_steps = 2
  c.training.log_every = 1
  c.training.checkpoint_every = 2
  c.training.sample_every = 0
  c.training.num_sample_images = 0
  c.optim.warmup_steps = 0
  c.sampling.num_steps = 2
  c.sampling.guidance_scale = 2.0
  c.sampling.batch_size = 2
  c.sampling.num_samples = 2
  c.sampling.method = 'ddim'
  return c


def _rows(path: pathlib.Path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_stages_train_resume_and_sample(two_stage_run):
  w = two_stage_run.workdir
  ae = [r for r in _rows(w / 'autoencoder' / 'metrics.jsonl') if 'loss' in r]
  assert [r['step'] for r in ae] == [1, 2]
  assert all(np.isfinite(r['psnr']) and 'kl' in r and 'rec' in r for r in ae)
  # Stage 1 was skipped on the second run: its export and its metrics are untouched.
  assert two_stage_run.vae_file.stat().st_mtime_ns == two_stage_run.first_mtime
  assert (w / 'autoencoder' / 'metrics.jsonl').read_text() == two_stage_run.ae_metrics
  cfg = json.loads((w / 'autoencoder' / 'vae' / 'config.json').read_text())
  assert cfg['_class_name'] == 'AutoencoderKL' and cfg['scaling_factor'] > 0
  # Stage 2 resumed at step 2 (one start: num_params logged once) and went on to 4.
  rows = _rows(w / 'ldm' / 'metrics.jsonl')
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4]
  assert sum('num_params' in r for r in rows) == 1
  assert all(r['truncated_captions'] == 0 for r in rows if 'loss' in r)
  assert (w / 'ldm' / latent.TOKENIZER_FILE).exists()
  c = two_stage_run.config
  c.sampling.prompt = 'the digits three and eight'
  path = latent.sample_text(c, str(w))
  out = np.load(path)
  assert out['images'].shape == (2, 32, 32, 1) and out['images'].dtype == np.uint8
  assert list(out['prompts']) == ['the digits three and eight'] * 2
  assert list(pathlib.Path(path).parent.glob('*.png'))


def test_exported_autoencoder_is_diffusers_loadable(two_stage_run):
  """The stage-1 export, read by diffusers, decodes as our module does (within 1e-4)."""
  vae_dir = two_stage_run.workdir / 'autoencoder' / 'vae'
  theirs = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
  from diffusion_jax.weights import vae as vae_weights
  ours, params = vae_weights.load_vae(vae_dir)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  mean, _ = ours.apply({'params': params}, x, method=ours.encode)
  rec = ours.apply({'params': params}, mean, method=ours.decode)
  with torch.no_grad():
    t_mean = theirs.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
    t_rec = theirs.decode(t_mean).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(mean), t_mean.permute(0, 2, 3, 1).numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(rec), t_rec, atol=1e-4)
  assert theirs.config.scaling_factor == json.loads((vae_dir / 'config.json').read_text())[
      'scaling_factor']


def test_cached_latents_and_embeddings_give_the_uncached_loss(tmp_path):
  """Frozen CLIP + SD's VAE (tiny diffusers pipeline): cache_dataset's arrays, fed to the loss,
  give the loss of the raw images with the same key."""
  sd = tmp_path / 'sd'
  sd_fixtures.make_sd_pipeline(sd)
  c = _base()
  c.training.task = 'latent_diffusion'
  c.data.num_channels = 3
  c.data.split = 'test_heldout_pairs'  # 297 examples: a short caching pass
  c.autoencoder.path = str(sd / 'vae')
  c.model.text_encoder.source = 'pretrained'
  c.model.text_encoder.path = str(sd)
  c.model.cond_unet.attention_head_dim = 2
  c.model.parameterization = 'v'
  c.training.weighting = 'min_snr'
  s = builders.setup(c, str(tmp_path / 'run'), (32, 32, 3))
  data = builders.create_data(c, shuffle=False)
  task = latent.ldm_task(s, data)
  assert set(task.frozen) == {'vae', 'text_encoder'}
  params = builders.fresh_state(s).params
  assert set(params) == {'unet'}  # the frozen encoders are not trained
  raw = task.prepare_batch(next(builders.create_data(c, shuffle=False).iterator), 0)
  cached = latent.cache_dataset(c, s.latent, task.frozen, task.prepare, with_text=True,
                                batch_size=4)
  assert cached.num_examples == 296  # 74 whole batches of 4
  first = {k: v[:4] for k, v in cached.arrays.items()}
  np.testing.assert_array_equal(first['input_ids'], raw['input_ids'])
  key = jax.random.PRNGKey(3)
  loss = jax.jit(task.loss_fn)
  loss_raw, _ = loss(params, task.frozen, raw, key)
  loss_cached, _ = loss(params, task.frozen, first, key)
  assert np.isfinite(float(loss_raw)) and float(loss_raw) > 0
  np.testing.assert_allclose(float(loss_cached), float(loss_raw), rtol=1e-5)
  # A different key draws other latents and noise: the comparison can fail.
  other, _ = loss(params, task.frozen, first, jax.random.PRNGKey(4))
  assert abs(float(other) - float(loss_raw)) > 1e-4 * abs(float(loss_raw))


def test_truncated_captions_are_counted():
  captions = [input_pipeline.digits_caption(3), input_pipeline.digits_caption(3, 7), '']
  tok = text_vocab.build_vocab(captions)
  lm = types.SimpleNamespace(tokenizer=tok, max_length=4)
  counter = {'truncated': 0}
  prepare = latent._text_prepare(lm, counter)  # pylint: disable=protected-access
  batch = prepare({'x': np.zeros((3, 1)), 'text': np.asarray(captions)}, 0)
  # Words + start + end tokens: 5 and 7 are more than 4, the empty prompt's 2 are not.
  expected = sum(len(c.split()) + 2 > 4 for c in captions)
  assert counter['truncated'] == expected == 2
  assert batch['input_ids'].shape == (3, 4) and 'text' not in batch
  assert (batch['input_ids'][:2, -1] == tok.eos_token_id).all()  # truncated rows still end
  prepare({'x': np.zeros((1, 1)), 'text': np.asarray(['the digit one'])}, 1)
  assert counter['truncated'] == 3


def test_adaptive_discriminator_weight_matches_autodiff():
  """Esser et al.'s weight from the vjp at the last layer equals full-autodiff gradients."""
  vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                      down_block_types=('DownEncoderBlock2D',) * 2,
                      up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1,
                      mid_block_add_attention=False)
  disc = autoencoder_losses.PatchDiscriminator(channels=8, num_layers=2)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
  # Each function under jit: run eagerly, every op of the VAE and its gradient compiles alone.
  params = jax.jit(lambda k1, k2: {'vae': vae.init(k1, x)['params'],
                                   'disc': disc.init(k2, x)['params']})(
                                       jax.random.PRNGKey(0), jax.random.PRNGKey(1))
  key = jax.random.PRNGKey(2)
  fn = jax.jit(autoencoder_losses.autoencoder_loss(vae=vae, rec_loss='l1', kl_weight=1e-6,
                                                   disc=disc, disc_weight=0.5, disc_start=5))
  _, on = fn(params, None, {'x': x, 'step': jnp.full((2,), 5)}, key)
  off_loss, off = fn(params, None, {'x': x, 'step': jnp.full((2,), 4)}, key)

  @jax.jit
  def parts(p):
    mean, logvar = vae.apply({'params': p['vae']}, x, method=vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    r = vae.apply({'params': p['vae']}, z, method=vae.decode)
    rec = jnp.mean(jnp.sum(jnp.abs(x - r), axis=(1, 2, 3)))
    g = -jnp.mean(disc.apply({'params': p['disc']}, r))
    kl = jnp.mean(0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
    return rec, g, kl

  grads = jax.jit(lambda p: (jax.grad(lambda q: parts(q)[0])(p),
                             jax.grad(lambda q: parts(q)[1])(p)))(params)
  g_rec, g_adv = (g['vae']['decoder']['conv_out']['kernel'] for g in grads)
  expected = 0.5 * np.clip(np.linalg.norm(g_rec) / (np.linalg.norm(g_adv) + 1e-4), 0, 1e4)
  np.testing.assert_allclose(float(on['d_weight']), expected, rtol=1e-4)
  assert float(off['d_weight']) == 0.0
  rec, _, kl = parts(params)
  np.testing.assert_allclose(float(off_loss), float(rec + 1e-6 * kl), rtol=1e-5)
  @jax.jit
  def reconstruct(p):
    mean, logvar = vae.apply({'params': p}, x, method=vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return vae.apply({'params': p}, z, method=vae.decode)

  r = reconstruct(params['vae'])
  mse = np.mean((np.asarray(x, np.float64) - np.asarray(r, np.float64)) ** 2)
  np.testing.assert_allclose(float(on['psnr']), 10 * np.log10(4 / mse), rtol=1e-4)


def test_bad_latent_configs_name_the_field():
  from diffusion_jax.training import config as config_lib
  c = _base()
  c.training.task = 'latent_diffusion'
  with pytest.raises(ValueError, match='autoencoder.path'):
    config_lib.validate_config(c)
  c = _base()
  c.model.text_encoder.source = 'pretrained'
  with pytest.raises(ValueError, match='text_encoder.path'):
    config_lib.validate_config(c)
  c = _base()
  c.model.cond_unet.up_block_types = ('CrossAttnUpBlock2D',)
  with pytest.raises(ValueError, match='up_block_types'):
    config_lib.validate_config(c)
  with pytest.raises(ValueError, match='rec_loss'):
    autoencoder_losses.autoencoder_loss(vae=None, rec_loss='l3')


def test_tokenization_interfaces_are_interchangeable(tmp_path):
  """The CLIP tokenizer of a directory counts truncation through the same prepare."""
  sd_fixtures.write_clip_tokenizer(tmp_path / 'tok')
  tok = tokenization.CLIPTokenizer.from_directory(tmp_path / 'tok')
  lm = types.SimpleNamespace(tokenizer=tok, max_length=5)
  counter = {'truncated': 0}
  prepare = latent._text_prepare(lm, counter)  # pylint: disable=protected-access
  texts = ['a', 'a b c d e f g h']
  enc = tok.encode(texts, max_length=5)
  prepare({'text': np.asarray(texts)}, 0)
  assert counter['truncated'] == int(np.sum(enc.num_tokens > 5)) == 1


def test_fine_tune_diffusers_pipeline_round_trip(tmp_path):
  """init_from a tiny diffusers SD pipeline, two steps, saved back: diffusers loads the result and
  its U-Net computes what ours does (within 1e-4); our pipeline loader reads it too."""
  from diffusion_jax import pipelines
  from diffusion_jax.weights import unet as unet_weights
  sd = tmp_path / 'sd'
  sd_fixtures.make_sd_pipeline(sd)
  c = _base()
  c.training.task = 'latent_diffusion'
  c.data.num_channels = 3
  c.data.split = 'test_singles'
  c.autoencoder.path = str(sd / 'vae')
  c.model.text_encoder.source = 'pretrained'
  c.model.text_encoder.path = str(sd)
  c.training.init_from = str(sd)
  c.optim.learning_rate = 1e-2
  run = tmp_path / 'run'
  loop.train_and_evaluate(c, str(run))
  out = run / 'diffusers'
  ours, params = unet_weights.load_unet(out / 'unet')
  _, before = unet_weights.load_unet(sd / 'unet')
  assert not np.allclose(params['conv_in']['kernel'], before['conv_in']['kernel'])  # it trained
  theirs = diffusers.UNet2DConditionModel.from_pretrained(out / 'unet').eval()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  ctx = rng.normal(size=(2, 5, 32)).astype(np.float32)
  t = np.array([10.0, 500.0], np.float32)
  got = np.asarray(ours.apply({'params': params}, x, t, ctx))
  with torch.no_grad():
    want = theirs(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                  torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  diffusers.StableDiffusionPipeline.from_pretrained(out)
  pipelines.load_pretrained(str(out))
