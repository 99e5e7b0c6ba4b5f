"""Orchestration: build everything from the config, then train, sample or evaluate.

``train_and_evaluate(config, workdir)`` is the whole training job as a function (for notebooks);
``main.py`` only parses flags and calls it, ``sample`` or ``evaluate``. The ConfigDict stops here:
everything below takes typed arguments.

Outputs in ``workdir``: ``checkpoints/`` (orbax), ``metrics.jsonl``, ``tensorboard/``,
``samples/*.png`` and, from ``sample``, ``samples/*.npz``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax import (checkpointing, input_pipeline, losses, optim, preconditioning,
                           processes, sampling, sharding, train_state, writers)
from diffusion_jax import models as models_lib

PROCESS_TYPES = ('discrete', 'vp', 'subvp', 've')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# --- config validation (before anything is compiled) ----------------------------------------------


def _default_config() -> ml_collections.ConfigDict:
  """configs/default.py, the reference every config is checked against."""
  try:
    from configs import default  # pylint: disable=import-outside-toplevel
  except ImportError:  # not run from the repository root: load it from beside the package
    import importlib.util  # pylint: disable=import-outside-toplevel
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'default.py')
    if not os.path.exists(path):
      raise
    spec = importlib.util.spec_from_file_location('diffusion_jax_default_config', path)
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
  return default.get_config()


def _check_against_default(config, reference, prefix: str = '') -> None:
  """Every field must exist in configs/default.py and have a compatible type."""
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in reference:
      raise ValueError(f'Unknown config field {name!r}. Known fields here: '
                       f'{sorted(reference.keys())}. See configs/default.py.')
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise ValueError(f'Config field {name!r} must be a group of fields, got {value!r}.')
      _check_against_default(value, ref, name + '.')
      continue
    ok = (isinstance(value, type(ref))
          or (isinstance(ref, float) and isinstance(value, int) and not isinstance(value, bool))
          or (isinstance(ref, tuple) and isinstance(value, list)))
    if isinstance(ref, int) and not isinstance(ref, bool) and isinstance(value, bool):
      ok = False
    if not ok:
      raise ValueError(f'Config field {name!r} must be of type {type(ref).__name__} '
                       f'(like its default {ref!r}), got {value!r} of type {type(value).__name__}.')


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f'Config field {name!r} = {value!r} is not one of {tuple(choices)}.')


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f'Config field {name!r} must be {">= 0" if allow_zero else "> 0"}, '
                     f'got {value}.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks names, types and consistency of every field; raises ValueError naming the field."""
  _check_against_default(config, _default_config())
  _choice('data.source', config.data.source, input_pipeline.SOURCES)
  _choice('model.name', config.model.name, tuple(models_lib.MODELS))
  _choice('model.parameterization', config.model.parameterization, processes.PREDICTIONS)
  _choice('model.noise_input', config.model.noise_input, preconditioning.NOISE_INPUTS)
  _choice('model.dtype', config.model.dtype, tuple(DTYPES))
  _choice('process.type', config.process.type, PROCESS_TYPES)
  _choice('process.schedule', config.process.schedule, ('linear', 'cosine'))
  _choice('training.weighting', config.training.weighting, losses.WEIGHTINGS)
  _choice('training.time_sampling', config.training.time_sampling, losses.TIME_SAMPLINGS)
  _choice('optim.optimizer', config.optim.optimizer, optim.OPTIMIZERS)
  _choice('optim.schedule', config.optim.schedule, optim.SCHEDULES)
  _choice('sampling.method', config.sampling.method, tuple(sampling.METHODS))
  _choice('sampling.grid', config.sampling.grid, ('',) + tuple(sampling.grids.GRIDS))
  _choice('sampling.spacing', config.sampling.spacing, ('',) + sampling.grids.SPACINGS)
  _choice('sampling.warm_start', config.sampling.warm_start, ('heun', 'ab'))
  _positive('sampling.order', config.sampling.order, allow_zero=True)
  if config.sampling.order and 'order' not in sampling.method_options(config.sampling.method):
    raise ValueError(f"Config field 'sampling.order' = {config.sampling.order} is set but "
                     f'sampling.method={config.sampling.method!r} takes no order; leave it 0.')
  if config.sampling.analytic_first_step and config.sampling.method != 'plms':
    raise ValueError("Config field 'sampling.analytic_first_step' = True needs "
                     "sampling.method='plms' with sampling.warm_start='ab' (iPNDM); got "
                     f'sampling.method={config.sampling.method!r}.')
  _choice('eval.dequantize', config.eval.dequantize, ('uniform', 'none'))
  for name in ('training.batch_size', 'training.num_train_steps', 'training.log_every',
               'training.checkpoint_every', 'training.keep_checkpoints', 'training.steps_per_call',
               'training.max_nonfinite_steps', 'sampling.num_steps', 'sampling.num_samples',
               'sampling.batch_size', 'process.num_timesteps', 'eval.num_examples',
               'eval.batch_size', 'eval.num_draws'):
    group, field = name.split('.')
    _positive(name, config[group][field])
  _positive('training.sample_every', config.training.sample_every, allow_zero=True)
  _positive('training.num_sample_images', config.training.num_sample_images, allow_zero=True)
  if not 0.0 <= config.training.ema_decay < 1.0:
    raise ValueError(f'training.ema_decay must be in [0, 1), got {config.training.ema_decay}.')
  if not 0.0 <= config.training.label_dropout < 1.0:
    raise ValueError('training.label_dropout must be in [0, 1), got '
                     f'{config.training.label_dropout}.')
  if config.model.num_classes > 0 and not config.data.use_labels:
    raise ValueError(f'model.num_classes={config.model.num_classes} needs labels: set '
                     '--config.data.use_labels=True (or model.num_classes=0 for unconditional).')
  if config.sampling.guidance_scale != 1.0 and config.model.num_classes == 0:
    raise ValueError('sampling.guidance_scale != 1 needs a class-conditional model '
                     '(model.num_classes > 0, trained with training.label_dropout > 0).')
  k = config.training.steps_per_call
  for name in ('num_train_steps', 'log_every', 'checkpoint_every', 'sample_every'):
    if config.training[name] % k:
      raise ValueError(f'training.{name}={config.training[name]} must be a multiple of '
                       f'training.steps_per_call={k}.')
  if config.model.name == 'unet':
    try:
      models_lib.validate_unet_config(image_size=config.data.image_size,
                                      ch_mult=tuple(config.model.unet.ch_mult),
                                      attn_resolutions=tuple(config.model.unet.attn_resolutions))
    except ValueError as e:  # name the config field, not the function's argument
      text = str(e)
      field = ('model.unet.attn_resolutions' if text.startswith('attn_resolutions') else
               'model.unet.ch_mult' if text.startswith('ch_mult') else 'data.image_size')
      raise ValueError(f'Config field {field!r}: {e}') from e
  check = getattr(preconditioning, 'check_model_process', None)
  if check is not None:
    check(config.model.noise_input, config.model.parameterization, build_process(config.process))
  _check_sampler_options(config)


