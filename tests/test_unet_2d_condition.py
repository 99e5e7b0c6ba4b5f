"""Parity of our UNet2DConditionModel with diffusers' (PyTorch) on tiny random configurations.

Each tiny U-Net is built by diffusers with random weights (every parameter perturbed, so that no
bias is zero and no norm scale one), saved by ``save_pretrained`` (safetensors) and loaded with
``weights.unet.load_unet``; outputs on random latents, text states and fractional timesteps must
agree within 1e-4 (float32). Parameter counts of the full SD 1.5 / SD 2 / SDXL configurations
(``jax.eval_shape``) must equal diffusers' (built on torch's meta device) and the published ones.
"""

from __future__ import annotations

import copy
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers.loaders import single_file_utils

from diffusion_jax.models import attention as attention_lib
from diffusion_jax.models import unet_2d_condition
from diffusion_jax.weights import core
from diffusion_jax.weights import unet as unet_weights

UNet2DConditionModel = unet_2d_condition.UNet2DConditionModel

TINY_COMMON = dict(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=24,
                   in_channels=4, out_channels=4, sample_size=8)
TINY = {
    # SD 1.x: conv proj_in / proj_out, attention_head_dim = number of heads, a last DownBlock2D.
    'sd1': dict(TINY_COMMON, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=2,
                attention_head_dim=4),
    # SD 2.x: linear projections, heads per level, upcast attention.
    'sd2': dict(TINY_COMMON, down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1,
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
    # SDXL: first level without attention, transformer depth per level, text_time conditioning.
    'sdxl': dict(TINY_COMMON, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                 up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), layers_per_block=2,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, addition_embed_type='text_time',
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}
POOLED = 16  # SDXL tiny: pooled text width, projection_class_embeddings_input_dim - 6 * 8

# The published diffusers configs (unet/config.json of runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2, stabilityai/stable-diffusion-xl-base-1.0), architecture keys.
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
            down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
            up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3,
            block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
            mid_block_scale_factor=1, act_fn='silu', norm_num_groups=32, norm_eps=1e-5,
            cross_attention_dim=768, attention_head_dim=8, center_input_sample=False)
SD2 = dict(SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
           use_linear_projection=True, upcast_attention=True, dual_cross_attention=False)
SDXL = dict(SD15, sample_size=128, down_block_types=['DownBlock2D'] + ['CrossAttnDownBlock2D'] * 2,
            up_block_types=['CrossAttnUpBlock2D'] * 2 + ['UpBlock2D'],
            block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
            use_linear_projection=True, addition_embed_type='text_time',
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            upcast_attention=None, class_embed_type=None, num_attention_heads=None)
PUBLISHED = {'sd15': (SD15, 859_520_964), 'sd2': (SD2, 865_910_724),
             'sdxl': (SDXL, 2_567_463_684)}


def _torch_unet(config: dict, seed: int = 0) -> diffusers.UNet2DConditionModel:
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """name -> (torch model, directory saved with save_pretrained)."""
  out = {}
  for name, config in TINY.items():
    model = _torch_unet(config)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory, safe_serialization=True)
    out[name] = (model, directory)
  return out


