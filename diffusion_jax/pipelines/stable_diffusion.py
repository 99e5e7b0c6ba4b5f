"""Stable Diffusion 1.x / 2.x / XL text-to-image over loaded parameter trees, one program per shape.

``load_pretrained(path)`` reads a local diffusers-format directory (``model_index.json``; ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, for SDXL ``text_encoder_2/`` and ``tokenizer_2/``,
``scheduler/``): safetensors through ``weights``, never pickle, never a download.
``text_to_image`` tokenizes on the host, then runs the text encoders, the whole guided sampling loop
(any method of ``sampling.METHODS``; by default the directory's own scheduler, step for step) and
the VAE decode in one jitted program per (batch, size, steps, method), the batch sharded over
every device on the mesh's data axes and the weights replicated (or FSDP-sharded with
``mesh_fsdp``).

The conditioning pytree the U-Net's ``model_fn(x, t, cond)`` sees (DESIGN.md):
``{'context': [B, L, D]}`` for SD 1.x / 2.x, plus ``'pooled': [B, P]`` and ``'time_ids': [B, 6]``
for SDXL, which diffusers calls ``encoder_hidden_states``, ``text_embeds`` and ``time_ids``
(``added_cond_kwargs``). Prompt encoding follows diffusers' ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline.encode_prompt``: SD 1.x / 2.x take the text encoder's last hidden
state (SD 2's encoder config already stops one layer early); SDXL concatenates the penultimate
hidden states of both encoders and takes the pooled projection of the second; an SDXL negative
prompt left as ``None`` is all zeros when ``force_zeros_for_empty_prompt`` (the default in its
``model_index.json``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax import editing
from diffusion_jax.adapters import lora
from diffusion_jax.adapters import textual_inversion
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax import tokenization
from diffusion_jax.pipelines import controlnet as controlnet_lib
from diffusion_jax.pipelines import schedulers
from diffusion_jax.models import autoencoder_kl
from diffusion_jax.models import clip as clip_models
from diffusion_jax.models import unet_2d_condition
from diffusion_jax.weights import clip as clip_weights
from diffusion_jax.weights import core as weights_core
from diffusion_jax.weights import unet as unet_weights
from diffusion_jax.weights import vae as vae_weights

PyTree = Any

PIPELINE_CLASSES = {
    'StableDiffusionPipeline': 'sd',
    'StableDiffusionImg2ImgPipeline': 'sd',
    'StableDiffusionInpaintPipeline': 'sd',
    'StableDiffusionXLPipeline': 'sdxl',
    'StableDiffusionXLImg2ImgPipeline': 'sdxl',
    'StableDiffusionXLInpaintPipeline': 'sdxl',
}
_REQUIRED = {'sd': ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'),
             'sdxl': ('unet', 'vae', 'text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2',
                      'scheduler')}


@dataclasses.dataclass
class StableDiffusionPipeline:
  """A loaded SD 1.x / 2.x / XL pipeline: modules, parameter trees, tokenizers and scheduler.

  Build it with ``load_pretrained``. Attributes are public so that research code can swap a tree
  (``pipe.params['unet'] = ...``) or call a module directly.

  Attributes:
    kind: ``'sd'`` (1.x / 2.x) or ``'sdxl'``.
    unet, vae: ``UNet2DConditionModel`` and ``AutoencoderKL`` modules.
    text_encoders: one (SD) or two (SDXL) CLIP text modules.
    tokenizers: the matching ``tokenization.CLIPTokenizer`` s.
    scheduler: the directory's ``schedulers.Scheduler`` (process, method, prediction).
    params: ``{'unet', 'vae', 'text_encoder'[, 'text_encoder_2']}`` parameter trees.
    mesh: the device mesh the batch is sharded over.
    force_zeros_for_empty_prompt: SDXL: a ``None`` negative prompt is zero embeddings.
  """

  kind: str
  unet: Any
  vae: Any
  text_encoders: tuple[Any, ...]
  tokenizers: tuple[Any, ...]
  scheduler: schedulers.Scheduler
  params: dict[str, PyTree]
  mesh: jax.sharding.Mesh
  force_zeros_for_empty_prompt: bool = True
  controlnets: tuple[Any, ...] = ()  # ControlNetModel s; their trees: params['controlnet']
  _programs: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def vae_scale_factor(self) -> int:
    """Pixels per latent cell along each side: ``2 ** (len(vae.block_out_channels) - 1)``."""
    return 2 ** (len(self.vae.block_out_channels) - 1)

  @property
  def default_size(self) -> int:
    """``unet.sample_size * vae_scale_factor`` (512 for SD 1.5, 768 for SD 2 at v, 1024 for SDXL)."""
    return int(self.unet.sample_size) * self.vae_scale_factor

  # --- prompts -------------------------------------------------------------------------------

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
    """Token ids ``int32 [B, 77]`` per tokenizer (truncated and padded as diffusers does)."""
    return tuple(np.asarray(tok(list(prompts)), np.int32) for tok in self.tokenizers)

  def _encode(self, params: PyTree, ids: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
    if self.kind == 'sd':
      out = self.text_encoders[0].apply({'params': params['text_encoder']}, ids[0])
      return {'context': out['last_hidden_state']}
    hidden, pooled = [], None
    for i, (module, name) in enumerate(zip(self.text_encoders, ('text_encoder', 'text_encoder_2'))):
      out = module.apply({'params': params[name]}, ids[i])
      hidden.append(out['hidden_states'][-2])
      if i == 1:
        pooled = out['text_embeds']
    return {'context': jnp.concatenate(hidden, axis=-1), 'pooled': pooled}

  def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None
                    = None, *, height: int | None = None, width: int | None = None
                    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The conditioning pytrees ``(cond, null_cond)`` of the prompts, as the U-Net takes them.

    Args:
      prompt: one prompt or a list of B.
      negative_prompt: ``None`` (the empty prompt; zeros for SDXL with
        ``force_zeros_for_empty_prompt``), one string for all, or a list of B.
      height, width: SDXL's size conditioning (``time_ids``), default ``default_size``.

    Returns:
      ``cond`` and ``null_cond``: ``{'context': [B, 77, D]}`` (SDXL also ``'pooled': [B, P]``,
      ``'time_ids': [B, 6]``), float32.
    """
    prompts, negatives = _prompt_lists(prompt, negative_prompt)
    height, width = self._size(height, width)
    fn = self._program(('encode', len(prompts), height, width, negatives is None),
                       lambda: jax.jit(lambda p, i, n: self._conds(p, i, n, height, width)))
    ids = self.tokenize(prompts)
    neg_ids = None if negatives is None else self.tokenize(negatives)
    return fn(self.params, ids, neg_ids)

  def _conds(self, params, ids, neg_ids, height, width):
    cond = self._encode(params, ids)
    if neg_ids is None and self.kind == 'sdxl' and self.force_zeros_for_empty_prompt:
      null = jax.tree.map(jnp.zeros_like, cond)
    else:
      if neg_ids is None:
        neg_ids = tuple(jnp.asarray(t) for t in self.tokenize([''] * ids[0].shape[0]))
      null = self._encode(params, neg_ids)
    if self.kind == 'sdxl':
      time_ids = jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32),
                          (ids[0].shape[0], 1))
      cond['time_ids'] = null['time_ids'] = time_ids
    return cond, null

  # --- sampling ------------------------------------------------------------------------------

  def model_fn(self, unet_params: PyTree, controlnet_params: Any = (), controlnet_scales: Any = ()):
    """``model_fn(x, t, cond)`` of the U-Net for ``sampling``: ``t`` in the process's time.

    With ControlNets, ``cond['control']`` holds one control image per ControlNet.
    """
    if self.controlnets:
      return controlnet_lib.controlnet_model_fn(
          self.unet, unet_params, self.controlnets, controlnet_params, scales=controlnet_scales,
          model_timestep=self.scheduler.model_timestep, sdxl=self.kind == 'sdxl')
    def fn(x, t, cond):
      added = None
      if self.kind == 'sdxl':
        added = {'text_embeds': cond['pooled'], 'time_ids': cond['time_ids']}
      if 'inpaint' in cond:  # SD inpainting U-Nets: [latents, mask, masked-image latents]
        x = jnp.concatenate([x, cond['inpaint'].astype(x.dtype)], axis=-1)
      timesteps = self.scheduler.model_timestep(t)
      return self.unet.apply({'params': unet_params}, x, timesteps, cond['context'],
                             added_cond_kwargs=added)
    return fn

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """``[B, h, w, C]`` latents -> images float32 ``[B, H, W, 3]`` in [0, 1] (jitted per shape)."""
    fn = self._program(('decode',) + tuple(latents.shape), lambda: jax.jit(self._decode))
    return fn(self.params['vae'], latents)

  def _decode(self, vae_params, latents):
    z = latents / self.vae.scaling_factor + (self.vae.shift_factor or 0.0)
    image = self.vae.apply({'params': vae_params}, z, method=self.vae.decode)
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  def text_to_image(self, prompt: str | Sequence[str], *,
                    negative_prompt: str | Sequence[str] | None = None, num_steps: int = 50,
                    guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                    method: str | None = None, key: jax.Array | None = None,
                    latents: jax.Array | np.ndarray | None = None, height: int | None = None,
                    width: int | None = None, output_type: str = 'np',
                    control_image: Any = None,
                    controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                    **sampler_options: Any) -> jax.Array:
    """Images from prompts (diffusers' ``StableDiffusion[XL]Pipeline.__call__`` semantics).

    Args:
      prompt: one prompt or a list of B.
      negative_prompt: ``None``, one string, or a list of B (see ``encode_prompt``).
      num_steps: sampler steps (diffusers' ``num_inference_steps``).
      guidance_scale: classifier-free guidance weight w of ``null + w (cond - null)``; at
        ``<= 1`` the negative branch is not evaluated (as diffusers).
      guidance_rescale: phi of Lin et al. (2024), eq. 16 (diffusers' ``guidance_rescale``).
      method: a name of ``sampling.METHODS``; ``None`` is the directory's scheduler,
        reproduced step for step (``scheduler.method``).
      key: PRNG key for the start noise (when ``latents`` is None) and stochastic samplers;
        default ``jax.random.key(0)``.
      latents: start noise ``[B, h, w, C]`` (NHWC, unit variance, as diffusers takes it
        before ``init_noise_sigma``), ``h = height / vae_scale_factor``.
      height, width: image size in pixels, multiples of ``vae_scale_factor``; default
        ``default_size``.
      output_type: ``'np'`` (images float32 ``[B, H, W, 3]`` in [0, 1]) or ``'latent'`` (the
        final latents ``[B, h, w, C]``, before the VAE's scaling).
      control_image: with ControlNets (``load_pretrained(..., controlnet=)``): ``[B or 1, H, W,
        3]`` in [0, 1] (NHWC, the generated size), or a list of them, one per ControlNet.
      controlnet_conditioning_scale: a float for every ControlNet, or one per ControlNet.
      **sampler_options: forwarded to the sampler (``sampling.method_options(method)``).

    Returns:
      ``[B, H, W, 3]`` float32 images in [0, 1], or ``[B, h, w, C]`` latents.

    Raises:
      ValueError: prompt and negative lists of different lengths, a size not divisible by the
        VAE factor, latents of the wrong shape, an unknown method or output type, control
        images missing, of the wrong shape or range, or given without a ControlNet.
    """
    _check_output_type(output_type)
    prompts, negatives = _prompt_lists(prompt, negative_prompt)
    height, width = self._size(height, width)
    batch = len(prompts)
    shape = (batch, height // self.vae_scale_factor, width // self.vae_scale_factor,
             int(self.unet.in_channels))
    key = jax.random.key(0) if key is None else key
    noise_key, sample_key = jax.random.split(key)
    if latents is None:
      latents = jax.random.normal(noise_key, shape, jnp.float32)
    elif tuple(latents.shape) != shape:
      raise ValueError(f'latents have shape {tuple(latents.shape)}; for {batch} prompts at '
                       f'{height}x{width} they must be {shape} (NHWC, [B, height / '
                       f'{self.vae_scale_factor}, width / {self.vae_scale_factor}, '
                       f'{self.unet.in_channels}]).')
    method = self._method(method)
    use_cfg = float(guidance_scale) > 1.0
    options = self.scheduler.sample_options(method, num_steps)
    options.update(sampler_options)
    program_key = ('txt2img', batch, height, width, num_steps, method, use_cfg,
                   negatives is None, float(guidance_rescale), output_type,
                   tuple(sorted((k, repr(v)) for k, v in options.items())))

    def build():
      def run(params, ids, neg_ids, x_T, key, guidance_scale, control, scales):
        cond, null = self._conds(params, ids, neg_ids, height, width)
        if self.controlnets:
          cond['control'] = null['control'] = control  # both CFG halves see the image
        x0 = sampling.sample(
            self.model_fn(params['unet'], params.get('controlnet', ()), tuple(scales)),
            self.scheduler.process, method=method,
            num_steps=num_steps, key=key,
            x_T=self.scheduler.x_T(x_T, method=method, num_steps=num_steps),
            prediction=self.scheduler.prediction, cond=cond,
            null_cond=null if use_cfg else None,
            guidance_scale=guidance_scale if use_cfg else 1.0,
            guidance_rescale=guidance_rescale, **options)
        if output_type == 'latent':
          return x0
        return self._decode(params['vae'], x0)
      batch_sharding = _batch_sharding(self.mesh, batch)
      return jax.jit(run, out_shardings=batch_sharding)

    fn = self._program(program_key, build)
    ids = self._put_batch(self.tokenize(prompts))
    neg_ids = None if negatives is None else self._put_batch(self.tokenize(negatives))
    x_T = self._put_batch(jnp.asarray(latents, jnp.float32))
    control, scales = (), jnp.zeros((0,), jnp.float32)
    if self.controlnets:
      control = self._put_batch(controlnet_lib.prepare_control_images(
          control_image, num_controlnets=len(self.controlnets), batch=batch, height=height,
          width=width))
      scales = jnp.asarray(controlnet_lib.control_scales(controlnet_conditioning_scale,
                                                         len(self.controlnets)), jnp.float32)
    elif control_image is not None:
      raise ValueError('control_image was given but the pipeline has no ControlNet: load it with '
                       'load_pretrained(path, controlnet=DIR or [DIRS]).')
    return fn(self.params, ids, neg_ids, x_T, sample_key, jnp.float32(guidance_scale), control,
              scales)

  # --- adapters ------------------------------------------------------------------------------

  def load_lora_weights(self, path: str | epath.PathLike, *, scale: float = 1.0,
                        adapter_name: str | None = None) -> str:
    """Merges a LoRA file (diffusers / PEFT or kohya layout) into the weights; returns its name.

    ``adapters.lora.load_lora_weights``: several LoRAs add up with their own scales, and
    ``unload_lora_weights`` restores the base weights bitwise.
    """
    self._programs.clear()
    return lora.load_lora_weights(self, path, scale=scale, adapter_name=adapter_name)

  def unload_lora_weights(self) -> None:
    """Removes every LoRA: the base weights again, bitwise (``adapters.lora``)."""
    self._programs.clear()
    lora.unload_lora_weights(self)

  def load_textual_inversion(self, path: str | epath.PathLike, *,
                             token: str | None = None) -> list[str]:
    """Adds a textual-inversion embedding (``learned_embeds.safetensors`` or A1111 files) and its
    placeholder token(s) to the tokenizer(s) and text encoder(s); returns the tokens added.

    Raises:
      ValueError: a token already in the vocabulary (nothing is changed).
    """
    self._programs.clear()
    return textual_inversion.load_textual_inversion(self, path, token=token)

  # --- editing -------------------------------------------------------------------------------

  def encode_image(self, image: jax.typing.ArrayLike) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [0, 1] -> latents ``[B, h, w, C]`` as the U-Net sees them.

    The posterior mean (diffusers draws from the posterior; the two differ by its standard
    deviation, ~1e-3 of the latents for SD's VAE), shifted and scaled:
    ``(mean - shift_factor) * scaling_factor``.
    """
    image = jnp.asarray(image, jnp.float32)
    fn = self._program(('encode_image',) + tuple(image.shape), lambda: jax.jit(self._encode_image))
    return fn(self.params['vae'], image)

  def _encode_image(self, vae_params, image):
    mean, _ = self.vae.apply({'params': vae_params}, image * 2.0 - 1.0, method=self.vae.encode)
    return (mean.astype(jnp.float32) - (self.vae.shift_factor or 0.0)) * self.vae.scaling_factor

  def _kept_steps(self, method: str, num_steps: int, strength: float, sampler_options):
    """The sampler options of the last ``int(num_steps * strength)`` steps and their start level.

    For the directory's own scheduler (DDIM, Euler, DPM-Solver++, UniPC) these are diffusers'
    img2img steps exactly (``get_timesteps``: the full schedule cut at ``num_steps - init``, the
    multistep orders restarting at one); for any other method, the cut of our own grid
    (``editing.strength_times``). Returns ``(options, (alpha, sigma) of the start)`` with
    ``options`` None when no step is kept.
    """
    strength = editing.check_strength(strength)
    init = min(int(num_steps * strength), num_steps)
    if init == 0:
      return None, None
    start = num_steps - init
    sched = self.scheduler
    if method == sched.method and sched.exact and sched.class_name != 'PNDMScheduler':
      opts = sched.sample_options(method, num_steps)
      levels = opts['levels']
      cut = lambda a: None if a is None else np.asarray(a)[start:]  # noqa: E731
      opts['times'] = cut(opts['times'])
      opts['levels'] = type(levels)(*(cut(a) for a in levels))
      if 'orders' in opts:  # DPM-Solver: lower orders until its history fills again
        opts['orders'] = np.minimum(opts['orders'][start:], np.arange(1, init + 1))
      if 'order' in opts:
        opts['order'] = min(int(opts['order']), init)
      alpha, sigma = float(opts['levels'].alpha[0]), float(opts['levels'].sigma[0])
    else:
      times = editing.strength_times(sched.process, method=method, num_steps=num_steps,
                                     strength=strength)
      opts = {'times': times}
      t0 = jnp.asarray(times[0], jnp.float32)
      with jax.ensure_compile_time_eval():
        alpha, sigma = float(sched.process.alpha(t0)), float(sched.process.sigma(t0))
    opts.update(sampler_options)
    return opts, (alpha, sigma)

  def image_to_image(self, prompt: str | Sequence[str], image: jax.typing.ArrayLike, *,
                     strength: float = 0.8, negative_prompt: str | Sequence[str] | None = None,
                     num_steps: int = 50, guidance_scale: float = 7.5,
                     guidance_rescale: float = 0.0, method: str | None = None,
                     key: jax.Array | None = None, noise: jax.typing.ArrayLike | None = None,
                     output_type: str = 'np', **sampler_options: Any) -> jax.Array:
    """SDEdit img2img (Meng et al. 2022) with diffusers' ``StableDiffusionImg2ImgPipeline`` semantics.

    The image is encoded, noised to the first of the last ``int(num_steps * strength)`` steps
    (``x = alpha x_0 + sigma noise``) and sampled back over them with guidance.

    Args:
      prompt, negative_prompt, num_steps, guidance_scale, guidance_rescale, method, output_type,
        **sampler_options: as ``text_to_image``.
      image: ``[B, H, W, 3]`` in [0, 1] (or one image ``[H, W, 3]`` for all prompts), H and W
        multiples of ``vae_scale_factor``; or latents ``[B, h, w, C]`` with C the U-Net's input
        channels, used as they are (as diffusers takes a 4-channel ``image``).
      strength: in [0, 1]; 0 returns the input, 1 starts from (almost) pure noise.
      key: PRNG key of the noise (default ``jax.random.key(0)``).
      noise: the start noise itself, ``[B, h, w, C]`` (e.g. diffusers' draw, for parity).

    Returns:
      ``[B, H, W, 3]`` float32 images in [0, 1], or latents for ``output_type='latent'``.

    Raises:
      ValueError: a bad strength, image shape or size, prompts, method or output type.
    """
    _check_output_type(output_type)
    self._check_no_controlnet()
    prompts, negatives = _prompt_lists(prompt, negative_prompt)
    batch = len(prompts)
    image = jnp.asarray(image, jnp.float32)
    if image.ndim == 3:
      image = jnp.broadcast_to(image[None], (batch,) + image.shape)
    channels = int(self.unet.in_channels)
    if image.ndim != 4 or image.shape[0] != batch or image.shape[-1] not in (3, channels):
      raise ValueError(f'image has shape {tuple(image.shape)}; give [B, H, W, 3] images in [0, 1] '
                       f'(or [B, h, w, {channels}] latents) with B = {batch}, the number of '
                       'prompts.')
    is_latent = image.shape[-1] == channels and image.shape[-1] != 3
    scale = self.vae_scale_factor if is_latent else 1
    height, width = self._size(image.shape[1] * scale, image.shape[2] * scale)
    method = self._method(method)
    opts, start = self._kept_steps(method, num_steps, strength, sampler_options)
    latent_shape = (batch, height // self.vae_scale_factor, width // self.vae_scale_factor,
                    channels)
    noise, sample_key = _start_noise(key, noise, latent_shape)
    use_cfg = float(guidance_scale) > 1.0
    program_key = ('img2img', batch, height, width, is_latent, num_steps, float(strength), method,
                   use_cfg, negatives is None, float(guidance_rescale), output_type,
                   tuple(sorted((k, repr(v)) for k, v in sampler_options.items())))

    def build():
      def run(params, ids, neg_ids, image, noise, key, guidance_scale):
        x0 = image if is_latent else self._encode_image(params['vae'], image)
        if opts is not None:
          cond, null = self._conds(params, ids, neg_ids, height, width)
          x_t = start[0] * x0 + start[1] * noise
          times = opts['times']
          x0 = sampling.sample(
              self.model_fn(params['unet']), self.scheduler.process, method=method,
              num_steps=len(times), key=key, x_T=x_t, prediction=self.scheduler.prediction,
              cond=cond, null_cond=null if use_cfg else None,
              guidance_scale=guidance_scale if use_cfg else 1.0,
              guidance_rescale=guidance_rescale, **opts)
        return x0 if output_type == 'latent' else self._decode(params['vae'], x0)
      return jax.jit(run, out_shardings=_batch_sharding(self.mesh, batch))

    fn = self._program(program_key, build)
    ids = self._put_batch(self.tokenize(prompts))
    neg_ids = None if negatives is None else self._put_batch(self.tokenize(negatives))
    return fn(self.params, ids, neg_ids, self._put_batch(image),
              self._put_batch(jnp.asarray(noise, jnp.float32)), sample_key,
              jnp.float32(guidance_scale))

  def inpaint(self, prompt: str | Sequence[str], image: jax.typing.ArrayLike,
              mask_image: jax.typing.ArrayLike, *, strength: float = 1.0,
              negative_prompt: str | Sequence[str] | None = None, num_steps: int = 50,
              guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
              method: str | None = None, key: jax.Array | None = None,
              noise: jax.typing.ArrayLike | None = None, output_type: str = 'np',
              **sampler_options: Any) -> jax.Array:
    """Inpainting with diffusers' ``StableDiffusionInpaintPipeline`` semantics.

    A U-Net with 9 input channels (SD's inpainting models) is given the latents, the mask and
    the masked image's latents concatenated on the channels (``cond['inpaint']``, so classifier-
    free guidance carries them on both halves); any other U-Net inpaints by replacement: after
    every step the kept region is set to the encoded image noised to the level the step reached
    (the same noise throughout, the clean latents after the last step), as diffusers does.

    Args:
      prompt, negative_prompt, num_steps, guidance_scale, guidance_rescale, method, output_type,
        **sampler_options: as ``text_to_image``.
      image: ``[B, H, W, 3]`` (or ``[H, W, 3]``) in [0, 1].
      mask_image: ``[B, H, W, 1]``, ``[B, H, W]`` or ``[H, W]`` in [0, 1]: **white (>= 0.5) is
        repainted**, black kept (diffusers' convention; ``editing.inpaint`` takes 1 = keep). It
        reaches the latents by nearest-neighbour subsampling, as diffusers' ``interpolate``.
      strength: 1 starts from pure noise; below 1 from the image's latents noised to the first
        of the last ``int(num_steps * strength)`` steps (``image_to_image``).
      key, noise: the start noise (``[B, h, w, C]``, C = the latent channels) or its key.

    Returns:
      ``[B, H, W, 3]`` float32 in [0, 1], or the final latents.

    Raises:
      ValueError: image and mask shapes that do not match, a size not divisible by the VAE
        factor, and what ``image_to_image`` raises.
    """
    _check_output_type(output_type)
    self._check_no_controlnet()
    prompts, negatives = _prompt_lists(prompt, negative_prompt)
    batch = len(prompts)
    image = jnp.asarray(image, jnp.float32)
    if image.ndim == 3:
      image = jnp.broadcast_to(image[None], (batch,) + image.shape)
    if image.ndim != 4 or image.shape[0] != batch or image.shape[-1] != 3:
      raise ValueError(f'image has shape {tuple(image.shape)}; give [B, H, W, 3] in [0, 1] with '
                       f'B = {batch}, the number of prompts.')
    mask = jnp.asarray(mask_image, jnp.float32)
    if mask.ndim == 2:
      mask = mask[None]
    if mask.ndim == 3:
      mask = mask[..., None]
    mask = jnp.broadcast_to(mask, (batch,) + mask.shape[1:]) if mask.shape[0] == 1 else mask
    if mask.shape != image.shape[:3] + (1,):
      raise ValueError(f'mask_image has shape {tuple(jnp.shape(mask_image))}; it must cover the '
                       f'image, [B, H, W(, 1)] with [H, W] = {tuple(image.shape[1:3])}.')
    height, width = self._size(image.shape[1], image.shape[2])
    method = self._method(method)
    f = self.vae_scale_factor
    in_channels = int(self.unet.in_channels)
    latent_channels = int(self.vae.latent_channels)
    nine = in_channels == 2 * latent_channels + 1
    full = editing.check_strength(strength) == 1.0
    if full:
      opts = self.scheduler.sample_options(method, num_steps)
      opts.update(sampler_options)
      start = None
    else:
      opts, start = self._kept_steps(method, num_steps, strength, sampler_options)
    latent_shape = (batch, height // f, width // f, latent_channels)
    noise, sample_key = _start_noise(key, noise, latent_shape)
    use_cfg = float(guidance_scale) > 1.0
    program_key = ('inpaint', batch, height, width, num_steps, float(strength), method, use_cfg,
                   negatives is None, float(guidance_rescale), output_type,
                   tuple(sorted((k, repr(v)) for k, v in sampler_options.items())))

    def build():
      def run(params, ids, neg_ids, image, mask, noise, key, guidance_scale):
        repaint = (mask >= 0.5).astype(jnp.float32)
        repaint_latent = repaint[:, ::f, ::f]  # torch's 'nearest' interpolate at factor f
        image_latents = self._encode_image(params['vae'], image)
        cond, null = self._conds(params, ids, neg_ids, height, width)
        options = dict(opts or {})
        steps = len(options['times']) if 'times' in options else num_steps
        if nine:
          masked = self._encode_image(params['vae'], image * (1.0 - repaint) + 0.5 * repaint)
          extra = jnp.concatenate([repaint_latent, masked], axis=-1)
          cond, null = {**cond, 'inpaint': extra}, {**null, 'inpaint': extra}
        else:
          keep = 1.0 - repaint_latent

          def replace(x, i, t, alpha, sigma):
            del t
            # After the last step the clean latents, whatever level the schedule ends at
            # (diffusers' DDIM / PNDM stop at alphas_cumprod[0], not at the data).
            noised = jnp.where(i == steps - 1, image_latents,
                               alpha * image_latents + sigma * noise)
            return keep * noised + (1.0 - keep) * x
          options['step_hook'] = replace
        if opts is None:
          return image_latents if output_type == 'latent' else self._decode(params['vae'],
                                                                            image_latents)
        if full:
          x_t = self.scheduler.x_T(noise, method=method, num_steps=num_steps)
        else:
          x_t = start[0] * image_latents + start[1] * noise
        x0 = sampling.sample(
            self.model_fn(params['unet']), self.scheduler.process, method=method,
            num_steps=steps, key=key, x_T=x_t, prediction=self.scheduler.prediction, cond=cond,
            null_cond=null if use_cfg else None,
            guidance_scale=guidance_scale if use_cfg else 1.0,
            guidance_rescale=guidance_rescale, **options)
        return x0 if output_type == 'latent' else self._decode(params['vae'], x0)
      return jax.jit(run, out_shardings=_batch_sharding(self.mesh, batch))

    fn = self._program(program_key, build)
    ids = self._put_batch(self.tokenize(prompts))
    neg_ids = None if negatives is None else self._put_batch(self.tokenize(negatives))
    return fn(self.params, ids, neg_ids, self._put_batch(image), self._put_batch(mask),
              self._put_batch(jnp.asarray(noise, jnp.float32)), sample_key,
              jnp.float32(guidance_scale))

  # --- helpers -------------------------------------------------------------------------------

  def _method(self, method: str | None) -> str:
    """``method`` or the directory's scheduler's; ValueError naming the known ones."""
    method = method or self.scheduler.method
    if method not in sampling.METHODS:
      raise ValueError(f'unknown method {method!r}; use one of {sorted(sampling.METHODS)} or None '
                       f'for the scheduler of the directory ({self.scheduler.method!r}).')
    return method

  def _check_no_controlnet(self) -> None:
    if self.controlnets:
      raise ValueError('image_to_image and inpaint do not take ControlNets yet; load the pipeline '
                       'without controlnet= for them.')

  def _size(self, height, width) -> tuple[int, int]:
    height = self.default_size if height is None else int(height)
    width = self.default_size if width is None else int(width)
    f = self.vae_scale_factor
    if height % f or width % f or height <= 0 or width <= 0:
      raise ValueError(f'height and width must be positive multiples of the VAE factor {f}; got '
                       f'{height}x{width}.')
    return height, width

  def _program(self, key, build):
    if key not in self._programs:
      self._programs[key] = build()
    return self._programs[key]

  def _put_batch(self, tree):
    def put(x):
      return jax.device_put(x, _batch_sharding(self.mesh, x.shape[0]))
    return jax.tree.map(put, tree)


def _check_output_type(output_type: str) -> None:
  if output_type not in ('np', 'latent'):
    raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}.")


def _start_noise(key, noise, shape: tuple[int, ...]):
  """``(noise, sampler key)``: the given start noise (shape-checked) or a draw from ``key``."""
  key = jax.random.key(0) if key is None else key
  noise_key, sample_key = jax.random.split(key)
  if noise is None:
    return jax.random.normal(noise_key, shape, jnp.float32), sample_key
  if tuple(jnp.shape(noise)) != shape:
    raise ValueError(f'noise has shape {tuple(jnp.shape(noise))}; it must be {shape}.')
  return noise, sample_key


def _batch_sharding(mesh, batch: int):
  """Batch on the data axes when it divides the device count, else replicated."""
  if batch % mesh.devices.size == 0:
    return sharding.batch_sharding(mesh)
  return sharding.replicated(mesh)


def _prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str] | None]:
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f'prompt must be a string or a non-empty list of strings; got {prompt!r}.')
  if negative_prompt is None:
    return prompts, None
  negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
               else list(negative_prompt))
  if len(negatives) != len(prompts):
    raise ValueError(f'{len(prompts)} prompts but {len(negatives)} negative prompts: give one '
                     'negative prompt per prompt, or one string for all.')
  return prompts, negatives


def _read_json(path: epath.Path) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e


def load_pretrained(path: str | epath.PathLike, *, dtype: Any = jnp.float32,
                    variant: str | None = None, controlnet: Any = None,
                    mesh: jax.sharding.Mesh | None = None,
                    mesh_fsdp: int = 1) -> StableDiffusionPipeline:
  """Loads a local diffusers-format SD 1.x / 2.x / XL directory (no download, no pickle).

  Args:
    path: the directory holding ``model_index.json``.
    dtype: parameter and compute dtype of the networks (``jnp.float32`` or ``jnp.bfloat16``);
      sampling integrates in float32 whatever it is.
    variant: weights file variant, e.g. ``'fp16'`` for ``*.fp16.safetensors``.
    controlnet: a diffusers ControlNet directory, or a list of them (summed, as diffusers'
      ``MultiControlNetModel``); ``text_to_image`` then takes ``control_image``.
    mesh: device mesh; default every device on the data axis (``mesh_fsdp`` on the FSDP axis).
    mesh_fsdp: FSDP axis size when ``mesh`` is None: 1 replicates the weights.

  Returns:
    A ``StableDiffusionPipeline``.

  Raises:
    FileNotFoundError: no such directory, no ``model_index.json``, a missing component.
    ValueError: a pipeline class other than ``PIPELINE_CLASSES``, or weights that do not match
      their configs (naming the tensor and both shapes).
  """
  root = epath.Path(path)
  index, kind = _read_index(root)
  for name in _REQUIRED[kind]:
    if not (root / name).is_dir():
      raise FileNotFoundError(f'{index["_class_name"]} needs the component directory '
                              f'{root / name}, which is missing.')
  unet, unet_params = unet_weights.load_unet(root / 'unet', variant=variant, dtype=dtype)
  vae, vae_params = vae_weights.load_vae(root / 'vae', variant=variant, dtype=dtype)
  encoders, encoder_params = [], {}
  for name in _encoder_names(kind):
    module, params = clip_weights.load_text_encoder(root / name, variant=variant, dtype=dtype)
    encoders.append(module)
    encoder_params[name] = params
  params = {'unet': unet_params, 'vae': vae_params, **encoder_params}
  controlnets = ()
  if controlnet is not None:
    controlnets, params['controlnet'] = controlnet_lib.load_controlnets(
        controlnet, dtype=dtype, variant=variant)
    controlnet_lib.check_compatible(unet, controlnets)
  pipe = _assemble(root, index, kind, unet=unet, vae=vae, encoders=encoders, params=params,
                   mesh=mesh, mesh_fsdp=mesh_fsdp)
  return dataclasses.replace(pipe, controlnets=controlnets)


def _encoder_names(kind: str) -> tuple[str, ...]:
  return ('text_encoder',) if kind == 'sd' else ('text_encoder', 'text_encoder_2')


def _assemble(root: epath.Path, index: Mapping[str, Any], kind: str, *, unet, vae, encoders,
              params, mesh, mesh_fsdp) -> StableDiffusionPipeline:
  """The pipeline from loaded modules and trees, with the tokenizers and scheduler of ``root``."""
  toks = [tokenization.CLIPTokenizer.from_directory(root / name.replace('text_encoder', 'tokenizer'))
          for name in _encoder_names(kind)]
  scheduler_path = root / 'scheduler' / 'scheduler_config.json'
  if not scheduler_path.exists():
    raise FileNotFoundError(f'{scheduler_path} is missing.')
  scheduler = schedulers.from_config(_read_json(scheduler_path))
  if mesh is None:
    mesh = sharding.make_mesh(data=-1, fsdp=mesh_fsdp)
  params = sharding.put_params(params, mesh) if mesh.devices.size > 1 else jax.device_put(params)
  return StableDiffusionPipeline(
      kind=kind, unet=unet, vae=vae, text_encoders=tuple(encoders), tokenizers=tuple(toks),
      scheduler=scheduler, params=params, mesh=mesh,
      force_zeros_for_empty_prompt=bool(index.get('force_zeros_for_empty_prompt', True)))


def _read_index(root: epath.Path) -> tuple[dict[str, Any], str]:
  """``model_index.json`` of ``root`` and the pipeline kind it names; errors name the problem."""
  if not root.is_dir():
    raise FileNotFoundError(f'{root} is not a directory; pass the local directory of a diffusers '
                            'pipeline (the one holding model_index.json).')
  index_path = root / 'model_index.json'
  if not index_path.exists():
    raise FileNotFoundError(f'{root} has no model_index.json, so it is not a diffusers pipeline '
                            'directory (as written by save_pretrained).')
  index = _read_json(index_path)
  class_name = index.get('_class_name')
  if class_name not in PIPELINE_CLASSES:
    raise ValueError(f'{index_path} names pipeline class {class_name!r}; supported: '
                     f'{sorted(PIPELINE_CLASSES)}.')
  return index, PIPELINE_CLASSES[class_name]


# Keys that tell the family of an original (LDM / SGM) single-file checkpoint.
_SINGLE_FILE_KINDS = (
    (clip_weights.SDXL_OPEN_CLIP_PREFIX, 'sdxl'),
    (clip_weights.SD1_PREFIX, 'sd'),
)


def load_single_file(path: str | epath.PathLike, *, config: str | epath.PathLike,
                     dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
                     mesh_fsdp: int = 1) -> StableDiffusionPipeline:
  """Loads an original single-file SD 1.x or SDXL checkpoint (``.safetensors``, LDM key layout).

  Such a file holds the U-Net (``model.diffusion_model.``), the VAE (``first_stage_model.``) and
  the text encoders (SD 1.x ``cond_stage_model.transformer.``; SDXL
  ``conditioner.embedders.0.transformer.`` and the OpenCLIP ``conditioner.embedders.1.model.``),
  but no configs, tokenizers or scheduler: those come from ``config``, a local diffusers-format
  directory of the same architecture (as diffusers' ``from_single_file(config=...)``; its weights
  files are not read and need not be there).

  Args:
    path: the ``.safetensors`` file (pickled ``.ckpt`` files are never read).
    config: diffusers-format directory with ``model_index.json``, each component's
      ``config.json``, ``tokenizer*/`` and ``scheduler/``.
    dtype, mesh, mesh_fsdp: as ``load_pretrained``.

  Raises:
    FileNotFoundError: no such file or config directory (or a component's config missing).
    ValueError: a file that is not an SD 1.x / SDXL single-file checkpoint, a config directory of
      the other family, or tensors that do not match the configs (naming the key).
  """
  path = epath.Path(path)
  if path.suffix != '.safetensors':
    raise ValueError(f'{path}: only .safetensors single files are read (never pickled .ckpt); '
                     'convert it first.')
  state = weights_core.read_safetensors(path)
  kind = next((k for prefix, k in _SINGLE_FILE_KINDS if any(key.startswith(prefix)
                                                             for key in state)), None)
  if kind is None:
    raise ValueError(f'{path} holds no text encoder under {clip_weights.SD1_PREFIX!r} (SD 1.x) or '
                     f'{clip_weights.SDXL_OPEN_CLIP_PREFIX!r} (SDXL): not an SD 1.x / SDXL '
                     'single-file checkpoint.')
  root = epath.Path(config)
  index, config_kind = _read_index(root)
  if config_kind != kind:
    raise ValueError(f'{path} is an {kind} checkpoint but {root} is an {config_kind} pipeline: '
                     'pass a config directory of the same family.')
  unet = unet_2d_condition.UNet2DConditionModel.from_config(
      _read_json(root / 'unet' / 'config.json'), dtype=dtype)
  vae = autoencoder_kl.AutoencoderKL.from_config(_read_json(root / 'vae' / 'config.json'),
                                                 dtype=dtype)
  params = {'unet': unet_weights.unet_params_from_ldm(state, unet, dtype=dtype),
            'vae': vae_weights.vae_params_from_ldm(state, vae, dtype=dtype)}
  encoders = []
  for name in _encoder_names(kind):
    module = clip_models.from_config(clip_weights.read_config(root / name), dtype=dtype,
                                     param_dtype=dtype)
    if name == 'text_encoder':
      prefix = clip_weights.SD1_PREFIX if kind == 'sd' else clip_weights.SDXL_CLIP_L_PREFIX
      params[name] = clip_weights.from_ldm_clip(module, state, prefix=prefix, dtype=dtype)
    else:
      params[name] = clip_weights.from_ldm_open_clip(module, state, dtype=dtype)
    encoders.append(module)
  return _assemble(root, index, kind, unet=unet, vae=vae, encoders=encoders, params=params,
                   mesh=mesh, mesh_fsdp=mesh_fsdp)


__all__ = ['PIPELINE_CLASSES', 'StableDiffusionPipeline', 'load_pretrained', 'load_single_file']
