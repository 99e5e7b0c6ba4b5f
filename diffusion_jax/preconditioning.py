"""From a network's raw output to the prediction a process expects.

The network computes ``F(x, c_noise)`` and knows nothing of processes (Karras et al. 2022, Sec. 5,
EDM's ``EDMPrecond``). This module chooses the noise-conditioning input ``c_noise`` from the time
``t`` and reads ``F`` as one of the prediction types of ``processes.convert_prediction``:

- ``parameterization='eps'``, ``'x0'``, ``'v'`` or ``'flow'``: ``F`` is that quantity (Ho et al.
  2020 use eps; Salimans & Ho 2022 use v; rectified flow, Esser et al. 2024, the velocity
  ``eps - x0``).
- ``parameterization='score'``: ``F / sigma(t)`` is the score, as NCSN++ with ``scale_by_sigma``
  (Song et al. 2021, score_sde ``models/ncsnpp.py``).

Noise inputs (``c_noise``):
- ``'t'``: the time itself (the DDPM step 1..N for ``DiscreteVP``, as Ho et al.).
- ``'t999'``: ``999 * t``, the label score_sde feeds DDPM++ for continuous VP/sub-VP SDEs on [eps, 1]
  (and the ``1000 t`` scale SD3 feeds its network for rectified flow on [0, 1]).
- ``'log_sigma'``: ``log sigma(t)``, the label of NCSN++ for VE SDEs.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from diffusion_jax import processes

Parameterization = Literal['eps', 'x0', 'v', 'score', 'flow']
NoiseInput = Literal['t', 't999', 'log_sigma']
NOISE_INPUTS = ('t', 't999', 'log_sigma')

# network_fn(params, x, c_noise, cond, *, train, rngs) -> F, same shape as x; cond: a pytree whose
# leaves have the batch as leading axis, or None.
NetworkFn = Callable[..., jax.Array]


def noise_input(process, t: jax.Array, kind: NoiseInput) -> jax.Array:
  """The network's noise-conditioning input for times ``t: [B]``; returns ``[B]`` float32."""
  t = jnp.asarray(t, jnp.float32)
  if kind == 't':
    return t
  if kind == 't999':
    return 999.0 * t
  if kind == 'log_sigma':
    return jnp.log(process.sigma(t))
  raise ValueError(f'noise_input={kind!r} is not known; use one of {NOISE_INPUTS}.')


def _is_variance_exploding(process) -> bool:
  """True for processes that only add noise (alpha = 1 throughout, the VE SDE / SMLD)."""
  return bool(abs(float(process.log_alpha(process.t_max))) < 1e-6)


def check_model_process(noise_input_kind: NoiseInput, parameterization: Parameterization,
                        process) -> None:
  """Raises ValueError when a model's conditioning does not fit ``process``.

  A VE model (NCSN++, conditioned on ``log sigma``) only ever saw ``alpha = 1``; a VP / sub-VP
  model conditioned on ``999 t`` saw ``t in [eps, 1]``, which neither a VE process (alpha = 1, other
  sigmas at the same t) nor a ``DiscreteVP`` (t in [1, N]) gives it. Called by the trainer before
  it pairs a network with a process (e.g. when a checkpoint's config is overridden).

  Args:
    noise_input_kind: the network's ``c_noise`` kind (``NOISE_INPUTS``).
    parameterization: how its output is read (``processes.PREDICTIONS``).
    process: the process the model is asked to serve.
  """
  prediction_type(parameterization)
  if noise_input_kind not in NOISE_INPUTS:
    raise ValueError(f'noise_input={noise_input_kind!r} is not known; use one of {NOISE_INPUTS}.')
  name = type(process).__name__
  ve = _is_variance_exploding(process)
  if noise_input_kind == 'log_sigma' and not ve:
    raise ValueError(
        f"a VE model (noise_input='log_sigma', as NCSN++ for the VE SDE) was asked for the "
        f'{name} process, whose alpha(t) decays (a VP-type process); use a VE process '
        f"(sde.VESDE) or a model trained with noise_input='t999' (VP/sub-VP SDEs) or 't' "
        f'(DiscreteVP).')
  if noise_input_kind == 't999':
    if ve:
      raise ValueError(
          f"a VP model (noise_input='t999', trained on a VP or sub-VP SDE) was asked for the VE "
          f"process {name}; use sde.VPSDE / sde.SubVPSDE, or a model trained with "
          f"noise_input='log_sigma' for VE.")
    if float(process.t_max) > 1.0 + 1e-6:
      raise ValueError(
          f"noise_input='t999' expects continuous times in [eps, 1]; {name} has t_max = "
          f"{process.t_max} (for DiscreteVP use noise_input='t').")


def prediction_type(parameterization: Parameterization) -> processes.Prediction:
  """The prediction type a model_fn built with ``parameterization`` returns."""
  if parameterization not in processes.PREDICTIONS:
    raise ValueError(f'parameterization={parameterization!r} is not known; use one of '
                     f'{processes.PREDICTIONS}.')
  return parameterization


def apply_preconditioning(raw: jax.Array, x: jax.Array, t: jax.Array, process, *,
                          parameterization: Parameterization) -> jax.Array:
  """Turns the raw network output ``raw: [B, ...]`` into the prediction ``prediction_type(...)``."""
  prediction_type(parameterization)
  raw = raw.astype(jnp.float32)
  if parameterization == 'score':
    return raw / processes._bcast(process.sigma(t), x)  # pylint: disable=protected-access
  return raw


def make_model_fn(network_fn: NetworkFn, params: Any, process, *,
                  parameterization: Parameterization = 'eps', noise_input_kind: NoiseInput = 't',
                  train: bool = False, dropout_key: jax.Array | None = None
                  ) -> Callable[..., jax.Array]:
  """A ``model_fn(x, t, cond=None) -> prediction`` (DESIGN.md contract) over a network and params.

  Args:
    network_fn: ``network_fn(params, x, c_noise, cond, train=..., rngs=...) -> F``; ``cond`` is
      passed through untouched (e.g. ``{'label': [B] int32}``, or None).
    params: the network's parameters.
    process: the process whose times ``t`` the model_fn takes.
    parameterization: how to read F (see the module docstring); the returned model_fn's
      prediction type is ``prediction_type(parameterization)``.
    noise_input_kind: which c_noise the network was trained with.
    train: dropout on (needs ``dropout_key``).
    dropout_key: PRNG key for dropout when ``train``.
  """
  prediction_type(parameterization)
  if noise_input_kind not in NOISE_INPUTS:
    raise ValueError(f'noise_input={noise_input_kind!r} is not known; use one of {NOISE_INPUTS}.')
  rngs = {'dropout': dropout_key} if (train and dropout_key is not None) else None

  def model_fn(x: jax.Array, t: jax.Array, cond: Any = None) -> jax.Array:
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    c_noise = noise_input(process, t, noise_input_kind)
    raw = network_fn(params, x, c_noise, cond, train=train, rngs=rngs)
    return apply_preconditioning(raw, x, t, process, parameterization=parameterization)

  return model_fn