# --- builders ----------------------------------------------------------------------------------------


def build_process(cfg: ml_collections.ConfigDict):
  """The noise process of ``config.process``."""
  if cfg.type == 'discrete':
    if cfg.schedule == 'linear':
      return processes.DiscreteVP.linear(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    return processes.DiscreteVP.cosine(cfg.num_timesteps, cfg.cosine_s)
  from diffusion_jax import sde  # pylint: disable=import-outside-toplevel
  if cfg.type == 'vp':
    return sde.VPSDE(beta_min=cfg.beta_min, beta_max=cfg.beta_max, eps=cfg.t_eps)
  if cfg.type == 'subvp':
    return sde.SubVPSDE(beta_min=cfg.beta_min, beta_max=cfg.beta_max, eps=cfg.t_eps)
  return sde.VESDE(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, eps=cfg.t_eps)


def build_network(model_cfg: ml_collections.ConfigDict):
  """The Flax module and ``network_fn(params, x, c_noise, y, *, train, rngs) -> F``."""
  dtype = DTYPES[model_cfg.dtype]
  if model_cfg.name == 'unet':
    fields = dict(model_cfg.unet)
    fields['ch_mult'] = tuple(fields['ch_mult'])
    fields['attn_resolutions'] = tuple(fields['attn_resolutions'])
    fields['num_head_channels'] = fields['num_head_channels'] or None
    module = models_lib.UNet(**fields, num_classes=model_cfg.num_classes, dtype=dtype)
  else:
    module = models_lib.MLP(**dict(model_cfg.mlp), num_classes=model_cfg.num_classes, dtype=dtype)

  def network_fn(params, x, c_noise, y=None, *, train: bool = False, rngs=None):
    return module.apply({'params': params}, x, c_noise, y, train=train, rngs=rngs)

  return module, network_fn


def build_optimizer(config: ml_collections.ConfigDict):
  """The optax transformation and its learning-rate schedule (the latter only for logging)."""
  o = config.optim
  lr = dict(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
            total_steps=config.training.num_train_steps)
  tx = optim.make_optimizer(name=o.optimizer, schedule=o.schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                            weight_decay=o.weight_decay, grad_clip=o.grad_clip, **lr)
  return tx, optim.learning_rate_schedule(decay=o.schedule, **lr)


def _element_shape(config) -> tuple[int, ...] | None:
  """The shape of one example, known from the config for image sources; None for arrays."""
  if config.data.source == 'array':
    return None
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def create_data(config, *, split: str | None = None, num_epochs: int | None = None,
                shuffle: bool = True, batch_size: int | None = None,
                random_flip: bool | None = None) -> input_pipeline.DataPipeline:
  """This process's input pipeline (its shard, per-process batch)."""
  d = config.data
  batch_size = batch_size or config.training.batch_size
  return input_pipeline.create_dataset(
      source=d.source, path=d.path or None, name=d.name or None, split=split or d.split,
      data_dir=d.data_dir or None, image_size=d.image_size if d.source != 'array' else None,
      num_channels=d.num_channels, batch_size=batch_size // jax.process_count(),
      seed=config.seed, shuffle=shuffle, num_epochs=num_epochs,
      random_flip=d.random_flip if random_flip is None else random_flip,
      use_labels=d.use_labels, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=d.worker_count)


@dataclasses.dataclass
class Setup:
  """Everything the modes share, built once from the config."""
  mesh: Any
  process: Any
  module: Any
  network_fn: Callable
  tx: Any
  lr_schedule: Callable
  element_shape: tuple[int, ...]
  state: train_state.TrainState
  state_shardings: Any
  checkpointer: checkpointing.Checkpointer


def setup(config: ml_collections.ConfigDict, workdir: str, element_shape: tuple[int, ...]) -> Setup:
  """Mesh, process, network, optimizer, sharded state and the checkpointer (nothing restored)."""
  mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  sharding.check_batch_size(config.training.batch_size, mesh)
  process = build_process(config.process)
  module, network_fn = build_network(config.model)
  tx, lr_schedule = build_optimizer(config)
  x = jnp.zeros((1,) + tuple(element_shape), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None

  def init_fn(key):
    params = module.init({'params': key}, x, jnp.ones((1,)), y, train=False)['params']
    return train_state.TrainState.create(apply_fn=network_fn, params=params, tx=tx)

  state, shardings = sharding.create_sharded_state(init_fn, mesh, jax.random.PRNGKey(config.seed),
                                                   min_size=config.mesh.fsdp_min_size)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    max_to_keep=config.training.keep_checkpoints)
  return Setup(mesh, process, module, network_fn, tx, lr_schedule, tuple(element_shape), state,
               shardings, ckpt)


def abstract_state(s: Setup):
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), s.state,
                      s.state_shardings)


