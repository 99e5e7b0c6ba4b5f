"""The config, validated and turned into typed objects: process, network, optimizer, objective.

The ConfigDict stops in this package: everything these functions return takes plain, typed
arguments. ``validate_config`` checks every field against ``diffusion_jax/configs/default.py``
(names, types, choices, consistency) and traces the configured sampler once, so a bad config stops
the job before anything is compiled, with a message naming the field.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion_jax import (input_pipeline, losses, objectives, optim, preconditioning, processes,
                           sampling)
from diffusion_jax import models as models_lib
from diffusion_jax.configs import default

PROCESS_TYPES = ('discrete', 'vp', 'subvp', 've', 'rectified_flow')
TASKS = ('denoising', 'autoencoder', 'latent_diffusion', 'ldm')  # training/latent.py
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# --- validation (before anything is compiled) -----------------------------------------------------


def _check_against_default(config, reference, prefix: str = '') -> None:
  """Every field must exist in the default config and have a compatible type."""
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in reference:
      raise ValueError(f'Unknown config field {name!r}. Known fields here: '
                       f'{sorted(reference.keys())}. See diffusion_jax/configs/default.py '
                       '(docs/config.md).')
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


def _flatten(config, prefix: str = '') -> dict[str, Any]:
  """``{'a.b': value}`` of every leaf field of ``config``."""
  out = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return out


def differences_from_default(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{'a.b': value}`` of the fields whose value differs from ``configs/default.py``."""
  reference = _flatten(default.get_config())
  return {k: v for k, v in _flatten(config).items() if k not in reference or reference[k] != v}


