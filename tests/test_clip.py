"""CLIP text encoders against transformers (PyTorch, CPU) and the published parameter counts.

Tiny random ``transformers.CLIPTextModel`` / ``CLIPTextModelWithProjection`` are saved with
``save_pretrained`` and loaded by ``diffusion_jax.weights.clip``; every output transformers gives
(last_hidden_state, pooler_output, every hidden state, text_embeds) must agree within 1e-4 in
float32. The pooled token rule is exercised by inputs where "first end-of-text id" and "largest
id" point at different positions.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.loaders import single_file_utils
from safetensors.numpy import load_file, save_file

from diffusion_jax.models import clip
from diffusion_jax.weights import clip as clip_weights

VOCAB = 99
LENGTH = 16
TOL = 1e-4


def _config(*, hidden_act='quick_gelu', eos_token_id=50, **kw):
  fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=LENGTH, projection_dim=24,
                hidden_act=hidden_act, bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=1)
  fields.update(kw)
  return transformers.CLIPTextConfig(**fields)


def _input_ids(eos, batch=3, length=LENGTH, seed=0):
  """Random ids with the end-of-text id ``eos`` once mid-sequence and again as padding, and a
  larger id after it, so that "first eos" and "largest id" name different positions."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 49, size=(batch, length))
  for b in range(batch):
    end = 3 + 2 * b
    ids[b, end] = eos
    ids[b, end + 1] = VOCAB - 1
    ids[b, end + 3:] = eos
  ids[:, 0] = 1
  return ids.astype(np.int32)


def _torch_outputs(model, ids):
  with torch.no_grad():
    out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
  res = {'last_hidden_state': out.last_hidden_state.numpy(),
         'hidden_states': [h.numpy() for h in out.hidden_states]}
  if hasattr(out, 'text_embeds'):
    res['text_embeds'] = out.text_embeds.numpy()
  else:
    res['pooler_output'] = out.pooler_output.numpy()
  return res


def _check(ours, ref, pooled_index=None):
  err = {}
  err['last_hidden_state'] = np.abs(np.asarray(ours['last_hidden_state'])
                                    - ref['last_hidden_state']).max()
  assert len(ours['hidden_states']) == len(ref['hidden_states'])
  err['hidden_states'] = max(np.abs(np.asarray(a) - b).max()
                             for a, b in zip(ours['hidden_states'], ref['hidden_states']))
  for k in ('pooler_output', 'text_embeds'):
    if k in ref:
      err[k] = np.abs(np.asarray(ours[k]) - ref[k]).max()
  assert all(e < TOL for e in err.values()), err
  return err


def _save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return path


@pytest.mark.parametrize('cls_name,hidden_act,eos', [
    ('CLIPTextModel', 'quick_gelu', 50),
    ('CLIPTextModel', 'gelu', 2),
    ('CLIPTextModelWithProjection', 'gelu', 50),
    ('CLIPTextModelWithProjection', 'quick_gelu', 2),
])
def test_matches_transformers(tmp_path, cls_name, hidden_act, eos):
  torch.manual_seed(0)
  ref_model = getattr(transformers, cls_name)(_config(hidden_act=hidden_act, eos_token_id=eos))
  ref_model.eval()
  directory = _save(ref_model, tmp_path / 'enc')
  module, params = clip_weights.load_text_encoder(directory)
  assert type(module).__name__ == cls_name
  assert (module.hidden_act, module.eos_token_id) == (hidden_act, eos)

  ids = _input_ids(eos)
  ours = jax.jit(module.apply)({'params': params}, ids)
  ref = _torch_outputs(ref_model, ids)
  _check(ours, ref)
  assert len(ours['hidden_states']) == 3  # embeddings + 2 layers: hidden_states[-2] is layer 1
  if cls_name == 'CLIPTextModel':
    # The rule picks its position: pooled is last_hidden_state there, and the other rule's
    # position gives another vector (so the comparison above could fail).
    first_eos = np.argmax(ids == eos, axis=1)
    largest = np.argmax(ids, axis=1)
    rule, other = (largest, first_eos) if eos == 2 else (first_eos, largest)
    assert (rule != other).all()
    rows = np.arange(ids.shape[0])
    np.testing.assert_array_equal(np.asarray(ours['pooler_output']),
                                  np.asarray(ours['last_hidden_state'])[rows, rule])
    assert np.abs(ref['pooler_output'] - np.asarray(ours['last_hidden_state'])[rows, other]
                  ).max() > 1e-2


