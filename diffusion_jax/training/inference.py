"""``--mode=sample``: samples from a checkpoint's EMA params, and the sampler the loop uses.

Only the EMA params are read from the checkpoint (``Checkpointer.restore_params``), never the
optimizer state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax import preconditioning, sampling, sharding, writers
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
