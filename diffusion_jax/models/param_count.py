"""Parameter counting by shape evaluation only (no initialization, no FLOPs)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def count_params(module: nn.Module, input_shape: Sequence[int], *, num_classes: int = 0) -> int:
  """Number of parameters of ``module`` for inputs of ``input_shape``.

  Traces ``module.init`` with ``jax.eval_shape``, so even the 35.7M-parameter DDPM U-Net is
  counted in well under a second and without allocating its weights.

  Args:
    module: a network with the shared signature ``(x, c_noise, label=None, *, train=False)``.
    input_shape: ``[B, ...]`` shape of ``x``.
    num_classes: when > 0, labels ``label: [B]`` are passed too (the module's own ``num_classes``
      decides the size of its class table either way).

  Returns:
    The total number of scalar parameters.
  """
  batch = input_shape[0]
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  c_noise = jax.ShapeDtypeStruct((batch,), jnp.float32)
  cond = {'label': jax.ShapeDtypeStruct((batch,), jnp.int32)} if num_classes > 0 else {}
  init = functools.partial(module.init, train=False)
  variables = jax.eval_shape(lambda key, x, c, cond: init(key, x, c, **cond), jax.random.key(0),
                             x, c_noise, cond)
  return int(sum(np.prod(p.shape, dtype=np.int64) for p in jax.tree.leaves(variables['params'])))
