"""AutoencoderKL and its weights against diffusers' own AutoencoderKL (PyTorch, CPU, float32).

A tiny diffusers VAE (two levels of 32 and 64 channels, one resnet per encoder level, 8 groups,
4 latent channels) with seeded random weights is written with ``save_pretrained`` and read back
by ``weights.vae.load_vae``; both encode the same 32x32 images and decode the same latents (NCHW
there, NHWC here). Measured max abs errors (torch 2.13 CPU, XLA CPU with the suite's flags):
posterior mean 2.3e-6, logvar 2.2e-6, decode 3.5e-6 (outputs up to 2.8 in magnitude), against the
bound 1e-4. bfloat16 compute and parameters: relative max error (max |ours_bf16 -
diffusers_fp32| / max |diffusers_fp32|) of the mean 0.018, of decode 0.015; bound 0.05.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from diffusion_jax.models.autoencoder_kl import AutoencoderKL, DiagonalGaussian
from diffusion_jax.weights import vae as vae_weights

TOL = 1e-4
TINY = dict(down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            sample_size=32)
SD_VAE = dict(down_block_types=('DownEncoderBlock2D',) * 4,
              up_block_types=('UpDecoderBlock2D',) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
# diffusers' AutoencoderKL with SD's configuration (issue 17; equal to the count below on torch's
# meta device).
SD_VAE_PARAMS = 83_653_863


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Weights ~ N(0, 1 / fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif name.endswith('weight'):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(torch model, directory) of the tiny VAE written by diffusers."""
  model = _randomize(TorchAutoencoderKL(**TINY))
  directory = tmp_path_factory.mktemp('vae')
  model.save_pretrained(directory)
  return model, directory


@pytest.fixture(scope='module')
def loaded(tiny):
  return vae_weights.load_vae(tiny[1])


