"""``train_and_evaluate``: the training job as a function (``--mode=train``, or a notebook).

It builds everything from the config, restores the workdir's checkpoint (or starts from
``training.init_from`` / ``init_params``, or from scratch), then runs the jitted step, logging
metrics, saving checkpoints, writing sample grids and honouring preemption.

Outputs in ``workdir`` (any path etils.epath and orbax support, ``gs://`` included):
``checkpoints/`` (orbax), ``config.json`` (the whole config; ``config.config_from_json`` reads it
back), ``metrics.jsonl``, ``tensorboard/``, ``samples/*.png``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax import sharding, writers
from diffusion_jax.training import builders, inference
from diffusion_jax.training import config as config_lib
from diffusion_jax.training import step as step_lib
from diffusion_jax.training.preemption import Preemption
from diffusion_jax.training.state import TrainState


# tqdm's default bar without its rate field ({rate_fmt}); the postfix carries the rates.
BAR_FORMAT = '{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}{postfix}]'


def _rate(x: float) -> str:
  return f'{x:.0f}' if x >= 100 else f'{x:.3g}'


def bar_postfix(summary: dict[str, float]) -> str:
  """``loss=0.0312, 9.87 steps/s, 632 images/s``: the progress bar's figures of a log interval."""
  return (f'loss={summary["loss"]:.4f}, {_rate(summary["steps_per_sec"])} steps/s, '
          f'{_rate(summary["images_per_sec"])} images/s')


def _global_batches(batches: list[dict[str, np.ndarray]], mesh, stacked: bool):
  """This process's batches as global arrays; ``stacked``: a leading axis of k steps."""
  if not stacked:
    return sharding.global_batch(batches[0], mesh)
  spec = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))
  return {k: jax.make_array_from_process_local_data(spec, np.stack([b[k] for b in batches]))
          for k in batches[0]}


def _merge_skipped(data) -> None:
  """Every process's unreadable files into every process's count (and so into the saved state).

  Each process decodes only its slice of each global batch, so each meets only some of the
  unreadable files; a collective, so every process calls it at the same step (log and save).
  """
  if jax.process_count() == 1:
    return
  local = np.asarray(data.skipped(), np.int32)
  sizes = multihost_utils.process_allgather(np.int32(len(local)))
  padded = np.full(max(int(np.max(sizes)), 1), -1, np.int32)
  padded[:len(local)] = local
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  data.add_skipped(gathered[gathered >= 0].tolist())


def _check_data(config: ml_collections.ConfigDict, data) -> None:
  shape = data.element_shape
  if config.model.name == 'unet' and len(shape) != 3:
    raise ValueError(f'model.name="unet" needs images [H, W, C]; the data has examples of shape '
                     f'{shape}. Use model.name="mlp" for vectors.')
  if config.model.num_classes and data.num_classes and data.num_classes > config.model.num_classes:
    raise ValueError(f'The data has {data.num_classes} classes but model.num_classes='
                     f'{config.model.num_classes}; set --config.model.num_classes='
                     f'{data.num_classes}.')


