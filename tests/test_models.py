"""Tests of diffusion_jax.models: published parameter counts, option coverage, numerics.

Kept fast: parameter counts and most shape checks go through ``jax.eval_shape`` (tracing only, no
compilation or initialization); the numerical checks run one tiny U-Net eagerly on random
parameters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.models import (MLP, MODELS, UNet, attention, count_params, fir, layers,
                                  validate_unet_config)

CIFAR = (1, 32, 32, 3)

# DDPM CIFAR-10 (Ho et al. 2020, Appendix B: 35.7M). The exact figure is the parameter count of
# the converted original checkpoint in diffusers, google/ddpm-cifar10-32 (UNet2DModel).
DDPM_CIFAR10_PARAMS = 35_746_307

# Song et al. (2021), score_sde configs/vp/cifar10_ddpmpp_continuous.py: "DDPM++ cont. (VP)".
DDPMPP = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
              dropout=0.1, resblock_type='biggan', skip_rescale=True, up_attn_every_block=False,
              embedding_type='sinusoidal')
# configs/ve/cifar10_ncsnpp_continuous.py: "NCSN++ cont. (VE)" (FIR, Fourier features, residual
# input pyramid, no output pyramid).
NCSNPP = dict(DDPMPP, fir=True, embedding_type='fourier', fourier_scale=16.0,
              progressive='none', progressive_input='residual', progressive_combine='sum')
# The NCSN++ of the brief with both skip pyramids (StyleGAN2-style output_skip / input_skip).
NCSNPP_SKIP = dict(NCSNPP, progressive='output_skip', progressive_input='input_skip')


def _score_sde_ncsnpp_count(*, nf, ch_mult, num_res_blocks, attn_resolutions, resblock_type,
                            progressive, progressive_input, combine, embedding_type,
                            image_size=32, channels=3, **_):
  """Parameter count of score_sde's PyTorch ``NCSNpp.__init__``, walked module by module.

  An independent reference: it follows the constructor of score_sde ``models/ncsnpp.py`` (the
  channel bookkeeping ``hs_c``, the pyramids, the Fourier ``W``) and sums closed-form sizes,
  sharing no code with the Flax modules.
  """
  conv3 = lambda i, o: 9 * i * o + o  # noqa: E731
  conv1 = lambda i, o: i * o + o  # noqa: E731
  gn = lambda c: 2 * c  # noqa: E731
  temb_dim = 4 * nf

  def resblock(i, o=None, updown=False):
    o = o or i
    n = gn(i) + conv3(i, o) + conv1(temb_dim, o) + gn(o) + conv3(o, o)
    return n + (conv1(i, o) if (i != o or updown) else 0)

  attn = lambda c: gn(c) + 4 * conv1(c, c)  # noqa: E731
  n = 0
  if embedding_type == 'fourier':
    n += nf  # GaussianFourierProjection.W (a Parameter, requires_grad=False, still counted).
    embed_dim = 2 * nf
  else:
    embed_dim = nf
  n += conv1(embed_dim, temb_dim) + conv1(temb_dim, temb_dim)
  resolutions = [image_size // 2**i for i in range(len(ch_mult))]
  pyramid_in = channels
  n += conv3(channels, nf)
  hs_c = [nf]
  in_ch = nf
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      n += resblock(in_ch, nf * mult)
      in_ch = nf * mult
      if resolutions[level] in attn_resolutions:
        n += attn(in_ch)
      hs_c.append(in_ch)
    if level != len(ch_mult) - 1:
      n += conv3(in_ch, in_ch) if resblock_type == 'ddpm' else resblock(in_ch, updown=True)
      if progressive_input == 'input_skip':
        n += conv1(pyramid_in, in_ch)  # Combine; pyramid downsampling has no weights.
        if combine == 'cat':
          in_ch *= 2
      elif progressive_input == 'residual':
        n += conv3(pyramid_in, in_ch)
        pyramid_in = in_ch
      hs_c.append(in_ch)
  in_ch = hs_c[-1]
  n += 2 * resblock(in_ch) + attn(in_ch)
  pyramid_ch = 0
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      out_ch = nf * ch_mult[level]
      n += resblock(in_ch + hs_c.pop(), out_ch)
      in_ch = out_ch
    if resolutions[level] in attn_resolutions:
      n += attn(in_ch)
    if progressive != 'none':
      if level == len(ch_mult) - 1:
        if progressive == 'output_skip':
          n += gn(in_ch) + conv3(in_ch, channels)
          pyramid_ch = channels
        else:
          n += gn(in_ch) + conv3(in_ch, in_ch)
          pyramid_ch = in_ch
      elif progressive == 'output_skip':
        n += gn(in_ch) + conv3(in_ch, channels)
      else:
        n += conv3(pyramid_ch, in_ch)
        pyramid_ch = in_ch
    if level != 0:
      n += conv3(in_ch, in_ch) if resblock_type == 'ddpm' else resblock(in_ch, updown=True)
  assert not hs_c
  if progressive != 'output_skip':
    n += gn(in_ch) + conv3(in_ch, channels)
  return n


def _ref_count(cfg):
  cfg = {'progressive': 'none', 'progressive_input': 'none', 'progressive_combine': 'sum', **cfg}
  return _score_sde_ncsnpp_count(nf=cfg['ch'], combine=cfg['progressive_combine'], **cfg)


# ---------------------------------------------------------------------------------------------
# Parameter counts (jax.eval_shape only).


def test_ddpm_cifar10_parameter_count_is_published():
  assert count_params(UNet(), CIFAR) == DDPM_CIFAR10_PARAMS


def test_ddpmpp_cont_vp_parameter_count():
  # Published: "DDPM++ cont. (VP)" ~62M (Song et al. 2021; 61.8M). Exact figure of score_sde's
  # architecture, checked against the module-by-module walk of its constructor.
  assert _ref_count(DDPMPP) == 61_804_419
  assert count_params(UNet(**DDPMPP), CIFAR) == 61_804_419


def test_ncsnpp_cont_ve_parameter_count():
  # Published: "NCSN++ cont. (VE)" ~63M (62.76M incl. the 128 fixed Fourier frequencies W,
  # which score_sde also stores as a parameter).
  assert _ref_count(NCSNPP) == 62_758_915
  assert count_params(UNet(**NCSNPP), CIFAR) == 62_758_915


@pytest.mark.parametrize('cfg', [
    NCSNPP_SKIP,
    dict(NCSNPP_SKIP, progressive_combine='cat'),
    dict(NCSNPP, progressive='residual', progressive_input='input_skip'),
    dict(DDPMPP, resblock_type='ddpm'),
    dict(NCSNPP, num_res_blocks=8),  # "NCSN++ cont. (deep, VE)": published ~108M.
], ids=['output_skip+input_skip', 'input_skip-cat', 'residual-out', 'ddpm-blocks', 'deep'])
def test_score_sde_variants_match_reference_walk(cfg):
  assert count_params(UNet(**cfg), CIFAR) == _ref_count(cfg)


def test_class_table_has_null_row():
  base = count_params(UNet(), CIFAR)
  cond = count_params(UNet(num_classes=10), CIFAR, num_classes=10)
  assert cond - base == 11 * 4 * 128


def test_params_do_not_depend_on_remat_policy():
  kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
  shapes = {p: _param_shapes(UNet(**kw, remat_policy=p), (1, 8, 8, 3))
            for p in ('none', 'full', 'dots_saveable')}
  assert shapes['none'] == shapes['full'] == shapes['dots_saveable']


# ---------------------------------------------------------------------------------------------
# Shapes and dtypes for every option (traced, not compiled).

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)


def _param_shapes(module, shape, label=None):
  init = functools.partial(module.init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]),
                             label=label)
  return jax.tree.map(lambda s: (s.shape, s.dtype), variables['params'])


def _traced(module, shape, label=None, train=False):
  """(params, output) shapes of one forward pass, traced once (init_with_output), not compiled."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  c = jax.ShapeDtypeStruct(shape[:1], jnp.float32)

  def fwd(key, x, c):
    out, variables = module.init_with_output({'params': key, 'dropout': key}, x, c,
                                             label=label, train=train)
    return variables['params'], out

  return jax.eval_shape(fwd, jax.random.key(0), x, c)


