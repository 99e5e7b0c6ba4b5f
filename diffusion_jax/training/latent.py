"""Latent text-to-image training: the autoencoder (stage 1) and latent diffusion (stage 2).

Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models": an
autoencoder compresses images to latents (``training.task='autoencoder'``), then a text-
conditioned U-Net (``UNet2DConditionModel``) learns to denoise the scaled latents
(``training.task='latent_diffusion'``); ``training.task='ldm'`` runs both, one after the other,
in ``workdir/autoencoder`` and ``workdir/ldm``, each resumable, a finished stage skipped.

Stage 1 trains ``AutoencoderKL`` with ``autoencoder_losses.autoencoder_loss`` (L1 / L2, KL, an
optional patch discriminator) and, when done, measures the latent scale factor on the training
data (``1 / std`` of posterior samples, as LDM) and writes the autoencoder as a diffusers-format
``vae/`` directory (``config.json`` with that ``scaling_factor``, and
``diffusion_pytorch_model.safetensors``): the model and its scale stored together, readable by
``weights.vae.load_vae`` and by diffusers.

Stage 2 reads a frozen autoencoder from such a directory (``autoencoder.path``; a Stable
Diffusion directory's ``vae/`` works the same) and a text encoder:

* ``model.text_encoder.source='vocab'``: a small CLIP-architecture transformer over a word
  vocabulary built from the training captions (``text_vocab``; saved as ``tokenizer.json`` in
  the workdir), trained jointly with the U-Net (LDM's text-to-image model): its parameters are
  ``params['text_encoder']`` beside ``params['unet']``;
* ``'pretrained'``: the CLIP tokenizer and text encoder of a diffusers directory
  (``model.text_encoder.path``), frozen (Stable Diffusion).

Frozen trees travel as the trainer's ``frozen`` argument (``{'vae': ..., 'text_encoder': ...}``),
never in the optimizer state. Captions are tokenized on the host (``Task.prepare``); a caption
longer than the tokenizer's length is truncated and counted (logged with the metrics as
``truncated_captions``). Classifier-free guidance: ``training.text_dropout`` of the examples
train on the empty prompt (its ids for a trained encoder, its embedding for a frozen one).
``training.cache_latents`` encodes the whole data set once (the posterior's mean and
log-variance, so the posterior sample of each step is the uncached one, key for key), and with a
frozen encoder ``training.cache_text`` caches the prompt embeddings too (maxdiffusion does the
same); later epochs skip the encoders. Any process, parameterization, weighting and time
sampling of the config applies (``objectives.denoising``).

``sample_text(config, workdir)`` is ``--mode=sample`` for these models: the prompts of
``sampling.prompt`` or ``sampling.prompts_file``, ``sampling.num_samples`` images per prompt,
guided with ``sampling.guidance_scale``; a PNG grid and an .npz with ``images`` (uint8) and
``prompts``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
import tqdm
from absl import logging
from etils import epath

from diffusion_jax import autoencoder_losses, objectives, preconditioning, sampling, text_vocab
from diffusion_jax import tokenization, writers
from diffusion_jax.models.autoencoder_kl import AutoencoderKL, DiagonalGaussian
from diffusion_jax.models.clip import CLIPTextModel
from diffusion_jax.models.unet_2d_condition import UNet2DConditionModel
from diffusion_jax.weights import clip as clip_weights
from diffusion_jax.weights import vae as vae_weights

TASKS = ('denoising', 'autoencoder', 'latent_diffusion', 'ldm')
TEXT_SOURCES = ('vocab', 'pretrained')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
VAE_DIR = 'vae'  # stage 1's export, inside its workdir
TOKENIZER_FILE = 'tokenizer.json'  # the word vocabulary of stage 2, inside its workdir


# --- modules from the config ----------------------------------------------------------------------


def autoencoder_module(config: ml_collections.ConfigDict) -> AutoencoderKL:
  """The ``AutoencoderKL`` of ``config.autoencoder`` for ``data.num_channels`` images."""
  a = config.autoencoder
  n = len(a.block_out_channels)
  module = AutoencoderKL(
      in_channels=config.data.num_channels, out_channels=config.data.num_channels,
      down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n,
      block_out_channels=tuple(a.block_out_channels), layers_per_block=a.layers_per_block,
      latent_channels=a.latent_channels, norm_num_groups=a.norm_num_groups,
      sample_size=config.data.image_size, scaling_factor=1.0,
      mid_block_add_attention=a.mid_block_add_attention, dtype=DTYPES[config.model.dtype])
  module.check_config()
  return module


def discriminator_module(config: ml_collections.ConfigDict
                         ) -> autoencoder_losses.PatchDiscriminator | None:
  a = config.autoencoder
  if a.disc_weight <= 0:
    return None
  return autoencoder_losses.PatchDiscriminator(channels=a.disc_channels, num_layers=a.disc_layers)


def unet_module(config: ml_collections.ConfigDict, *, in_channels: int, context_dim: int
                ) -> UNet2DConditionModel:
  """The ``UNet2DConditionModel`` of ``model.cond_unet`` over ``in_channels`` latents."""
  u = config.model.cond_unet
  module = UNet2DConditionModel(
      in_channels=in_channels, out_channels=in_channels,
      down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
      mid_block_type=u.mid_block_type or None, block_out_channels=tuple(u.block_out_channels),
      layers_per_block=u.layers_per_block, norm_num_groups=u.norm_num_groups,
      cross_attention_dim=context_dim, attention_head_dim=u.attention_head_dim,
      transformer_layers_per_block=u.transformer_layers_per_block,
      use_linear_projection=u.use_linear_projection, dtype=DTYPES[config.model.dtype],
      attention=u.attention, remat_policy=u.remat_policy)
  module.check_config()
  return module


# --- stage 2's frozen and text parts --------------------------------------------------------------


@dataclasses.dataclass
class LatentModels:
  """What stage 2 reads besides its trained params.

  Attributes:
    vae: the autoencoder module; ``vae_params`` its (frozen) parameters.
    scale, shift: the diffusion model sees ``scale * (z - shift)``.
    text: the text encoder module; ``text_params`` its parameters when frozen (pretrained),
      None when it trains (they are then ``params['text_encoder']``).
    tokenizer: ``tok(prompts) -> int32 [B, L]`` (``text_vocab.WordTokenizer`` or
      ``tokenization.CLIPTokenizer``).
    max_length: L.
    latent_shape: ``(h, w, C)`` of one latent.
  """
  vae: AutoencoderKL
  vae_params: Any
  scale: float
  shift: float
  text: CLIPTextModel
  text_params: Any
  tokenizer: Any
  max_length: int
  latent_shape: tuple[int, int, int]

  def tokenize(self, prompts) -> np.ndarray:
    return np.asarray(self.tokenizer(list(prompts), max_length=self.max_length), np.int32)

  @property
  def trains_text(self) -> bool:
    return self.text_params is None


def _vae_dir(config: ml_collections.ConfigDict) -> epath.Path:
  path = config.autoencoder.path
  if not path:
    raise ValueError("training.task='latent_diffusion' needs --config.autoencoder.path=DIR, a "
                     'diffusers-format vae/ directory (stage 1 writes one into '
                     f"WORKDIR/{VAE_DIR}; Stable Diffusion's is its vae/).")
  return epath.Path(path)


def _word_tokenizer(config, workdir, captions_fn) -> text_vocab.WordTokenizer:
  """The workdir's vocabulary, or one built from the training captions (and saved there)."""
  path = epath.Path(workdir) / TOKENIZER_FILE
  if path.exists():
    return text_vocab.load(path)
  if captions_fn is None:
    raise FileNotFoundError(f'No {TOKENIZER_FILE} in {workdir}: train first (the word vocabulary '
                            'is built from the training captions and saved there).')
  length = config.model.text_encoder.max_length or None
  tok = text_vocab.build_vocab(captions_fn(), max_length=length)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
  logging.info('Word vocabulary of %d tokens, length %d, saved to %s.', tok.vocab_size,
               tok.model_max_length, path)
  return tok


