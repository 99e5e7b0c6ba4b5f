"""diffusion_jax.models.sd_blocks against diffusers' own PyTorch blocks (float32, CPU).

Each diffusers block gets random weights (every parameter, norms included, drawn from a normal
so that no affine is the identity), its ``state_dict`` goes through ``weights.core`` into our
tree, and both run on the same input (NCHW there, NHWC here). The bound is 1e-5
throughout; measured max abs errors (torch 2.13 CPU, XLA CPU): ResnetBlock2D
6.9e-7 / 3.6e-7, Downsample2D and Upsample2D 0.0 (same convolution sums), cross-attention 3.6e-7
with each of the 'xla' / 'einsum' / 'chunked' implementations, the VAE mid-block attention 2.4e-7,
FeedForward 4.8e-7 (geglu) / 2.4e-7 (gelu), BasicTransformerBlock 4.8e-7, Transformer2DModel
7.2e-7 (1x1 conv projections) / 9.5e-7 (linear projections).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.attention import FeedForward as TorchFeedForward
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D

from diffusion_jax.models import sd_blocks
from diffusion_jax.weights import core

TOL = 1e-5


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return module.eval()


def _state(module: torch.nn.Module) -> dict[str, np.ndarray]:
  # Downsample2D registers its conv twice (``conv`` and the legacy alias ``Conv2d_0``).
  return {k: v.numpy() for k, v in module.state_dict().items() if 'Conv2d_0' not in k}


def _params(ours, state, *args):
  shapes = core.shapes_of(ours, *args)
  key_fn = lambda path: core.torch_key(path, lists=sd_blocks.MODULE_LISTS)  # noqa: E731
  return core.tree_from_state(state, shapes, key_fn)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _x(*shape, seed=1):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('in_ch,out_ch,with_temb', [(16, 32, True), (16, 16, False)])
def test_resnet_block(in_ch, out_ch, with_temb):
  torch_block = _randomize(TorchResnetBlock2D(
      in_channels=in_ch, out_channels=out_ch, temb_channels=24 if with_temb else None, groups=8,
      eps=1e-5, output_scale_factor=1.5))
  ours = sd_blocks.ResnetBlock2D(out_channels=out_ch, groups=8, eps=1e-5, output_scale_factor=1.5)
  x = _x(2, 8, 8, in_ch)
  temb = _x(2, 24, seed=2) if with_temb else None
  params = _params(ours, _state(torch_block), x, temb)
  assert ('conv_shortcut' in params) == (in_ch != out_ch)
  got = ours.apply({'params': params}, x, temb)
  with torch.no_grad():
    want = _nhwc(torch_block(_nchw(x), None if temb is None else torch.from_numpy(temb)))
  err = np.abs(np.asarray(got) - want).max()
  assert err <= TOL, err  # measured 6.9e-7 / 3.6e-7


@pytest.mark.parametrize('padding', [1, 0])
def test_downsample(padding):
  torch_block = _randomize(TorchDownsample2D(8, use_conv=True, out_channels=12, padding=padding,
                                             name='op' if padding == 0 else 'conv'))
  ours = sd_blocks.Downsample2D(out_channels=12, padding=padding)
  x = _x(2, 8, 8, 8)
  params = _params(ours, _state(torch_block), x)
  got = ours.apply({'params': params}, x)
  with torch.no_grad():
    want = _nhwc(torch_block(_nchw(x)))
  assert got.shape == want.shape == (2, 4, 4, 12)
  err = np.abs(np.asarray(got) - want).max()
  assert err <= TOL, err


@pytest.mark.parametrize('output_size', [None, (7, 9)])
def test_upsample(output_size):
  torch_block = _randomize(TorchUpsample2D(8, use_conv=True, out_channels=6))
  ours = sd_blocks.Upsample2D(out_channels=6)
  x = _x(2, 4, 5, 8)
  params = _params(ours, _state(torch_block), x, output_size)
  got = ours.apply({'params': params}, x, output_size)
  with torch.no_grad():
    want = _nhwc(torch_block(_nchw(x), output_size=output_size))
  assert got.shape == want.shape
  err = np.abs(np.asarray(got) - want).max()
  assert err <= TOL, err


def test_attention_cross():
  torch_attn = _randomize(TorchAttention(query_dim=32, cross_attention_dim=20, heads=4,
                                         dim_head=8))
  ours = sd_blocks.Attention(heads=4, dim_head=8, cross_attention_dim=20)
  x, ctx = _x(2, 10, 32), _x(2, 7, 20, seed=3)
  params = _params(ours, _state(torch_attn), x, ctx)
  assert set(params) == {'to_q', 'to_k', 'to_v', 'to_out_0'}
  for impl in ('xla', 'einsum', 'chunked'):
    got = ours.clone(attention=impl).apply({'params': params}, x, ctx)
    with torch.no_grad():
      want = torch_attn(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).numpy()
    err = np.abs(np.asarray(got) - want).max()
    assert err <= TOL, (impl, err)
  with pytest.raises(ValueError, match='cross_attention_dim=20'):
    ours.apply({'params': params}, x, _x(2, 7, 16))


def test_attention_vae_mid_block_form():
  # The VAE mid block's attention: GroupNorm first, 1 head over all channels, biases, residual.
  torch_attn = _randomize(TorchAttention(32, heads=1, dim_head=32, rescale_output_factor=2.0,
                                         eps=1e-6, norm_num_groups=8, residual_connection=True,
                                         bias=True, upcast_softmax=True,
                                         _from_deprecated_attn_block=True))
  ours = sd_blocks.Attention(heads=1, dim_head=32, bias=True, group_norm=8, eps=1e-6,
                             residual_connection=True, rescale_output_factor=2.0)
  x = _x(2, 6, 5, 32)
  params = _params(ours, _state(torch_attn), x)
  got = ours.apply({'params': params}, x)
  with torch.no_grad():
    want = _nhwc(torch_attn(_nchw(x)))
  err = np.abs(np.asarray(got) - want).max()
  assert err <= TOL, err


@pytest.mark.parametrize('activation_fn', ['geglu', 'gelu'])
def test_feed_forward(activation_fn):
  torch_ff = _randomize(TorchFeedForward(16, activation_fn=activation_fn))
  ours = sd_blocks.FeedForward(activation_fn=activation_fn)
  x = _x(2, 5, 16)
  params = _params(ours, _state(torch_ff), x)
  got = ours.apply({'params': params}, x)
  with torch.no_grad():
    want = torch_ff(torch.from_numpy(x)).numpy()
  err = np.abs(np.asarray(got) - want).max()
  assert err <= TOL, err


def test_basic_transformer_block():
  torch_block = _randomize(TorchBasicTransformerBlock(32, 4, 8, cross_attention_dim=24))
  ours = sd_blocks.BasicTransformerBlock(num_attention_heads=4, attention_head_dim=8,
                                         cross_attention_dim=24)
  x, ctx = _x(2, 12, 32), _x(2, 7, 24, seed=3)
  params = _params(ours, _state(torch_block), x, ctx)
  got = ours.apply({'params': params}, x, ctx)
  with torch.no_grad():
    want = torch_block(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).numpy()
  err = np.abs(np.asarray(got) - want).max()
  assert err <= TOL, err


@pytest.mark.parametrize('use_linear_projection', [False, True])
def test_transformer_2d(use_linear_projection):
  torch_model = _randomize(TorchTransformer2D(
      num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2,
      cross_attention_dim=24, norm_num_groups=8, use_linear_projection=use_linear_projection))
  ours = sd_blocks.Transformer2DModel(num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                      cross_attention_dim=24, norm_num_groups=8,
                                      use_linear_projection=use_linear_projection)
  x, ctx = _x(2, 6, 4, 32), _x(2, 7, 24, seed=3)
  params = _params(ours, _state(torch_model), x, ctx)
  assert 'transformer_blocks_1' in params
  got = ours.apply({'params': params}, x, ctx)
  with torch.no_grad():
    want = _nhwc(torch_model(_nchw(x), encoder_hidden_states=torch.from_numpy(ctx)).sample)
  err = np.abs(np.asarray(got) - want).max()
  assert err <= TOL, err


def test_bfloat16_transformer_runs_close():
  ours = sd_blocks.Transformer2DModel(num_attention_heads=2, attention_head_dim=16,
                                      cross_attention_dim=24, norm_num_groups=8)
  x, ctx = _x(2, 6, 4, 32), _x(2, 7, 24, seed=3)
  params = ours.init(jax.random.key(0), x, ctx)['params']
  want = ours.apply({'params': params}, x, ctx)
  got = ours.clone(dtype=jnp.bfloat16).apply({'params': params}, x, ctx)
  assert got.dtype == jnp.bfloat16
  rel = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
  assert rel < 0.05, rel
