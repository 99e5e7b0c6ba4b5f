"""Classifier-free guidance (Ho & Salimans 2022) and its rescaling (Lin et al. 2024).

``classifier_free_guidance`` turns a conditional ``model_fn(x, t, y)`` into the ``model_fn(x, t)``
the methods integrate. The conditional and unconditional predictions come from ONE model call on
the doubled batch ``[x, x]`` with labels ``[labels, null_label]``, which keeps the network's batch
large and its cost one evaluation per step.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Callable

import jax
import jax.numpy as jnp


def _accepts_labels(model_fn: Callable[..., jax.Array]) -> bool:
  """Whether ``model_fn`` can take a third argument ``y`` (a conditional model)."""
  try:
    params = list(inspect.signature(model_fn).parameters.values())
  except (TypeError, ValueError):  # builtins, some wrappers: assume it does
    return True
  if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
    return True
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return len(positional) >= 3


def rescale_guidance(guided: jax.Array, cond: jax.Array, phi: float) -> jax.Array:
  """Guidance rescale of Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", eqs. 15-16.

  ``x_rescaled = guided * std(cond) / std(guided)``,
  ``x_final = phi x_rescaled + (1 - phi) guided``, the standard deviations taken per example over
  all but the batch axis. guided, cond: [B, ...].
  """
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond, axis=axes, keepdims=True)
  std_guided = jnp.std(guided, axis=axes, keepdims=True)
  rescaled = guided * (std_cond / jnp.maximum(std_guided, 1e-12))
  return phi * rescaled + (1.0 - phi) * guided


def classifier_free_guidance(model_fn: Callable[..., jax.Array], *, batch_size: int,
                             guidance_scale: float | None = None, labels: jax.Array | None = None,
                             null_label: int | None = None, guidance_rescale: float = 0.0
                             ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The ``model_fn(x, t)`` a sampler integrates, with guidance or conditioning applied.

  Args:
    model_fn: ``model_fn(x, t, y=None) -> prediction``.
    batch_size: B, the batch of x_T (to check ``labels``).
    guidance_scale: w; ``uncond + w (cond - uncond)``, computed in float32 in the model's
      prediction space. ``None``: no guidance. ``1.0`` (a Python number) is the conditional model,
      called on the plain batch.
    labels: [B] integer labels; needed with ``guidance_scale``; alone, they condition the model.
    null_label: the unconditional label; needed with ``guidance_scale``.
    guidance_rescale: phi in [0, 1] of Lin et al. (2024), applied to the guided prediction.

  Returns:
    ``fn(x: [B, ...], t: [B]) -> prediction [B, ...]`` float32.
  """
  if guidance_scale is None:
    if guidance_rescale:
      raise ValueError('guidance_rescale needs guidance_scale (classifier-free guidance).')
    if labels is None:
      return lambda x, t: jnp.asarray(model_fn(x, t)).astype(jnp.float32)
  if labels is None:
    raise ValueError('guidance_scale was given but no labels: classifier-free guidance needs '
                     '`labels` [B] and `null_label`.')
  if not _accepts_labels(model_fn):
    raise ValueError('labels were given but model_fn takes no labels: it must be '
                     'model_fn(x, t, y) for conditioning or guidance.')
  labels = jnp.asarray(labels)
  if labels.shape != (batch_size,) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must be integers of shape [B] = ({batch_size},), got '
                     f'{labels.dtype} {labels.shape}.')
  if guidance_scale is None:
    return lambda x, t: jnp.asarray(model_fn(x, t, labels)).astype(jnp.float32)
  if null_label is None:
    raise ValueError('guidance_scale needs null_label, the label of the unconditional model.')
  if not 0.0 <= float(guidance_rescale) <= 1.0:
    raise ValueError(f'guidance_rescale must lie in [0, 1], got {guidance_rescale}.')
  if (isinstance(guidance_scale, numbers.Number) and guidance_scale == 1.0
      and not guidance_rescale):
    # w = 1 is exactly the conditional prediction: skip the unconditional half.
    return lambda x, t: jnp.asarray(model_fn(x, t, labels)).astype(jnp.float32)
  y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])

  def guided_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    out = jnp.asarray(model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y))
    cond, uncond = jnp.split(out.astype(jnp.float32), 2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
      guided = rescale_guidance(guided, cond, guidance_rescale)
    return guided

  return guided_fn
