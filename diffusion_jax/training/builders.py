"""What the modes share, built from the config: data, mesh, network, optimizer, objective, state.

``setup`` builds everything except arrays: the state is described abstractly (shapes, dtypes,
shardings), so a run that restores a checkpoint never materializes a fresh state beside it.
``fresh_state`` initializes one (``seed``), ``state_from_params`` starts from given params
(``training.init_from``), and ``restore_ema_params`` reads only the EMA params of a checkpoint
(``--mode=sample`` / ``--mode=eval`` never read optimizer state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from diffusion_jax import checkpointing, input_pipeline, objectives, sharding
from diffusion_jax.training import config as config_lib
from diffusion_jax.training.state import TrainState


def element_shape(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
  """The shape of one example, known from the config for image sources; None for arrays."""
  if config.data.source == 'array':
    return None
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def create_data(config: ml_collections.ConfigDict, *, split: str | None = None,
                num_epochs: int | None = None, shuffle: bool = True,
                batch_size: int | None = None, random_flip: bool | None = None
                ) -> input_pipeline.DataPipeline:
  """This process's input pipeline: its slice of every global batch (the same on any topology)."""
  d = config.data
  batch_size = batch_size or config.training.batch_size
  return input_pipeline.create_dataset(
      source=d.source, path=d.path or None, name=d.name or None, split=split or d.split,
      data_dir=d.data_dir or None, image_size=d.image_size if d.source != 'array' else None,
      num_channels=d.num_channels, batch_size=batch_size // jax.process_count(),
      seed=config.seed, shuffle=shuffle, num_epochs=num_epochs,
      random_flip=d.random_flip if random_flip is None else random_flip,
      use_labels=d.use_labels, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=d.worker_count,
      background=tuple(d.background), captions=d.captions or None, text_key=d.text_key or None)


@dataclasses.dataclass
class Task:
  """What the trainer optimizes: the objective and the trees it reads without training them.

  Attributes:
    loss_fn: ``loss_fn(params, frozen, batch, key) -> (loss, metrics)`` (``objectives``).
    frozen: trees the loss reads but never trains (an autoencoder, a text encoder, a teacher),
      placed like params (``sharding.put_params``); None when there are none.
    save_frozen: also write ``frozen`` into every checkpoint (for trees that cannot be reloaded
      from where they came from).
    prepare: ``prepare(local_batch, step) -> local_batch`` on the host before the batch becomes
      device arrays (tokenizes ``'text'``: strings cannot be JAX arrays); None: drop ``'text'``.
    data: a pipeline that replaces the config's (e.g. cached latents), or None.
    counters: host counts logged with the metrics (e.g. ``{'truncated': n}`` captions).
    prompts: text-to-image models: the prompts of the training-time sample grids.
  """

  loss_fn: objectives.LossFn
  frozen: Any = None
  save_frozen: bool = False
  prepare: Callable[[dict, int], dict] | None = None
  data: Any = None
  counters: dict[str, int] | None = None
  prompts: list[str] | None = None  # text-to-image: the prompts of the training-time grids

  def prepare_batch(self, batch: dict, step: int) -> dict:
    if self.prepare is not None:
      return self.prepare(batch, step)
    return {k: v for k, v in batch.items() if k != 'text'}


