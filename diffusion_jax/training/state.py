"""The training state: a pytree of step, params, EMA params and optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  """step, params, EMA params and optimizer state; the optimizer itself is static.

  The network is not part of the state: the objective closes over it (``objectives``), so the
  same state type serves any task.

  Attributes:
    step: int32 scalar, the number of updates applied (skipped non-finite updates count too, so
      that the data and the keys stay in step with the step counter).
    params: the tree that trains (float32).
    ema_params: exponential moving average of params (used for sampling and evaluation).
    opt_state: the optax state of params.
    tx: the optax transformation (static).
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, params: Any, tx: optax.GradientTransformation) -> 'TrainState':
    """Step 0: EMA params a copy of params, a fresh optimizer state."""
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params), tx=tx)