def test_shorter_input_and_attention_mask(tmp_path):
  torch.manual_seed(1)
  ref_model = transformers.CLIPTextModel(_config()).eval()
  module, params = clip_weights.load_text_encoder(_save(ref_model, tmp_path / 'enc'))
  ids = _input_ids(50, length=10, seed=1)
  mask = np.ones_like(ids)
  mask[0, 7:] = 0
  ours = module.apply({'params': params}, ids, mask)
  with torch.no_grad():
    out = ref_model(torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)))
  valid = mask.astype(bool)  # transformers' rows of fully masked queries are not compared
  err = np.abs(np.asarray(ours['last_hidden_state']) - out.last_hidden_state.numpy())[valid].max()
  assert err < TOL
  with pytest.raises(ValueError, match='max_position_embeddings'):
    module.apply({'params': params}, np.ones((1, LENGTH + 1), np.int32))


@pytest.mark.parametrize('cls_name', ['CLIPTextModel', 'CLIPTextModelWithProjection'])
def test_both_key_layouts_and_round_trip(tmp_path, cls_name):
  torch.manual_seed(2)
  ref_model = getattr(transformers, cls_name)(_config(hidden_act='gelu')).eval()
  directory = _save(ref_model, tmp_path / 'saved')
  saved = load_file(directory / 'model.safetensors')
  prefixed = any(k.startswith('text_model.') for k in saved)
  # What transformers 5 writes: CLIPTextModel without the prefix, WithProjection with it.
  assert prefixed == (cls_name == 'CLIPTextModelWithProjection')
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'config.json').write_text((directory / 'config.json').read_text())
  if prefixed:
    renamed = {k.removeprefix('text_model.'): v for k, v in saved.items()}
  else:
    renamed = {('' if k.startswith('text_projection') else 'text_model.') + k: v
               for k, v in saved.items()}
    # transformers < 5 files also hold the position_ids buffer, which is ignored.
    renamed['text_model.embeddings.position_ids'] = np.arange(LENGTH)[None]
  save_file(renamed, other / 'model.safetensors')
  _, params_a = clip_weights.load_text_encoder(directory)
  module, params_b = clip_weights.load_text_encoder(other)
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)

  ids = _input_ids(50)
  _check(module.apply({'params': params_b}, ids), _torch_outputs(ref_model, ids))
  # transformers itself reads the renamed layout to the same model.
  reloaded = getattr(transformers, cls_name).from_pretrained(other).eval()
  _check(module.apply({'params': params_b}, ids), _torch_outputs(reloaded, ids))

  for prefix in ('', 'text_model.'):
    state = clip_weights.text_encoder_state(params_a, prefix=prefix)
    expected = {k: v for k, v in (renamed if bool(prefix) != prefixed else saved).items()
                if not k.endswith('position_ids')}
    assert sorted(state) == sorted(expected)
    for k, v in state.items():
      np.testing.assert_array_equal(v, expected[k])


def test_sharded_directory(tmp_path):
  torch.manual_seed(3)
  ref_model = transformers.CLIPTextModelWithProjection(_config()).eval()
  directory = _save(ref_model, tmp_path / 'enc', max_shard_size='40KB')
  assert (directory / 'model.safetensors.index.json').exists()
  module, params = clip_weights.load_text_encoder(directory)
  ids = _input_ids(50)
  _check(module.apply({'params': params}, ids), _torch_outputs(ref_model, ids))


