"""DDPM++ cont. (VP) on CIFAR-10: Song et al. (2021), score_sde configs/vp/cifar10_ddpmpp_continuous.py.

Continuous-time VP SDE (beta 0.1..20, t in [1e-3, 1]), the DDPM++ U-Net (BigGAN res blocks, skip
rescale, 4 blocks per level; 61,804,419 parameters, "62M" published), eps-prediction with 999 t as
the noise input (score = -eps / sigma), denoising score matching with lambda = sigma^2.

    python -m diffusion_jax.main --config=configs/cifar_vp_cont.py --workdir=runs/cifar_vp
    python -m diffusion_jax.main --config=configs/cifar_vp_cont.py --workdir=runs/cifar_vp --mode=eval

Likelihood training (Song et al. 2021b): --config.training.weighting=likelihood
--config.training.time_sampling=importance.
"""

from configs import cifar


def get_config():
  config = cifar.get_config()
  unet = config.model.unet
  unet.ch = 128
  unet.ch_mult = (1, 2, 2, 2)
  unet.num_res_blocks = 4
  unet.attn_resolutions = (16,)
  unet.dropout = 0.1
  unet.resblock_type = 'biggan'
  unet.skip_rescale = True
  unet.embedding_type = 'sinusoidal'
  unet.up_attn_every_block = False
  unet.init_scale = 0.0
  config.model.parameterization = 'eps'
  config.model.noise_input = 't999'

  config.process.type = 'vp'
  config.process.beta_min = 0.1
  config.process.beta_max = 20.0
  config.process.t_eps = 1e-3

  config.training.weighting = 'snr'  # eps-MSE, i.e. lambda(t) = sigma^2 on the score error
  config.training.num_train_steps = 1_300_000
  config.training.ema_decay = 0.9999
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip = 1.0

  config.sampling.method = 'pc'
  config.sampling.predictor = 'euler_maruyama'
  config.sampling.corrector = 'none'
  config.sampling.num_steps = 1000
  config.eval.num_examples = 10_000
  config.eval.t_start = 1e-5  # as score_sde's likelihood evaluation
  return config
