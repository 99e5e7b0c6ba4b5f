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

from diffusion_jax import likelihood, preconditioning, writers
from diffusion_jax.training import builders


def combine_bits_per_dim(means, stderrs, sizes) -> np.ndarray:
  """``[sum of n_i * mean_i, sum of (n_i * stderr_i)^2, sum of n_i]`` over independent batches.

  The overall mean weights each batch by its size, and so does its standard error (sqrt of the
  summed variances of the batch sums, over N). Sums of several processes add up.
  """
  n = np.asarray(sizes, np.float64)
  return np.array([np.sum(n * np.asarray(means)), np.sum((n * np.asarray(stderrs))**2), n.sum()])


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
  dequantize = None if ev.dequantize == 'none' else ev.dequantize
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
