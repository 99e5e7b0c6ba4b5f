"""A LoRA on the embedded text-to-image job: the digits model fine-tuned to draw mirrored digits.

    python -m diffusion_jax.main --config=configs/ldm_digits.py --workdir=runs/ldm_digits
    python experiments/ldm_digits_adapters.py --config=configs/ldm_digits_lora.py \\
        --workdir=runs/ldm_digits

The first command trains the latent-diffusion digits model; the second trains a LoRA (Hu et al.
2021) on its frozen U-Net with the training writers' single digits mirrored left to right (same
captions), writes it as a diffusers / PEFT ``pytorch_lora_weights.safetensors`` into
``WORKDIR/lora`` and measures on fresh samples the share drawn mirrored (a mirror classifier
trained on real digits) and the share that are the prompted digit once mirrored back
(``experiments/digit_classifier.py``). ``get_config`` is the job's own config;
``get_adapter_config`` the LoRA's settings.
"""

import ml_collections

from diffusion_jax import configs


def get_config():
  """The job the LoRA is trained on: ``configs/ldm_digits.py``'s, unchanged."""
  return configs.load(__file__.replace('ldm_digits_lora.py', 'ldm_digits.py')).get_config()


def get_adapter_config():
  """The LoRA's training and evaluation settings (read by the experiment only)."""
  c = ml_collections.ConfigDict()
  c.adapter = 'lora'
  c.style = 'mirrored'  # the training images flipped left to right; captions unchanged
  c.rank = 3  # r of every adapted kernel (the file: 4.3% of the U-Net's weights)
  c.alpha = 3.0  # scale alpha / r = 1
  # Module names adapted (adapters.lora.ATTENTION_TARGETS + CONV_TARGETS names): the attention
  # projections and the resnets' convolutions of the U-Net (mirroring moves every stroke, which
  # the attention projections alone reach only at the 8x8 and 4x4 latent levels).
  c.targets = ('to_q', 'to_k', 'to_v', 'to_out_0', 'conv1', 'conv2')
  c.num_train_steps = 1500
  c.batch_size = 64
  c.learning_rate = 2e-3
  c.warmup_steps = 50
  c.ema_decay = 0.99
  c.text_dropout = 0.1  # as the job: the unconditional branch of guidance learns the style too
  c.log_every = 100
  c.num_samples_per_digit = 20  # the digit prompts 'the digit zero' .. 'the digit nine'
  return c
