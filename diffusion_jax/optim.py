"""Optimizers and learning-rate schedules from plain arguments (the config stops at training/).

Partial training is a partition of the one parameter tree, not a flag in the layers:
``make_optimizer(..., trainable=mask)`` routes the trainable leaves through the optimizer and the
others through ``optax.set_to_zero()`` with ``optax.multi_transform``. Trees that never train at
all (an autoencoder, a text encoder, a teacher) are not parameters: they travel as the ``frozen``
argument of ``training.step.train_step``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

# None (every leaf trains), a pytree of bools with the params' structure, or a function
# (path, leaf) -> bool, path as from jax.tree_util.tree_map_with_path.
Trainable = Any

OPTIMIZERS = ('adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'linear')


def learning_rate_schedule(*, learning_rate: float, warmup_steps: int = 0, decay: str = 'constant',
                           total_steps: int | None = None, end_factor: float = 0.0
                           ) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then ``decay``.

  'constant' keeps the peak (DDPM: 5000 warmup steps, then 2e-4 constant, Ho et al. 2020 App. B);
  'cosine' and 'linear' decay to ``end_factor * learning_rate`` at ``total_steps``.
  """
  if decay not in SCHEDULES:
    raise ValueError(f'optim.schedule={decay!r} is not known; use one of {SCHEDULES}.')
  if warmup_steps < 0:
    raise ValueError(f'optim.warmup_steps must be >= 0, got {warmup_steps}.')
  if decay == 'constant':
    if warmup_steps == 0:
      return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps),
         optax.constant_schedule(learning_rate)], [warmup_steps])
  if total_steps is None or total_steps <= warmup_steps:
    raise ValueError(f"optim.schedule={decay!r} needs training.num_train_steps ({total_steps}) > "
                     f'optim.warmup_steps ({warmup_steps}).')
  if decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps,
                                              end_value=end_factor * learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps),
       optax.linear_schedule(learning_rate, end_factor * learning_rate,
                             total_steps - warmup_steps)],
      [warmup_steps])


def _decay_mask(params):
  """Weight decay on every parameter except the fixed Gaussian-Fourier frequencies of NCSN++.

  Those frequencies (``GaussianFourierProjection_0/W``) are kept as a parameter for checkpoint
  compatibility with score_sde but never trained (stop_gradient); decoupled decay would still
  shrink them.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any('GaussianFourierProjection' in str(k) for k in path), params)


def _labels(trainable: Any) -> Callable[[Any], Any]:
  """``params -> pytree of 'train' | 'freeze'`` for ``optax.multi_transform``."""

  def labels(params):
    if callable(trainable):
      mask = jax.tree_util.tree_map_with_path(lambda path, leaf: bool(trainable(path, leaf)),
                                              params)
    else:
      mask = trainable
    return jax.tree.map(lambda m: 'train' if m else 'freeze', mask)

  return labels


def make_optimizer(*, name: str = 'adam', learning_rate: float = 2e-4, warmup_steps: int = 0,
                   schedule: str = 'constant', total_steps: int | None = None,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                   trainable: Trainable = None) -> optax.GradientTransformation:
  """Adam or AdamW with warmup and global-norm gradient clipping (DDPM clips at 1.0).

  Args:
    name, learning_rate, warmup_steps, schedule, total_steps, b1, b2, eps, weight_decay: the
      optimizer and its learning-rate schedule (``learning_rate_schedule``).
    grad_clip: global-norm clipping threshold; None or <= 0 turns clipping off.
    trainable: which leaves of the params train. None: all of them. Otherwise a pytree of bools
      with the params' structure, or ``fn(path, leaf) -> bool``. The other leaves get
      ``optax.set_to_zero()``: their updates are zero (the leaves stay bitwise as they are), the
      optimizer stores no moments for them (``optax.MaskedNode`` in their place), and the global
      norm that clipping uses is the norm of the trainable leaves' gradients alone.

  Returns:
    An optax transformation: clip_by_global_norm (when ``grad_clip`` is set), then the optimizer
    with the learning-rate schedule; with ``trainable``, that chain inside
    ``optax.multi_transform({'train': chain, 'freeze': set_to_zero()}, ...)``.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'optim.optimizer={name!r} is not known; use one of {OPTIMIZERS}.')
  lr = learning_rate_schedule(learning_rate=learning_rate, warmup_steps=warmup_steps,
                              decay=schedule, total_steps=total_steps)
  if name == 'adam':
    if weight_decay:
      raise ValueError('optim.weight_decay needs optim.optimizer="adamw" (Adam would fold it into '
                       'the gradient, which is not decoupled weight decay).')
    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  else:
    opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
  tx = optax.chain(*parts, opt)
  if trainable is None:
    return tx
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, _labels(trainable))