def test_bfloat16(tmp_path):
  torch.manual_seed(4)
  ref_model = transformers.CLIPTextModelWithProjection(_config(hidden_act='gelu')).eval()
  directory = _save(ref_model, tmp_path / 'enc')
  module, params = clip_weights.load_text_encoder(directory, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  ids = _input_ids(50)
  ours = module.apply({'params': params}, ids)
  ref = _torch_outputs(ref_model, ids)
  assert ours['text_embeds'].dtype == jnp.bfloat16
  for k in ('last_hidden_state', 'text_embeds'):
    rel = (np.abs(np.asarray(ours[k], np.float32) - ref[k]).max() / np.abs(ref[k]).max())
    assert rel < 3e-2, (k, rel)  # bfloat16 has 8 mantissa bits: ~0.4% per rounding


def _open_clip_checkpoint(state, prefix, layers):
  """transformers' (prefix-less) tensors in OpenCLIP's names, as an LDM checkpoint holds them."""
  out = {prefix + 'token_embedding.weight': state['embeddings.token_embedding.weight'],
         prefix + 'positional_embedding': state['embeddings.position_embedding.weight'],
         prefix + 'ln_final.weight': state['final_layer_norm.weight'],
         prefix + 'ln_final.bias': state['final_layer_norm.bias'],
         prefix + 'text_projection': state['text_projection.weight'].T.copy(),
         prefix + 'logit_scale': np.float32(4.6)[None]}
  names = {'layer_norm1': 'ln_1', 'layer_norm2': 'ln_2', 'mlp.fc1': 'mlp.c_fc',
           'mlp.fc2': 'mlp.c_proj', 'self_attn.out_proj': 'attn.out_proj'}
  for i in range(layers):
    src, dst = f'encoder.layers.{i}.', f'{prefix}transformer.resblocks.{i}.'
    for ours, theirs in names.items():
      for leaf in ('weight', 'bias'):
        out[f'{dst}{theirs}.{leaf}'] = state[f'{src}{ours}.{leaf}']
    for leaf in ('weight', 'bias'):
      out[f'{dst}attn.in_proj_{leaf}'] = np.concatenate(
          [state[f'{src}self_attn.{p}_proj.{leaf}'] for p in 'qkv'])
  return out


def test_ldm_single_file_layouts(tmp_path):
  torch.manual_seed(5)
  clip_l = transformers.CLIPTextModel(_config()).eval()
  big_g = transformers.CLIPTextModelWithProjection(
      _config(hidden_act='gelu', projection_dim=32)).eval()
  state_l = {k: v.numpy() for k, v in clip_l.state_dict().items()}
  state_g = {k.removeprefix('text_model.'): v.numpy() for k, v in big_g.state_dict().items()}
  checkpoint = {'model.diffusion_model.out.0.weight': np.zeros(4, np.float32)}  # a U-Net key
  checkpoint.update({clip_weights.SDXL_CLIP_L_PREFIX + 'text_model.' + k: v
                     for k, v in state_l.items()})
  checkpoint.update(_open_clip_checkpoint(state_g, clip_weights.SDXL_OPEN_CLIP_PREFIX, 2))
  ids = _input_ids(50)

  module_l = clip.from_config(clip_l.config.to_dict())
  params_l = clip_weights.from_ldm_clip(module_l, checkpoint,
                                        prefix=clip_weights.SDXL_CLIP_L_PREFIX)
  _check(module_l.apply({'params': params_l}, ids), _torch_outputs(clip_l, ids))
  sd1 = {clip_weights.SD1_PREFIX + 'text_model.' + k: v for k, v in state_l.items()}
  jax.tree.map(np.testing.assert_array_equal, params_l,
               clip_weights.from_ldm_clip(module_l, sd1))

  module_g = clip.CLIPTextModelWithProjection.from_config(big_g.config.to_dict())
  params_g = clip_weights.from_ldm_open_clip(module_g, checkpoint)
  _check(module_g.apply({'params': params_g}, ids), _torch_outputs(big_g, ids))
  # diffusers' own converter, into a fresh transformers model, agrees with ours.
  converted = single_file_utils.convert_open_clip_checkpoint(
      big_g, {k: torch.from_numpy(np.asarray(v)) for k, v in checkpoint.items()},
      prefix=clip_weights.SDXL_OPEN_CLIP_PREFIX)
  fresh = transformers.CLIPTextModelWithProjection(big_g.config).eval()
  fresh.load_state_dict(converted, strict=False)
  _check(module_g.apply({'params': params_g}, ids), _torch_outputs(fresh, ids))

  with pytest.raises(ValueError, match='no tensor under'):
    clip_weights.from_ldm_open_clip(module_g, sd1)


def test_sd2_single_file_drops_the_last_layer_and_projection():
  """SD 2.x files hold OpenCLIP ViT-H's 24 layers and projection; SD 2 uses 23 layers, none."""
  torch.manual_seed(7)
  tower = transformers.CLIPTextModelWithProjection(
      _config(hidden_act='gelu', num_hidden_layers=3, projection_dim=32)).eval()
  state = {k.removeprefix('text_model.'): v.numpy() for k, v in tower.state_dict().items()}
  checkpoint = _open_clip_checkpoint(state, clip_weights.SD2_OPEN_CLIP_PREFIX, 3)
  ref = transformers.CLIPTextModel(_config(hidden_act='gelu', num_hidden_layers=2)).eval()
  missing, _ = ref.load_state_dict(tower.text_model.state_dict(), strict=False)
  assert not missing
  module = clip.CLIPTextModel.from_config(ref.config.to_dict())
  with pytest.raises(ValueError, match='match no parameter'):
    clip_weights.from_ldm_open_clip(module, checkpoint, prefix=clip_weights.SD2_OPEN_CLIP_PREFIX)
  params = clip_weights.from_ldm_open_clip(module, checkpoint, drop_unused=True,
                                           prefix=clip_weights.SD2_OPEN_CLIP_PREFIX)
  ids = _input_ids(50)
  _check(module.apply({'params': params}, ids), _torch_outputs(ref, ids))


@pytest.mark.parametrize('implementation', ['xla', 'chunked'])
def test_attention_implementations_agree(tmp_path, implementation):
  torch.manual_seed(8)
  ref_model = transformers.CLIPTextModel(_config()).eval()
  module, params = clip_weights.load_text_encoder(_save(ref_model, tmp_path / 'enc'),
                                                  attention=implementation)
  ids = _input_ids(50)
  _check(module.apply({'params': params}, ids), _torch_outputs(ref_model, ids))
  mask = np.ones_like(ids)
  mask[:, 12:] = 0
  a = module.apply({'params': params}, ids, mask)['last_hidden_state']
  b = module.clone(attention='einsum').apply({'params': params}, ids, mask)['last_hidden_state']
  assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-5


# Published sizes: CLIP ViT-L/14 text (SD 1.x), OpenCLIP ViT-H text with 23 layers (SD 2.x),
# OpenCLIP bigG text with projection (SDXL text_encoder_2).
FULL = [
    ('CLIPTextModel', dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, projection_dim=768), 123_060_480),
    ('CLIPTextModel', dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                           num_attention_heads=16, hidden_act='gelu', projection_dim=1024),
     340_387_840),
    ('CLIPTextModelWithProjection', dict(hidden_size=1280, intermediate_size=5120,
                                         num_hidden_layers=32, num_attention_heads=20,
                                         hidden_act='gelu', projection_dim=1280), 694_659_840),
]


