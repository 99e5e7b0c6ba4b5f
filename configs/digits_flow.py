"""Rectified flow on scikit-learn's 8x8 digits: the digits job with SD3's training recipe.

    python -m diffusion_jax.main --config=configs/digits_flow.py --workdir=runs/digits_flow

The network predicts the velocity eps - x0 of the straight path x_t = (1 - t) x_0 + t eps
(Liu et al. 2022; Esser et al. 2024), trained by flow matching (the velocity's plain MSE) with
SD3's logit-normal times (m = 0, s = 1); the network sees 999 t, as SD3 feeds its network 1000 t.
Sampling is configs/digits.py's (50 steps of the stochastic DPM-Solver++(2M) SDE, which runs on
any process of the contract); ``--config.sampling.method=dpmpp_2m`` integrates the
probability-flow ODE instead, and ``--config.sampling.shift=3.0`` gives SD3's shifted grid.
Otherwise as configs/digits.py.
"""

import os

from diffusion_jax import configs


def get_config():
  config = configs.load(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     'digits.py')).get_config()
  config.process.type = 'rectified_flow'
  config.process.t_eps = 1e-3  # t in [1e-3, 0.999]
  config.model.parameterization = 'flow'
  config.model.noise_input = 't999'
  config.training.weighting = 'uniform'
  config.training.time_sampling = 'logit_normal'
  config.training.logit_normal_mean = 0.0
  config.training.logit_normal_std = 1.0
  return config
