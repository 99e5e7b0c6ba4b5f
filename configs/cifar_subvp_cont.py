"""DDPM++ cont. (sub-VP) on CIFAR-10: Song et al. (2021), score_sde configs/subvp/cifar10_ddpmpp_continuous.py.

The DDPM++ cont. (VP) setup of configs/cifar_vp_cont.py with the sub-VP SDE (same beta 0.1..20).

    python -m diffusion_jax.main --config=configs/cifar_subvp_cont.py --workdir=runs/cifar_subvp
"""

from diffusion_jax.configs import cifar10


def get_config():
  config = cifar10.ddpmpp_continuous()
  config.process.type = 'subvp'
  return config