@pytest.mark.parametrize('opts', [
    dict(),
    dict(resamp_with_conv=False),
    dict(resblock_type='biggan', skip_rescale=True, up_attn_every_block=False),
    dict(resblock_type='biggan', fir=True),
    dict(resblock_type='ddpm', fir=True),
    dict(resblock_type='ddpm', fir=True, resamp_with_conv=False),
    dict(embedding_type='fourier'),
    dict(resblock_type='biggan', fir=True, progressive='output_skip',
         progressive_input='input_skip'),
    dict(resblock_type='biggan', progressive='output_skip', progressive_input='input_skip',
         progressive_combine='cat'),
    dict(resblock_type='biggan', fir=True, progressive='residual', progressive_input='residual',
         skip_rescale=True),
    dict(progressive='residual', progressive_input='input_skip', progressive_combine='cat'),
    dict(num_classes=10),
    dict(conditional=False),
    dict(conditional=False, num_classes=3),
    dict(num_heads=2),
    dict(num_head_channels=4),
    dict(out_channels=6),
    dict(remat_policy='full'),
    dict(remat_policy='dots_saveable', resblock_type='biggan'),
], ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()) or 'ddpm')
def test_unet_option_shapes(opts):
  shape = (2, 8, 8, 3)
  params, out = _traced(UNet(**TINY, **opts), shape, train=True)
  assert out.shape == shape[:3] + (opts.get('out_channels', 3),)
  assert out.dtype == jnp.float32
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_compute_keeps_float32_params_and_output():
  params, out = _traced(UNet(**TINY, dtype=jnp.bfloat16, resblock_type='biggan', fir=True,
                             embedding_type='fourier', progressive='output_skip',
                             progressive_input='residual', num_classes=4), (2, 8, 8, 3))
  assert out.dtype == jnp.float32
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_non_square_input():
  _, out = _traced(UNet(**TINY), (1, 8, 16, 1))
  assert out.shape == (1, 8, 16, 1)