def load_latent_models(config: ml_collections.ConfigDict, workdir: str | epath.Path,
                       image_shape: tuple[int, ...], *,
                       captions_fn: Callable[[], list[str]] | None = None) -> LatentModels:
  """The frozen autoencoder, the text encoder module (and frozen params) and the tokenizer.

  Raises:
    FileNotFoundError: no autoencoder directory, no pretrained text encoder, or (sampling) no
      vocabulary in the workdir.
    ValueError: an autoencoder whose channels do not match the data's.
  """
  dtype = DTYPES[config.model.dtype]
  vae, vae_params = vae_weights.load_vae(_vae_dir(config), dtype=None)
  vae = vae.clone(dtype=dtype)
  if vae.in_channels != image_shape[-1]:
    raise ValueError(f'The autoencoder of {config.autoencoder.path} takes {vae.in_channels}-channel '
                     f'images; the data has {image_shape[-1]} (data.num_channels).')
  f = 2 ** (len(vae.block_out_channels) - 1)
  latent_shape = (-(-image_shape[0] // f), -(-image_shape[1] // f), vae.latent_channels)
  t = config.model.text_encoder
  if t.source == 'vocab':
    tok = _word_tokenizer(config, workdir, captions_fn)
    length = tok.model_max_length
    text = CLIPTextModel(vocab_size=tok.vocab_size, hidden_size=t.hidden_size,
                         intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         max_position_embeddings=length, hidden_act='gelu',
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype=dtype)
    text_params = None
  else:
    if not t.path:
      raise ValueError("model.text_encoder.source='pretrained' needs "
                       '--config.model.text_encoder.path=DIR, a diffusers directory with '
                       'tokenizer/ and text_encoder/.')
    root = epath.Path(t.path)
    tok = tokenization.CLIPTokenizer.from_directory(root / 'tokenizer')
    text, text_params = clip_weights.load_text_encoder(root / 'text_encoder')
    text = text.clone(dtype=dtype)
    length = t.max_length or tok.model_max_length
  shift = vae.shift_factor or 0.0
  return LatentModels(vae=vae, vae_params=vae_params, scale=float(vae.scaling_factor),
                      shift=float(shift), text=text, text_params=text_params, tokenizer=tok,
                      max_length=int(length), latent_shape=latent_shape)


# --- the networks as the trainer sees them --------------------------------------------------------


def ldm_network(unet: UNet2DConditionModel, text: CLIPTextModel) -> Callable:
  """``network_fn(params, x, c_noise, cond, *, train, rngs)`` of the text-conditioned U-Net.

  ``cond`` holds ``'context'`` ``[B, L, D]`` (a frozen encoder's output) or ``'input_ids'``
  ``[B, L]``, encoded here with ``params['text_encoder']`` (an encoder that trains).
  """

  def network_fn(params, x, c_noise, cond=None, *, train: bool = False, rngs=None):
    del train, rngs  # the U-Net has no dropout
    if cond is None:
      raise ValueError('The text-conditioned U-Net needs cond ({"input_ids"} or {"context"}).')
    if 'context' in cond:
      context = cond['context']
    else:
      context = text.apply({'params': params['text_encoder']},
                           cond['input_ids'])['last_hidden_state']
    return unet.apply({'params': params['unet']}, x, c_noise, context)

  return network_fn


@dataclasses.dataclass
class Parts:
  """What ``builders.setup`` needs of a latent task."""
  module: Any
  network_fn: Callable
  init_params: Callable[[jax.Array], Any]
  element_shape: tuple[int, ...]
  latent: LatentModels | None = None


def autoencoder_parts(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> Parts:
  vae = autoencoder_module(config)
  disc = discriminator_module(config)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

  def init_params(key):
    k1, k2 = jax.random.split(key)
    params = {'vae': vae.init(k1, x)['params']}
    if disc is not None:
      params['disc'] = disc.init(k2, x)['params']
    return params

  def network_fn(params, x, c_noise=None, cond=None, *, train=False, rngs=None):
    del c_noise, cond, train, rngs
    return vae.apply({'params': params['vae']}, x)[0]

  return Parts(vae, network_fn, init_params, tuple(image_shape))


def diffusers_root(path: str) -> epath.Path | None:
  """``path`` when it is a diffusers pipeline directory (it has ``unet/config.json``), else None."""
  if not path:
    return None
  root = epath.Path(path)
  return root if (root / 'unet' / 'config.json').exists() else None


def pretrained_unet(config: ml_collections.ConfigDict, root: epath.Path, *, context_dim: int
                    ) -> UNet2DConditionModel:
  """The U-Net of a diffusers directory's ``unet/config.json``, with the config's dtype,
  attention and remat policy (fine-tuning).

  Raises:
    ValueError: an SDXL U-Net (its added conditioning is not trained here), or a cross-attention
      width that is not the text encoder's.
  """
  cfg = json.loads((root / 'unet' / 'config.json').read_text())
  u = config.model.cond_unet
  unet = UNet2DConditionModel.from_config(cfg, dtype=DTYPES[config.model.dtype],
                                          attention=u.attention, remat_policy=u.remat_policy)
  if unet.addition_embed_type:
    raise ValueError(f'{root}/unet is an SDXL U-Net (addition_embed_type='
                     f'{unet.addition_embed_type!r}); fine-tuning here covers SD 1.x / 2.x U-Nets.')
  dims = unet.cross_attention_dim
  if any(d != context_dim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))):
    raise ValueError(f'{root}/unet attends to {dims}-wide text states; the text encoder gives '
                     f'{context_dim} (model.text_encoder.path: use the same pipeline directory).')
  return unet


def load_pretrained_params(s) -> Any:
  """``{'unet': ...}`` of ``training.init_from``'s diffusers directory (NumPy, float32)."""
  from diffusion_jax.weights import unet as unet_weights  # pylint: disable=import-outside-toplevel
  root = diffusers_root(s.config.training.init_from)
  if s.latent.trains_text:
    raise ValueError('Fine-tuning a diffusers U-Net (training.init_from) needs its own text '
                     "encoder: set model.text_encoder.source='pretrained' and "
                     'model.text_encoder.path to the same directory.')
  _, params = unet_weights.load_unet(root / 'unet')
  return {'unet': params}


def save_diffusers(config: ml_collections.ConfigDict, workdir, params) -> epath.Path:
  """Writes ``workdir/diffusers``: ``training.init_from``'s pipeline with the trained U-Net.

  Every file of the source directory is copied except ``unet/``, which is written from
  ``params['unet']`` (``config.json`` and ``diffusion_pytorch_model.safetensors``, float32), so
  diffusers' ``from_pretrained`` and ``pipelines.load_pretrained`` load the result.
  """
  from diffusion_jax.weights import unet as unet_weights  # pylint: disable=import-outside-toplevel
  root = diffusers_root(config.training.init_from)
  out = epath.Path(workdir) / 'diffusers'
  if jax.process_index() != 0:
    return out
  def copy(src: epath.Path, dst: epath.Path) -> None:  # epath has no recursive glob on gs://
    for child in src.iterdir():
      if child.is_dir():
        copy(child, dst / child.name)
      else:
        dst.mkdir(parents=True, exist_ok=True)
        (dst / child.name).write_bytes(child.read_bytes())

  for child in root.iterdir():
    if child.name == 'unet':
      continue
    if child.is_dir():
      copy(child, out / child.name)
    else:
      out.mkdir(parents=True, exist_ok=True)
      (out / child.name).write_bytes(child.read_bytes())
  (out / 'unet').mkdir(parents=True, exist_ok=True)
  state = unet_weights.unet_state(jax.device_get(params['unet']))
  safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
                              str(out / 'unet' / 'diffusion_pytorch_model.safetensors'))
  (out / 'unet' / 'config.json').write_bytes((root / 'unet' / 'config.json').read_bytes())
  print(f'diffusion_jax: fine-tuned pipeline written to {out}.', flush=True)
  return out


