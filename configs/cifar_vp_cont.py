"""DDPM++ cont. (VP) on CIFAR-10: Song et al. (2021), score_sde configs/vp/cifar10_ddpmpp_continuous.py.

Continuous-time VP SDE (beta 0.1..20, t in [1e-3, 1]), the DDPM++ U-Net (BigGAN res blocks, skip
rescale, 4 blocks per level; 61,804,419 parameters, "62M" published), eps-prediction with 999 t as
the noise input (score = -eps / sigma), denoising score matching with lambda = sigma^2.

    python -m diffusion_jax.main --config=configs/cifar_vp_cont.py --workdir=runs/cifar_vp
    python -m diffusion_jax.main --config=configs/cifar_vp_cont.py --workdir=runs/cifar_vp --mode=eval

Likelihood training (Song et al. 2021b): --config.training.weighting=likelihood
--config.training.time_sampling=importance.
"""

from diffusion_jax.configs import cifar10


def get_config():
  return cifar10.ddpmpp_continuous()  # in diffusion_jax/configs/cifar10.py: shared by cifar_*_cont