def test_bad_image_size_raises():
  with pytest.raises(ValueError, match=r'30x30.*ch_mult=\(1, 2, 2, 2\).*multiple of 8'):
    _traced(UNet(), (1, 30, 30, 3))


def test_labels_without_classes_raise():
  with pytest.raises(ValueError, match='num_classes'):
    _traced(UNet(**TINY), (1, 8, 8, 3), label=jnp.zeros((1,), jnp.int32))


def test_unknown_option_raises():
  with pytest.raises(ValueError, match='resblock_type'):
    _traced(UNet(**TINY, resblock_type='resnet'), (1, 8, 8, 3))


def test_validate_unet_config():
  validate_unet_config(image_size=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,))
  with pytest.raises(ValueError, match='image_size=28'):
    validate_unet_config(image_size=28, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,))
  with pytest.raises(ValueError, match='attn_resolutions'):
    validate_unet_config(image_size=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(12,))


def test_exports():
  assert MODELS == {'unet': UNet, 'mlp': MLP}
  assert models.count_params is count_params


# ---------------------------------------------------------------------------------------------
# Numerics on one tiny U-Net with random (not initializer-drawn) parameters: eager and cheap.

SMALL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), init_scale=1.0)


def _random_params(module, shape, label=None, seed=0):
  rng = np.random.default_rng(seed)
  shapes = _param_shapes(module, shape, label)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s[0]), jnp.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple) and isinstance(s[1], np.dtype))


