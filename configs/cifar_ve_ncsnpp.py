"""NCSN++ cont. (VE) on CIFAR-10: Song et al. (2021), score_sde configs/ve/cifar10_ncsnpp_continuous.py.

VE SDE (sigma 0.01..50, t in [1e-5, 1]); NCSN++: BigGAN res blocks with FIR resampling, skip
rescale, Gaussian-Fourier embedding of log sigma, a residual input pyramid (62,758,915 parameters,
"63M" published); the network output divided by sigma is the score; EMA 0.999; PC sampling with
the reverse-diffusion predictor and Langevin corrector (snr 0.16).

Differences from score_sde, on purpose: data are scaled to [-1, 1] (score_sde's VE configs use
[0, 1], so sigma_max = 50 is relatively larger there), and the loss averages over pixels where
score_sde sums them (a constant factor that Adam's normalization absorbs).

    python -m diffusion_jax.main --config=configs/cifar_ve_ncsnpp.py --workdir=runs/cifar_ve
"""

from diffusion_jax.configs import cifar10


def get_config():
  config = cifar10.ddpmpp_continuous()  # the DDPM++ body: BigGAN blocks, skip rescale, 4 per level
  unet = config.model.unet
  unet.fir = True
  unet.embedding_type = 'fourier'
  unet.fourier_scale = 16.0
  unet.progressive = 'none'
  unet.progressive_input = 'residual'
  unet.progressive_combine = 'sum'
  config.model.parameterization = 'score'
  config.model.noise_input = 'log_sigma'

  config.process.type = 've'
  config.process.sigma_min = 0.01
  config.process.sigma_max = 50.0
  config.process.t_eps = 1e-5

  config.training.weighting = 'snr'  # lambda(t) = sigma^2 on the score error
  config.training.ema_decay = 0.999
  config.sampling.method = 'pc'
  config.sampling.predictor = 'reverse_diffusion'
  config.sampling.corrector = 'langevin'
  config.sampling.snr = 0.16
  return config
