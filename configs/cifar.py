"""DDPM on CIFAR-10 with the hyperparameters of Ho et al. (2020), Sec. 4 and Appendix B.

Prepare the data once on a machine with internet (TFDS; no TensorFlow needed to read it):

    pip install tensorflow  # only for preparing
    tfds build cifar10 --data_dir=$HOME/tensorflow_datasets

then train (TPU VM / GPU; 800k steps take days):

    python -m diffusion_jax.main --config=configs/cifar.py --workdir=runs/cifar
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 32
  config.data.num_channels = 3
  config.data.random_flip = True

  config.model.name = 'unet'
  config.model.parameterization = 'eps'
  config.model.noise_input = 't'
  unet = config.model.unet
  unet.ch = 128
  unet.ch_mult = (1, 2, 2, 2)
  unet.num_res_blocks = 2
  unet.attn_resolutions = (16,)
  unet.dropout = 0.1

  config.process.type = 'discrete'
  config.process.schedule = 'linear'
  config.process.num_timesteps = 1000
  config.process.beta_start = 1e-4
  config.process.beta_end = 0.02

  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  config.training.ema_decay = 0.9999
  config.training.log_every = 100
  config.training.checkpoint_every = 10_000
  config.training.sample_every = 50_000
  config.optim.optimizer = 'adam'
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.schedule = 'constant'
  config.optim.grad_clip = 1.0

  config.sampling.method = 'ddpm'
  config.sampling.num_steps = 1000
  config.sampling.num_samples = 50_000
  config.sampling.batch_size = 1000
  return config