@pytest.mark.parametrize('cls_name,fields,published', FULL)
def test_parameter_counts(cls_name, fields, published):
  config = transformers.CLIPTextConfig(**fields)
  with torch.device('meta'):
    ref = getattr(transformers, cls_name)(config)
  theirs = sum(p.numel() for p in ref.parameters())
  module = clip.from_config({**config.to_dict(), 'architectures': [cls_name]})
  assert type(module).__name__ == cls_name
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(clip_weights.input_shapes(module)))
  assert ours == theirs == published


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match='hidden_act'):
    clip.CLIPTextModel.from_config({**_config().to_dict(), 'hidden_act': 'relu'})
  overridden = clip.CLIPTextModel.from_config(_config().to_dict(), hidden_act='gelu',
                                              dtype=jnp.bfloat16)
  assert (overridden.hidden_act, overridden.dtype) == ('gelu', jnp.bfloat16)
  with pytest.raises(ValueError, match='name no CLIP text encoder'):
    clip.from_config({**_config().to_dict(), 'architectures': ['BertModel']})
  with pytest.raises(ValueError, match='lacks'):
    clip.from_config({'architectures': ['CLIPTextModel']})
  with pytest.raises(FileNotFoundError, match='config.json'):
    clip_weights.load_text_encoder(tmp_path)

  torch.manual_seed(6)
  directory = _save(transformers.CLIPTextModel(_config()), tmp_path / 'enc')
  config = json.loads((directory / 'config.json').read_text())
  (directory / 'config.json').write_text(json.dumps({**config, 'intermediate_size': 40}))
  with pytest.raises(ValueError, match=r"mlp\.fc1\.bias.*\(37,\).*\(40,\)"):
    clip_weights.load_text_encoder(directory)
  (directory / 'config.json').write_text(
      json.dumps({**config, 'architectures': ['CLIPTextModelWithProjection']}))
  with pytest.raises(ValueError, match="no tensor 'text_projection.weight'"):
    clip_weights.load_text_encoder(directory)