def ldm_parts(config: ml_collections.ConfigDict, workdir, image_shape: tuple[int, ...], *,
              captions_fn=None) -> Parts:
  lm = load_latent_models(config, workdir, image_shape, captions_fn=captions_fn)
  root = diffusers_root(config.training.init_from)
  if root is not None:
    unet = pretrained_unet(config, root, context_dim=lm.text.hidden_size)
  else:
    unet = unet_module(config, in_channels=lm.latent_shape[-1], context_dim=lm.text.hidden_size)
  x = jnp.zeros((1,) + lm.latent_shape, jnp.float32)
  ids = jnp.zeros((1, lm.max_length), jnp.int32)

  def init_params(key):
    k1, k2 = jax.random.split(key)
    params = {}
    if lm.trains_text:
      params['text_encoder'] = lm.text.init(k2, ids)['params']
    context = jnp.zeros((1, lm.max_length, lm.text.hidden_size), jnp.float32)
    params['unet'] = unet.init(k1, x, jnp.ones((1,)), context)['params']
    return params

  return Parts(unet, ldm_network(unet, lm.text), init_params, lm.latent_shape, lm)


# --- tasks ----------------------------------------------------------------------------------------


class CachedData:
  """An in-memory data pipeline over cached arrays, with a checkpointable iterator.

  Each epoch is a permutation of this process's examples drawn from ``(seed, epoch)``; the state
  is ``{'epoch', 'position'}``, so a resumed run continues with the same batches.
  """

  def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int,
               element_shape: tuple[int, ...]):
    self.arrays = arrays
    self.batch_size = batch_size
    self.seed = seed
    self.element_shape = element_shape
    self.num_examples = len(next(iter(arrays.values())))
    if self.num_examples < batch_size:
      raise ValueError(f'The cached data has {self.num_examples} examples, fewer than one batch '
                       f'({batch_size}).')
    self.iterator = self
    self.epoch, self.position = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position + self.batch_size > self.num_examples:  # drop the remainder, as grain
      self.epoch, self.position = self.epoch + 1, 0
      self._order = self._permutation(self.epoch)
    idx = self._order[self.position:self.position + self.batch_size]
    self.position += self.batch_size
    return {k: v[idx] for k, v in self.arrays.items()}

  def get_state(self) -> dict[str, int]:
    return {'epoch': self.epoch, 'position': self.position}

  def set_state(self, state: dict[str, int]) -> None:
    self.epoch, self.position = int(state['epoch']), int(state['position'])
    self._order = self._permutation(self.epoch)

  # The trainer's bookkeeping of unreadable files: the cache holds only readable ones.
  def num_skipped(self) -> int:
    return 0

  def skipped(self) -> list[int]:
    return []

  def add_skipped(self, indices) -> None:
    del indices


