"""LoRA as a tree transform, its files, and parity with diffusers + PEFT on a tiny SD pipeline.

References: the update formula in PyTorch's orientation computed with NumPy (``W + (alpha / r)
B A`` on ``[out, in(, kh, kw)]``), PEFT's forward of a convolution LoRA (a conv with the kernel's
size, then a 1x1 conv), and diffusers' ``StableDiffusionPipeline`` with a LoRA that PEFT built
(``init_lora_weights=False``, so B is not zero) and diffusers' ``save_lora_weights`` wrote.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors import numpy as st_numpy

import sd_fixtures
from diffusion_jax import optim
from diffusion_jax import pipelines
from diffusion_jax.adapters import lora as lora_lib
from diffusion_jax.models import clip
from diffusion_jax.models import unet_2d_condition
from diffusion_jax.weights import clip as clip_weights
from diffusion_jax.weights import core
from diffusion_jax.weights import unet as unet_weights

PROMPTS = ['a photo of an astronaut riding a horse', 'a red fox in the snow']
NEGATIVE = ['blurry', 'ugly, low resolution']
TOL = 1e-3
UNET_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0']
TEXT_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'out_proj']


def _random_lora(params, key, *, rank=3, alpha=5.0, targets=lora_lib.ATTENTION_TARGETS):
  """init_lora with b random too (b = 0 would hide orientation mistakes)."""
  lora = lora_lib.init_lora(params, rank=rank, alpha=alpha, targets=targets, key=key)
  leaves, treedef = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * 0.3
                                      for k, x in zip(keys, leaves)])


def _tiny_params():
  rng = np.random.default_rng(0)
  return {'block': {'to_q': {'kernel': rng.standard_normal((6, 5)).astype(np.float32),
                             'bias': np.zeros(5, np.float32)},
                    'conv1': {'kernel': rng.standard_normal((3, 3, 4, 7)).astype(np.float32)},
                    'norm': {'scale': np.ones(4, np.float32)}}}


def test_merge_is_the_pytorch_formula_and_the_peft_conv_forward():
  params = _tiny_params()
  lora = _random_lora(params, jax.random.key(0), targets=('to_q', 'conv1'))
  merged = lora_lib.merge(params, lora, scale=0.7)
  for name in ('to_q', 'conv1'):
    w = lora['block'][name]['kernel']
    a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    base = params['block'][name]['kernel'].astype(np.float64)
    if base.ndim == 2:  # PyTorch: weight [out, in], A [r, in], B [out, r]
      delta_t = b.T @ a.T
      expected = (base.T + 0.7 * (5.0 / 3) * delta_t).T
    else:  # weight [O, I, kh, kw], A [r, I, kh, kw], B [O, r, 1, 1]: B A on the reshaped matrix
      a_t = a.transpose(3, 2, 0, 1)
      delta_t = (b.T @ a_t.reshape(3, -1)).reshape(7, 4, 3, 3)
      expected = (base.transpose(3, 2, 0, 1) + 0.7 * (5.0 / 3) * delta_t).transpose(2, 3, 1, 0)
    got = np.asarray(merged['block'][name]['kernel'])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert merged['block']['norm']['scale'] is params['block']['norm']['scale']

  # PEFT's Conv2d LoRA forward: conv(x, W) + s * conv1x1(conv(x, A), B) == conv(x, W + s B A).
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
  conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
  w = lora['block']['conv1']['kernel']
  peft = conv(x, params['block']['conv1']['kernel']) + 0.7 * (5.0 / 3) * conv(
      conv(x, w.a), w.b[None, None])
  np.testing.assert_allclose(conv(x, merged['block']['conv1']['kernel']), peft, rtol=1e-4,
                             atol=1e-4)

  # unmerge: float32 round-off of |W| + |delta| (measured: ~1e-7 relative), not bitwise.
  back = lora_lib.unmerge(merged, lora, scale=0.7)
  for name in ('to_q', 'conv1'):
    err = np.abs(np.asarray(back['block'][name]['kernel']) - params['block'][name]['kernel'])
    bound = np.finfo(np.float32).eps * np.abs(np.asarray(merged['block'][name]['kernel'])).max()
    print(f'unmerge error {name}: {err.max():.3g} = {err.max() / bound:.2f} eps * max|W + delta|')
    assert err.max() <= 4 * bound

  # Two LoRAs with their own scales add up.
  other = _random_lora(params, jax.random.key(5), rank=2, alpha=2.0, targets=('to_q',))
  both = lora_lib.merge_many(params, [(lora, 0.7), (other, -1.5)])
  step = lora_lib.merge(lora_lib.merge(params, lora, scale=0.7), other, scale=-1.5)
  np.testing.assert_allclose(both['block']['to_q']['kernel'], step['block']['to_q']['kernel'],
                             rtol=1e-6, atol=1e-6)


def test_only_the_lora_tree_trains():
  params = _tiny_params()['block']
  lora = lora_lib.init_lora(params, rank=2, key=jax.random.key(0), targets=('to_q',))
  w = lora['to_q']['kernel']
  assert w.alpha == 2.0 and not np.asarray(w.b).any()  # alpha defaults to the rank; B = 0
  x = jax.random.normal(jax.random.key(1), (32, 6))
  target = x @ (params['to_q']['kernel'] + 0.5 * jax.random.normal(jax.random.key(2), (6, 5)))

  def loss_fn(lora, frozen, x):
    p = lora_lib.merge(frozen, lora)
    return jnp.mean((x @ p['to_q']['kernel'] + p['to_q']['bias'] - target) ** 2)

  grads = jax.grad(loss_fn)(lora, params, x)
  # B = 0: the gradient reaches B first, A's is zero (Hu et al. 2021, Sec. 4.1).
  assert not np.asarray(grads['to_q']['kernel'].a).any()
  assert np.asarray(grads['to_q']['kernel'].b).any()
  tx = optim.make_optimizer(learning_rate=3e-2, grad_clip=None)
  state = tx.init(lora)

  @jax.jit
  def step(lora, state):
    loss, g = jax.value_and_grad(loss_fn)(lora, params, x)
    updates, state = tx.update(g, state, lora)
    return jax.tree.map(lambda p, u: p + u, lora, updates), state, loss

  first = None
  for _ in range(60):
    lora, state, loss = step(lora, state)
    first = loss if first is None else first
  assert float(loss) < 0.5 * float(first)
  assert lora['to_q']['kernel'].alpha == 2.0  # static: the optimizer never saw it
  assert lora_lib.num_parameters(lora) == 6 * 2 + 2 * 5


def _kohya_from_peft(state, metadata):
  """Renames a diffusers/PEFT LoRA file's tensors to kohya's layout (the test's own table)."""
  out = {}
  for key, value in state.items():
    component, rest = key.split('.', 1)
    module, role = rest.rsplit('.lora_', 1)
    prefix = {'unet': 'lora_unet_', 'text_encoder': 'lora_te_'}[component]
    if component == 'text_encoder' and not module.startswith('text_model.'):
      module = 'text_model.' + module
    name = prefix + module.replace('.', '_')
    out[f'{name}.lora_{"down" if role == "A.weight" else "up"}.weight'] = value
    out[f'{name}.alpha'] = np.asarray(metadata[f'{component}.lora_alpha'], np.float32)
  return out


def _reference(path, lora_file, latents, *, scale):
  import diffusers  # pylint: disable=import-outside-toplevel
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)
  pipe.set_progress_bar_config(disable=True)
  pipe.load_lora_weights(lora_file)
  with torch.no_grad():
    out = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5,
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
               output_type='latent', height=16, width=16,
               cross_attention_kwargs={'scale': scale})
  return out.images.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module', autouse=True)