def sampler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword options of ``sampling.sample`` that ``config.sampling`` sets (no guidance)."""
  smp = config.sampling
  options: dict[str, Any] = {}
  if smp.grid:
    options['grid'] = smp.grid
  if smp.spacing:
    options['spacing'] = smp.spacing
  if smp.order:
    options['order'] = smp.order
  if smp.method == 'ddim':
    options['eta'] = smp.eta
  elif smp.method == 'plms':
    options['warm_start'] = smp.warm_start
    if smp.analytic_first_step:
      options['analytic_first_step'] = True
  elif smp.method == 'pc':
    options.update(predictor=smp.predictor, corrector=smp.corrector, snr=smp.snr)
  elif smp.method == 'ode':
    options.update(rtol=smp.rtol, atol=smp.atol)
  if smp.clip_x0:
    options['clip_x0'] = True
  return options


def _check_sampler_options(config: ml_collections.ConfigDict) -> None:
  """Traces (does not compile) the configured sampler on a stand-in model, so that an option the
  method rejects (an order above what it or num_steps allows, a grid it cannot use) stops the job
  before training, with the method's message and the config fields to change."""
  smp = config.sampling
  process = build_process(config.process)
  options = sampler_options(config)
  try:
    jax.eval_shape(lambda x: sampling.sample(
        lambda x, t: jnp.zeros_like(x), process, method=smp.method, num_steps=smp.num_steps,
        key=jax.random.PRNGKey(0), x_T=x, **options), jax.ShapeDtypeStruct((1, 2), jnp.float32))
  except (ValueError, TypeError) as e:
    raise ValueError(f'The sampling config (sampling.method={smp.method!r}, '
                     f'sampling.num_steps={smp.num_steps}, options {options}) is not valid: '
                     f'{e}') from e