def _inputs(name: str, batch: int = 2, height: int = 8, width: int = 8, seed: int = 0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((batch, height, width, 4)).astype(np.float32)
  t = np.array([3.7, 512.25, 999.0, 0.5][:batch], np.float32)
  context = rng.standard_normal((batch, 5, 24)).astype(np.float32)
  added = None
  if name == 'sdxl':
    added = {'text_embeds': rng.standard_normal((batch, POOLED)).astype(np.float32),
             'time_ids': np.array([[1024, 768, 0, 16, 1024, 1024]] * batch, np.float32)
                         + rng.integers(0, 64, (batch, 6)).astype(np.float32)}
  return sample, t, context, added


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def _torch_out(model, sample, t, context, added, **kwargs) -> np.ndarray:
  with torch.no_grad():
    out = model(_nchw(sample), torch.from_numpy(t), torch.from_numpy(context),
                added_cond_kwargs=(None if added is None else
                                   {k: torch.from_numpy(v) for k, v in added.items()}),
                **kwargs).sample
  return np.moveaxis(out.numpy(), 1, -1)


def _ours(module, params, sample, t, context, added, **kwargs) -> np.ndarray:
  fn = jax.jit(lambda p, x, t, c, a, kw: module.apply({'params': p}, x, t, c,
                                                      added_cond_kwargs=a, **kw))
  return np.asarray(fn(params, sample, t, context, added, kwargs))


_OUTPUTS = {}


def _ours_loaded(directory, name, size=(8, 8), **load_kwargs) -> np.ndarray:
  """Our output on ``_inputs(name, *size)``, memoized: each tiny U-Net compiles once per module."""
  key = (name, size, tuple(sorted(load_kwargs.items())))
  if key not in _OUTPUTS:
    module, params = unet_weights.load_unet(directory, **load_kwargs)
    _OUTPUTS[key] = _ours(module, params, *_inputs(name, height=size[0], width=size[1]))
  return _OUTPUTS[key]


@pytest.mark.parametrize('name,size', [('sd1', (8, 8)), ('sd2', (8, 8)), ('sdxl', (8, 8)),
                                       ('sd1', (9, 7))])
def test_matches_diffusers(saved, name, size):
  model, directory = saved[name]
  ours = _ours_loaded(directory, name, size)
  ref = _torch_out(model, *_inputs(name, height=size[0], width=size[1]))
  assert ours.shape == ref.shape == (2, *size, 4)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.1  # not trivially zero


def _skip_shapes(config: dict, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
  """The skip connections' NHWC shapes from the config (as diffusers' forward builds them)."""
  channels = config['block_out_channels']
  shapes = [(batch, height, width, channels[0])]
  for level, c in enumerate(channels):
    shapes += [(batch, height, width, c)] * config['layers_per_block']
    if level < len(channels) - 1:
      height, width = (height + 1) // 2, (width + 1) // 2
      shapes.append((batch, height, width, c))
  return shapes, (batch, height, width, channels[-1])


def test_controlnet_residuals_match_diffusers(saved):
  name = 'sd1'
  model, directory = saved[name]
  module, params = unet_weights.load_unet(directory)
  inputs = _inputs(name, seed=1)
  rng = np.random.default_rng(2)
  down_shapes, mid_shape = _skip_shapes(TINY[name], 2, 8, 8)
  down = tuple(rng.standard_normal(s).astype(np.float32) for s in down_shapes)
  mid = rng.standard_normal(mid_shape).astype(np.float32)
  ours = _ours(module, params, *inputs, down_block_additional_residuals=down,
               mid_block_additional_residual=mid)
  ref = _torch_out(model, *inputs, down_block_additional_residuals=tuple(_nchw(d) for d in down),
                   mid_block_additional_residual=_nchw(mid))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # The residuals matter: without them the output differs.
  assert np.abs(ours - _torch_out(model, *inputs)).max() > 1e-2
  with pytest.raises(ValueError, match='down_block_additional_residuals'):
    jax.eval_shape(lambda: module.apply(
        {'params': params}, *inputs[:3], down_block_additional_residuals=down[:-1],
        mid_block_additional_residual=mid))


def test_chunked_attention_equals_einsum(saved, monkeypatch):
  model, directory = saved['sd2']
  ref = _ours_loaded(directory, 'sd2', attention='einsum')
  # 64 and 16 tokens: chunks of 24 queries (the last one padded) instead of the default 512,
  # which would be one chunk here.
  calls = []
  chunked = attention_lib.chunked_attention

  def small_chunks(q, k, v):
    calls.append(q.shape)
    return chunked(q, k, v, chunk_size=24)

  monkeypatch.setattr(attention_lib, 'chunked_attention', small_chunks)
  module, params = unet_weights.load_unet(directory, attention='chunked')
  out = _ours(module, params, *_inputs('sd2'))
  assert any(shape[1] == 64 for shape in calls)  # the chunked path ran, with 3 chunks
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out, _torch_out(model, *_inputs('sd2')), atol=1e-4, rtol=0)


def test_remat_same_gradients():
  # One level (no resampling) is enough: remat wraps every resnet and transformer alike.
  module = UNet2DConditionModel(
      block_out_channels=(32,), down_block_types=('CrossAttnDownBlock2D',),
      up_block_types=('CrossAttnUpBlock2D',), layers_per_block=1, norm_num_groups=8,
      cross_attention_dim=24, attention_head_dim=4)
  sample, t, context, _ = _inputs('sd1', batch=1, height=4, width=4)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape).astype(np.float32),
                        unet_weights.unet_shapes(module))

  def grads(m):
    loss = lambda p: jnp.mean(m.apply({'params': p}, sample, t, context) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)

  ref = grads(module)
  rematted = grads(module.clone(remat_policy='full'))
  assert jax.tree.structure(rematted) == jax.tree.structure(ref)  # the same parameter paths
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), rematted, ref)
  with pytest.raises(ValueError, match='remat_policy'):
    module.clone(remat_policy='some').check_config()


def test_state_round_trip_and_keys(saved):
  model, directory = saved['sdxl']
  module, params = unet_weights.load_unet(directory)
  state = unet_weights.unet_state(params)
  torch_state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert set(state) == set(torch_state)
  for k, v in torch_state.items():
    np.testing.assert_array_equal(state[k], v, err_msg=k)
  # An fp16 variant beside the float32 weights: read when asked for, as float32 parameters.
  copy.deepcopy(model).half().save_pretrained(directory, variant='fp16', safe_serialization=True)
  _, params16 = unet_weights.load_unet(directory, variant='fp16')
  assert {x.dtype for x in jax.tree.leaves(params16)} == {np.dtype(np.float32)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(np.float16)), params16,
               params)
  path = ('down_blocks_1', 'attentions_1', 'transformer_blocks_0', 'attn2', 'to_k', 'kernel')
  key = 'down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight'
  assert unet_weights.unet_key(path) == key