def _allow_peft_in_transformers():
  """transformers 5.24 refuses PEFT < 0.22 for text-encoder adapters; PyPI's newest is 0.21.2.

  The check is a version gate only; PEFT 0.21.2's LoRA layers are what runs either way. Lifted
  for this module's tests only.
  """
  import transformers.integrations.peft as tpeft  # pylint: disable=import-outside-toplevel
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tpeft, 'check_peft_version', lambda min_version: None)
    yield


@pytest.fixture(scope='module')
def sd_lora(tmp_path_factory):
  import diffusers  # pylint: disable=import-outside-toplevel
  from peft import LoraConfig, get_peft_model_state_dict  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('lora')
  ref = sd_fixtures.make_sd_pipeline(root / 'pipe', kind='sd', scheduler='DDIMScheduler')
  torch.manual_seed(0)
  unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False)
  text_cfg = LoraConfig(r=2, lora_alpha=3, target_modules=TEXT_TARGETS, init_lora_weights=False)
  ref.unet.add_adapter(unet_cfg)
  ref.text_encoder.add_adapter(text_cfg)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      root / 'lora', unet_lora_layers=get_peft_model_state_dict(ref.unet),
      text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
      unet_lora_adapter_metadata=unet_cfg.to_dict(),
      text_encoder_lora_adapter_metadata=text_cfg.to_dict())
  peft_file = root / 'lora' / lora_lib.WEIGHT_NAME
  metadata = json.loads(lora_lib.read_metadata(peft_file)[lora_lib.METADATA_KEY])
  kohya_file = root / 'kohya.safetensors'
  kohya_file.write_bytes(st_numpy.save(_kohya_from_peft(core.read_safetensors(peft_file),
                                                        metadata)))
  return root / 'pipe', peft_file, kohya_file