def make_sampler(config: ml_collections.ConfigDict, s: Setup, batch_size: int):
  """A jitted ``(params, key) -> samples [batch_size, *element_shape]`` sharded over devices."""
  smp = config.sampling
  num_classes = config.model.num_classes
  options = sampler_options(config)
  if num_classes:
    options.update(guidance_scale=smp.guidance_scale, null_label=num_classes)
  out_sharding = NamedSharding(s.mesh, PartitionSpec(sharding.BATCH_AXES))
  shape = (batch_size,) + s.element_shape

  def sample_fn(params, key):
    model_fn = preconditioning.make_model_fn(
        s.network_fn, params, s.process, parameterization=config.model.parameterization,
        noise_input_kind=config.model.noise_input)
    k_noise, k_sampler = jax.random.split(key)
    x_T = jax.lax.with_sharding_constraint(s.process.prior_sample(k_noise, shape), out_sharding)
    extra = dict(options)
    if num_classes:
      extra['labels'] = jnp.arange(batch_size) % num_classes
    return sampling.sample(model_fn, s.process, method=smp.method, num_steps=smp.num_steps,
                           key=k_sampler, x_T=x_T,
                           prediction=preconditioning.prediction_type(
                               config.model.parameterization), **extra)

  return jax.jit(sample_fn, out_shardings=out_sharding)


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole global array as NumPy on every process (a multi-process array is gathered)."""
  if not x.is_fully_addressable:  # device_get cannot fetch shards held by other processes
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _devices_multiple(n: int, mesh) -> int:
  d = mesh.devices.size
  return max(d, (n + d - 1) // d * d)


def _write_samples_png(workdir: str, name: str, images: np.ndarray) -> str:
  path = os.path.join(workdir, 'samples', name)
  if images.ndim == 4 and jax.process_index() == 0:
    writers.save_image_grid(path, images, upscale=max(1, 64 // images.shape[1]))
  return path


# --- training ----------------------------------------------------------------------------------------


class _Preemption:
  """SIGTERM -> save at the next step boundary and exit cleanly (all processes agree on the step).

  One process: a Python SIGTERM handler sets a flag that the loop reads after each step. Several
  processes: JAX's preemption sync manager (started by ``jax.distributed.initialize``) catches
  SIGTERM itself, spreads the notice to every process and names one common step;
  ``multihost_utils.reached_preemption_sync_point`` is True on every process at that step. It
  costs no communication until a notice arrives, so it is called every step.
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._multi = jax.process_count() > 1
    self._warned = False

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    if self._multi:
      return self  # leave SIGTERM to JAX's preemption notifier
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # no preemption service: SIGTERM then ends the job unsaved
      if not self._warned:
        logging.warning('No preemption sync manager (%s); SIGTERM will not save a checkpoint.', e)
        self._warned = True
      return False


