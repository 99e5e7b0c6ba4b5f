"""The embedded text-to-image job: latent diffusion on captioned digits, both stages on a CPU.

    python -m diffusion_jax.main --config=configs/ldm_digits.py --workdir=runs/ldm_digits
    python -m diffusion_jax.main --config=configs/ldm_digits.py --workdir=runs/ldm_digits \\
        --mode=sample --config.sampling.prompt="the digits three and seven"
    python experiments/ldm_digits_quality.py --workdir=runs/ldm_digits

Data: ``data.source='digits_text'`` (scikit-learn's digits at 32x32: one digit, ``the digit
seven``, or two side by side, ``the digits three and seven``; the ten pairs (a, (a + 5) mod 10)
never in training). Stage 1 trains a KL autoencoder 32x32x1 -> 8x8x4 into
``WORKDIR/autoencoder`` (and writes it with its measured scale factor to
``WORKDIR/autoencoder/vae``); stage 2 trains a text-conditioned U-Net on the cached latents with a
small text transformer over the captions' word vocabulary trained jointly, into ``WORKDIR/ldm``.
Rerunning the command resumes the unfinished stage. No download.
"""

from diffusion_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'digits_text'
  config.data.image_size = 32
  config.data.num_channels = 1
  config.training.task = 'ldm'

  # Stage 1: 32x32x1 -> 8x8x4.
  a = config.autoencoder
  a.block_out_channels = (16, 32, 64)
  a.layers_per_block = 1
  a.latent_channels = 4
  a.norm_num_groups = 8
  a.mid_block_add_attention = False
  a.rec_loss = 'l1'
  a.kl_weight = 1e-6
  a.num_train_steps = 1000
  a.learning_rate = 1e-3
  a.batch_size = 32

  # Stage 2: the U-Net on 8x8x4 latents, cross-attention to a 2-layer text transformer.
  u = config.model.cond_unet
  u.block_out_channels = (32, 64)
  u.layers_per_block = 1
  u.norm_num_groups = 8
  u.down_block_types = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D')
  u.up_block_types = ('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D')
  u.attention_head_dim = 4
  t = config.model.text_encoder
  t.source = 'vocab'
  t.hidden_size = 64
  t.intermediate_size = 128
  t.num_layers = 2
  t.num_heads = 4
  config.model.parameterization = 'eps'
  config.process.schedule = 'linear'
  config.training.cache_latents = True
  config.training.text_dropout = 0.1
  # Measured (docs/benchmarks.md): the digit words are learned late, by steps more than by
  # images. The step costs in proportion to the batch (about 350 latents/s on 2 cores), and
  # 6,000 steps at batch 32 draw 95.7% of single digits right (batch 64: 98.3%, in twice the
  # time; 4,000 steps at batch 64: 76.7%).
  config.training.batch_size = 32
  config.training.num_train_steps = 6000
  config.training.log_every = 250
  config.training.checkpoint_every = 1000
  config.training.sample_every = 0  # one grid at the end
  config.training.num_sample_images = 32
  config.training.ema_decay = 0.999
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.sampling.method = 'dpmpp_2m'
  config.sampling.num_steps = 25
  config.sampling.guidance_scale = 6.0  # measured: 3.0 gives 77.0% / 84.7% / 88.7% (docs/benchmarks.md)
  config.sampling.batch_size = 100
  config.sampling.num_samples = 8
  return config
