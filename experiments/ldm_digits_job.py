"""The trained digits job of ``configs/ldm_digits.py``, frozen: what the adapter experiments share.

``experiments/ldm_digits_adapters.py`` (LoRA, textual inversion) and
``experiments/ldm_digits_controlnet.py`` train on top of it; no flags here.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.training import latent


def restore(config, workdir: str) -> tuple[Any, Any, int]:
  """``(setup, params, step)``: the job's EMA U-Net and text encoder (device arrays) in ``workdir``.

  Raises:
    ValueError: a job whose text encoder is pretrained (these experiments train on the word
      vocabulary's jointly trained encoder of ``configs/ldm_digits.py``).
  """
  (s, params, step), _ = latent.restore(config, workdir)
  s.checkpointer.close()
  if not s.latent.trains_text:
    raise ValueError('This experiment expects the job of configs/ldm_digits.py (a text encoder '
                     "trained with the U-Net, model.text_encoder.source='vocab').")
  return s, jax.tree.map(jnp.asarray, params), int(step)


def latent_encoder(lm: latent.LatentModels) -> Callable[[np.ndarray], np.ndarray]:
  """``images [N, 32, 32, 1] in [-1, 1] -> float32 [N, 8, 8, 4]``: posterior means as the job
  scales them (``scale * (z - shift)``), 500 images per call."""
  encode = jax.jit(lambda x: lm.vae.apply({'params': lm.vae_params}, x, method=lm.vae.encode)[0])

  def latents_of(images):
    z = np.concatenate([np.asarray(encode(images[i:i + 500])) for i in range(0, len(images), 500)])
    return ((z - lm.shift) * lm.scale).astype(np.float32)

  return latents_of
