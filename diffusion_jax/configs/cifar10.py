"""CIFAR-10 setups that several experiment configs start from.

``configs/cifar.py`` is ``ddpm()``; ``configs/cifar_vp_cont.py`` is ``ddpmpp_continuous()``, which
``configs/cifar_subvp_cont.py`` and ``configs/cifar_ve_ncsnpp.py`` change. They live here, in the
package, so that a config file never imports a sibling config by path (the top-level configs/ is
not on ``sys.path`` of an installed package).
"""

import ml_collections

from diffusion_jax.configs import default


def ddpm() -> ml_collections.ConfigDict:
  """DDPM on CIFAR-10 with the hyperparameters of Ho et al. (2020), Sec. 4 and Appendix B."""
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


def ddpmpp_continuous() -> ml_collections.ConfigDict:
  """DDPM++ cont. (VP): Song et al. (2021), score_sde configs/vp/cifar10_ddpmpp_continuous.py.

  Continuous-time VP SDE (beta 0.1..20, t in [1e-3, 1]), the DDPM++ U-Net (BigGAN res blocks, skip
  rescale, 4 blocks per level; 61,804,419 parameters, "62M" published), eps-prediction with 999 t
  as the noise input (score = -eps / sigma), denoising score matching with lambda = sigma^2; the
  data, batch and schedule of ``ddpm()``.
  """
  config = ddpm()  # ch 128, ch_mult (1, 2, 2, 2), attention at 16, dropout 0.1 as there
  unet = config.model.unet
  unet.num_res_blocks = 4
  unet.resblock_type = 'biggan'
  unet.skip_rescale = True
  unet.embedding_type = 'sinusoidal'
  unet.up_attn_every_block = False
  unet.init_scale = 0.0
  config.model.noise_input = 't999'  # eps-prediction, as ddpm()

  config.process.type = 'vp'
  config.process.beta_min = 0.1
  config.process.beta_max = 20.0
  config.process.t_eps = 1e-3

  config.training.weighting = 'snr'  # eps-MSE, i.e. lambda(t) = sigma^2 on the score error
  config.training.num_train_steps = 1_300_000  # EMA, Adam, warmup and clipping: ddpm()'s

  config.sampling.method = 'pc'
  config.sampling.predictor = 'euler_maruyama'
  config.sampling.corrector = 'none'
  config.sampling.num_steps = 1000
  config.eval.num_examples = 10_000
  config.eval.t_start = 1e-5  # as score_sde's likelihood evaluation
  return config
