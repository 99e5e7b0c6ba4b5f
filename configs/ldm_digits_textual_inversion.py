"""Textual inversion on the embedded text-to-image job: a new word learned from 16 images.

    python -m diffusion_jax.main --config=configs/ldm_digits.py --workdir=runs/ldm_digits
    python experiments/ldm_digits_adapters.py --config=configs/ldm_digits_textual_inversion.py \\
        --workdir=runs/ldm_digits

The first command trains the latent-diffusion digits model; the second learns one new token
embedding ``<new>`` (Gal et al. 2022; everything else frozen) from ``num_images`` single-digit
images of one class drawn by the held-out writers (never seen in training), captioned
``the digit <new>``, writes it as diffusers' ``learned_embeds.safetensors`` into
``WORKDIR/textual_inversion_<class>`` and measures the share of ``the digit <new>`` samples that
``experiments/digit_classifier.py`` reads as that class. ``get_config`` is the job's own config;
``get_adapter_config`` the inversion's settings.
"""

import ml_collections

from diffusion_jax import configs


def get_config():
  """The job the embedding is learned on: ``configs/ldm_digits.py``'s, unchanged."""
  return configs.load(__file__.replace('ldm_digits_textual_inversion.py',
                                       'ldm_digits.py')).get_config()


def get_adapter_config():
  """The inversion's training and evaluation settings (read by the experiment only)."""
  c = ml_collections.ConfigDict()
  c.adapter = 'textual_inversion'
  c.token = '<new>'
  c.initializer_token = 'digit'  # Gal et al. start from a coarse descriptor of the concept
  c.digits = (2, 4, 7)  # one embedding per class, each learned on its own
  c.num_images = 16  # held-out writers' single digits of the class (the first ones)
  c.num_train_steps = 400
  c.batch_size = 16
  c.learning_rate = 5e-3
  c.warmup_steps = 20
  c.ema_decay = 0.0  # the last value (a single vector)
  c.text_dropout = 0.0  # no empty prompt: only the new word is learned
  c.log_every = 100
  c.num_samples = 100  # 'the digit <new>' samples per class
  return c