def _initial_state(s: builders.Setup, data, init_params: Any) -> tuple[TrainState, int]:
  """The workdir's checkpoint if there is one, else init params, else a fresh state.

  Resume wins: with a checkpoint in the workdir, ``init_params`` / ``training.init_from`` are
  not read at all (a warning says so). Otherwise they are checked against the model before
  anything is placed or trained (a mismatch raises ValueError naming the first differing path).
  """
  init_from = s.config.training.init_from
  restored = s.checkpointer.restore(s.abstract_state)
  if restored is not None:
    state, data_state, start_step = restored
    if data_state is not None:
      data.iterator.set_state(data_state)
    logging.info('Resumed from step %d of %s.', start_step, s.checkpointer.directory)
    if init_params is not None or init_from:
      logging.warning('Resuming from the checkpoint of step %d in %s; %s is ignored (it only '
                      'starts a fresh workdir).', start_step, s.checkpointer.directory,
                      'init_params' if init_params is not None
                      else f'training.init_from={init_from!r}')
    return state, start_step
  params = builders.load_init_params(s, init_params)
  if params is None:
    return builders.fresh_state(s), 0
  logging.info('Starting from %s: params and EMA params from it, a fresh optimizer state.',
               'init_params' if init_params is not None
               else f'the EMA params of training.init_from={init_from!r}')
  return builders.state_from_params(s, params), 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       init_params: Any = None) -> TrainState:
  """Trains (resuming from ``workdir/checkpoints`` if there is one) and writes samples.

  On a CPU, call ``cpu_runtime.configure()`` before the first JAX computation of the process, as
  ``main`` does (see that module).

  Args:
    config: a config of the fields of ``diffusion_jax/configs/default.py``.
    workdir: where checkpoints, metrics and samples go (local or ``gs://``).
    init_params: params to start from when the workdir has no checkpoint (params and EMA params
      both start there; the optimizer state is fresh); overrides ``training.init_from``. A tree
      that does not match the model raises ValueError naming the first differing path.

  Returns:
    The final TrainState.
  """
  config_lib.validate_config(config)
  if config.training.task == 'ldm':  # both stages of latent diffusion, each its own run
    from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
    return latent.run_two_stages(config, workdir, functools.partial(train_and_evaluate,
                                                                    init_params=init_params))
  is_chief = jax.process_index() == 0
  data = builders.create_data(config)
  _check_data(config, data)
  s = builders.setup(config, workdir, data.element_shape)
  element_shape = s.element_shape
  task = builders.build_task(s, data)
  if task.data is not None:  # e.g. cached latents: the encoders are not run again
    data = task.data
  state, start_step = _initial_state(s, data, init_params)
  frozen = task.frozen
  if frozen is not None:
    frozen = sharding.put_params(frozen, s.mesh, min_size=config.mesh.fsdp_min_size)

  writer = writers.MetricWriter(workdir, enabled=is_chief)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  if is_chief:
    logging.info('Parameters: %s (%.2fM). Devices: %d, mesh %s.', f'{num_params:,}',
                 num_params / 1e6, jax.device_count(), dict(s.mesh.shape))
    changed = config_lib.differences_from_default(config)
    logging.info('Config: diffusion_jax/configs/default.py with %s; the whole config is in %s.',
                 ', '.join(f'{k}={v!r}' for k, v in changed.items()) or 'no change',
                 config_lib.write_config_json(config, workdir))
    if start_step == 0:
      writer.write_text('config', str(config))
      writer.write(0, {'num_params': num_params})
    print(f'diffusion_jax: {num_params:,} parameters, {jax.device_count()} device(s), '
          f'start at step {start_step} of {config.training.num_train_steps}.', flush=True)

  k = config.training.steps_per_call
  fn = step_lib.train_steps if k > 1 else step_lib.train_step
  step_fn = jax.jit(functools.partial(fn, loss_fn=task.loss_fn,
                                      ema_decay=config.training.ema_decay,
                                      lr_schedule=s.lr_schedule),
                    donate_argnums=(0,), out_shardings=(s.state_shardings,
                                                        sharding.replicated(s.mesh)))
  base_key = jax.random.PRNGKey(config.seed + 1)  # not the init key
  sampler = None
  num_grid = config.training.num_sample_images

  grid_prompts = list(task.prompts or [])

  def write_grid(st, step):
    nonlocal sampler
    if not num_grid or len(element_shape) != 3 or config.training.task == 'autoencoder':
      return
    if s.latent is not None:  # text-to-image: the first captions of the data, guided
      from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
      if grid_prompts:
        images = latent.generate(config, s, st.ema_params, grid_prompts[:num_grid],
                                 key=jax.random.PRNGKey(step), batch_size=len(grid_prompts))
        inference.write_png(workdir, f'step_{step:07d}.png', images)
      return
    n = inference.devices_multiple(num_grid, s.mesh)
    sampler = sampler or inference.make_sampler(config, s, n)
    images = inference.to_host(sampler(st.ema_params, jax.random.PRNGKey(step)))
    inference.write_png(workdir, f'step_{step:07d}.png', images[:num_grid])

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
    extra = {'frozen': frozen} if task.save_frozen else {}
    _merge_skipped(data)
    s.checkpointer.save(step, st, data_state=data.iterator.get_state(), **extra)

  pending: list[dict[str, jax.Array]] = []
  nonfinite_run = 0
  t_last, step_last = time.time(), start_step
  total = config.training.num_train_steps
  # One bar: steps done, elapsed and ETA (tqdm's), then loss, steps/s and images/s of the last
  # log interval (ours). tqdm's own rate is left out: a second steps/s figure, smoothed over
  # other intervals and counting the compilation, disagreed with the logged one.
  bar = tqdm.tqdm(total=total, initial=start_step, disable=not is_chief, unit='step',
                  dynamic_ncols=True, mininterval=1.0, bar_format=BAR_FORMAT)
  step = start_step
  with Preemption() as preemption:
    while step < total:
      batches = []
      for i in range(k):
        batches.append(task.prepare_batch(next(data.iterator), step + i))
      batch = _global_batches(batches, s.mesh, stacked=k > 1)
      state, metrics = step_fn(state, batch, base_key, frozen)
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
        _merge_skipped(data)
        summary.update(skipped_steps=int(skipped.sum()), steps_per_sec=steps_per_s,
                       images_per_sec=steps_per_s * config.training.batch_size,
                       data_skipped_files=data.num_skipped())
        if task.counters:
          summary.update({f'{name}_captions': count for name, count in task.counters.items()})
        writer.write(step, summary)
        bar.set_postfix_str(bar_postfix(summary))
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
  if config.training.task == 'autoencoder':  # the scale factor, and the model as a vae/ dir
    from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
    latent.finish_autoencoder(config, workdir, state.ema_params)
  elif config.training.task == 'latent_diffusion':
    from diffusion_jax.training import latent  # pylint: disable=import-outside-toplevel
    if latent.diffusers_root(config.training.init_from) is not None:
      latent.save_diffusers(config, workdir, state.ema_params)  # fine-tuned, as diffusers reads
  if is_chief:
    # Every path as the user gave the workdir (the checkpointer's own is made absolute).
    out = epath.Path(workdir)
    samples = f', samples {out / "samples"}' if num_grid else ''
    print(f'diffusion_jax: trained to step {step}. Checkpoints {out / "checkpoints"}, metrics '
          f'{out / "metrics.jsonl"}{samples}.', flush=True)
  return state