def _text_prepare(lm: LatentModels, counter: dict[str, int]):
  def prepare(batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    del step
    batch = dict(batch)
    if 'text' in batch:
      enc = lm.tokenizer.encode(list(batch.pop('text')), max_length=lm.max_length)
      counter['truncated'] += int(np.sum(enc.truncated))
      batch['input_ids'] = np.asarray(enc.input_ids, np.int32)
    return batch
  return prepare


def _encode_fn(lm: LatentModels, *, with_text: bool):
  """Jitted ``(frozen, x [B, H, W, C], ids [B, L]) -> {'moments', 'context'?}``."""

  def encode(frozen, x, ids):
    mean, logvar = lm.vae.apply({'params': frozen['vae']}, x, method=lm.vae.encode)
    out = {'moments': jnp.concatenate([mean, logvar], axis=-1)}
    if with_text:
      out['context'] = lm.text.apply({'params': frozen['text_encoder']}, ids)['last_hidden_state']
    return out

  return jax.jit(encode)


def ldm_task(s, data, *, frozen_placed=None):
  """The latent-diffusion ``builders.Task`` (see the module docstring)."""
  from diffusion_jax.training import builders  # pylint: disable=import-outside-toplevel
  config, lm = s.config, s.latent
  cfg = config.training
  frozen = {'vae': lm.vae_params}
  if not lm.trains_text:
    frozen['text_encoder'] = lm.text_params
  empty_ids = lm.tokenize([''])  # [1, L]
  cache_text = cfg.cache_text and not lm.trains_text
  if cfg.cache_text and lm.trains_text:
    raise ValueError('training.cache_text=True caches a frozen text encoder\'s embeddings; this '
                     "text encoder trains (model.text_encoder.source='vocab'): set it False.")
  if lm.trains_text:
    null_cond = {'input_ids': jnp.asarray(empty_ids)}
  else:
    empty_ctx = lm.text.apply({'params': lm.text_params}, empty_ids)['last_hidden_state']
    null_cond = {'context': jnp.asarray(empty_ctx)}

  def cond_fn(frozen_, batch):
    if 'context' in batch:
      return {'context': batch['context']}
    if lm.trains_text:
      return {'input_ids': batch['input_ids']}
    return {'context': lm.text.apply({'params': frozen_['text_encoder']},
                                     batch['input_ids'])['last_hidden_state']}

  base = objectives.denoising(
      network_fn=s.network_fn, process=s.process, parameterization=config.model.parameterization,
      noise_input=config.model.noise_input, weighting=cfg.weighting,
      min_snr_gamma=cfg.min_snr_gamma, time_sampling=cfg.time_sampling,
      logit_normal_mean=cfg.logit_normal_mean, logit_normal_std=cfg.logit_normal_std,
      cond_fn=cond_fn, null_cond=null_cond, cond_dropout=cfg.text_dropout)
  loss_fn = latent_loss(base, lm, sample_posterior=config.autoencoder.sample_posterior)
  counter = {'truncated': 0}
  prepare = _text_prepare(lm, counter)
  new_data = None
  if cfg.cache_latents:
    new_data = cache_dataset(config, lm, frozen, prepare, with_text=cache_text,
                             batch_size=data_batch_size(config))
  n = config.training.num_sample_images
  prompts = None
  if n and data is not None and data.has_text:
    captions = data.captions()
    prompts = [captions[i] for i in np.linspace(0, len(captions) - 1, n).astype(int)]
  return builders.Task(loss_fn=loss_fn, frozen=frozen, prepare=prepare, data=new_data,
                       counters=counter, prompts=prompts)


def data_batch_size(config) -> int:
  return config.training.batch_size // jax.process_count()


def latent_loss(base: objectives.LossFn, lm: LatentModels, *, sample_posterior: bool
                ) -> objectives.LossFn:
  """Wraps a denoising loss on latents: encodes ``batch['x']`` (or reads cached ``'moments'``).

  The key is split ``k_z, k_rest``: the posterior sample, then the denoising loss's own key,
  so a cached run and an uncached one draw the same latents and noise.
  """

  def loss_fn(params, frozen, batch, key):
    k_z, k_rest = jax.random.split(key)
    if 'moments' in batch:
      mean, logvar = jnp.split(batch['moments'], 2, axis=-1)
    else:
      mean, logvar = lm.vae.apply({'params': frozen['vae']}, batch['x'], method=lm.vae.encode)
    posterior = DiagonalGaussian(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar))
    z = posterior.sample(k_z) if sample_posterior else posterior.mean
    z = lm.scale * (z - lm.shift)
    rest = {k: v for k, v in batch.items() if k not in ('x', 'moments')}
    return base(params, frozen, {**rest, 'x': z}, k_rest)

  return loss_fn


