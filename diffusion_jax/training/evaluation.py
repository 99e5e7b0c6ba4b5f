"""``--mode=eval``: bits/dim of a checkpoint's EMA model on ``data.eval_split``.

Only the EMA params are read from the checkpoint, never the optimizer state.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import input_pipeline, likelihood, preconditioning, writers
from diffusion_jax.training import builders


def combine_bits_per_dim(means, stderrs, sizes) -> np.ndarray:
  """``[sum of n_i * mean_i, sum of (n_i * stderr_i)^2, sum of n_i]`` over independent batches.

  The overall mean weights each batch by its size, and so does its standard error (sqrt of the
  summed variances of the batch sums, over N). Sums of several processes add up.
  """
  n = np.asarray(sizes, np.float64)
  return np.array([np.sum(n * np.asarray(means)), np.sum((n * np.asarray(stderrs))**2), n.sum()])


# Sources whose images are 8-bit levels: dequantize='auto' is 'uniform' for them.
_8BIT_SOURCES = ('folder', 'tfds')


def dequantization(config: ml_collections.ConfigDict) -> str | None:
  """``eval.dequantize`` as ``likelihood.bits_per_dim`` takes it: 'uniform' or None.

  ``'auto'`` (the default) follows the data: 'uniform' for 8-bit images (folders, TFDS, uint8
  arrays), None for the rest (float arrays; scikit-learn's digits, which have 17 gray levels, not
  256), whose bits/dim is then that of a density, -log2 p(x) / D.
  """
  choice = config.eval.dequantize
  if choice != 'auto':
    return None if choice == 'none' else choice
  d = config.data
  if d.source == 'array':
    header = input_pipeline.array_header(d.path, text_key=d.text_key or None) if d.path else None
    return 'uniform' if header is not None and header[1] == np.uint8 else None
  return 'uniform' if d.source in _8BIT_SOURCES else None


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Bits/dim of the EMA model on ``data.eval_split`` via the probability-flow ODE.

  Each process evaluates its own shard of the split (its share of ``eval.num_examples``); the
  sums of every process are combined. Writes ``eval_bpd``, ``eval_bpd_stderr`` and
  ``eval_num_examples`` to the workdir's metrics at the checkpoint's step and returns them.
  """
  s, params, step = builders.restore_ema_params(config, workdir)
  s.checkpointer.close()
  data = builders.create_data(config, split=config.data.eval_split, num_epochs=1, shuffle=False,
                              batch_size=config.eval.batch_size, random_flip=False)
  ev = config.eval
  model_fn = preconditioning.make_model_fn(
      s.network_fn, params, s.process, parameterization=config.model.parameterization,
      noise_input_kind=config.model.noise_input)
  prediction = preconditioning.prediction_type(config.model.parameterization)
  means, stderrs, sizes = [], [], []
  key = jax.random.PRNGKey(config.seed + 3)
  dequantize = dequantization(config)
  share = -(-ev.num_examples // jax.process_count())
  # Counted in examples, updated after each batch's ODE solves (minutes each on a CPU): a bar
  # over the iterator showed '0it' until the second batch and never counted the last one.
  available = data.num_examples // ev.batch_size * (ev.batch_size // jax.process_count())
  bar = tqdm.tqdm(total=min(share, available), desc='bits/dim',
                  unit='example', disable=jax.process_index() != 0, dynamic_ncols=True)
  for i, batch in enumerate(data.iterator):
    x = batch['x'][:share - sum(sizes)]
    mean, stderr = likelihood.bits_per_dim(
        model_fn, s.process, x, key=jax.random.fold_in(key, i), prediction=prediction,
        num_draws=ev.num_draws, dequantize=dequantize, rtol=ev.rtol, atol=ev.atol,
        t_start=ev.t_start or None)
    means.append(mean)
    stderrs.append(stderr)
    sizes.append(len(x))
    bar.update(len(x))
    bar.set_postfix_str(f'{np.dot(sizes, means) / sum(sizes):.4f} bits/dim')
    if sum(sizes) >= share:
      break
  bar.close()
  sums = combine_bits_per_dim(means, stderrs, sizes)
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
