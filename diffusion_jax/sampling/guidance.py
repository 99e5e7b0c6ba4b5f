"""Conditioning and classifier-free guidance (Ho & Salimans 2022), rescaled (Lin et al. 2024).

``classifier_free_guidance`` turns a ``model_fn(x, t, cond)`` (DESIGN.md's contract: ``cond`` any
pytree whose leaves have the batch as leading axis, or None) into the ``fn(x, t)`` the methods
integrate. The conditioning is opaque (STYLE.md 15): it is checked and concatenated leaf by leaf,
never looked into. With guidance, the conditional and unconditional predictions come from ONE model
call on the doubled batch ``[x, x]`` with ``cond`` and ``null_cond`` concatenated leaf by leaf,
which keeps the network's batch large and its cost one evaluation per step.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.sampling import core


def _leaves(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
  """``(path, shape)`` of every leaf of ``tree`` (None has none)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), tuple(jnp.shape(leaf))) for path, leaf in flat]


def check_cond(cond: Any, batch_size: int, *, name: str = 'cond',
               allow_one: bool = False) -> None:
  """Raises ValueError unless every leaf of ``cond`` has leading axis ``batch_size``.

  Args:
    cond: a pytree of arrays, or None (nothing to check).
    batch_size: B, the batch of x.
    name: how the message calls the tree.
    allow_one: also accept a leading axis of 1 (broadcast over the batch).
  """
  for path, shape in _leaves(cond):
    if not shape or not (shape[0] == batch_size or (allow_one and shape[0] == 1)):
      want = f'{batch_size} (or 1)' if allow_one else f'{batch_size}'
      raise ValueError(f'{name}{path} has shape {shape}: every leaf of {name} needs the batch of '
                       f'x as its leading axis, B = {want}.')


def _check_null_cond(cond: Any, null_cond: Any, batch_size: int) -> None:
  """null_cond must have cond's tree structure, its leaves cond's shapes with batch B or 1."""
  cond_def, null_def = jax.tree.structure(cond), jax.tree.structure(null_cond)
  if cond_def != null_def:
    raise ValueError(f'null_cond must have the tree structure of cond: cond is {cond_def}, '
                     f'null_cond is {null_def}.')
  check_cond(null_cond, batch_size, name='null_cond', allow_one=True)
  for (path, c_shape), (_, u_shape) in zip(_leaves(cond), _leaves(null_cond)):
    if c_shape[1:] != u_shape[1:]:
      raise ValueError(f'null_cond{path} has shape {u_shape} but cond{path} has shape '
                       f'{c_shape}: they may differ only in the batch axis.')


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
                             cond: Any = None, null_cond: Any = None,
                             guidance_scale: float | jax.Array = 1.0,
                             guidance_rescale: float = 0.0
                             ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The ``fn(x, t)`` a sampler integrates: the model with its conditioning and guidance applied.

  Args:
    model_fn: ``model_fn(x: [B, ...], t: [B], cond) -> prediction``, always called with three
      positional arguments (``cond`` None for an unconditional model).
    batch_size: B, the batch of x_T (every leaf of ``cond`` must have it as leading axis).
    cond: the conditioning, any pytree of arrays ``[B, ...]``, or None.
    null_cond: the unconditional conditioning, with cond's tree structure; each leaf has cond's
      shape with batch B, or batch 1 (broadcast to B, e.g. one null label or one empty-prompt
      embedding for every example), and is cast to cond's leaf dtype. Needed for guidance.
    guidance_scale: w; ``uncond + w (cond - uncond)``, computed in float32 in the model's
      prediction space: a number, or an array of shape [], [1] or [B] (one w per example).
      ``1.0`` as a Python number (without rescale) is the plain conditional model: one call on
      the plain batch, ``null_cond`` unused. An array w always guides.
    guidance_rescale: phi in [0, 1] of Lin et al. (2024), applied to the guided prediction; a
      number or an array of shape [], [1] or [B].

  Returns:
    ``fn(x: [B, ...], t: [B]) -> prediction [B, ...]`` float32.

  Raises:
    ValueError: a leaf of cond or null_cond without the batch B (the message names its path and
      shape), null_cond of another structure or leaf shape, guidance without cond or
      null_cond, phi outside [0, 1], guidance_scale or guidance_rescale not a finite number or
      an array of shape [], [1] or [B].
  """
  for name, value in (('guidance_scale', guidance_scale), ('guidance_rescale', guidance_rescale)):
    if not isinstance(value, (numbers.Real, jax.Array, np.ndarray)) or isinstance(value, bool):
      raise ValueError(f'{name} must be a number or an array (guidance_scale 1.0: no guidance; '
                       f'guidance_rescale 0.0: none), got {value!r} ({type(value).__name__}).')
    if not isinstance(value, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(value))):
      raise ValueError(f'{name} must be finite, got {value}.')  # traced values are not checked
    shape = np.shape(value)
    if shape not in ((), (1,), (batch_size,)):
      raise ValueError(f'{name} must be a number, or an array of shape [B] = ({batch_size},) '
                       f'with one value per example, got shape {shape}.')
  check_cond(cond, batch_size)
  rescale_concrete = not isinstance(guidance_rescale, jax.core.Tracer)
  if rescale_concrete and not np.all((np.asarray(guidance_rescale) >= 0.0)
                                     & (np.asarray(guidance_rescale) <= 1.0)):
    raise ValueError(f'guidance_rescale must lie in [0, 1], got {guidance_rescale}.')
  plain = (isinstance(guidance_scale, numbers.Number) and guidance_scale == 1.0
           and isinstance(guidance_rescale, numbers.Number) and guidance_rescale == 0.0)
  if not plain and cond is None:
    raise ValueError('classifier-free guidance needs cond (the conditioning to guide towards); '
                     'got cond=None.')
  if null_cond is not None:
    _check_null_cond(cond, null_cond, batch_size)
  if plain:
    return lambda x, t: core.model_output(model_fn(x, t, cond), x.shape)
  if null_cond is None:
    array_note = ('' if isinstance(guidance_scale, numbers.Number) else
                  ' (an array guidance_scale guides even at 1.0; pass the number 1.0 for the '
                  'plain conditional model)')
    raise ValueError(f'guidance_scale={guidance_scale}, guidance_rescale={guidance_rescale}: '
                     'classifier-free guidance needs null_cond, the conditioning of the '
                     "unconditional model (cond's tree, e.g. {'label': [num_classes]})"
                     f'{array_note}.')
  per_example = lambda v, x: (v if isinstance(v, numbers.Number) or np.ndim(v) == 0
                              else jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1)))

  def double(c, u):
    u = jnp.broadcast_to(jnp.asarray(u), jnp.shape(c)).astype(jnp.asarray(c).dtype)
    return jnp.concatenate([c, u])

  both = jax.tree.map(double, cond, null_cond)

  def guided_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    out = core.model_output(model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both),
                            (2 * x.shape[0],) + tuple(x.shape[1:]))
    cond_out, uncond_out = jnp.split(out, 2)
    guided = uncond_out + per_example(guidance_scale, x) * (cond_out - uncond_out)
    if not (isinstance(guidance_rescale, numbers.Number) and guidance_rescale == 0.0):
      guided = rescale_guidance(guided, cond_out, per_example(guidance_rescale, x))
    return guided

  return guided_fn