def test_lora_files_match_diffusers(sd_lora):
  path, peft_file, kohya_file = sd_lora
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  pipe = pipelines.load_pretrained(path)
  base = jax.tree.map(np.asarray, pipe.params)
  run = lambda: np.asarray(pipe.text_to_image(  # noqa: E731
      PROMPTS, negative_prompt=NEGATIVE, num_steps=3, guidance_scale=7.5, latents=latents,
      height=16, width=16, output_type='latent'))
  plain = run()

  name = lora_lib.load_lora_weights(pipe, peft_file, scale=1.0)
  lora = lora_lib.read_lora(peft_file, pipe.params)
  w = lora['unet']['down_blocks_0']['attentions_0']['transformer_blocks_0']['attn1']['to_q'][
      'kernel']
  assert (w.rank, w.alpha) == (4, 8.0)  # alpha from diffusers' adapter metadata
  assert lora['text_encoder']['encoder']['layers_0']['self_attn']['q_proj']['kernel'].alpha == 3.0
  errors, references = {}, {}
  for scale in (1.0, 0.5):
    lora_lib.set_lora_scale(pipe, name, scale)
    expected = references[scale] = _reference(path, peft_file.parent, latents, scale=scale)
    got = run()
    errors[scale] = np.abs(got - expected).max() / np.abs(expected).max()
    assert errors[scale] <= TOL, (scale, errors[scale])
    assert np.abs(got - plain).max() > 50 * TOL * np.abs(expected).max()  # the LoRA matters
  print('relative max error vs diffusers by scale:', errors)

  lora_lib.unload_lora_weights(pipe)
  for (p, a), b in zip(traverse_util.flatten_dict(jax.tree.map(np.asarray, pipe.params)).items(),
                       traverse_util.flatten_dict(base).values()):
    assert np.array_equal(a, b), p  # the base comes back bitwise
  np.testing.assert_array_equal(run(), plain)

  # The kohya file renamed from the same tensors gives the same result, at scale 0.5.
  lora_lib.load_lora_weights(pipe, kohya_file, scale=0.5, adapter_name='kohya')
  expected = references[0.5]
  assert np.abs(run() - expected).max() <= TOL * np.abs(expected).max()
  # ... and diffusers reads it as it reads the PEFT file.
  np.testing.assert_allclose(_reference(path, kohya_file, latents, scale=0.5), expected,
                             rtol=1e-5, atol=1e-5)


def test_sdxl_lora_on_both_text_encoders_matches_diffusers(tmp_path):
  import diffusers  # pylint: disable=import-outside-toplevel
  from peft import LoraConfig, get_peft_model_state_dict  # pylint: disable=import-outside-toplevel
  ref = sd_fixtures.make_sd_pipeline(tmp_path / 'xl', kind='sdxl',
                                     scheduler='EulerDiscreteScheduler')
  torch.manual_seed(1)
  configs = {'unet': LoraConfig(r=2, lora_alpha=4, target_modules=UNET_TARGETS,
                                init_lora_weights=False),
             'text_encoder': LoraConfig(r=2, lora_alpha=1, target_modules=TEXT_TARGETS,
                                        init_lora_weights=False),
             'text_encoder_2': LoraConfig(r=3, lora_alpha=6, target_modules=TEXT_TARGETS,
                                          init_lora_weights=False)}
  for name, cfg in configs.items():
    getattr(ref, name).add_adapter(cfg)
  diffusers.StableDiffusionXLPipeline.save_lora_weights(
      tmp_path / 'lora', **{f'{n}_lora_layers': get_peft_model_state_dict(getattr(ref, n))
                            for n in configs},
      **{f'{n}_lora_adapter_metadata': cfg.to_dict() for n, cfg in configs.items()})
  latents = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
  ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / 'xl')
  ref.set_progress_bar_config(disable=True)
  ref.load_lora_weights(tmp_path / 'lora')
  with torch.no_grad():
    expected = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=5.0,
                   latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   output_type='latent', height=16, width=16).images.numpy().transpose(0, 2, 3, 1)
  pipe = pipelines.load_pretrained(tmp_path / 'xl')
  lora_lib.load_lora_weights(pipe, tmp_path / 'lora')
  assert sorted(lora_lib.read_lora(tmp_path / 'lora', pipe.params)) == sorted(configs)
  got = np.asarray(pipe.text_to_image(PROMPTS, negative_prompt=NEGATIVE, num_steps=2,
                                      guidance_scale=5.0, latents=latents, height=16, width=16,
                                      output_type='latent'))
  err = np.abs(got - expected).max() / np.abs(expected).max()
  print('SDXL relative max error vs diffusers:', err)
  assert err <= TOL