def test_ldm_layout_matches_diffusers_converter(saved, tmp_path):
  """Our LDM key table, inverted by diffusers' own convert_ldm_unet_checkpoint, is the identity."""
  for name in ('sd1', 'sdxl'):
    model, directory = saved[name]
    module, params = unet_weights.load_unet(directory)
    ldm = unet_weights.ldm_state(params, module)
    config = dict(model.config)
    converted = single_file_utils.convert_ldm_unet_checkpoint(
        {k: torch.from_numpy(v) for k, v in ldm.items()}, config)
    torch_state = model.state_dict()
    assert set(converted) == set(torch_state), name
    for k, v in torch_state.items():
      np.testing.assert_array_equal(converted[k].numpy(), v.numpy(), err_msg=k)
    # A single file holding VAE / text tensors too: only the U-Net's are read.
    ldm['first_stage_model.decoder.conv_in.weight'] = np.zeros((1,), np.float32)
    path = tmp_path / f'{name}.safetensors'
    safetensors.numpy.save_file(ldm, str(path))
    loaded = unet_weights.unet_params_from_ldm(core.read_safetensors(path), module)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
  del ldm['model.diffusion_model.middle_block.1.proj_in.weight']
  with pytest.raises(ValueError, match=r'middle_block\.1\.proj_in\.weight'):
    unet_weights.unet_params_from_ldm(ldm, module)


def test_param_counts_of_full_configs():
  for name, (config, published) in PUBLISHED.items():
    with torch.device('meta'):
      ref = diffusers.UNet2DConditionModel(**config)
    theirs = sum(p.numel() for p in ref.parameters())
    shapes = unet_weights.unet_shapes(UNet2DConditionModel.from_config(config))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert ours == theirs == published, name


def test_from_config_errors_and_load_errors(saved, tmp_path):
  with pytest.raises(ValueError, match='class_embed_type'):
    UNet2DConditionModel.from_config(dict(SD15, class_embed_type='projection'))
  with pytest.raises(ValueError, match='time_cond_proj_dim'):
    UNet2DConditionModel.from_config(dict(SD15, time_cond_proj_dim=256))
  with pytest.raises(ValueError, match='encoder_hid_dim_type'):
    UNet2DConditionModel.from_config(dict(SD15, encoder_hid_dim_type='text_proj'))
  with pytest.raises(ValueError, match='no_such_key'):
    UNet2DConditionModel.from_config(dict(SD15, no_such_key=1))
  with pytest.raises(FileNotFoundError, match='config.json'):
    unet_weights.load_unet(tmp_path)
  # Weights of one configuration with the config of another: the key and both shapes are named.
  _, directory = saved['sd1']
  other = tmp_path / 'other'
  other.mkdir()
  config = json.loads((directory / 'config.json').read_text())
  config['cross_attention_dim'] = 16
  (other / 'config.json').write_text(json.dumps(config))
  (other / 'diffusion_pytorch_model.safetensors').write_bytes(
      (directory / 'diffusion_pytorch_model.safetensors').read_bytes())
  with pytest.raises(ValueError, match=r'attn2\.to_k\.weight.*\(32, 24\).*\(32, 16\)'):
    unet_weights.load_unet(other)
  module, params = unet_weights.load_unet(directory)
  sample, t, context, _ = _inputs('sd1')
  apply = lambda *a, **kw: jax.eval_shape(  # noqa: E731
      lambda: module.apply({'params': params}, *a, **kw))
  with pytest.raises(ValueError, match='NHWC'):
    apply(np.moveaxis(sample, -1, 1), t, context)
  with pytest.raises(ValueError, match='both'):
    apply(sample, t, context, mid_block_additional_residual=sample)
  with pytest.raises(ValueError, match='width 12.*cross_attention_dim'):
    apply(sample, t, context[..., :12])


def test_sdxl_needs_added_cond_kwargs(saved):
  _, directory = saved['sdxl']
  module, params = unet_weights.load_unet(directory)
  sample, t, context, _ = _inputs('sdxl')
  with pytest.raises(ValueError, match='text_embeds'):
    jax.eval_shape(lambda: module.apply({'params': params}, sample, t, context))


def test_bfloat16_close_to_float32(saved):
  model, directory = saved['sd1']
  module16, params16 = unet_weights.load_unet(directory, dtype=jnp.bfloat16)
  assert module16.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
  inputs = _inputs('sd1')
  out = _ours(module16, params16, *inputs)
  ref = _torch_out(model, *inputs)
  assert out.dtype == np.float32
  # bfloat16 keeps 8 mantissa bits: a few percent of the output's scale, not 1e-4.
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
  assert np.abs(out - ref).max() > 1e-4  # it did compute in bfloat16
