"""A test-sized job: tiny U-Net, a few steps on the digits. Seconds on a CPU.

    python -m diffusion_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from diffusion_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'digits'
  config.data.image_size = 8
  config.data.num_channels = 1
  config.model.unet.ch = 16
  config.model.unet.ch_mult = (1, 2)
  config.model.unet.num_res_blocks = 1
  config.model.unet.attn_resolutions = (4,)
  config.model.mlp.hidden_dim = 32
  config.model.mlp.num_layers = 2
  config.model.mlp.embed_dim = 16
  config.process.num_timesteps = 100
  config.training.batch_size = 8
  config.training.num_train_steps = 4
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.sample_every = 0
  config.training.num_sample_images = 0  # no sampler compile in smoke runs; tests turn it on
  config.optim.warmup_steps = 0
  config.sampling.method = 'ddim'
  config.sampling.num_steps = 3
  config.sampling.num_samples = 6
  config.sampling.batch_size = 4
  config.eval.num_examples = 4
  config.eval.batch_size = 4
  return config