def write_config_json(config: ml_collections.ConfigDict, workdir) -> Any:
  """Writes the whole config to ``workdir/config.json`` (any epath path); returns the path."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = epath.Path(workdir) / 'config.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
  return path


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The config that ``write_config_json`` wrote: the default with every field set from ``text``.

  JSON has no tuples: a field whose default is a tuple gets its list back as a tuple.
  """
  import json  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  reference = _flatten(config)
  for name, value in _flatten(json.loads(text)).items():
    *groups, leaf = name.split('.')
    holder = config
    for g in groups:
      holder = holder[g]
    if isinstance(reference.get(name), tuple) and isinstance(value, tuple):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    holder[leaf] = value
  return config


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f'Config field {name!r} = {value!r} is not one of {tuple(choices)}.')


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f'Config field {name!r} must be {">= 0" if allow_zero else "> 0"}, '
                     f'got {value}.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks names, types and consistency of every field; raises ValueError naming the field."""
  _check_against_default(config, default.get_config())
  _choice('data.source', config.data.source, input_pipeline.SOURCES)
  _choice('model.name', config.model.name, tuple(models_lib.MODELS))
  _choice('model.parameterization', config.model.parameterization, processes.PREDICTIONS)
  _choice('model.noise_input', config.model.noise_input, preconditioning.NOISE_INPUTS)
  _choice('model.dtype', config.model.dtype, tuple(DTYPES))
  _choice('process.type', config.process.type, PROCESS_TYPES)
  _choice('process.schedule', config.process.schedule, ('linear', 'cosine'))
  _choice('training.weighting', config.training.weighting, losses.WEIGHTINGS)
  _choice('training.time_sampling', config.training.time_sampling, losses.TIME_SAMPLINGS)
  if config.training.time_sampling == 'logit_normal':
    if config.process.type == 'discrete':
      raise ValueError("Config field 'training.time_sampling' = 'logit_normal' is for continuous "
                       "processes (process.type 'rectified_flow', 'vp', 'subvp', 've'); "
                       "process.type='discrete' trains on integer steps.")
    _positive('training.logit_normal_std', config.training.logit_normal_std)
  _positive('sampling.shift', config.sampling.shift)
  if config.process.type == 'rectified_flow' and not 0 < config.process.t_eps < 0.5:
    raise ValueError(f"Config field 'process.t_eps' = {config.process.t_eps} must lie in (0, 0.5) "
                     "for process.type='rectified_flow' (t in [t_eps, 1 - t_eps]).")
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
  _choice('eval.dequantize', config.eval.dequantize, ('auto', 'uniform', 'none'))
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
  _choice('training.task', config.training.task, TASKS)
  latent = config.training.task != 'denoising'
  if latent:
    _validate_latent(config)
  if config.sampling.guidance_scale != 1.0 and config.model.num_classes == 0 and not latent:
    raise ValueError('sampling.guidance_scale != 1 needs a class-conditional model '
                     '(model.num_classes > 0, trained with training.label_dropout > 0).')
  k = config.training.steps_per_call
  for name in ('num_train_steps', 'log_every', 'checkpoint_every', 'sample_every'):
    if config.training[name] % k:
      raise ValueError(f'training.{name}={config.training[name]} must be a multiple of '
                       f'training.steps_per_call={k}.')
  _check_array_image_size(config)
  if config.model.name == 'unet' and not latent:
    try:
      models_lib.validate_unet_config(image_size=config.data.image_size,
                                      ch_mult=tuple(config.model.unet.ch_mult),
                                      attn_resolutions=tuple(config.model.unet.attn_resolutions))
    except ValueError as e:  # name the config field, not the function's argument
      text = str(e)
      if text.startswith('attn_resolutions'):
        u = config.model.unet
        sizes = [config.data.image_size // 2**i for i in range(len(u.ch_mult))]
        raise ValueError(
            f"Config field 'model.unet.attn_resolutions': {e} Set "
            f"--config.model.unet.attn_resolutions='({sizes[-1]},)' (any of {sizes}), or '()' "
            'for no attention.') from e
      field = 'model.unet.ch_mult' if text.startswith('ch_mult') else 'data.image_size'
      raise ValueError(f'Config field {field!r}: {e}') from e
  preconditioning.check_model_process(config.model.noise_input, config.model.parameterization,
                                      build_process(config.process))
  check_sampler_options(config)


def _check_array_image_size(config: ml_collections.ConfigDict) -> None:
  """Images of ``data.source='array'`` must have the size ``data.image_size`` says.

  Arrays are not resized, and the network is built for ``data.image_size`` as for every other
  source (its attention resolutions checked against it), so a file of another size is an error
  here, before anything is built. Vectors ``[N, D]`` have no image size; a file that cannot be
  read is left to the input pipeline, which names it.
  """
  if config.data.source != 'array' or not config.data.path:
    return
  header = input_pipeline.array_header(config.data.path, text_key=config.data.text_key or None)
  if header is None or len(header[0]) != 4:
    return
  height, width = header[0][1:3]
  size = config.data.image_size
  if (height, width) != (size, size):
    fix = (f'set --config.data.image_size={height}' if height == width else
           'crop or pad the images of the file to squares')
    raise ValueError(f'data.path={config.data.path} holds {height}x{width} images but '
                     f'data.image_size={size}; arrays are not resized: {fix}.')


def _validate_latent(config: ml_collections.ConfigDict) -> None:
  """The fields of latent text-to-image training (``training/latent.py``)."""
  from diffusion_jax import autoencoder_losses  # pylint: disable=import-outside-toplevel
  a, t = config.autoencoder, config.model.text_encoder
  if not 0.0 <= config.training.text_dropout < 1.0:
    raise ValueError('training.text_dropout must be in [0, 1), got '
                     f'{config.training.text_dropout}.')
  _choice('autoencoder.rec_loss', a.rec_loss, autoencoder_losses.REC_LOSSES)
  _choice('model.text_encoder.source', t.source, ('vocab', 'pretrained'))
  for name in ('kl_weight', 'disc_weight', 'disc_start', 'batch_size'):
    _positive(f'autoencoder.{name}', a[name], allow_zero=True)
  for name in ('num_train_steps', 'learning_rate', 'scale_examples', 'latent_channels',
               'disc_channels', 'disc_layers'):
    _positive(f'autoencoder.{name}', a[name])
  bad = [c for c in a.block_out_channels if c % a.norm_num_groups]
  if bad:
    raise ValueError(f'Config field autoencoder.block_out_channels {tuple(a.block_out_channels)}: '
                     f'{bad} not divisible by autoencoder.norm_num_groups={a.norm_num_groups}.')
  u = config.model.cond_unet
  n = len(u.block_out_channels)
  for name in ('down_block_types', 'up_block_types'):
    if len(u[name]) != n:
      raise ValueError(f'Config field model.cond_unet.{name} has {len(u[name])} entries; '
                       f'model.cond_unet.block_out_channels has {n} levels.')
  if t.source == 'pretrained' and not t.path:
    raise ValueError("model.text_encoder.source='pretrained' needs "
                     '--config.model.text_encoder.path=DIR (a diffusers directory with '
                     'tokenizer/ and text_encoder/).')
  if config.training.task == 'latent_diffusion' and not a.path:
    raise ValueError("training.task='latent_diffusion' needs --config.autoencoder.path=DIR, a "
                     "diffusers-format vae/ directory (or use training.task='ldm' to train "
                     'the autoencoder first).')
  if config.training.task == 'autoencoder' and config.training.steps_per_call != 1:
    raise ValueError("training.task='autoencoder' runs one step per call "
                     '(training.steps_per_call=1).')
  if config.data.random_flip and config.data.source == 'digits_text':
    raise ValueError('data.random_flip would swap the digits that digits_text captions order.')


# --- builders -------------------------------------------------------------------------------------


def build_process(cfg: ml_collections.ConfigDict):
  """The noise process of ``config.process``."""
  if cfg.type == 'discrete':
    if cfg.schedule == 'linear':
      return processes.DiscreteVP.linear(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    return processes.DiscreteVP.cosine(cfg.num_timesteps, cfg.cosine_s)
  if cfg.type == 'rectified_flow':
    return processes.RectifiedFlow(eps=cfg.t_eps)
  from diffusion_jax import sde  # pylint: disable=import-outside-toplevel
  if cfg.type == 'vp':
    return sde.VPSDE(beta_min=cfg.beta_min, beta_max=cfg.beta_max, eps=cfg.t_eps)
  if cfg.type == 'subvp':
    return sde.SubVPSDE(beta_min=cfg.beta_min, beta_max=cfg.beta_max, eps=cfg.t_eps)
  return sde.VESDE(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, eps=cfg.t_eps)


def build_network(model_cfg: ml_collections.ConfigDict):
  """The Flax module and ``network_fn(params, x, c_noise, cond, *, train, rngs) -> F``.

  ``cond`` is a dict whose keys are the module's conditioning keyword arguments (``{'label': [B]
  int32}`` for class labels) or None; network_fn unpacks it into them.
  """
  dtype = DTYPES[model_cfg.dtype]
  if model_cfg.name == 'unet':
    fields = dict(model_cfg.unet)
    fields['ch_mult'] = tuple(fields['ch_mult'])
    fields['attn_resolutions'] = tuple(fields['attn_resolutions'])
    fields['num_head_channels'] = fields['num_head_channels'] or None
    module = models_lib.UNet(**fields, num_classes=model_cfg.num_classes, dtype=dtype)
  else:
    module = models_lib.MLP(**dict(model_cfg.mlp), num_classes=model_cfg.num_classes, dtype=dtype)

  def network_fn(params, x, c_noise, cond=None, *, train: bool = False, rngs=None):
    return module.apply({'params': params}, x, c_noise, **(cond or {}), train=train, rngs=rngs)

  return module, network_fn


def build_optimizer(config: ml_collections.ConfigDict, *, trainable: optim.Trainable = None
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation and its learning-rate schedule (the latter only for logging).

  ``trainable``: which leaves of the params train (``optim.make_optimizer``); None for all.
  """
  o = config.optim
  lr = dict(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
            total_steps=config.training.num_train_steps)
  tx = optim.make_optimizer(name=o.optimizer, schedule=o.schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                            weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                            trainable=trainable, **lr)
  return tx, optim.learning_rate_schedule(decay=o.schedule, **lr)


def _label_cond(frozen, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  del frozen  # class labels come from the batch alone
  return {'label': batch['label'].astype(jnp.int32)}


def build_objective(config: ml_collections.ConfigDict, process, network_fn: Callable
                    ) -> objectives.LossFn:
  """The denoising objective of the config; class-conditional when ``model.num_classes > 0``.

  Class labels travel as ``cond={'label': [B] int32}``; dropped labels (probability
  ``training.label_dropout``, for classifier-free guidance) become the null label
  ``num_classes``.
  """
  num_classes = config.model.num_classes
  conditional = dict(cond_fn=_label_cond, null_cond={'label': num_classes},
                     cond_dropout=config.training.label_dropout) if num_classes else {}
  return objectives.denoising(
      network_fn=network_fn, process=process, parameterization=config.model.parameterization,
      noise_input=config.model.noise_input, weighting=config.training.weighting,
      min_snr_gamma=config.training.min_snr_gamma, time_sampling=config.training.time_sampling,
      logit_normal_mean=config.training.logit_normal_mean,
      logit_normal_std=config.training.logit_normal_std, **conditional)


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
  if smp.shift != 1.0:
    options['shift'] = smp.shift
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


def sampler_cond(config: ml_collections.ConfigDict, batch_size: int
                 ) -> tuple[dict[str, jax.Array] | None, dict[str, jax.Array] | None]:
  """``(cond, null_cond)`` of ``batch_size`` samples; ``(None, None)`` for unconditional models.

  Class-conditional: ``cond = {'label': arange(B) % K}`` (every class in turn) and ``null_cond =
  {'label': full(B, K)}``, the null label the model learned with ``training.label_dropout``.
  """
  k = config.model.num_classes
  if not k:
    return None, None
  return ({'label': jnp.arange(batch_size, dtype=jnp.int32) % k},
          {'label': jnp.full((batch_size,), k, jnp.int32)})


def check_sampler_options(config: ml_collections.ConfigDict) -> None:
  """Traces (does not compile) the configured sampler on a stand-in model, so that an option the
  method rejects (an order above what it or num_steps allows, a grid it cannot use) stops the job
  before training, with the method's message and the config fields to change."""
  smp = config.sampling
  process = build_process(config.process)
  options = sampler_options(config)
  try:
    jax.eval_shape(lambda x: sampling.sample(
        lambda x, t, cond=None: jnp.zeros_like(x), process, method=smp.method,
        num_steps=smp.num_steps, key=jax.random.PRNGKey(0), x_T=x, **options),
                   jax.ShapeDtypeStruct((1, 2), jnp.float32))
  except (ValueError, TypeError) as e:
    raise ValueError(f'The sampling config (sampling.method={smp.method!r}, '
                     f'sampling.num_steps={smp.num_steps}, options {options}) is not valid: '
                     f'{e}') from e
