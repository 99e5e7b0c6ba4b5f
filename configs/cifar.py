"""DDPM on CIFAR-10 with the hyperparameters of Ho et al. (2020), Sec. 4 and Appendix B.

Prepare the data once on a machine with internet (TFDS; no TensorFlow needed to read it):

    pip install tensorflow  # only for preparing
    tfds build cifar10 --data_dir=$HOME/tensorflow_datasets

then train (TPU VM / GPU; 800k steps take days):

    python -m diffusion_jax.main --config=configs/cifar.py --workdir=runs/cifar
"""

from diffusion_jax.configs import cifar10


def get_config():
  return cifar10.ddpm()  # the settings, in diffusion_jax/configs/cifar10.py, are shared by cifar_*
