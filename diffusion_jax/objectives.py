"""Training objectives: what a task minimizes, as ``loss_fn(params, frozen, batch, key)``.

A task hands the trainer one function

    loss_fn(params, frozen, batch, key) -> (loss, metrics)

``params`` is the tree that trains (``training.step.train_step`` differentiates, clips, optimizes
and EMAs it and nothing else); ``frozen`` is whatever else the loss reads (an autoencoder, a text
encoder, a teacher; None for the models of today), passed to the jitted step as an argument and
never differentiated; ``batch`` is one global batch; ``key`` is the step's own key
(``fold_in(run_key, step)``). ``metrics`` are scalars, averaged over the logging interval.

``denoising`` is the first objective: the denoising loss of ``losses.denoising_loss`` with its
weightings, time sampling and condition dropout for classifier-free guidance.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax import losses, preconditioning

LossFn = Callable[[Any, Any, dict[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]
# cond_fn(frozen, batch) -> cond: the network's conditioning pytree for a batch (leaves [B, ...]).
CondFn = Callable[[Any, dict[str, jax.Array]], Any]


def drop_cond(key: jax.Array, cond: Any, null_cond: Any, rate: float, batch_size: int) -> Any:
  """Replaces ``cond`` by ``null_cond`` for a random ``rate`` of the examples, leaf by leaf.

  One Bernoulli draw per example decides for every leaf of that example, so a dropped example
  loses all of its conditioning at once (Ho & Salimans 2022, Algorithm 1, with p_uncond = rate).
  Nothing here looks at what the leaves mean.

  Args:
    key: PRNG key of the draw.
    cond: pytree with leaves ``[B, ...]``.
    null_cond: pytree of the same structure whose leaves broadcast against cond's (a scalar, or
      ``[1, ...]``), e.g. ``{'label': num_classes}`` or an empty prompt's embedding.
    rate: probability of dropping an example's conditioning.
    batch_size: B.

  Returns:
    A pytree like ``cond``.
  """
  drop = jax.random.bernoulli(key, rate, (batch_size,))  # [B]

  def leaf(c, null):
    mask = drop.reshape((batch_size,) + (1,) * (c.ndim - 1))
    return jnp.where(mask, jnp.asarray(null, c.dtype), c)

  return jax.tree.map(leaf, cond, null_cond)


def denoising(*, network_fn: preconditioning.NetworkFn, process,
              parameterization: preconditioning.Parameterization = 'eps',
              noise_input: preconditioning.NoiseInput = 't',
              weighting: losses.Weighting = 'uniform', min_snr_gamma: float = 5.0,
              time_sampling: str = 'uniform', logit_normal_mean: float = 0.0,
              logit_normal_std: float = 1.0, cond_fn: CondFn | None = None,
              null_cond: Any = None, cond_dropout: float = 0.0) -> LossFn:
  """The denoising objective of a network read through ``preconditioning``.

  Args:
    network_fn: ``network_fn(params, x, c_noise, cond, *, train, rngs) -> F``.
    process: the noise process.
    parameterization: how the network's output is read ('eps', 'x0', 'v', 'score'); also the
      loss's prediction type.
    noise_input: the network's noise-conditioning input ('t', 't999', 'log_sigma').
    weighting: loss weighting ('uniform', 'snr', 'min_snr', 'likelihood'; see ``losses``).
    min_snr_gamma: gamma of 'min_snr'.
    time_sampling: 'uniform', 'importance' or 'logit_normal' (SD3; ``losses.sample_times``).
    logit_normal_mean, logit_normal_std: m and s of 'logit_normal'.
    cond_fn: ``cond_fn(frozen, batch) -> cond``; None for an unconditional model. Class labels:
      ``lambda frozen, batch: {'label': batch['label'].astype(jnp.int32)}``.
    null_cond: the unconditional input, broadcasting against cond leaf by leaf (class labels:
      ``{'label': num_classes}``); needed when ``cond_dropout > 0``.
    cond_dropout: probability of training an example on ``null_cond`` instead of its cond, for
      classifier-free guidance (Ho & Salimans 2022 use 0.1-0.2).

  Returns:
    ``loss_fn(params, frozen, batch, key) -> (loss, metrics)`` with ``batch = {'x': [B, ...],
    ...}``; metrics: loss, mse, loss_q0..loss_q3 (``losses.denoising_loss``). The key is split as
    ``k_loss, k_drop, k_cond = jax.random.split(key, 3)``: times and noise, network dropout,
    condition dropout.
  """
  if not 0.0 <= cond_dropout < 1.0:
    raise ValueError(f'cond_dropout must be in [0, 1), got {cond_dropout}.')
  if cond_dropout > 0 and (cond_fn is None or null_cond is None):
    raise ValueError(f'cond_dropout={cond_dropout} needs cond_fn and null_cond (the input that '
                     'replaces a dropped cond).')

  def loss_fn(params, frozen, batch, key):
    k_loss, k_drop, k_cond = jax.random.split(key, 3)
    cond = None
    if cond_fn is not None:
      cond = cond_fn(frozen, batch)
      if cond_dropout > 0:
        cond = drop_cond(k_cond, cond, null_cond, cond_dropout, batch['x'].shape[0])
    model_fn = preconditioning.make_model_fn(
        network_fn, params, process, parameterization=parameterization,
        noise_input_kind=noise_input, train=True, dropout_key=k_drop)
    return losses.denoising_loss(
        model_fn, process, batch['x'], k_loss, prediction=parameterization, weighting=weighting,
        min_snr_gamma=min_snr_gamma, time_sampling=time_sampling,
        logit_normal_mean=logit_normal_mean, logit_normal_std=logit_normal_std, cond=cond)

  return loss_fn
