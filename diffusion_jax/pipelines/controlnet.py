"""ControlNet in the Stable Diffusion pipelines: loading, the guided model_fn, training on a frozen base.

Sampling follows diffusers' ``StableDiffusionControlNetPipeline`` (and its XL form): at every step
each ControlNet reads the same (guidance-doubled) latents, timestep and text states as the U-Net
plus its control image, its residuals are scaled by its ``controlnet_conditioning_scale`` and
summed over the ControlNets (``MultiControlNetModel``), and the U-Net adds the sum to its skip
connections and middle block. The control images ride in the conditioning pytree (DESIGN.md) as
``cond['control']``, a tuple of ``[B, H, W, 3]`` images in [0, 1], one per ControlNet, so that
classifier-free guidance, which concatenates ``cond`` and ``null_cond`` leaf by leaf, gives the
ControlNets the control image on both halves, as diffusers does outside guess mode:

```
nets, nets_params = controlnet.load_controlnets([canny_dir, depth_dir])
control = controlnet.prepare_control_images([canny, depth], num_controlnets=2, batch=B,
                                            height=512, width=512)
cond['control'] = null_cond['control'] = control
model_fn = controlnet.controlnet_model_fn(
    pipe.unet, params['unet'], nets, nets_params, scales=(1.0, 0.5),
    model_timestep=pipe.scheduler.model_timestep, sdxl=pipe.kind == 'sdxl')
```

``denoising_objective`` trains a ControlNet (``ControlNetModel.from_unet``) with the U-Net frozen:
the task's ``loss_fn(params=controlnet_params, frozen={'unet': ..., ...}, batch, key)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from diffusion_jax import objectives
from diffusion_jax import preconditioning
from diffusion_jax.models import controlnet as controlnet_lib
from diffusion_jax.models import unet_2d_condition
from diffusion_jax.weights import controlnet as controlnet_weights

PyTree = Any
ControlNetModel = controlnet_lib.ControlNetModel


def _as_list(value: Any) -> list[Any]:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def load_controlnets(paths: str | epath.PathLike | Sequence[str | epath.PathLike], *,
                     dtype: Any = jnp.float32, variant: str | None = None, **overrides: Any
                     ) -> tuple[tuple[ControlNetModel, ...], tuple[PyTree, ...]]:
  """One or several diffusers ControlNet directories: ``(modules, params)``, one entry per path.

  Args:
    paths: a directory or a list of them (diffusers' ``MultiControlNetModel`` order).
    dtype: parameter and compute dtype.
    variant: weights file variant, e.g. ``'fp16'``.
    **overrides: module fields, e.g. ``attention='cudnn'``.

  Raises:
    FileNotFoundError, ValueError: as ``weights.controlnet.load_controlnet``; an empty list.
  """
  paths = _as_list(paths)
  if not paths:
    raise ValueError('load_controlnets: no ControlNet directory given.')
  loaded = [controlnet_weights.load_controlnet(p, variant=variant, dtype=dtype, **overrides)
            for p in paths]
  return tuple(m for m, _ in loaded), tuple(p for _, p in loaded)


def check_compatible(unet: unet_2d_condition.UNet2DConditionModel,
                     controlnets: Sequence[ControlNetModel]) -> None:
  """Raises ValueError naming the field when a ControlNet's residuals cannot fit ``unet``'s skips."""
  unet_levels = unet._levels()  # pylint: disable=protected-access
  for k, net in enumerate(controlnets):
    levels = net._levels()  # pylint: disable=protected-access
    for name, ours, theirs in (
        ('in_channels', net.in_channels, unet.in_channels),
        ('block_out_channels', tuple(net.block_out_channels), tuple(unet.block_out_channels)),
        ('layers_per_block', levels['layers'], unet_levels['layers']),
        ('cross_attention_dim', levels['context_dim'], unet_levels['context_dim']),
        ('addition_embed_type', net.addition_embed_type, unet.addition_embed_type)):
      if ours != theirs:
        raise ValueError(f'ControlNet {k} has {name}={ours}, the U-Net {theirs}: it was trained '
                         'for another base model (SD 1.x / 2.x / XL).')


def control_scales(controlnet_conditioning_scale: float | Sequence[float],
                   num_controlnets: int) -> tuple[float, ...]:
  """One scale per ControlNet from a float (for all) or a list (diffusers' convention).

  Raises:
    ValueError: a list of another length.
  """
  scales = _as_list(controlnet_conditioning_scale)
  if len(scales) == 1:
    scales = scales * num_controlnets
  if len(scales) != num_controlnets:
    raise ValueError(f'{len(scales)} controlnet_conditioning_scale values for {num_controlnets} '
                     'ControlNets: give one float, or one per ControlNet.')
  return tuple(float(s) for s in scales)


def prepare_control_images(control_image: Any, *, num_controlnets: int, batch: int, height: int,
                           width: int) -> tuple[np.ndarray, ...]:
  """The control images as the model_fn takes them: a tuple of ``[B, H, W, C]`` float32 arrays.

  Args:
    control_image: for one ControlNet an image ``[H, W, C]`` or a batch ``[1 or B, H, W, C]``
      (NHWC, values in [0, 1], as diffusers' control image processor leaves them: not
      normalized to [-1, 1]); for several, a list with one such entry per ControlNet.
    num_controlnets: how many ControlNets are loaded.
    batch: B, the number of prompts; a single image is repeated B times (diffusers).
    height, width: the image size being generated, which the control images must have (they are
      not resized here: resize them first).

  Raises:
    ValueError: a missing image, a list of another length, a wrong shape, size or range.
  """
  if control_image is None:
    raise ValueError('the pipeline has ControlNets: pass control_image=[B, H, W, 3] in [0, 1] '
                     '(a list of them, one per ControlNet, for several).')
  images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
  if len(images) != num_controlnets:
    raise ValueError(f'{len(images)} control images for {num_controlnets} ControlNets: give one '
                     'image (or batch) per ControlNet, in the order they were loaded.')
  out = []
  for k, image in enumerate(images):
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
      image = image[None]
    if image.ndim != 4 or image.shape[0] not in (1, batch) or image.shape[1:3] != (height, width):
      raise ValueError(f'control image {k} has shape {image.shape}; for {batch} prompts at '
                       f'{height}x{width} it must be [1 or {batch}, {height}, {width}, C] (NHWC; '
                       'resize it to the generated size).')
    if image.size and (image.min() < 0.0 or image.max() > 1.0):
      raise ValueError(f'control image {k} has values in [{image.min():g}, {image.max():g}]; '
                       'control images are in [0, 1] (e.g. uint8 / 255).')
    out.append(np.ascontiguousarray(np.broadcast_to(image, (batch,) + image.shape[1:])))
  return tuple(out)


def controlnet_residuals(controlnets: Sequence[ControlNetModel], params: Sequence[PyTree],
                         sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                         control: Sequence[jax.Array], *, scales: Sequence[float | jax.Array],
                         added_cond_kwargs: Mapping[str, jax.Array] | None = None
                         ) -> dict[str, Any]:
  """The summed residuals of several ControlNets, as the U-Net's keyword arguments.

  Args:
    controlnets, params: the modules and their parameter trees.
    sample: ``[B, h, w, C]`` latents as the U-Net sees them.
    timesteps: ``[B]`` diffusers timesteps.
    encoder_hidden_states: ``[B, L, D]`` text states.
    control: one control image ``[B, H, W, 3]`` per ControlNet.
    scales: one conditioning scale per ControlNet (floats or traced scalars).
    added_cond_kwargs: SDXL's ``{'text_embeds', 'time_ids'}``.

  Returns:
    ``{'down_block_additional_residuals': (...), 'mid_block_additional_residual': ...}``.

  Raises:
    ValueError: lists of different lengths.
  """
  if not len(controlnets) == len(params) == len(control) == len(scales):
    raise ValueError(f'{len(controlnets)} ControlNets, {len(params)} parameter trees, '
                     f'{len(control)} control images and {len(scales)} scales: give one of each '
                     'per ControlNet.')
  outputs = [net.apply({'params': p}, sample, timesteps, encoder_hidden_states, image,
                       conditioning_scale=scale, added_cond_kwargs=added_cond_kwargs)
             for net, p, image, scale in zip(controlnets, params, control, scales)]
  down, mid = controlnet_lib.sum_residuals(outputs)
  return {'down_block_additional_residuals': down, 'mid_block_additional_residual': mid}


def controlnet_model_fn(unet: unet_2d_condition.UNet2DConditionModel, unet_params: PyTree,
                        controlnets: Sequence[ControlNetModel], controlnet_params: Sequence[PyTree],
                        *, scales: Sequence[float | jax.Array],
                        model_timestep: Callable[[jax.Array], jax.Array] = lambda t: t,
                        sdxl: bool = False) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
  """``model_fn(x, t, cond)`` of the U-Net guided by ControlNets, for ``sampling.sample``.

  Args:
    unet, unet_params: the U-Net.
    controlnets, controlnet_params: the ControlNets, in the order of ``cond['control']``.
    scales: their conditioning scales (floats or traced scalars).
    model_timestep: our time ``t`` -> diffusers' timestep (``pipe.scheduler.model_timestep``).
    sdxl: read ``cond['pooled']`` and ``cond['time_ids']`` as SDXL's ``added_cond_kwargs``.

  Returns:
    ``model_fn(x: [B, h, w, C], t: [B], cond) -> [B, h, w, C]`` with ``cond = {'context':
    [B, L, D], 'control': ([B, H, W, 3], ...)}`` (+ ``'pooled'``, ``'time_ids'`` for SDXL).
  """
  controlnets, controlnet_params = tuple(controlnets), tuple(controlnet_params)

  def model_fn(x, t, cond):
    added = None
    if sdxl:
      added = {'text_embeds': cond['pooled'], 'time_ids': cond['time_ids']}
    timesteps = model_timestep(t)
    residuals = controlnet_residuals(controlnets, controlnet_params, x, timesteps,
                                     cond['context'], tuple(cond['control']), scales=scales,
                                     added_cond_kwargs=added)
    return unet.apply({'params': unet_params}, x, timesteps, cond['context'],
                      added_cond_kwargs=added, **residuals)

  return model_fn


def denoising_objective(*, unet: unet_2d_condition.UNet2DConditionModel,
                        controlnet: ControlNetModel, process,
                        cond_fn: objectives.CondFn, control_key: str = 'control',
                        parameterization: preconditioning.Parameterization = 'eps',
                        noise_input: preconditioning.NoiseInput = 't',
                        model_timestep: Callable[[jax.Array], jax.Array] = lambda t: t,
                        sdxl: bool = False, null_cond: Any = None, cond_dropout: float = 0.0,
                        x_fn: Callable[[Any, dict[str, jax.Array], jax.Array], jax.Array]
                        | None = None, **denoising_options: Any) -> objectives.LossFn:
  """The denoising loss of a frozen U-Net guided by a trainable ControlNet (Zhang et al. 2023).

  ``loss_fn(params, frozen, batch, key)``: ``params`` is the ControlNet's tree (the only one
  that trains), ``frozen['unet']`` the U-Net's (never differentiated); everything else in
  ``frozen`` (a text encoder, an autoencoder) is for ``cond_fn`` and ``x_fn``. The loss is
  ``objectives.denoising``'s with the U-Net + ControlNet as the network. Condition dropout
  replaces the text conditioning only and keeps the control image, as diffusers'
  ``train_controlnet.py`` (``proportion_empty_prompts``; the paper, Sec. 3.3, drops 50% of the
  prompts).

  Args:
    unet: the frozen U-Net module.
    controlnet: the ControlNet module (``ControlNetModel.from_unet(unet, ...)``).
    process: the noise process the U-Net was trained with.
    cond_fn: ``cond_fn(frozen, batch) -> {'context': [B, L, D]}`` (+ ``'pooled'``,
      ``'time_ids'`` for SDXL): the text conditioning, e.g. from a frozen text encoder.
    control_key: the batch field of the control images ``[B, H, W, 3]`` in [0, 1].
    parameterization, noise_input: how the U-Net's output and time input are read
      (``preconditioning``), as it was trained.
    model_timestep: ``c_noise`` -> the U-Net's timestep input (``schedulers.model_timestep`` for
      a diffusers U-Net on ``scheduler.process``; identity for one trained here).
    sdxl: the U-Net takes SDXL's ``added_cond_kwargs``.
    null_cond: the text conditioning of an empty prompt, leaves broadcasting against
      ``cond_fn``'s; needed when ``cond_dropout > 0``.
    cond_dropout: probability of training an example on ``null_cond``.
    x_fn: ``x_fn(frozen, batch, key) -> x0`` (e.g. latents of a frozen VAE); default
      ``batch['x']``.
    **denoising_options: ``objectives.denoising``'s weighting and time-sampling options.

  Returns:
    ``loss_fn(params, frozen, batch, key) -> (loss, metrics)``.

  Raises:
    ValueError: a dropout rate outside [0, 1) or dropout without ``null_cond``.
  """
  if not 0.0 <= cond_dropout < 1.0:
    raise ValueError(f'cond_dropout must be in [0, 1), got {cond_dropout}.')
  if cond_dropout > 0 and null_cond is None:
    raise ValueError(f'cond_dropout={cond_dropout} needs null_cond (the empty prompt\'s '
                     'conditioning that replaces a dropped prompt).')

  def loss_fn(params, frozen, batch, key):
    k_loss, k_drop, k_x = jax.random.split(key, 3)
    if control_key not in batch:
      raise ValueError(f'the ControlNet objective reads the control images from batch['
                       f'{control_key!r}], which the batch lacks (fields {sorted(batch)}).')
    text = cond_fn(frozen, batch)
    if cond_dropout > 0:
      text = objectives.drop_cond(k_drop, text, null_cond, cond_dropout, batch['x'].shape[0])
    cond = dict(text, control=(batch[control_key],))
    if x_fn is not None:
      batch = dict(batch, x=x_fn(frozen, batch, k_x))
    unet_params = jax.lax.stop_gradient(frozen['unet'])

    def network_fn(cn_params, x, c_noise, cond, *, train=False, rngs=None):
      del train, rngs  # the SD networks have no dropout
      model_fn = controlnet_model_fn(unet, unet_params, (controlnet,), (cn_params,),
                                     scales=(1.0,), model_timestep=model_timestep, sdxl=sdxl)
      return model_fn(x, c_noise, cond)

    inner = objectives.denoising(
        network_fn=network_fn, process=process, parameterization=parameterization,
        noise_input=noise_input, cond_fn=lambda frozen, batch: cond, **denoising_options)
    return inner(params, frozen, batch, k_loss)

  return loss_fn


__all__ = ['check_compatible', 'control_scales', 'controlnet_model_fn', 'controlnet_residuals',
           'denoising_objective', 'load_controlnets', 'prepare_control_images']