def test_written_files_are_what_diffusers_and_kohya_write(sd_lora, tmp_path):
  path, peft_file, kohya_file = sd_lora
  pipe = pipelines.load_pretrained(path)
  lora = lora_lib.read_lora(peft_file, pipe.params)
  original = core.read_safetensors(peft_file)
  # Our PEFT writer: the same tensor names and values (text_model.-prefixed text keys, which
  # diffusers strips for transformers 5) and alphas that diffusers' metadata reader finds.
  ours = core.read_safetensors(lora_lib.save_lora(tmp_path / 'peft', lora))
  strip = lambda k: k.replace('text_encoder.text_model.', 'text_encoder.')  # noqa: E731
  assert {strip(k) for k in ours} == set(original)
  for k, v in ours.items():
    np.testing.assert_array_equal(v, original[strip(k)])
  again = lora_lib.read_lora(tmp_path / 'peft', pipe.params)
  alphas = lambda t: {p: w.alpha for p, w in lora_lib.flatten(t).items()}  # noqa: E731
  assert alphas(again) == alphas(lora)
  # diffusers loads our file as its own (the alphas of our metadata included).
  latents = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
  np.testing.assert_allclose(_reference(path, tmp_path / 'peft', latents, scale=1.0),
                             _reference(path, peft_file.parent, latents, scale=1.0),
                             rtol=1e-5, atol=1e-5)
  # Our kohya writer == the test's renaming of the PEFT file.
  kohya = core.read_safetensors(lora_lib.save_lora(tmp_path / 'k.safetensors', lora,
                                                   layout='kohya'))
  expected = core.read_safetensors(kohya_file)
  assert set(kohya) == set(expected)
  for k, v in kohya.items():
    np.testing.assert_array_equal(v, expected[k])


