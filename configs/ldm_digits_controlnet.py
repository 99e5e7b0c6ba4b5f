"""A ControlNet on the embedded text-to-image job: digits drawn along a given edge map.

    python -m diffusion_jax.main --config=configs/ldm_digits.py --workdir=runs/ldm_digits
    python experiments/ldm_digits_controlnet.py --workdir=runs/ldm_digits

The first command trains the latent-diffusion digits model (``configs/ldm_digits.py``); the second
trains a ControlNet (Zhang et al. 2023) on its frozen U-Net and text encoder, conditioned on each
training image's edge map (the ink's one-pixel boundary), writes it as a diffusers ControlNet
directory into ``WORKDIR/controlnet`` and measures on held-out writers' images whether the samples'
edges match the control (IoU) and the prompted digits are kept (``digit_classifier``), with and
without the ControlNet on the same prompts and noise. ``get_config`` is the job's own config (what
the trainer validates); ``get_controlnet_config`` the ControlNet's settings.
"""

import importlib.util
import os

import ml_collections


def _ldm_digits_config():
  """``configs/ldm_digits.py``'s config (read by path: the configs are files, not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ldm_digits.py')
  spec = importlib.util.spec_from_file_location('ldm_digits_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  """The job the ControlNet is trained on: ``configs/ldm_digits.py``'s, unchanged."""
  return _ldm_digits_config()


def get_controlnet_config():
  """The ControlNet's training and evaluation settings (read by the experiment only)."""
  c = ml_collections.ConfigDict()
  c.control = 'edges'  # the ink's boundary, {0, 1}, one channel
  # 32x32 control images -> 8x8 latents: three widths, two stride-2 steps.
  c.conditioning_embedding_out_channels = (16, 32, 64)
  c.num_train_steps = 1500
  c.batch_size = 64
  c.learning_rate = 3e-4
  c.warmup_steps = 100
  c.ema_decay = 0.99
  c.text_dropout = 0.1  # prompts replaced by the empty prompt; the control image is kept
  c.log_every = 100
  c.num_eval_singles = 150  # held-out writers' single digits (test_singles)
  c.num_eval_pairs = 150  # and pairs of seen classes (test_seen_pairs)
  c.conditioning_scale = 1.0
  return c