def cache_dataset(config, lm: LatentModels, frozen, prepare, *, with_text: bool,
                  batch_size: int) -> CachedData:
  """Encodes this process's share of the training data once: moments (and embeddings)."""
  from diffusion_jax.training import builders  # pylint: disable=import-outside-toplevel
  once = builders.create_data(config, num_epochs=1, shuffle=False, random_flip=False)
  encode = _encode_fn(lm, with_text=with_text)
  placed = jax.device_put(frozen)
  parts: dict[str, list[np.ndarray]] = {}
  for batch in tqdm.tqdm(once.iterator, desc='caching latents', disable=jax.process_index() != 0,
                         total=-(-once.num_examples // batch_size)):
    batch = prepare(batch, 0)
    out = jax.device_get(encode(placed, batch['x'], batch['input_ids']))
    keep = {'input_ids': batch['input_ids'], **out}
    for k, v in keep.items():
      parts.setdefault(k, []).append(np.asarray(v))
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  logging.info('Cached %d latents %s%s.', len(arrays['moments']), lm.latent_shape,
               ' and text embeddings' if with_text else '')
  return CachedData(arrays, batch_size=batch_size, seed=config.seed,
                    element_shape=lm.latent_shape)


def autoencoder_task(s):
  from diffusion_jax.training import builders  # pylint: disable=import-outside-toplevel
  a = s.config.autoencoder
  disc = discriminator_module(s.config)
  loss_fn = autoencoder_losses.autoencoder_loss(
      vae=s.module, rec_loss=a.rec_loss, kl_weight=a.kl_weight, disc=disc,
      disc_weight=a.disc_weight, disc_start=a.disc_start)

  def prepare(batch, step):
    batch = {k: v for k, v in batch.items() if k != 'text'}
    if disc is not None:
      batch['step'] = np.full((len(batch['x']),), step, np.int32)
    return batch

  return builders.Task(loss_fn=loss_fn, prepare=prepare)


# --- stage 1's result: the scale factor and the diffusers-format directory -------------------------


def measure_scale(config, vae: AutoencoderKL, vae_params, *, num_examples: int) -> float:
  """``1 / std`` of posterior samples of up to ``num_examples`` training images (LDM)."""
  from diffusion_jax.training import builders  # pylint: disable=import-outside-toplevel
  data = builders.create_data(config, num_epochs=1, shuffle=True, random_flip=False)
  sample = jax.jit(lambda p, x, k: DiagonalGaussian(
      *vae.apply({'params': p}, x, method=vae.encode)).sample(k))
  zs, n = [], 0
  for i, batch in enumerate(data.iterator):
    zs.append(np.asarray(sample(vae_params, batch['x'], jax.random.PRNGKey(i))))
    n += len(batch['x'])
    if n >= num_examples:
      break
  return autoencoder_losses.latent_scale(np.concatenate(zs)[:num_examples])


def export_autoencoder(config, vae: AutoencoderKL, vae_params, directory, *, scale: float
                       ) -> epath.Path:
  """Writes ``directory/config.json`` (diffusers' AutoencoderKL keys) and the safetensors."""
  directory = epath.Path(directory)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    fields = {f.name: getattr(vae, f.name) for f in dataclasses.fields(AutoencoderKL)
              if f.name not in ('parent', 'name', 'dtype', 'attention')}
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    fields['scaling_factor'] = float(scale)
    cfg = {'_class_name': 'AutoencoderKL', **fields}
    state = vae_weights.vae_state(jax.device_get(vae_params))
    safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
                                str(directory / 'diffusion_pytorch_model.safetensors'))
    # config.json last: its presence marks a finished export (the two-stage job skips stage 1).
    (directory / 'config.json').write_text(json.dumps(cfg, indent=2, sort_keys=True) + '\n')
  return directory


def finish_autoencoder(config, workdir, params) -> epath.Path:
  """Measures the scale factor and exports stage 1 to ``workdir/vae``; returns that path."""
  vae = autoencoder_module(config)
  vae_params = jax.device_get(params['vae'])
  scale = measure_scale(config, vae, vae_params, num_examples=config.autoencoder.scale_examples)
  path = export_autoencoder(config, vae, vae_params, epath.Path(workdir) / VAE_DIR, scale=scale)
  logging.info('Latent scale factor %.5f (1 / std of latents); autoencoder written to %s.',
               scale, path)
  print(f'diffusion_jax: latent scale factor {scale:.5f}; autoencoder in {path}.', flush=True)
  return path


# --- both stages as one job -----------------------------------------------------------------------


def stage_configs(config: ml_collections.ConfigDict, workdir: str | epath.Path
                  ) -> tuple[ml_collections.ConfigDict, str, ml_collections.ConfigDict, str]:
  """``(autoencoder config, its workdir, latent-diffusion config, its workdir)`` of an 'ldm' job.

  Stage 1 takes ``autoencoder.num_train_steps`` / ``learning_rate`` / ``batch_size`` (0: the
  training's) and no EMA; stage 2 the ``training.*`` fields and ``autoencoder.path`` = stage 1's
  export (unless set).
  """
  root = epath.Path(workdir)
  a = config.autoencoder
  c1 = copy.deepcopy(config)
  c1.training.task = 'autoencoder'
  n = a.num_train_steps
  c1.training.num_train_steps = n
  c1.training.batch_size = a.batch_size or config.training.batch_size
  c1.training.steps_per_call = 1
  c1.training.log_every = min(config.training.log_every, n)
  c1.training.checkpoint_every = min(config.training.checkpoint_every, n)
  c1.training.sample_every = 0
  c1.training.num_sample_images = 0
  c1.training.ema_decay = 0.0
  c1.optim.learning_rate = a.learning_rate
  c1.optim.warmup_steps = min(config.optim.warmup_steps, n - 1)
  c2 = copy.deepcopy(config)
  c2.training.task = 'latent_diffusion'
  if not a.path:
    c2.autoencoder.path = str(root / 'autoencoder' / VAE_DIR)
  return c1, str(root / 'autoencoder'), c2, str(root / 'ldm')


def run_two_stages(config: ml_collections.ConfigDict, workdir: str, train_fn: Callable):
  """Stage 1 into ``workdir/autoencoder`` (skipped once its ``vae/`` is written), then stage 2
  into ``workdir/ldm`` (``train_fn`` resumes it from its checkpoint). Returns stage 2's state."""
  c1, w1, c2, w2 = stage_configs(config, workdir)
  if not config.autoencoder.path:
    if (epath.Path(w1) / VAE_DIR / 'config.json').exists():
      logging.info('Stage 1 done (%s exists): skipped.', epath.Path(w1) / VAE_DIR)
    else:
      print('diffusion_jax: stage 1 of 2, the autoencoder.', flush=True)
      train_fn(c1, w1)
  print('diffusion_jax: stage 2 of 2, latent diffusion.', flush=True)
  return train_fn(c2, w2)


# --- sampling (--mode=sample) ----------------------------------------------------------------------


def read_prompts(smp: ml_collections.ConfigDict) -> list[str]:
  """``sampling.prompt`` or the lines of ``sampling.prompts_file`` (exactly one set)."""
  prompt = smp.get('prompt', '')
  prompts_file = smp.get('prompts_file', '')
  if bool(prompt) == bool(prompts_file):
    raise ValueError('Sampling a text-to-image model needs exactly one of '
                     '--config.sampling.prompt="..." and --config.sampling.prompts_file=FILE '
                     '(one prompt per line).')
  if prompt:
    return [prompt]
  path = epath.Path(prompts_file)
  if not path.exists():
    raise FileNotFoundError(f'sampling.prompts_file {path} does not exist.')
  prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f'sampling.prompts_file {path} holds no prompt (one per line).')
  return prompts


