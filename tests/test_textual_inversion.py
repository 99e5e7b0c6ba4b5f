"""Textual inversion: files, token table and tokenizer, training rows only, parity with diffusers.

Reference: diffusers' ``load_textual_inversion`` on the same tiny SD pipeline and files (one
single-vector and one multi-vector concept), then its ``StableDiffusionPipeline``: final latents
within 1e-3 of ours for prompts that use the new tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import numpy as st_numpy

import sd_fixtures
from diffusion_jax import optim
from diffusion_jax import pipelines
from diffusion_jax.adapters import textual_inversion as ti

PROMPTS = ['a photo of <cat-toy> riding a horse', 'a red fox in the snow, <style> painted']
NEGATIVE = ['blurry', 'ugly <style>']
TOL = 1e-3


@pytest.fixture(scope='module')
def sd_ti(tmp_path_factory):
  root = tmp_path_factory.mktemp('ti')
  ref = sd_fixtures.make_sd_pipeline(root / 'pipe', kind='sd', scheduler='DDIMScheduler')
  table = ref.text_encoder.get_input_embeddings().weight.detach().numpy()
  rng = np.random.default_rng(0)
  std = float(table.std())
  single = (std * 3 * rng.standard_normal(table.shape[1])).astype(np.float32)  # [D]
  multi = (std * 3 * rng.standard_normal((3, table.shape[1]))).astype(np.float32)  # [3, D]
  (root / 'cat').mkdir()
  (root / 'cat' / ti.WEIGHT_NAME).write_bytes(st_numpy.save({'<cat-toy>': single}))
  (root / 'style.safetensors').write_bytes(st_numpy.save({'<style>': multi}))
  return root, single, multi


def _latents(batch):
  return np.random.default_rng(1).standard_normal((batch, 8, 8, 4)).astype(np.float32)


def test_textual_inversion_matches_diffusers(sd_ti):
  import diffusers  # pylint: disable=import-outside-toplevel
  root, single, multi = sd_ti
  latents = _latents(len(PROMPTS))
  ours = pipelines.load_pretrained(root / 'pipe')
  run = lambda: np.asarray(ours.text_to_image(  # noqa: E731
      PROMPTS, negative_prompt=NEGATIVE, num_steps=3, guidance_scale=7.5, latents=latents,
      height=16, width=16, output_type='latent'))
  before = run()  # compiled before the table grows: the program must follow the new shapes
  vocab = len(ours.tokenizers[0])
  assert ti.load_textual_inversion(ours, root / 'cat') == ['<cat-toy>']
  assert ti.load_textual_inversion(ours, root / 'style.safetensors') == [
      '<style>', '<style>_1', '<style>_2']
  table = np.asarray(ti.table(ours.params['text_encoder']))
  assert table.shape[0] == vocab + 4 == ours.text_encoders[0].vocab_size
  np.testing.assert_array_equal(table[vocab], single)
  np.testing.assert_array_equal(table[vocab + 1:], multi)
  ids = ours.tokenize(['a <style> fox'])[0][0]
  assert list(ids[:5]) == [ours.tokenizers[0].bos_token_id,
                           ours.tokenizers[0].convert_tokens_to_ids('a</w>'),
                           vocab + 1, vocab + 2, vocab + 3]
  got = run()

  ref = diffusers.StableDiffusionPipeline.from_pretrained(root / 'pipe')
  ref.set_progress_bar_config(disable=True)
  ref.load_textual_inversion(str(root / 'cat'))
  ref.load_textual_inversion(str(root / 'style.safetensors'))
  with torch.no_grad():
    expected = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5,
                   latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                   output_type='latent', height=16, width=16).images.numpy().transpose(0, 2, 3, 1)
  err = np.abs(got - expected).max() / np.abs(expected).max()
  print('relative max error vs diffusers:', err)
  assert err <= TOL
  assert np.abs(got - before).max() > 50 * TOL * np.abs(expected).max()  # the tokens matter


def test_other_file_layouts_and_bad_input(sd_ti, tmp_path):
  root, single, multi = sd_ti
  pipe = pipelines.load_pretrained(root / 'pipe')
  # A1111's single-key safetensors: the token from token= or the file name.
  (tmp_path / 'emb.safetensors').write_bytes(st_numpy.save({'emb_params': multi}))
  (tmp_path / 'my-style.safetensors').write_bytes(st_numpy.save({'string_to_param.*': single}))
  assert ti.read_embeddings(tmp_path / 'emb.safetensors', token='<e>')[0] == '<e>'
  np.testing.assert_array_equal(ti.read_embeddings(tmp_path / 'emb.safetensors')[1][''], multi)
  assert ti.load_textual_inversion(pipe, tmp_path / 'my-style.safetensors') == ['my-style']
  vocab = len(pipe.tokenizers[0])
  rows = ti.table(pipe.params['text_encoder']).shape[0]
  # Already in the vocabulary: an error, and nothing changes.
  with pytest.raises(ValueError, match="'my-style' is already in the vocabulary"):
    ti.load_textual_inversion(pipe, tmp_path / 'my-style.safetensors')
  with pytest.raises(ValueError, match="'photo</w>' is already in the vocabulary"):
    ti.load_textual_inversion(pipe, tmp_path / 'emb.safetensors', token='photo</w>')
  assert len(pipe.tokenizers[0]) == vocab
  assert ti.table(pipe.params['text_encoder']).shape[0] == rows
  # Another width, several tensors, pickles.
  (tmp_path / 'wide.safetensors').write_bytes(st_numpy.save({'<w>': np.zeros(48, np.float32)}))
  with pytest.raises(ValueError, match='48 wide'):
    ti.load_textual_inversion(pipe, tmp_path / 'wide.safetensors')
  (tmp_path / 'two.safetensors').write_bytes(st_numpy.save({'a': single, 'b': single}))
  with pytest.raises(ValueError, match='one tensor'):
    ti.read_embeddings(tmp_path / 'two.safetensors')
  with pytest.raises(ValueError, match='SDXL embedding'):
    (tmp_path / 'xl.safetensors').write_bytes(st_numpy.save({'clip_l': multi, 'clip_g': multi}))
    ti.load_textual_inversion(pipe, tmp_path / 'xl.safetensors', token='<xl>')
  with pytest.raises(FileNotFoundError, match='pickle'):
    (tmp_path / 'x.pt').write_bytes(b'0')
    ti.read_embeddings(tmp_path / 'x.pt')


def test_training_updates_only_the_new_rows(sd_ti, tmp_path):
  root, _, _ = sd_ti
  pipe = pipelines.load_pretrained(root / 'pipe')
  module, tokenizer = pipe.text_encoders[0], pipe.tokenizers[0]
  frozen = pipe.params['text_encoder']
  vocab = ti.table(frozen).shape[0]
  init = ti.initial_rows(frozen, tokenizer.convert_tokens_to_ids(['a</w>']))  # [1, D]
  [new_id] = tokenizer.add_tokens(['<new>'])
  assert new_id == vocab
  module = module.clone(vocab_size=vocab + 1)
  ids = jnp.asarray(tokenizer(['a <new> in the snow']))
  # A random direction (a constant shift would vanish in the LayerNorms).
  goal = init + 0.1 * jax.random.normal(jax.random.key(0), init.shape)
  target = module.apply({'params': ti.with_rows(frozen, goal)}, ids)['last_hidden_state']

  def loss_fn(rows, frozen, ids):
    out = module.apply({'params': ti.with_rows(frozen, rows)}, ids)['last_hidden_state']
    return jnp.mean((out - target) ** 2)

  tx = optim.make_optimizer(learning_rate=1e-2, grad_clip=None)
  rows, state = init, tx.init(init)

  @jax.jit
  def step(rows, state):
    loss, g = jax.value_and_grad(loss_fn)(rows, frozen, ids)
    updates, state = tx.update(g, state, rows)
    return rows + updates, state, loss

  losses = []
  for _ in range(60):
    rows, state, loss = step(rows, state)
    losses.append(float(loss))
  assert losses[-1] < 0.1 * losses[0]
  # The frozen table is an input, never updated; the learned row is saved and loaded back.
  path = ti.save_embeddings(tmp_path / 'learned', '<new>', rows)
  fresh = pipelines.load_pretrained(root / 'pipe')
  ti.load_textual_inversion(fresh, path)
  table = np.asarray(ti.table(fresh.params['text_encoder']))
  np.testing.assert_array_equal(table[:vocab], np.asarray(ti.table(frozen)))
  np.testing.assert_array_equal(table[vocab], np.asarray(rows)[0])