def _images(seed=0, batch=2, size=32):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _latents(seed=1, batch=2, size=16):
  return np.random.default_rng(seed).standard_normal((batch, size, size, 4)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_encode(model, x):
  with torch.no_grad():
    dist = model.encode(_nchw(x)).latent_dist
  return _nhwc(dist.mean), _nhwc(dist.logvar)


def _torch_decode(model, z):
  with torch.no_grad():
    return _nhwc(model.decode(_nchw(z)).sample)


def test_encode_and_decode_match_diffusers(tiny, loaded):
  model, _ = tiny
  module, params = loaded
  assert module.block_out_channels == (32, 64) and module.scaling_factor == 0.18215
  x, z = _images(), _latents()
  mean, logvar = module.apply({'params': params}, x, method=module.encode)
  want_mean, want_logvar = _torch_encode(model, x)
  assert mean.shape == (2, 16, 16, 4)
  assert np.abs(np.asarray(mean) - want_mean).max() <= TOL
  assert np.abs(np.asarray(logvar) - want_logvar).max() <= TOL
  image = module.apply({'params': params}, z, method=module.decode)
  want = _torch_decode(model, z)
  assert image.shape == (2, 32, 32, 3) and image.dtype == jnp.float32
  assert np.abs(np.asarray(image) - want).max() <= TOL
  # The training call decodes the posterior mean unless asked to sample.
  recon, mean2, _ = module.apply({'params': params}, x)
  want_recon = _torch_decode(model, want_mean)
  assert np.abs(np.asarray(recon) - want_recon).max() <= TOL
  np.testing.assert_array_equal(mean2, mean)


def test_attention_implementations_agree(tiny, loaded):
  model, _ = tiny
  module, params = loaded
  z = _latents()
  want = _torch_decode(model, z)
  for impl in ('xla', 'chunked'):
    got = module.clone(attention=impl).apply({'params': params}, z, method=module.decode)
    assert np.abs(np.asarray(got) - want).max() <= TOL, impl


def test_posterior_sample_and_kl():
  rng = np.random.default_rng(3)
  mean = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  logvar = rng.uniform(-3, 1, (2, 4, 4, 3)).astype(np.float32)
  post = DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  want = DiagonalGaussianDistribution(torch.cat([_nchw(mean), _nchw(logvar)], dim=1)).kl().numpy()
  np.testing.assert_allclose(post.kl(), want, rtol=1e-5)
  np.testing.assert_array_equal(post.mode(), mean)
  draws = jax.vmap(post.sample)(jax.random.split(jax.random.key(0), 4000))
  # Per-element mean and std of 4000 draws: within 5 standard errors of the Gaussian's.
  std = np.exp(0.5 * logvar)
  assert np.abs(np.asarray(draws.mean(0)) - mean).max() < 5 * std.max() / np.sqrt(4000)
  assert np.abs(np.asarray(draws.std(0)) / std - 1).max() < 5 / np.sqrt(2 * 4000)


def test_sampled_reconstruction_needs_key(loaded):
  module, params = loaded
  x = _images(batch=1)
  with pytest.raises(ValueError, match='needs a key'):
    module.apply({'params': params}, x, sample_posterior=True)
  recon, mean, logvar = module.apply({'params': params}, x, key=jax.random.key(1),
                                     sample_posterior=True)
  z = DiagonalGaussian(mean, logvar).sample(jax.random.key(1))
  np.testing.assert_allclose(recon, module.apply({'params': params}, z, method=module.decode),
                             atol=1e-6)


def test_fp16_variant_loads(tiny, tmp_path):
  model, _ = tiny
  half = _randomize(TorchAutoencoderKL(**TINY)).half()
  half.save_pretrained(tmp_path, variant='fp16')
  assert (tmp_path / 'diffusion_pytorch_model.fp16.safetensors').exists()
  module, params = vae_weights.load_vae(tmp_path, variant='fp16')
  leaves = jax.tree.leaves(params)
  assert all(leaf.dtype == np.float32 for leaf in leaves)
  # The fp16 values, exactly, in our layout.
  want = half.state_dict()['decoder.up_blocks.0.resnets.1.conv1.weight'].float().numpy()
  got = params['decoder']['up_blocks_0']['resnets_1']['conv1']['kernel']
  np.testing.assert_array_equal(got, want.transpose(2, 3, 1, 0))
  # And it decodes as diffusers' float32 model holding the same fp16-rounded weights.
  z = _latents()
  want_image = _torch_decode(half.float(), z)
  got_image = module.apply({'params': params}, z, method=module.decode)
  assert np.abs(np.asarray(got_image) - want_image).max() <= TOL
  with pytest.raises(FileNotFoundError, match='fp16'):
    vae_weights.load_vae(tiny[1], variant='fp16')


def _write(directory, config, state):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.json').write_text(json.dumps(config))
  safetensors.numpy.save_file(state, str(directory / 'diffusion_pytorch_model.safetensors'))


def test_missing_or_misshaped_tensor_names_the_key(tiny, tmp_path):
  model, directory = tiny
  config = json.loads((directory / 'config.json').read_text())
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  missing = dict(state)
  del missing['decoder.mid_block.attentions.0.to_v.weight']
  _write(tmp_path / 'missing', config, missing)
  with pytest.raises(ValueError, match=r"vae: the weights have no tensor "
                     r"'decoder\.mid_block\.attentions\.0\.to_v\.weight'.*\(64, 64\)"):
    vae_weights.load_vae(tmp_path / 'missing')
  wrong = dict(state)
  wrong['encoder.conv_in.weight'] = np.zeros((32, 3, 5, 5), np.float32)
  _write(tmp_path / 'wrong', config, wrong)
  with pytest.raises(ValueError, match=r"'encoder\.conv_in\.weight' has shape \(32, 3, 5, 5\), "
                     r"the model expects \(32, 3, 3, 3\)"):
    vae_weights.load_vae(tmp_path / 'wrong')
  extra = dict(state, **{'encoder.extra.weight': np.zeros(3, np.float32)})
  _write(tmp_path / 'extra', config, extra)
  with pytest.raises(ValueError, match='encoder.extra.weight'):
    vae_weights.load_vae(tmp_path / 'extra')
  with pytest.raises(FileNotFoundError, match='config.json'):
    vae_weights.load_vae(tmp_path / 'nowhere')


def test_deprecated_attention_names_load(tiny, loaded, tmp_path):
  model, directory = tiny
  config = json.loads((directory / 'config.json').read_text())
  old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  state = {}
  for k, v in model.state_dict().items():
    for new, name in old.items():
      k = k.replace(f'attentions.0.{new}.', f'attentions.0.{name}.')
    state[k] = v.numpy()
  assert 'encoder.mid_block.attentions.0.proj_attn.weight' in state
  _write(tmp_path, config, state)
  _, params = vae_weights.load_vae(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_state_round_trip(loaded, tiny):
  model, _ = tiny
  state = vae_weights.vae_state(loaded[1])
  want = model.state_dict()
  assert set(state) == set(want)
  for k, v in state.items():
    np.testing.assert_array_equal(v, want[k].numpy(), err_msg=k)


def _to_ldm(state, num_levels):
  """diffusers layout -> LDM layout, written from the LDM names (test-side inverse table)."""
  out = {}
  for key, value in state.items():
    k = key.replace('conv_norm_out', 'norm_out').replace('conv_shortcut', 'nin_shortcut')
    parts = k.split('.')
    if parts[1] == 'down_blocks':
      i = parts[2]
      rest = ('block.' + '.'.join(parts[4:]) if parts[3] == 'resnets'
              else 'downsample.' + '.'.join(parts[5:]))
      k = f'encoder.down.{i}.{rest}'
    elif parts[1] == 'up_blocks':
      i = num_levels - 1 - int(parts[2])
      rest = ('block.' + '.'.join(parts[4:]) if parts[3] == 'resnets'
              else 'upsample.' + '.'.join(parts[5:]))
      k = f'decoder.up.{i}.{rest}'
    elif parts[1] == 'mid_block' and parts[2] == 'resnets':
      k = f'{parts[0]}.mid.block_{int(parts[3]) + 1}.' + '.'.join(parts[4:])
    elif parts[1] == 'mid_block':
      names = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out': 'proj_out'}
      leaf = parts[-1]
      k = f'{parts[0]}.mid.attn_1.{names[parts[4]]}.{leaf}'
      if leaf == 'weight' and parts[4] != 'group_norm':
        value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
    out[k] = value
  return out


def test_ldm_single_file_layout(tiny, loaded):
  model, directory = tiny
  config = json.loads((directory / 'config.json').read_text())
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  ldm = _to_ldm(state, num_levels=2)
  assert 'encoder.mid.attn_1.q.weight' in ldm and ldm['encoder.mid.attn_1.q.weight'].ndim == 4
  assert {'decoder.up.0.block.0.nin_shortcut.weight',
          'encoder.down.1.block.0.nin_shortcut.weight'} <= set(ldm)
  # The test's inverse table is the inverse of diffusers' own converter.
  back = convert_ldm_vae_checkpoint({f'first_stage_model.{k}': torch.from_numpy(v)
                                     for k, v in ldm.items()}, config)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(np.asarray(back[k]), state[k], err_msg=k)
  # A whole single-file checkpoint: the VAE under first_stage_model., other networks' tensors too.
  checkpoint = {f'first_stage_model.{k}': v for k, v in ldm.items()}
  checkpoint['model.diffusion_model.out.2.weight'] = np.zeros((4, 8, 3, 3), np.float32)
  checkpoint['first_stage_model.loss.logvar'] = np.zeros((), np.float32)
  module, params = loaded
  got = vae_weights.vae_params_from_ldm(checkpoint, module)
  jax.tree.map(np.testing.assert_array_equal, got, params)
  # Without a module, the configuration is read off the tensors.
  inferred = vae_weights.vae_config_from_ldm(checkpoint)
  for key in ('block_out_channels', 'layers_per_block', 'latent_channels', 'in_channels',
              'out_channels', 'down_block_types', 'up_block_types'):
    assert tuple(np.atleast_1d(inferred[key])) == tuple(np.atleast_1d(config[key])), key
  got = vae_weights.vae_params_from_ldm(
      checkpoint, AutoencoderKL.from_config(dict(inferred, norm_num_groups=8)))
  jax.tree.map(np.testing.assert_array_equal, got, params)
  del checkpoint['first_stage_model.decoder.up.1.upsample.conv.bias']
  with pytest.raises(ValueError, match=r"'decoder\.up\.1\.upsample\.conv\.bias'"):
    vae_weights.vae_params_from_ldm(checkpoint, module)


def test_from_config_checks(tiny):
  config = json.loads((tiny[1] / 'config.json').read_text())
  assert '_class_name' in config and '_diffusers_version' in config
  module = AutoencoderKL.from_config(config, dtype=jnp.bfloat16)
  assert module.dtype == jnp.bfloat16 and module.down_block_types == TINY['down_block_types']
  with pytest.raises(ValueError, match="act_fn='gelu'"):
    AutoencoderKL.from_config(dict(config, act_fn='gelu'))
  with pytest.raises(ValueError, match='AttnDownEncoderBlock2D'):
    AutoencoderKL.from_config(dict(config, down_block_types=['DownEncoderBlock2D',
                                                             'AttnDownEncoderBlock2D']))
  with pytest.raises(ValueError, match="'norm_type'"):
    AutoencoderKL.from_config(dict(config, norm_type='spatial'))
  with pytest.raises(ValueError, match="use attention='xla'"):
    AutoencoderKL.from_config(dict(config, block_out_channels=[32, 512]), attention='cudnn')
  with pytest.raises(ValueError, match='not an AutoencoderKL'):
    AutoencoderKL.from_config(dict(config, _class_name='AutoencoderTiny'))


def test_parameter_count_of_sd_vae():
  ours = vae_weights.vae_shapes(AutoencoderKL(**SD_VAE))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(ours))
  with torch.device('meta'):
    theirs = TorchAutoencoderKL(**SD_VAE)
  assert count == sum(p.numel() for p in theirs.parameters()) == SD_VAE_PARAMS


def test_bfloat16_runs_close(tiny):
  model, directory = tiny
  module, params = vae_weights.load_vae(directory, dtype=jnp.bfloat16)
  assert module.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
  x, z = _images(), _latents()
  image = module.apply({'params': params}, z, method=module.decode)
  mean, _ = module.apply({'params': params}, x, method=module.encode)
  assert image.dtype == jnp.float32 and np.isfinite(np.asarray(image)).all()
  want = _torch_decode(model, z)
  want_mean, _ = _torch_encode(model, x)
  rel_image = np.abs(np.asarray(image) - want).max() / np.abs(want).max()
  rel_mean = np.abs(np.asarray(mean) - want_mean).max() / np.abs(want_mean).max()
  assert rel_image < 0.05 and rel_mean < 0.05, (rel_image, rel_mean)
