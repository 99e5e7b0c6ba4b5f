"""``--mode=txt2img`` (and img2img / inpaint) with a pretrained diffusers-format SD directory.

Reads ``config.pretrained`` (a local directory, never a download), the prompts of
``sampling.prompt`` (one) or ``sampling.prompts_file`` (one per line), and writes
``workdir/samples/<mode>_<method>_<steps>.png`` (a grid) and ``.npz`` with ``images`` (uint8
``[N, H, W, 3]``, ``sampling.num_samples`` per prompt, prompt-major) and ``prompts`` (``[N]``).
``--mode=img2img`` / ``inpaint`` with ``pretrained`` set edit ``sampling.image`` (RGB, sides
multiples of the VAE factor) through ``image_to_image`` / ``inpaint`` of the pipeline;
``sampling.mask`` is white = keep, as for the pixel models (the pipeline's diffusers convention is
the opposite; it is inverted here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from PIL import Image
from etils import epath

from diffusion_jax import pipelines
from diffusion_jax import sampling
from diffusion_jax import writers
from diffusion_jax.training import inference

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def read_prompts(smp: ml_collections.ConfigDict) -> list[str]:
  """The prompts of ``sampling.prompt`` or ``sampling.prompts_file`` (exactly one must be set).

  Raises:
    ValueError: neither or both set, or a prompts file with no prompt.
    FileNotFoundError: a prompts file that does not exist.
  """
  if bool(smp.prompt) == bool(smp.prompts_file):
    raise ValueError('--mode=txt2img needs exactly one of --config.sampling.prompt="..." and '
                     '--config.sampling.prompts_file=FILE (one prompt per line).')
  if smp.prompt:
    return [smp.prompt]
  path = epath.Path(smp.prompts_file)
  if not path.exists():
    raise FileNotFoundError(f'sampling.prompts_file {path} does not exist.')
  prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f'sampling.prompts_file {path} holds no prompt (one per line).')
  return prompts


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields ``--mode=txt2img`` reads (a txt2img config trains nothing).

  Raises:
    ValueError: ``sampling.method`` neither '' (the directory's scheduler) nor a name of
      ``sampling.METHODS``; an unknown ``sampling.dtype``; non-positive steps, samples or batch;
      height / width negative.
  """
  smp = config.sampling
  if smp.method and smp.method not in sampling.METHODS:
    raise ValueError(f"sampling.method={smp.method!r}: use '' (the pretrained directory's "
                     f'scheduler) or one of {sorted(sampling.METHODS)}.')
  if smp.dtype not in DTYPES:
    raise ValueError(f'sampling.dtype must be one of {sorted(DTYPES)}, got {smp.dtype!r}.')
  for name in ('num_steps', 'num_samples', 'batch_size'):
    if smp[name] < 1:
      raise ValueError(f'sampling.{name} must be >= 1, got {smp[name]}.')
  if smp.height < 0 or smp.width < 0:
    raise ValueError('sampling.height and sampling.width must be >= 0 (0: the model\'s size).')


def check_inputs(config: ml_collections.ConfigDict) -> list[str]:
  """Checks ``--mode=txt2img``'s inputs before any backend starts; returns the prompts.

  Raises:
    ValueError: no ``pretrained`` directory, an unknown ``sampling.dtype``, bad prompts.
    FileNotFoundError: ``pretrained`` without ``model_index.json``, a missing prompts file.
  """
  if not config.pretrained:
    raise ValueError('--mode=txt2img needs --config.pretrained=DIR, a local diffusers-format '
                     'Stable Diffusion directory (with model_index.json).')
  index = epath.Path(config.pretrained) / 'model_index.json'
  if not index.exists():
    raise FileNotFoundError(f'--config.pretrained={config.pretrained} has no model_index.json: '
                            'give the local directory of a diffusers pipeline (save_pretrained).')
  validate_config(config)
  return read_prompts(config.sampling)


def _read_image(path: str, *, mode: str) -> np.ndarray:
  """``[H, W, 3]`` (``mode='RGB'``) or ``[H, W]`` (``'L'``) float32 in [0, 1]."""
  with epath.Path(path).open('rb') as f:
    image = Image.open(f)
    image.load()
  return np.asarray(image.convert(mode), np.float32) / 255.0


def text_to_image(config: ml_collections.ConfigDict, workdir: str, *, mode: str = 'txt2img'
                  ) -> str:
  """Runs the pipeline of ``config.pretrained`` on the configured prompts; returns the .npz path.

  Args:
    config: the run's config (``pretrained``, ``sampling.*``).
    workdir: outputs go to ``workdir/samples``.
    mode: 'txt2img', or 'img2img' / 'inpaint' on ``sampling.image`` (and ``sampling.mask``).

  Raises:
    ValueError: no ``pretrained`` directory, bad prompts or sampling fields (see
      ``read_prompts``, ``StableDiffusionPipeline.text_to_image``).
  """
  prompts = check_inputs(config)
  smp = config.sampling
  pipe = pipelines.load_pretrained(config.pretrained, dtype=DTYPES[smp.dtype],
                                   variant=smp.variant or None)
  method = smp.method or None
  options = dict(guidance_rescale=smp.guidance_rescale, method=method, num_steps=smp.num_steps,
                 guidance_scale=smp.guidance_scale, negative_prompt=smp.negative_prompt or None)
  if mode == 'txt2img':
    options.update(height=smp.height or None, width=smp.width or None)
    call = pipe.text_to_image
  elif mode == 'img2img':
    image = _read_image(smp.image, mode='RGB')
    call = lambda batch, **kw: pipe.image_to_image(batch, image, strength=smp.strength, **kw)  # noqa: E731
  else:
    image = _read_image(smp.image, mode='RGB')
    repaint = 1.0 - _read_image(smp.mask, mode='L')  # sampling.mask: white = keep
    call = lambda batch, **kw: pipe.inpaint(batch, image, repaint, **kw)  # noqa: E731
  per_call = max(1, min(smp.batch_size, smp.num_samples))
  all_prompts = [p for p in prompts for _ in range(smp.num_samples)]
  key = jax.random.key(config.seed)
  images = []
  for i in tqdm.trange(0, len(all_prompts), per_call, desc=mode,
                       disable=jax.process_index() != 0):
    batch = all_prompts[i:i + per_call]
    images.append(inference.to_host(call(batch, key=jax.random.fold_in(key, i), **options)))
  images = np.concatenate(images)
  name = f'{mode}_{method or pipe.scheduler.method}_{smp.num_steps}'
  path = epath.Path(workdir) / 'samples' / (name + '.npz')
  if jax.process_index() == 0:
    uint8 = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    inference.write_png(workdir, name + '.png', images[:64] * 2.0 - 1.0)
    writers.save_npz(path, images=uint8, prompts=np.asarray(all_prompts))
    print(f'Wrote {len(uint8)} images for {len(prompts)} prompts to {path}', flush=True)
  return str(path)


__all__ = ['DTYPES', 'check_inputs', 'read_prompts', 'text_to_image', 'validate_config']