@dataclasses.dataclass
class Setup:
  """Everything the modes share, built once from the config (no arrays of the state yet)."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  process: Any
  module: Any
  network_fn: Callable
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  element_shape: tuple[int, ...]
  init_fn: Callable[[jax.Array], TrainState]
  abstract_state: TrainState  # jax.ShapeDtypeStruct leaves carrying their shardings
  state_shardings: TrainState
  checkpointer: checkpointing.Checkpointer
  latent: Any = None  # latent.LatentModels of a latent-diffusion task (frozen VAE, text encoder)

  @property
  def abstract_params(self) -> Any:
    return self.abstract_state.params


def setup(config: ml_collections.ConfigDict, workdir: str | epath.Path,
          example_shape: tuple[int, ...]) -> Setup:
  """Mesh, process, network, optimizer, the state's shapes and shardings, the checkpointer.

  Args:
    config: a validated config.
    workdir: the run's directory (its ``checkpoints/`` is opened, not read).
    example_shape: the shape of one example, e.g. ``[H, W, C]`` (``element_shape`` or the data's).
  """
  mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  sharding.check_batch_size(config.training.batch_size, mesh)
  process = config_lib.build_process(config.process)
  tx, lr_schedule = config_lib.build_optimizer(config)
  latent_models = None
  task = config.training.task
  if task in ('autoencoder', 'latent_diffusion'):
    from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
    if task == 'autoencoder':
      parts = latent.autoencoder_parts(config, tuple(example_shape))
    else:
      parts = latent.ldm_parts(config, workdir, tuple(example_shape),
                               captions_fn=lambda: create_data(config).captions())
    module, network_fn, latent_models = parts.module, parts.network_fn, parts.latent
    example_shape = parts.element_shape

    def init_fn(key):
      return TrainState.create(params=parts.init_params(key), tx=tx)
  elif task == 'denoising':
    module, network_fn = config_lib.build_network(config.model)
    x = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
    cond, _ = config_lib.sampler_cond(config, 1)

    def init_fn(key):
      params = module.init({'params': key}, x, jnp.ones((1,)), **(cond or {}),
                           train=False)['params']
      return TrainState.create(params=params, tx=tx)
  else:
    raise ValueError(f'training.task={task!r} runs as two stages (training/latent.py), not here.')

  shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  shardings = sharding.param_sharding(shapes, mesh, min_size=config.mesh.fsdp_min_size)
  ckpt = checkpointing.Checkpointer(str(epath.Path(workdir) / 'checkpoints'),
                                    max_to_keep=config.training.keep_checkpoints)
  return Setup(config, mesh, process, module, network_fn, tx, lr_schedule, tuple(example_shape),
               init_fn, sharding.with_shardings(shapes, shardings), shardings, ckpt,
               latent_models)


def build_task(s: Setup, data: Any = None) -> Task:
  """The config's task (``training.task``): the denoising objective of its network, nothing
  frozen; the autoencoder objective; or latent diffusion with its frozen trees (``latent``)."""
  task = s.config.training.task
  if task in ('autoencoder', 'latent_diffusion'):
    from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
    return latent.autoencoder_task(s) if task == 'autoencoder' else latent.ldm_task(s, data)
  return Task(loss_fn=config_lib.build_objective(s.config, s.process, s.network_fn))


def fresh_state(s: Setup) -> TrainState:
  """A new state from ``config.seed``, born sharded (never whole on one device first)."""
  key = jax.random.PRNGKey(s.config.seed)
  return jax.jit(s.init_fn, out_shardings=s.state_shardings)(key)


def state_from_params(s: Setup, params: Any) -> TrainState:
  """Step 0 from given params: params and EMA params equal them, a fresh optimizer state."""
  return jax.jit(lambda p: TrainState.create(params=p, tx=s.tx),
                 out_shardings=s.state_shardings)(params)


def load_init_params(s: Setup, init_params: Any = None) -> Any:
  """The params to start from: ``init_params`` (a tree) or ``training.init_from``'s EMA params.

  Returns None when neither is given. Raises ValueError naming the first path whose name, shape
  or dtype differs from the model's, before any array is placed.
  """
  init_from = s.config.training.init_from
  if init_params is not None:
    checkpointing.check_tree(s.abstract_params, init_params, name='init_params')
    # The model's own containers (a FrozenDict or another mapping in, plain dicts out).
    tree = flax.serialization.from_state_dict(s.abstract_params,
                                              flax.serialization.to_state_dict(init_params))
    return sharding.put_params(tree, s.mesh, min_size=s.config.mesh.fsdp_min_size)
  if init_from and s.latent is not None:
    from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
    if latent.diffusers_root(init_from) is not None:  # fine-tuning released weights
      tree = latent.load_pretrained_params(s)
      checkpointing.check_tree(s.abstract_params, tree, name='init_from')
      return sharding.put_params(tree, s.mesh, min_size=s.config.mesh.fsdp_min_size)
  if init_from:
    return checkpointing.load_params(init_from, s.abstract_params, which='ema_params')
  return None


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str | epath.Path
                       ) -> tuple[Setup, Any, int]:
  """``(setup, ema_params, step)`` of the workdir's newest good checkpoint, nothing else read.

  Raises FileNotFoundError when the workdir has no checkpoint.
  """
  config_lib.validate_config(config)
  shape = element_shape(config)
  if shape is None:  # array data: the example shape comes from the file
    shape = create_data(config).element_shape
  s = setup(config, workdir, shape)
  restored = s.checkpointer.restore_params(s.abstract_params, which='ema_params')
  if restored is None:
    s.checkpointer.close()
    raise FileNotFoundError(f'No checkpoint in {s.checkpointer.directory}: train first with '
                            f'--mode=train and the same --workdir.')
  params, step = restored
  return s, params, step
