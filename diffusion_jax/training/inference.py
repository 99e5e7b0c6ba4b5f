"""``--mode=sample``: samples from a checkpoint's EMA params, and the sampler the loop uses;
``--mode=img2img`` / ``inpaint`` / ``invert``: edits of an input image (``editing.py``).

Only the EMA params are read from the checkpoint (``Checkpointer.restore_params``), never the
optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from diffusion_jax import editing, input_pipeline, preconditioning, sampling, sharding, writers
from diffusion_jax.training import builders
from diffusion_jax.training import config as config_lib


def make_sampler(config: ml_collections.ConfigDict, s: builders.Setup, batch_size: int
                 ) -> Callable[[Any, jax.Array], jax.Array]:
  """A jitted ``(params, key) -> samples [batch_size, *element_shape]`` sharded over devices.

  Class-conditional models sample every class in turn (``config.sampler_cond``) with
  ``sampling.guidance_scale``; unconditional ones with ``cond=None``.
  """
  smp = config.sampling
  options = config_lib.sampler_options(config)
  cond, null_cond = config_lib.sampler_cond(config, batch_size)
  if cond is not None:
    options.update(cond=cond, null_cond=null_cond, guidance_scale=smp.guidance_scale)
  out_sharding = NamedSharding(s.mesh, PartitionSpec(sharding.BATCH_AXES))
  shape = (batch_size,) + s.element_shape
  prediction = preconditioning.prediction_type(config.model.parameterization)

  def sample_fn(params, key):
    model_fn = preconditioning.make_model_fn(
        s.network_fn, params, s.process, parameterization=config.model.parameterization,
        noise_input_kind=config.model.noise_input)
    k_noise, k_sampler = jax.random.split(key)
    x_T = jax.lax.with_sharding_constraint(s.process.prior_sample(k_noise, shape), out_sharding)
    return sampling.sample(model_fn, s.process, method=smp.method, num_steps=smp.num_steps,
                           key=k_sampler, x_T=x_T, prediction=prediction, **options)

  return jax.jit(sample_fn, out_shardings=out_sharding)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole global array as NumPy on every process (a multi-process array is gathered)."""
  if not x.is_fully_addressable:  # device_get cannot fetch shards held by other processes
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def devices_multiple(n: int, mesh) -> int:
  """``n`` rounded up to a multiple of the mesh's device count (at least one per device)."""
  d = mesh.devices.size
  return max(d, (n + d - 1) // d * d)


def write_png(workdir: str | epath.Path, name: str, images: np.ndarray) -> epath.Path:
  """``workdir/samples/name``: a PNG grid of ``images [N, H, W, C]`` (process 0 writes)."""
  path = epath.Path(workdir) / 'samples' / name
  if images.ndim == 4 and jax.process_index() == 0:
    writers.save_image_grid(path, images, upscale=max(1, 64 // images.shape[1]))
  return path


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Samples ``sampling.num_samples`` from the latest checkpoint's EMA params.

  Writes ``samples/<method>_<steps>_step<k>.png`` (a grid of the first 100) and ``.npz`` with
  ``x`` (float32, the model's scale) and, for images, ``images`` (uint8). Returns the .npz path.
  """
  s, params, step = builders.restore_ema_params(config, workdir)
  s.checkpointer.close()
  smp = config.sampling
  batch = devices_multiple(min(smp.batch_size, smp.num_samples), s.mesh)
  sampler = make_sampler(config, s, batch)
  outs = []
  key = jax.random.PRNGKey(config.seed + 2)
  num_batches = -(-smp.num_samples // batch)
  for i in tqdm.trange(num_batches, desc='sampling', disable=jax.process_index() != 0):
    outs.append(to_host(sampler(params, jax.random.fold_in(key, i))))
  x = np.concatenate(outs)[:smp.num_samples]
  name = f'{smp.method}_{smp.num_steps}_step{step}'
  path = epath.Path(workdir) / 'samples' / (name + '.npz')
  if jax.process_index() == 0:
    arrays = {'x': x.astype(np.float32)}
    if x.ndim == 4:
      arrays['images'] = writers.to_uint8(x)
      write_png(workdir, name + '.png', x[:100])
    writers.save_npz(path, **arrays)
    print(f'Wrote {len(x)} samples to {path}', flush=True)
  return str(path)


# --- editing modes: --mode=img2img, --mode=inpaint, --mode=invert ---------------------------------

EDIT_MODES = ('img2img', 'inpaint', 'invert')


def _image_size_of(path: str, field: str) -> tuple[int, int]:
  """(width, height) of an image file, or the error a user can act on."""
  if not path:
    raise ValueError(f'--config.sampling.{field} is empty: give the path of an image file.')
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f'--config.sampling.{field}={path}: no such file.')
  try:
    with epath.Path(path).open('rb') as f, Image.open(f) as image:
      return image.size
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'--config.sampling.{field}={path} is not an image Pillow can read: '
                     f'{e}') from e


def check_edit_inputs(config: ml_collections.ConfigDict, mode: str) -> None:
  """The inputs of an editing mode, checked before anything is built (one-line errors).

  Raises:
    FileNotFoundError: a missing ``sampling.image`` / ``sampling.mask``.
    ValueError: an empty or unreadable path, a mask whose size is not the image's,
      ``sampling.strength`` outside [0, 1], ``sampling.resample < 1``, a label out of range, an
      invert method without an inverse.
  """
  if mode not in EDIT_MODES:
    return
  smp = config.sampling
  size = _image_size_of(smp.image, 'image')
  if mode == 'inpaint':
    mask_size = _image_size_of(smp.mask, 'mask')
    if mask_size != size:
      raise ValueError(f'--config.sampling.mask={smp.mask} is {mask_size[0]}x{mask_size[1]} '
                       f'pixels but --config.sampling.image={smp.image} is {size[0]}x{size[1]}: '
                       'the mask must have the size of the image.')
    if smp.resample < 1:
      raise ValueError(f'--config.sampling.resample={smp.resample} must be >= 1.')
    if smp.resample > 1 and smp.method not in editing.RESAMPLE_METHODS:
      raise ValueError(f'--config.sampling.resample={smp.resample} needs sampling.method in '
                       f'{editing.RESAMPLE_METHODS}, got {smp.method!r}.')
  if mode == 'img2img':
    try:
      editing.check_strength(smp.strength)
    except ValueError as e:
      raise ValueError(f'--config.sampling.strength: {e}') from None
  if mode == 'invert' and smp.method not in sampling.INVERSIONS:
    raise ValueError(f'--mode=invert: sampling.method={smp.method!r} has no inverse; use one of '
                     f'{sorted(sampling.INVERSIONS)}.')
  k = config.model.num_classes
  if not k and smp.label != -1:
    raise ValueError(f'--config.sampling.label={smp.label}: the model is unconditional '
                     '(model.num_classes=0); leave it -1.')
  if k and not -1 <= smp.label < k:
    raise ValueError(f'--config.sampling.label={smp.label}: use -1 (every class in turn) or a '
                     f'class in 0..{k - 1}.')


def _load_input(config: ml_collections.ConfigDict, path: str, *, mask: bool = False
                ) -> np.ndarray:
  """The image at the model's size and scale, ``[1, H, W, C]`` in [-1, 1]; a mask ``[1, H, W,
  1]`` of 0 (generate, black) and 1 (keep, white), thresholded at half intensity."""
  channels = 1 if mask else config.data.num_channels
  image = input_pipeline.load_image(path, image_size=config.data.image_size,
                                    num_channels=channels, background=config.data.background)
  if mask:
    return (image >= 128).astype(np.float32)[None]
  return (image.astype(np.float32) / 127.5 - 1.0)[None]


def _edit_conds(config: ml_collections.ConfigDict, n: int, *, null_default: bool = False):
  """``(labels [n] or None, guidance kwargs builder)`` for ``n`` edits of a class model."""
  k = config.model.num_classes
  if not k:
    return None
  label = config.sampling.label
  if label >= 0:
    return np.full((n,), label, np.int32)
  return np.full((n,), k, np.int32) if null_default else (np.arange(n) % k).astype(np.int32)


def _edit_program(config, s, edit):
  """``jit((params, x, labels, key) -> edit(model_fn, x, cond_kwargs, key))``: the model of the
  checkpoint, with class conditioning and guidance when the model has classes."""
  k = config.model.num_classes

  @jax.jit
  def run(params, x, labels, key):
    model_fn = preconditioning.make_model_fn(
        s.network_fn, params, s.process, parameterization=config.model.parameterization,
        noise_input_kind=config.model.noise_input)
    kw = {}
    if labels is not None:
      kw = dict(cond={'label': labels}, null_cond={'label': jnp.full((1,), k, jnp.int32)},
                guidance_scale=config.sampling.guidance_scale)
    return edit(model_fn, x, kw, key)

  return run


def _run_edits(config, s, params, edit, x_in: np.ndarray, labels, num: int, key: jax.Array):
  """``edit(model_fn, x [b, ...], cond_kwargs, key) -> [b, ...]`` over ``num`` edits of ``x_in``
  in batches of ``sampling.batch_size`` (one compiled program; the last batch padded)."""
  batch = min(config.sampling.batch_size, num)
  run = _edit_program(config, s, edit)
  x = np.broadcast_to(x_in, (batch,) + x_in.shape[1:])
  outs = []
  num_batches = -(-num // batch)
  for i in tqdm.trange(num_batches, desc='editing', disable=jax.process_index() != 0):
    lab = None if labels is None else np.resize(labels[i * batch:(i + 1) * batch], (batch,))
    outs.append(to_host(run(params, x, lab, jax.random.fold_in(key, i))))
  return np.concatenate(outs)[:num]


def _write_edits(workdir, name: str, x: np.ndarray, shown: np.ndarray, **arrays) -> str:
  """``samples/name.npz`` (``x``, ``images`` uint8 and ``arrays``) and ``name.png`` (``shown``
  first, then the first edits); returns the .npz path."""
  path = epath.Path(workdir) / 'samples' / (name + '.npz')
  if jax.process_index() == 0:
    write_png(workdir, name + '.png', np.concatenate([shown, x[:100 - len(shown)]]))
    writers.save_npz(path, x=x.astype(np.float32), images=writers.to_uint8(x),
                     **{k: v for k, v in arrays.items() if v is not None})
    print(f'Wrote {len(x)} edits to {path}', flush=True)
  return str(path)


def _prepare(config, workdir, mode):
  check_edit_inputs(config, mode)
  s, params, step = builders.restore_ema_params(config, workdir)
  s.checkpointer.close()
  if s.element_shape is None or len(s.element_shape) != 3:
    raise ValueError(f'--mode={mode} edits images; this model takes data of shape '
                     f'{s.element_shape}.')
  x_in = _load_input(config, config.sampling.image)
  return s, params, step, x_in


def img2img(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``--mode=img2img``: ``sampling.num_samples`` SDEdit edits of ``sampling.image``.

  Each is ``editing.img2img`` at ``sampling.strength`` with ``sampling.method`` over
  ``sampling.num_steps`` (class models: ``sampling.label`` or every class in turn, guided by
  ``sampling.guidance_scale``). Writes ``samples/img2img_<method>_<steps>_s<strength>_step<k>``
  ``.png`` (the input, then the edits) and ``.npz`` (``x``, ``images``, ``input``, ``label``).
  Returns the .npz path.
  """
  s, params, step, x_in = _prepare(config, workdir, 'img2img')
  smp = config.sampling
  options = config_lib.sampler_options(config)
  prediction = preconditioning.prediction_type(config.model.parameterization)
  labels = _edit_conds(config, smp.num_samples)

  def edit(model_fn, x, kw, key):
    return editing.img2img(model_fn, s.process, x, strength=smp.strength, method=smp.method,
                           num_steps=smp.num_steps, key=key, prediction=prediction, **kw,
                           **options)

  x = _run_edits(config, s, params, edit, x_in, labels, smp.num_samples,
                 jax.random.PRNGKey(config.seed + 3))
  name = f'img2img_{smp.method}_{smp.num_steps}_s{smp.strength:g}_step{step}'
  return _write_edits(workdir, name, x, x_in, input=x_in, label=labels)


def inpaint(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``--mode=inpaint``: ``sampling.num_samples`` completions of ``sampling.image`` where
  ``sampling.mask`` is black (white = keep), ``editing.inpaint`` with ``sampling.resample``.

  Writes ``samples/inpaint_<method>_<steps>_r<resample>_step<k>`` ``.png`` (the input with the
  region to fill at -1, then the completions) and ``.npz`` (``x``, ``images``, ``input``,
  ``mask``, ``label``). Returns the .npz path.
  """
  s, params, step, x_in = _prepare(config, workdir, 'inpaint')
  smp = config.sampling
  mask = _load_input(config, smp.mask, mask=True)
  options = config_lib.sampler_options(config)
  if smp.resample > 1:  # RePaint's own loop takes the grid and DDIM's eta only
    options = {k: v for k, v in options.items()
               if k in ('grid', 'spacing', 'clip_x0') or (k == 'eta' and smp.method == 'ddim')}
  prediction = preconditioning.prediction_type(config.model.parameterization)
  labels = _edit_conds(config, smp.num_samples)

  def edit(model_fn, x, kw, key):
    return editing.inpaint(model_fn, s.process, x, mask, method=smp.method,
                           num_steps=smp.num_steps, key=key, prediction=prediction,
                           resample=smp.resample, **kw, **options)

  x = _run_edits(config, s, params, edit, x_in, labels, smp.num_samples,
                 jax.random.PRNGKey(config.seed + 4))
  name = f'inpaint_{smp.method}_{smp.num_steps}_r{smp.resample}_step{step}'
  shown = np.where(mask == 1, x_in, -1.0)
  return _write_edits(workdir, name, x, shown, input=x_in, mask=mask, label=labels)


def invert(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``--mode=invert``: DDIM-type inversion of ``sampling.image`` and its regeneration.

  ``sampling.invert`` with ``sampling.method`` (one of ``sampling.INVERSIONS``) and
  ``sampling.num_steps`` (class models: ``sampling.label``, or the null class when -1, guided by
  ``sampling.guidance_scale``), then ``sampling.sample`` back; prints the regeneration's PSNR.
  Writes ``samples/invert_<method>_<steps>_step<k>`` ``.png`` (input, regeneration) and ``.npz``
  (``x_T``, ``x`` the regeneration, ``images``, ``input``, ``psnr_db``). Returns the .npz path.
  """
  s, params, step, x_in = _prepare(config, workdir, 'invert')
  smp = config.sampling
  options = {k: v for k, v in config_lib.sampler_options(config).items()
             if k in ('grid', 'spacing', 'order')}
  prediction = preconditioning.prediction_type(config.model.parameterization)
  labels = _edit_conds(config, 1, null_default=True)

  def edit(model_fn, x, kw, key):
    del key
    x_T = sampling.invert(model_fn, s.process, x, method=smp.method, num_steps=smp.num_steps,
                          prediction=prediction, **kw, **options)
    back = sampling.sample(model_fn, s.process, method=smp.method, num_steps=smp.num_steps,
                           x_T=x_T, prediction=prediction, **kw, **options)
    return x_T, back

  x_T, back = jax.tree.map(to_host, _edit_program(config, s, edit)(params, x_in, labels,
                                                                 jax.random.PRNGKey(0)))
  psnr = float(editing.psnr(back, x_in)[0])
  name = f'invert_{smp.method}_{smp.num_steps}_step{step}'
  path = _write_edits(workdir, name, back, x_in, input=x_in, x_T=x_T,
                      psnr_db=np.float64(psnr), label=labels)
  if jax.process_index() == 0:
    print(f'Regeneration PSNR {psnr:.2f} dB ({smp.method}, {smp.num_steps} steps)', flush=True)
  return path