def test_mixed_alphas_conv_loras_and_the_ldm_names_round_trip(tmp_path):
  # An SDXL-like pipeline's shapes only (no weights): kohya's SDXL files use the LDM names.
  module = unet_2d_condition.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
      up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=64,
      transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), norm_num_groups=8,
      use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=8,
      projection_class_embeddings_input_dim=8 * 6 + 32)
  text = dict(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
  shapes = {'unet': unet_weights.unet_shapes(module),
            'text_encoder': clip_weights.input_shapes(clip.CLIPTextModel(**text)),
            'text_encoder_2': clip_weights.input_shapes(clip.CLIPTextModelWithProjection(**text))}
  lora = _random_lora(shapes, jax.random.key(3), rank=2, alpha=1.0,
                      targets=lora_lib.ATTENTION_TARGETS + lora_lib.CONV_TARGETS + (
                          'fc1', 'text_projection'))
  flat = lora_lib.flatten(lora)
  first = sorted(flat)[0]
  flat[first] = flat[first].replace(alpha=7.0)  # one module with its own alpha
  lora = traverse_util.unflatten_dict(flat)
  assert any(w.a.ndim == 4 for w in flat.values())
  for fmt, kwargs in (('peft', {}), ('kohya', {'unet_module': module, 'sdxl': True}),
                      ('kohya', {})):
    file = lora_lib.save_lora(tmp_path / f'{fmt}{len(kwargs)}.safetensors', lora, layout=fmt,
                              **kwargs)
    keys = list(core.read_safetensors(file))
    if kwargs:  # kohya's SDXL names
      for start in ('lora_unet_input_blocks_', 'lora_te1_text_model_encoder_layers_',
                    'lora_te2_text_model_encoder_layers_', 'lora_te2_text_projection.'):
        assert any(k.startswith(start) for k in keys), (start, keys[:3])
    back = lora_lib.flatten(lora_lib.read_lora(file, shapes, unet_module=module))
    assert set(back) == set(flat)
    for p, w in flat.items():
      np.testing.assert_array_equal(back[p].a, w.a)
      np.testing.assert_array_equal(back[p].b, w.b)
      assert back[p].alpha == w.alpha, (fmt, p)
  with pytest.raises(ValueError, match='LDM layout: pass unet_module'):
    lora_lib.read_lora(tmp_path / 'kohya2.safetensors', shapes)


def test_older_diffusers_layouts_read_the_same(sd_lora):
  path, peft_file, _ = sd_lora
  pipe = pipelines.load_pretrained(path)
  state = core.read_safetensors(peft_file)
  expected = lora_lib.flatten(lora_lib.lora_from_state(state, pipe.params))
  proc = {'to_q': 'to_q_lora', 'to_k': 'to_k_lora', 'to_v': 'to_v_lora', 'to_out.0': 'to_out_lora',
          'q_proj': 'to_q_lora', 'k_proj': 'to_k_lora', 'v_proj': 'to_v_lora',
          'out_proj': 'to_out_lora'}
  layouts = {
      # LoRACompatibleLinear (diffusers 0.2x): <module>.lora.down.weight
      'lora.down': lambda m, r: f'{m}.lora.{r}.weight',
      # text encoders' monkey-patched form: <module>.lora_linear_layer.down.weight
      'lora_linear_layer': lambda m, r: f'{m}.lora_linear_layer.{r}.weight',
      # attention processors: <attn>.processor.to_q_lora.down.weight (the U-Net),
      # <self_attn>.to_q_lora.down.weight (the text encoder)
      'processor': lambda m, r: '{}{}.{}.{}.weight'.format(
          m.rsplit('.', 2 if m.endswith('to_out.0') else 1)[0],
          '.processor' if m.startswith('unet.') else '',
          proc[m.split('.attn1.')[-1].split('.attn2.')[-1].split('self_attn.')[-1]], r),
  }
  for name, fn in layouts.items():
    old = {}
    for key, value in state.items():
      module, role = key.rsplit('.lora_', 1)
      old[fn(module, 'down' if role == 'A.weight' else 'up')] = value
    got = lora_lib.flatten(lora_lib.lora_from_state(old, pipe.params))
    assert set(got) == set(expected), name
    for p, w in expected.items():
      np.testing.assert_array_equal(got[p].a, w.a)
      np.testing.assert_array_equal(got[p].b, w.b)


def test_bad_files_are_named(sd_lora, tmp_path):
  path, peft_file, _ = sd_lora
  pipe = pipelines.load_pretrained(path)
  state = core.read_safetensors(peft_file)
  # A LoRA for another architecture: the first key no parameter has.
  other = dict(state)
  other['unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight'] = (
      np.zeros((4, 16), np.float32))
  with pytest.raises(ValueError, match=r"'unet.down_blocks.3.attentions.0.transformer_blocks.0"
                                       r".attn1.to_q.lora_A.weight' names no parameter"):
    lora_lib.lora_from_state(other, pipe.params)
  # A factor of the wrong size.
  wrong = dict(state)
  key = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight'
  wrong[key] = np.zeros((4, 17), np.float32)
  with pytest.raises(ValueError, match='attn2.to_k.*do not fit the weight'):
    lora_lib.lora_from_state(wrong, pipe.params)
  # DoRA and other LyCORIS tensors are refused by name.
  with pytest.raises(ValueError, match='dora_scale'):
    lora_lib.lora_from_state({**state, 'lora_unet_conv_in.dora_scale': np.ones(1)}, pipe.params)
  # One factor only.
  with pytest.raises(ValueError, match='needs both factors'):
    lora_lib.lora_from_state({key: state[key]}, pipe.params)
  # No alpha anywhere (no metadata, no .alpha): alpha = rank, scale 1.
  plain = lora_lib.lora_from_state(state, pipe.params)
  assert all(w.alpha == w.rank for w in lora_lib.flatten(plain).values())
  (tmp_path / 'x.bin').write_bytes(b'0')
  with pytest.raises(FileNotFoundError, match='pickle'):
    lora_lib.load_lora_weights(pipe, tmp_path / 'x.bin')
  name = lora_lib.load_lora_weights(pipe, peft_file)
  with pytest.raises(ValueError, match='loaded already'):
    lora_lib.load_lora_weights(pipe, peft_file, adapter_name=name)
  with pytest.raises(ValueError, match='no kernel of the tree matches'):
    lora_lib.init_lora(pipe.params['unet'], rank=2, key=jax.random.key(0), targets=('nope',))