@pytest.fixture(scope='module')
def small_case():
  shape = (2, 8, 8, 3)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  c = jnp.asarray([3.0, 700.0])
  params = _random_params(UNet(**SMALL, dropout=0.5), shape)
  return x, c, params


def test_remat_policies_give_same_output(small_case):
  x, c, params = small_case
  ref = UNet(**SMALL, dropout=0.5).apply({'params': params}, x, c, train=False)
  assert float(jnp.abs(ref).max()) > 0
  for policy in ('full', 'dots_saveable'):
    net = UNet(**SMALL, dropout=0.5, remat_policy=policy)
    # jit: eagerly, every checkpointed block would be compiled on its own.
    out = jax.jit(functools.partial(net.apply, train=False))({'params': params}, x, c)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training(small_case):
  x, c, params = small_case
  net = UNet(**SMALL, dropout=0.5)
  apply = functools.partial(net.apply, {'params': params}, x, c)
  eval_a, eval_b = apply(train=False), apply(train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = apply(train=True, rngs={'dropout': jax.random.key(0, impl='unsafe_rbg')})
  train_b = apply(train=True, rngs={'dropout': jax.random.key(1, impl='unsafe_rbg')})
  assert not np.allclose(train_a, eval_a)
  assert not np.allclose(train_a, train_b)
  no_dropout = UNet(**SMALL, dropout=0.0).apply({'params': params}, x, c, train=True)
  np.testing.assert_allclose(no_dropout, eval_a, rtol=1e-6, atol=1e-6)


def test_noise_conditioning_changes_output(small_case):
  x, c, params = small_case
  net = UNet(**SMALL, dropout=0.5)
  a = net.apply({'params': params}, x, c, train=False)
  b = net.apply({'params': params}, x, c + 1.0, train=False)
  assert not np.allclose(a, b)


def test_class_conditioning_and_null_class():
  shape = (2, 8, 8, 3)
  net = UNet(**SMALL, num_classes=3)
  params = _random_params(net, shape)
  x = jnp.ones(shape)
  c = jnp.asarray([10.0, 10.0])
  null = net.apply({'params': params}, x, c, train=False)
  explicit_null = net.apply({'params': params}, x, c, label=jnp.asarray([3, 3]), train=False)
  np.testing.assert_array_equal(null, explicit_null)
  # Conditioning arrives as the cond dict's keys (build_network's module.apply(..., **cond)).
  labelled = net.apply({'params': params}, x, c, **{'label': jnp.asarray([0, 2])}, train=False)
  np.testing.assert_array_equal(
      labelled, net.apply({'params': params}, x, c, jnp.asarray([0, 2])))  # positional, train=False
  assert not np.allclose(labelled, null)
  assert not np.allclose(labelled[0], labelled[1])  # Same x and c_noise, different labels.


def test_bfloat16_close_to_float32(small_case):
  x, c, params = small_case
  ref = UNet(**SMALL).apply({'params': params}, x, c, train=False)
  bf16 = UNet(**SMALL, dtype=jnp.bfloat16)
  out = jax.jit(functools.partial(bf16.apply, train=False))({'params': params}, x, c)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_zero_init_output():
  # init_scale=0 zero-initializes the last layer (DDPM): the untrained network outputs 0.
  net = UNet(ch=4, ch_mult=(1,), num_res_blocks=0, attn_resolutions=())
  x, c = jnp.ones((1, 4, 4, 2)), jnp.ones((1,))

  @jax.jit  # One compilation instead of one per initializer and shape.
  def init_and_apply(key):
    params = net.init(key, x, c, train=False)['params']
    return params, net.apply({'params': params}, x, c, train=False)

  # The RBG generator compiles much faster than threefry.
  params, out = init_and_apply(jax.random.key(0, impl='unsafe_rbg'))
  assert float(jnp.abs(params['Conv_1']['kernel']).max()) == 0.0
  assert float(jnp.abs(params['Conv_0']['kernel']).max()) > 0.0
  np.testing.assert_array_equal(out, 0.0)


# ---------------------------------------------------------------------------------------------
# Layers against NumPy formulas.


def test_sinusoidal_embedding_matches_ddpm_formula():
  c = np.asarray([0.0, 1.0, 999.0], np.float32)
  dim = 8
  freqs = np.exp(-np.log(10000.0) * np.arange(dim // 2) / (dim // 2 - 1))  # DDPM: half - 1.
  want = np.concatenate([np.sin(c[:, None] * freqs), np.cos(c[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(layers.sinusoidal_embedding(jnp.asarray(c), dim), want,
                             rtol=1e-5, atol=1e-4)


def _group_norm_ref(x, scale, bias, groups, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_attention_block_matches_numpy():
  heads, c = 2, 8
  block = layers.AttnBlock(num_heads=heads, init_scale=1.0)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4, c)).astype(np.float32)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x)['params']
  p = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  out = block.apply({'params': jax.tree.map(jnp.asarray, p)}, jnp.asarray(x))

  gn = p['GroupNorm_0']
  h = _group_norm_ref(x, gn['scale'], gn['bias'], layers.num_groups(c))
  proj = [h @ p[f'Dense_{i}']['kernel'] + p[f'Dense_{i}']['bias'] for i in range(3)]
  q, k, v = (t.reshape(2, 12, heads, c // heads) for t in proj)
  logits = np.einsum('bqnd,bknd->bnqk', q, k) / np.sqrt(c // heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  a = np.einsum('bnqk,bknd->bqnd', weights, v).reshape(2, 3, 4, c)
  want = x + a @ p['Dense_3']['kernel'] + p['Dense_3']['bias']
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# FIR resampling against a direct NumPy implementation of StyleGAN2's upfirdn_2d_ref.


def _upfirdn_ref(x, k, up, down, pad0, pad1):
  b, h, w, c = x.shape
  z = np.zeros((b, h * up, w * up, c), x.dtype)
  z[:, ::up, ::up, :] = x
  z = np.pad(z, ((0, 0), (pad0, pad1), (pad0, pad1), (0, 0)))
  kh = k.shape[0]
  oh, ow = z.shape[1] - kh + 1, z.shape[2] - kh + 1
  kf = k[::-1, ::-1]
  out = np.zeros((b, oh, ow, c), x.dtype)
  for i in range(kh):
    for j in range(kh):
      out += kf[i, j] * z[:, i:i + oh, j:j + ow, :]
  return out[:, ::down, ::down, :]


@pytest.mark.parametrize('up,down,pad', [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (1, 2))])
def test_upfirdn_matches_reference(up, down, pad):
  x = np.random.default_rng(0).standard_normal((1, 6, 6, 2)).astype(np.float32)
  k = fir.setup_kernel((1, 3, 3, 1))
  out = fir.upfirdn_2d(jnp.asarray(x), k, up=up, down=down, pad=pad)
  np.testing.assert_allclose(out, _upfirdn_ref(x, k, up, down, *pad), rtol=1e-5, atol=1e-5)


def test_fir_resampling_shapes_and_dc_gain():
  x = jnp.ones((1, 8, 8, 2))
  up, down = fir.upsample_2d(x), fir.downsample_2d(x)
  assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
  # Unit DC gain away from the zero-padded border.
  np.testing.assert_allclose(up[:, 2:-2, 2:-2], 1.0, rtol=1e-6)
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], 1.0, rtol=1e-6)
  w = jnp.ones((3, 3, 2, 5))
  assert fir.upsample_conv_2d(x, w).shape == (1, 16, 16, 5)
  assert fir.conv_downsample_2d(x, w).shape == (1, 4, 4, 5)


# ---------------------------------------------------------------------------------------------
# MLP.


@pytest.mark.parametrize('shape', [(4, 5), (4, 2, 3)])
def test_mlp_shapes_and_zero_init(shape):
  net = MLP(hidden_dim=16, num_layers=2, embed_dim=8)
  x = jnp.ones(shape)
  c = jnp.arange(shape[0], dtype=jnp.float32)
  params = net.init(jax.random.key(0), x, c, train=False)['params']
  out = net.apply({'params': params}, x, c, train=False)
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # Zero-initialized output layer.


def test_mlp_conditioning_and_bfloat16():
  net = MLP(hidden_dim=16, num_layers=2, embed_dim=8, num_classes=2, dtype=jnp.bfloat16)
  x = jnp.ones((3, 2))
  c = jnp.asarray([0.0, 1.0, 2.0])
  params = _random_params(net, (3, 2))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  null = net.apply({'params': params}, x, c, train=False)
  assert null.dtype == jnp.float32
  np.testing.assert_array_equal(null, net.apply({'params': params}, x, c,
                                                label=jnp.full((3,), 2), train=False))
  assert not np.allclose(null, net.apply({'params': params}, x, c,
                                         label=jnp.zeros((3,), jnp.int32), train=False))
  assert not np.allclose(null[0], null[1])  # c_noise matters.
  assert count_params(net, (3, 2), num_classes=2) == sum(
      p.size for p in jax.tree.leaves(params))


def test_group_norm_matches_numpy_and_flax_values_and_gradients():
  """Our GroupNorm reorders Flax's reductions; function, parameters and gradients are the same."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  c, groups = 64, 32
  # A mean well away from zero (as activations have) and unequal group scales.
  x = (rng.standard_normal((3, 5, 6, c)) * rng.uniform(0.5, 4, c) + 2.0).astype(np.float32)
  ours = layers.GroupNorm(num_groups=groups)
  flax_gn = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
  params = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_gn.init(
      jax.random.key(0), x))
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                        params)
  p = params['params']
  want = _group_norm_ref(x.astype(np.float64), np.asarray(p['scale']), np.asarray(p['bias']),
                         groups)
  np.testing.assert_allclose(ours.apply(params, x), want, rtol=1e-4, atol=1e-4)
  cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  g_ours = jax.grad(lambda p, x: jnp.vdot(ours.apply(p, x), cot), argnums=(0, 1))(params, x)
  g_flax = jax.grad(lambda p, x: jnp.vdot(flax_gn.apply(p, x), cot), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_flax)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
  half = layers.GroupNorm(num_groups=groups, dtype=jnp.bfloat16).apply(params, x)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), want, rtol=2e-2, atol=5e-2)


def test_dropout_keeps_the_stated_fraction_and_is_unbiased():
  """16-bit draws: kept fraction 1 - round(rate*2^16)/2^16 within sampling error, kept values
  scaled by exactly its inverse, every element independent (halves of one word included)."""
  rate = 0.1
  x = jnp.ones((64, 32, 32, 16), jnp.float32)  # 1,048,576 elements, an even count
  drop = layers.Dropout(rate)
  y = np.asarray(drop.apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(3)}))
  keep = 1 - round(rate * 65536) / 65536
  kept = y != 0
  n = kept.size
  assert abs(kept.mean() - keep) < 4 * np.sqrt(keep * (1 - keep) / n)
  np.testing.assert_allclose(y[kept], 1 / keep, rtol=1e-6)
  assert abs(y.mean() - 1.0) < 4 * np.sqrt((1 - keep) / keep / n)
  # The two 16-bit halves of a word land in the first and second half of the flat array: their
  # keep decisions must be uncorrelated.
  flat = kept.reshape(-1)
  a, b = flat[: n // 2].astype(float), flat[n // 2:].astype(float)
  assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(n // 2)
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  odd = jnp.ones((3, 5, 7), jnp.float32)  # an odd element count
  assert drop.apply({}, odd, deterministic=False, rngs={'dropout': jax.random.key(0)}).shape == (
      3, 5, 7)
  with pytest.raises(ValueError, match='dropout rate'):
    layers.Dropout(1.0).apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(0)})


def test_nin_is_a_dense_over_channels_with_the_same_parameter_names():
  """``nin`` flattens to [N, C] around its Dense: names, values and gradients stay a 1x1 conv's."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class TwoNin(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = layers.nin(7, jnp.float32)(x)
      return layers.nin(5, jnp.float32)(h)

  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
  model = TwoNin()
  params = model.init(jax.random.key(0), x)['params']
  assert jax.tree.map(jnp.shape, params) == {
      'Dense_0': {'kernel': (6, 7), 'bias': (7,)}, 'Dense_1': {'kernel': (7, 5), 'bias': (5,)}}
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                        params)
  np_p = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  h = np.einsum('bhwi,io->bhwo', x, np_p['Dense_0']['kernel']) + np_p['Dense_0']['bias']
  want = np.einsum('bhwi,io->bhwo', h, np_p['Dense_1']['kernel']) + np_p['Dense_1']['bias']
  out = model.apply({'params': params}, x)
  assert out.shape == (2, 3, 4, 5)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Weight gradient of the first layer against the closed form sum_bhw x^T (g W1^T).
  cot = rng.standard_normal(out.shape).astype(np.float32)
  grads = jax.grad(lambda p: jnp.vdot(model.apply({'params': p}, x), cot))(params)
  g_h = np.einsum('bhwo,io->bhwi', cot, np_p['Dense_1']['kernel'])
  np.testing.assert_allclose(grads['Dense_0']['kernel'], np.einsum('bhwi,bhwo->io', x, g_h),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads['Dense_1']['kernel'], np.einsum('bhwi,bhwo->io', h, cot),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_cpu_einsum_attention_matches_dot_product_attention(dtype):
  """The CPU default of AttnBlock and jax.nn.dot_product_attention (used elsewhere) agree."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 10, 3, 4)), dtype) for _ in range(3))
  einsum_attention = attention.einsum_attention
  ours = einsum_attention(q, k, v)
  ref = jax.nn.dot_product_attention(q, k, v, implementation='xla')
  assert ours.dtype == ref.dtype == dtype
  # Same arithmetic (bitwise equal with jax 0.10); the tolerance allows a reordered reduction.
  tol = 1e-6 if dtype == jnp.float32 else 8e-3
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)
  cot = jnp.asarray(rng.standard_normal(q.shape), dtype)
  g_ours = jax.grad(lambda *a: jnp.vdot(einsum_attention(*a), cot).astype(jnp.float32),
                    argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: jnp.vdot(jax.nn.dot_product_attention(*a, implementation='xla'),
                                       cot).astype(jnp.float32), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Attention implementations (models/attention.py) against a float64 NumPy softmax attention.


def _attention_ref(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('btnd,bsnd->bnts', q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum('bnts,bsnd->btnd', w, v)


def _qkv(t, s=None, seed=3, shape=(2, None, 2, 8)):
  rng = np.random.default_rng(seed)
  b, _, n, d = shape
  q = rng.standard_normal((b, t, n, d))
  k, v = (rng.standard_normal((b, s or t, n, d)) for _ in range(2))
  return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v))


# 600 queries: more than one chunk of 'chunked' (512), and not a multiple of it.
@pytest.mark.parametrize('implementation', ['auto', 'xla', 'einsum', 'chunked', 'cudnn'])
def test_attention_implementations_match_numpy(implementation):
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    pytest.skip('cuDNN attention runs only on an NVIDIA GPU')
  q, k, v = _qkv(600)
  if implementation == 'cudnn':  # cuDNN takes float16 / bfloat16 only.
    out = attention.dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)),
                                          implementation='cudnn')
    np.testing.assert_allclose(np.asarray(out, np.float32), _attention_ref(q, k, v),
                               rtol=2e-2, atol=2e-2)
    return
  out = attention.dot_product_attention(q, k, v, implementation=implementation)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _attention_ref(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('t,s,chunk', [(37, 37, 8), (16, 23, 4), (5, 9, 16), (12, 12, 1)])
def test_chunked_attention_any_lengths_match_numpy(t, s, chunk):
  """Padded last chunk, more keys than queries, one chunk only, one query per chunk."""
  q, k, v = _qkv(t, s)
  out = attention.chunked_attention(q, k, v, chunk_size=chunk)
  np.testing.assert_allclose(out, _attention_ref(q, k, v), rtol=1e-5, atol=1e-5)


def test_chunked_attention_gradients_match_einsum():
  q, k, v = _qkv(37)
  cot = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)

  def grads(fn):
    return jax.grad(lambda *a: jnp.vdot(fn(*a), cot), argnums=(0, 1, 2))(q, k, v)

  chunked = grads(functools.partial(attention.chunked_attention, chunk_size=8))
  for a, b in zip(chunked, grads(attention.einsum_attention)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_attention_never_holds_the_whole_score_matrix():
  """XLA's temporary buffers at T = 4096: the [T, T] float32 scores are 64 MiB; 'chunked' stays far
  below that forward and forward+backward, while 'einsum' needs at least that much."""
  t = 4096
  scores = t * t * 4
  x = jax.ShapeDtypeStruct((1, t, 1, 32), jnp.float32)

  def temp_bytes(implementation, grad):
    attend = functools.partial(attention.dot_product_attention, implementation=implementation)
    fn = jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2)) if grad else attend
    return jax.jit(fn).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes('einsum', grad=False) >= scores  # the measure sees the full matrix
  assert temp_bytes('chunked', grad=False) < 0.3 * scores
  assert temp_bytes('chunked', grad=True) < 0.6 * scores
  if jax.default_backend() == 'cpu':  # 'auto' chunks from CPU_CHUNKED_MIN_TOKENS queries on CPU
    assert t >= attention.CPU_CHUNKED_MIN_TOKENS
    assert temp_bytes('auto', grad=False) < 0.3 * scores


def test_default_implementation_and_unknown_name():
  cpu = jax.default_backend() == 'cpu'
  assert attention.default_implementation() == ('einsum' if cpu else 'xla')
  assert attention.default_implementation(256) == ('einsum' if cpu else 'xla')
  assert attention.default_implementation(1024) == ('chunked' if cpu else 'xla')
  assert attention.default_implementation(4096) == ('chunked' if cpu else 'xla')
  with pytest.raises(ValueError, match="'flash'.*'chunked'"):
    attention.dot_product_attention(*_qkv(4), implementation='flash')
  with pytest.raises(ValueError, match='attention'):
    _traced(UNet(**TINY, attention='flash'), (1, 8, 8, 3))


def test_unet_attention_field_same_params_and_function():
  """The implementation is a field passed down to every AttnBlock: same parameters, same output."""
  shape = (2, 8, 8, 3)
  kw = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), init_scale=1.0,
            num_heads=2)
  params = _random_params(UNet(**kw), shape)
  assert _param_shapes(UNet(**kw, attention='chunked'), shape) == _param_shapes(UNet(**kw), shape)
  x = jnp.asarray(np.random.default_rng(5).standard_normal(shape), jnp.float32)
  c = jnp.asarray([3.0, 500.0])
  outs = {}
  for impl in ('einsum', 'xla', 'chunked'):
    net = UNet(**kw, attention=impl)
    outs[impl] = jax.jit(functools.partial(net.apply, train=False))({'params': params}, x, c)
  for impl in ('xla', 'chunked'):
    np.testing.assert_allclose(outs[impl], outs['einsum'], rtol=1e-5, atol=1e-5)