def make_text_sampler(config: ml_collections.ConfigDict, s) -> Callable:
  """Jitted ``(params, ids [B, L], key) -> images [B, H, W, C]`` in [-1, 1] (one per shape)."""
  lm, smp = s.latent, config.sampling
  options = _sampler_options(config)
  prediction = preconditioning.prediction_type(config.model.parameterization)
  empty = jnp.asarray(lm.tokenize(['']))

  def cond_of(params, ids):
    if lm.trains_text:
      return {'input_ids': ids}
    return {'context': lm.text.apply({'params': lm.text_params}, ids)['last_hidden_state']}

  def run(params, ids, key):
    b = ids.shape[0]
    cond = cond_of(params, ids)
    null = cond_of(params, jnp.broadcast_to(empty, ids.shape))
    model_fn = preconditioning.make_model_fn(
        s.network_fn, params, s.process, parameterization=config.model.parameterization,
        noise_input_kind=config.model.noise_input)
    k_noise, k_sampler = jax.random.split(key)
    x_T = s.process.prior_sample(k_noise, (b,) + lm.latent_shape)
    guided = dict(cond=cond, null_cond=null, guidance_scale=smp.guidance_scale) \
        if smp.guidance_scale != 1.0 else dict(cond=cond)
    z = sampling.sample(model_fn, s.process, method=smp.method, num_steps=smp.num_steps,
                        key=k_sampler, x_T=x_T, prediction=prediction, **guided, **options)
    z = z / lm.scale + lm.shift
    return lm.vae.apply({'params': lm.vae_params}, z, method=lm.vae.decode)

  return jax.jit(run)