def _global_batches(batches: list[dict[str, np.ndarray]], mesh, stacked: bool):
  if not stacked:
    return sharding.global_batch(batches[0], mesh)
  spec = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))
  return {k: jax.make_array_from_process_local_data(spec, np.stack([b[k] for b in batches]))
          for k in batches[0]}


def step_config(config: ml_collections.ConfigDict, lr_schedule=None) -> train_state.StepConfig:
  """The static settings of ``train_state.train_step`` that the config sets."""
  return train_state.StepConfig(
      parameterization=config.model.parameterization, noise_input=config.model.noise_input,
      weighting=config.training.weighting, min_snr_gamma=config.training.min_snr_gamma,
      time_sampling=config.training.time_sampling, ema_decay=config.training.ema_decay,
      num_classes=config.model.num_classes, label_dropout=config.training.label_dropout,
      lr_schedule=lr_schedule)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
  """Trains (resuming from ``workdir/checkpoints`` if there is one) and writes samples.

  On a CPU, call ``cpu_runtime.configure()`` before the first JAX computation of the process, as
  ``main`` does: without it each step of a large model maps its temporary buffer anew (about 15%
  slower for the CIFAR-10 U-Net, see that module).

  Returns the final TrainState.
  """
  validate_config(config)
  is_chief = jax.process_index() == 0
  data = create_data(config)
  element_shape = data.element_shape
  if config.model.name == 'unet' and len(element_shape) != 3:
    raise ValueError(f'model.name="unet" needs images [H, W, C]; the data has examples of shape '
                     f'{element_shape}. Use model.name="mlp" for vectors.')
  if config.model.num_classes and data.num_classes and data.num_classes > config.model.num_classes:
    raise ValueError(f'The data has {data.num_classes} classes but model.num_classes='
                     f'{config.model.num_classes}; set --config.model.num_classes='
                     f'{data.num_classes}.')
  s = setup(config, workdir, element_shape)
  state = s.state
  start_step = 0
  restored = s.checkpointer.restore(abstract_state(s))
  if restored is not None:
    state, data_state, start_step = restored
    if data_state is not None:
      data.iterator.set_state(data_state)
    logging.info('Resumed from step %d of %s.', start_step, s.checkpointer.directory)
  s.state = None  # the restored or fresh state lives in `state` only (it is donated below)

  writer = writers.MetricWriter(workdir, enabled=is_chief)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  if is_chief:
    logging.info('Parameters: %s (%.2fM). Devices: %d, mesh %s.', f'{num_params:,}',
                 num_params / 1e6, jax.device_count(), dict(s.mesh.shape))
    logging.info('Config:\n%s', config)
    if start_step == 0:
      writer.write_text('config', str(config))
      writer.write(0, {'num_params': num_params})
    print(f'diffusion_jax: {num_params:,} parameters, {jax.device_count()} device(s), '
          f'start at step {start_step} of {config.training.num_train_steps}.', flush=True)

  step_cfg = step_config(config, s.lr_schedule)
  k = config.training.steps_per_call
  fn = train_state.train_steps if k > 1 else train_state.train_step
  rep = sharding.replicated(s.mesh)
  step_fn = jax.jit(functools.partial(fn, config=step_cfg), donate_argnums=(0,),
                    out_shardings=(s.state_shardings, rep))
  base_key = jax.random.PRNGKey(config.seed + 1)  # not the init key
  sampler = None
  num_grid = config.training.num_sample_images

  def write_grid(st, step):
    nonlocal sampler
    if not num_grid or len(element_shape) != 3:
      return
    n = _devices_multiple(num_grid, s.mesh)
    sampler = sampler or make_sampler(config, s, n)
    images = _to_host(sampler(st.ema_params, jax.random.PRNGKey(step)))
    _write_samples_png(workdir, f'step_{step:07d}.png', images[:num_grid])

  def check_state(flags, step):
    """Stops before the state is saved or sampled if an update overflowed it (see train_step)."""
    if any(np.any(f) for f in flags):
      bar.close()
      s.checkpointer.wait_until_finished()
      raise FloatingPointError(
          f'An update before step {step} made the parameters Inf/NaN '
          'although its loss and gradients were finite: the learning rate is far too high '
          f'(optim.learning_rate={config.optim.learning_rate}). Training stopped without saving; '
          f'the last good checkpoint is step {s.checkpointer.latest_step()} in '
          f'{s.checkpointer.directory}. Lower optim.learning_rate and rerun.')

  def check_pending(step):
    check_state(jax.device_get([m['nonfinite_state'] for m in pending]), step)

  def save(st, step):
    check_pending(step)
    s.checkpointer.save(step, st, data_state=data.iterator.get_state())

  pending: list[dict[str, jax.Array]] = []
  nonfinite_run = 0
  t_last, step_last = time.time(), start_step
  total = config.training.num_train_steps
  bar = tqdm.tqdm(total=total, initial=start_step, disable=not is_chief, unit='step',
                  dynamic_ncols=True, mininterval=1.0)
  step = start_step
  with _Preemption() as preemption:
    while step < total:
      batches = [next(data.iterator) for _ in range(k)]
      batch = _global_batches(batches, s.mesh, stacked=k > 1)
      state, metrics = step_fn(state, batch, base_key, s.process)
      step += k
      pending.append(metrics)
      bar.update(k)
      if step % config.training.log_every == 0 or step == total:
        fetched = jax.device_get(pending)
        pending = []
        rows = [{m: np.reshape(v, (-1,)) for m, v in f.items()} for f in fetched]
        check_state([r['nonfinite_state'] for r in rows], step)
        skipped = np.concatenate([r['skipped'] for r in rows])
        for flag in skipped:
          nonfinite_run = nonfinite_run + 1 if flag else 0
        now = time.time()
        steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, step
        summary = {m: float(np.mean(np.concatenate([r[m] for r in rows])))
                   for m in rows[0] if m not in ('skipped', 'nonfinite_state')}
        summary.update(skipped_steps=int(skipped.sum()), steps_per_sec=steps_per_s,
                       images_per_sec=steps_per_s * config.training.batch_size,
                       data_skipped_files=data.num_skipped())
        writer.write(step, summary)
        bar.set_postfix(loss=f'{summary["loss"]:.4f}', step_s=f'{steps_per_s:.2f}',
                        img_s=f'{summary["images_per_sec"]:.0f}')
        if nonfinite_run >= config.training.max_nonfinite_steps:
          bar.close()
          s.checkpointer.wait_until_finished()
          raise FloatingPointError(
              f'{nonfinite_run} consecutive training steps had a non-finite loss or gradient '
              f'(up to step {step}); their updates were skipped and training stopped. The last '
              f'good checkpoint is step {s.checkpointer.latest_step()} in '
              f'{s.checkpointer.directory}. Lower optim.learning_rate, check the data for '
              'NaN/Inf, or set model.dtype="float32".')
      if step % config.training.checkpoint_every == 0 or step == total:
        save(state, step)
      if config.training.sample_every and step % config.training.sample_every == 0:
        check_pending(step)
        write_grid(state, step)
      if preemption.reached(step):
        if step % config.training.checkpoint_every and step != total:
          save(state, step)
        s.checkpointer.wait_until_finished()
        logging.warning('Preemption signal: saved step %d and stopped; rerun the same command '
                        'to continue.', step)
        bar.close()
        writer.close()
        s.checkpointer.close()
        return state
  bar.close()
  write_grid(state, step)
  s.checkpointer.wait_until_finished()
  s.checkpointer.close()
  writer.close()
  return state


