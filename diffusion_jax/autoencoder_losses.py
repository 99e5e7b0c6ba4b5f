"""The autoencoder objective of latent diffusion's first stage, and its patch discriminator.

Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models", App. G,
train the KL autoencoder with (their ``LPIPSWithDiscriminator``, CompVis/latent-diffusion
``ldm/modules/losses/contperceptual.py``)

    L = rec + kl_weight * KL(q(z|x) || N(0, I)) + disc_factor * lambda * L_G

with per-example sums over pixels (rec) and latent elements (KL), averaged over the batch;
``L_G = -mean(D(x_rec))`` the generator's hinge term once ``step >= disc_start``, and the adaptive
weight of Esser et al. (2021), "Taming Transformers", eq. 7:
``lambda = disc_weight * ||grad_w rec|| / (||grad_w L_G|| + 1e-4)``, clipped to [0, 1e4] and not
differentiated, with ``w`` the decoder's last layer. The discriminator (``PatchDiscriminator``,
Isola et al. 2017's PatchGAN as in taming-transformers ``NLayerDiscriminator``) minimizes the
hinge loss ``0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))`` on the same step: its
parameters and the autoencoder's are disjoint, and each player's loss sees the other's output
through ``stop_gradient``, so one gradient of the sum trains both.

Differences from the LDM code, on purpose: no perceptual (LPIPS) term (no pretrained VGG weights
are available offline here), GroupNorm instead of BatchNorm in the discriminator (no mutable
batch statistics in the train state), and one optimizer for both players.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.autoencoder_kl import AutoencoderKL, DiagonalGaussian

REC_LOSSES = ('l1', 'l2')


class PatchDiscriminator(nn.Module):
  """A PatchGAN discriminator: logits ``[B, h, w, 1]`` of overlapping patches being real.

  Attributes:
    channels: channels of the first conv (doubled per layer, at most 8x).
    num_layers: stride-2 convs after the first (taming-transformers: 3).
  """
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x: [B, H, W, C]`` in [-1, 1] -> logits ``[B, h, w, 1]`` float32."""
    h = nn.Conv(self.channels, (4, 4), strides=2, padding=1)(x)
    h = nn.leaky_relu(h, 0.2)
    for i in range(1, self.num_layers + 1):
      stride = 2 if i < self.num_layers else 1
      ch = self.channels * min(2 ** i, 8)
      h = nn.Conv(ch, (4, 4), strides=stride, padding=1, use_bias=False)(h)
      h = nn.GroupNorm(num_groups=min(32, ch // 4))(h)
      h = nn.leaky_relu(h, 0.2)
    return nn.Conv(1, (4, 4), strides=1, padding=1)(h).astype(jnp.float32)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Peak signal-to-noise ratio (dB) of images in [-1, 1] (peak-to-peak 2), over the batch.

  ``10 log10(4 / mse)``; the same as on [0, 1] images with peak 1.
  """
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def _rec(x: jax.Array, y: jax.Array, kind: str) -> jax.Array:
  """Per-example reconstruction loss summed over pixels: ``[B]``."""
  d = x - y
  e = jnp.abs(d) if kind == 'l1' else jnp.square(d)
  return jnp.sum(e, axis=tuple(range(1, e.ndim)))


def autoencoder_loss(*, vae: AutoencoderKL, rec_loss: str = 'l1', kl_weight: float = 1e-6,
                     disc: PatchDiscriminator | None = None, disc_weight: float = 0.0,
                     disc_start: int = 0):
  """The first-stage objective as ``loss_fn(params, frozen, batch, key) -> (loss, metrics)``.

  Args:
    vae: the autoencoder; ``params['vae']`` are its parameters.
    rec_loss: 'l1' (LDM) or 'l2', summed over pixels.
    kl_weight: weight of the KL term (LDM's f=4/8 KL models: 1e-6).
    disc: a discriminator (``params['disc']``), or None for none.
    disc_weight: the adaptive weight's factor (LDM: 0.5); 0 turns the adversarial terms off.
    disc_start: the step from which both players train (``batch['step']`` [B] int32 says which).

  Returns:
    The loss; metrics: loss, rec (mean per pixel), kl (per example), psnr (dB), and with a
    discriminator g_loss, d_loss, d_weight.

  Raises:
    ValueError: an unknown ``rec_loss``, a negative weight, or ``disc_weight > 0`` without disc.
  """
  if rec_loss not in REC_LOSSES:
    raise ValueError(f'rec_loss={rec_loss!r} is not known; use one of {REC_LOSSES}.')
  if kl_weight < 0 or disc_weight < 0:
    raise ValueError(f'kl_weight ({kl_weight}) and disc_weight ({disc_weight}) must be >= 0.')
  adversarial = disc is not None and disc_weight > 0

  def decode_with_last(params, z, w):
    vae_params = jax.tree.map(lambda a: a, params)  # shallow copy of the nested dicts
    vae_params['decoder']['conv_out']['kernel'] = w
    return vae.apply({'params': vae_params}, z, method=vae.decode)

  def loss_fn(params, frozen, batch, key):
    del frozen
    x = batch['x']
    mean, logvar = vae.apply({'params': params['vae']}, x, method=vae.encode)
    posterior = DiagonalGaussian(mean, logvar)
    z = posterior.sample(key)
    recon = vae.apply({'params': params['vae']}, z, method=vae.decode)
    rec = _rec(x, recon, rec_loss)  # [B]
    kl = posterior.kl()  # [B]
    loss = jnp.mean(rec) + kl_weight * jnp.mean(kl)
    metrics = {'rec': jnp.mean(rec) / (x[0].size), 'kl': jnp.mean(kl), 'psnr': psnr(x, recon)}
    if adversarial:
      on = (batch['step'][0] >= disc_start).astype(jnp.float32)
      d_frozen = jax.lax.stop_gradient(params['disc'])
      g_of = lambda r: -jnp.mean(disc.apply({'params': d_frozen}, r))  # noqa: E731
      g_loss = g_of(recon)
      # Esser et al. (2021) eq. 7: gradients of both terms at the decoder's last layer.
      w = params['vae']['decoder']['conv_out']['kernel']
      _, vjp = jax.vjp(lambda w_: decode_with_last(jax.lax.stop_gradient(params['vae']), z, w_),
                       jax.lax.stop_gradient(w))
      r0 = jax.lax.stop_gradient(recon)
      g_rec = vjp(jax.grad(lambda r: jnp.mean(_rec(x, r, rec_loss)))(r0))[0]
      g_adv = vjp(jax.grad(g_of)(r0))[0]
      d_weight = jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_adv) + 1e-4)
      d_weight = jax.lax.stop_gradient(jnp.clip(d_weight, 0.0, 1e4) * disc_weight)
      real = disc.apply({'params': params['disc']}, x)
      fake = disc.apply({'params': params['disc']}, jax.lax.stop_gradient(recon))
      d_loss = 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
      loss = loss + on * (d_weight * g_loss + d_loss)
      metrics.update(g_loss=g_loss, d_loss=d_loss, d_weight=d_weight * on)
    metrics['loss'] = loss
    return loss, metrics

  return loss_fn


def latent_scale(latents: Any) -> float:
  """``1 / std`` of latents (all elements), LDM's ``scale_factor`` measured on the data."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  std = float(np.std(np.asarray(latents, np.float64)))
  if not std > 0:
    raise ValueError(f'The latents have standard deviation {std}: the autoencoder collapsed.')
  return 1.0 / std


__all__ = ['PatchDiscriminator', 'REC_LOSSES', 'autoencoder_loss', 'latent_scale', 'psnr']