def _sampler_options(config):
  from diffusion_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.sampler_options(config)


def generate(config, s, params, prompts: list[str], *, key: jax.Array,
             batch_size: int | None = None) -> np.ndarray:
  """Images ``float32 [N, H, W, C]`` in [-1, 1] for ``prompts`` (one image each)."""
  run = make_text_sampler(config, s)
  batch_size = batch_size or config.sampling.batch_size
  ids = s.latent.tokenize(prompts)
  out = []
  for i in tqdm.trange(0, len(prompts), batch_size, desc='sampling',
                       disable=jax.process_index() != 0):
    chunk = ids[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:  # one compiled shape: pad the last batch
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(jax.device_get(run(params, chunk, jax.random.fold_in(key, i))))[:n])
  return np.concatenate(out)


def restore(config, workdir):
  """``(setup, ema_params, step)`` of a latent-diffusion run ('ldm': its ``ldm/`` stage)."""
  from diffusion_jax.training import builders  # pylint: disable=import-outside-toplevel
  if config.training.task == 'ldm':
    _, _, config, workdir = stage_configs(config, workdir)
  if config.training.task != 'latent_diffusion':
    raise ValueError(f"Text-to-image sampling needs training.task 'ldm' or 'latent_diffusion', got "
                     f'{config.training.task!r}.')
  return builders.restore_ema_params(config, workdir), workdir