# --- sampling ----------------------------------------------------------------------------------------


def _restore_for_inference(config, workdir: str):
  validate_config(config)
  element_shape = _element_shape(config)
  if element_shape is None:  # array data: the example shape comes from the file
    element_shape = create_data(config).element_shape
  s = setup(config, workdir, element_shape)
  restored = s.checkpointer.restore(abstract_state(s))
  if restored is None:
    raise FileNotFoundError(f'No checkpoint in {s.checkpointer.directory}: train first with '
                            f'--mode=train and the same --workdir.')
  state, _, step = restored
  return s, state, step


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Samples ``sampling.num_samples`` from the latest checkpoint's EMA params.

  Writes ``samples/<method>_<steps>_step<k>.png`` (a grid of the first 100) and ``.npz`` with
  ``x`` (float32, the model's scale) and, for images, ``images`` (uint8). Returns the .npz path.
  """
  s, state, step = _restore_for_inference(config, workdir)
  smp = config.sampling
  batch = _devices_multiple(min(smp.batch_size, smp.num_samples), s.mesh)
  sampler = make_sampler(config, s, batch)
  outs = []
  key = jax.random.PRNGKey(config.seed + 2)
  num_batches = -(-smp.num_samples // batch)
  for i in tqdm.trange(num_batches, desc='sampling', disable=jax.process_index() != 0):
    outs.append(_to_host(sampler(state.ema_params, jax.random.fold_in(key, i))))
  x = np.concatenate(outs)[:smp.num_samples]
  name = f'{smp.method}_{smp.num_steps}_step{step}'
  path = os.path.join(workdir, 'samples', name + '.npz')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {'x': x.astype(np.float32)}
    if x.ndim == 4:
      arrays['images'] = writers.to_uint8(x)
      _write_samples_png(workdir, name + '.png', x[:100])
    np.savez(path, **arrays)
    print(f'Wrote {len(x)} samples to {path}', flush=True)
  return path


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Bits/dim of the EMA model on ``data.eval_split`` via the probability-flow ODE."""
  from diffusion_jax import likelihood  # pylint: disable=import-outside-toplevel
  s, state, step = _restore_for_inference(config, workdir)
  data = create_data(config, split=config.data.eval_split, num_epochs=1, shuffle=False,
                     batch_size=config.eval.batch_size, random_flip=False)
  ev = config.eval
  model_fn = preconditioning.make_model_fn(
      s.network_fn, state.ema_params, s.process, parameterization=config.model.parameterization,
      noise_input_kind=config.model.noise_input)
  prediction = preconditioning.prediction_type(config.model.parameterization)
  means, stderrs, sizes = [], [], []
  key = jax.random.PRNGKey(config.seed + 3)
  dequantize = None if ev.dequantize == 'none' else ev.dequantize
  # Each process evaluates its own shard of the split: its share of eval.num_examples.
  share = -(-ev.num_examples // jax.process_count())
  for i, batch in enumerate(tqdm.tqdm(data.iterator, desc='bits/dim',
                                      disable=jax.process_index() != 0)):
    x = batch['x'][:share - sum(sizes)]
    mean, stderr = likelihood.bits_per_dim(
        model_fn, s.process, x, key=jax.random.fold_in(key, i), prediction=prediction,
        num_draws=ev.num_draws, dequantize=dequantize, rtol=ev.rtol, atol=ev.atol,
        t_start=ev.t_start or None)
    means.append(mean)
    stderrs.append(stderr)
    sizes.append(len(x))
    if sum(sizes) >= share:
      break
  n = np.asarray(sizes, np.float64)
  # Batches are independent: the overall mean weights each batch by its size, and so does its
  # standard error (sqrt of the summed variances of the batch sums, over N). On several processes
  # the sums of every process's batches are added up.
  sums = np.array([np.sum(n * np.asarray(means)), np.sum((n * np.asarray(stderrs))**2), n.sum()])
  logging.info('eval on process %d: %d examples, %.6f bits/dim', jax.process_index(), sums[2],
               sums[0] / max(sums[2], 1))
  if jax.process_count() > 1:
    sums = np.asarray(multihost_utils.process_allgather(sums.astype(np.float32)),
                      np.float64).reshape(-1, 3).sum(axis=0)
  metrics = {'eval_bpd': float(sums[0] / sums[2]),
             'eval_bpd_stderr': float(np.sqrt(sums[1]) / sums[2]),
             'eval_num_examples': int(sums[2])}
  writer = writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write(step, metrics)
  writer.close()
  if jax.process_index() == 0:
    print(f'bits/dim at step {step}: {metrics["eval_bpd"]:.4f} +- {metrics["eval_bpd_stderr"]:.4f}'
          f' ({metrics["eval_num_examples"]} examples)', flush=True)
  return metrics