def sample_text(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``--mode=sample`` of a text-to-image model: PNG grid and .npz; returns the .npz path.

  Writes ``samples/text_<method>_<steps>_step<k>.png`` (up to 100 images) and ``.npz`` with
  ``images`` uint8 ``[N, H, W, C]`` and ``prompts`` ``[N]`` (N = prompts x
  ``sampling.num_samples``, each prompt's images together), into the latent-diffusion workdir.

  Raises:
    ValueError / FileNotFoundError: prompts not given, or no trained model in the workdir.
  """
  prompts = read_prompts(config.sampling)
  (s, params, step), workdir = restore(config, workdir)
  s.checkpointer.close()
  smp = s.config.sampling
  all_prompts = [p for p in prompts for _ in range(smp.num_samples)]
  images = generate(s.config, s, params, all_prompts, key=jax.random.PRNGKey(config.seed + 2),
                    batch_size=min(smp.batch_size, len(all_prompts)))
  name = f'text_{smp.method}_{smp.num_steps}_step{step}'
  path = epath.Path(workdir) / 'samples' / (name + '.npz')
  if jax.process_index() == 0:
    grid = epath.Path(workdir) / 'samples' / (name + '.png')
    writers.save_image_grid(grid, images[:100], upscale=max(1, 64 // images.shape[1]))
    writers.save_npz(path, images=writers.to_uint8(images), prompts=np.asarray(all_prompts))
    print(f'Wrote {len(images)} images for {len(prompts)} prompt(s) to {path}', flush=True)
  return str(path)


__all__ = ['CachedData', 'LatentModels', 'TASKS', 'TEXT_SOURCES', 'autoencoder_module',
           'autoencoder_task', 'cache_dataset', 'export_autoencoder', 'finish_autoencoder',
           'generate', 'latent_loss', 'ldm_network', 'ldm_task', 'load_latent_models',
           'measure_scale', 'run_two_stages', 'sample_text', 'stage_configs']
