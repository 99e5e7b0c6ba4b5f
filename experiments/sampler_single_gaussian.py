"""Sampler defaults on single Gaussians (no other mode to flip to) against DDIM at the same NFE.

    python experiments/sampler_single_gaussian.py     # ~4 min on 2 CPUs

On the oracle panels (experiments/sampler_panel.py) the mixtures' errors are dominated by the few
samples that start near a boundary between modes; a single Gaussian shows a method's systematic
error alone. Each method with only ``method`` and ``num_steps`` on the DDPM linear schedule,
2000 samples, RMS distance (over samples, summed over coordinates) to the exact probability-flow
map (oracles.GaussianMixture.pf_ode_map); ratio to DDIM (its defaults) at the NFE the run spent.
"""

import jax
import numpy as np

from diffusion_jax import oracles, processes, sampling

CASES = {  # name: (mean, std)
    'D=2 mean (5, -5) std 0.02': (np.array([5.0, -5.0]), 0.02),
    'D=4 mean 3 std 0.05': (np.full(4, 3.0), 0.05),
}
METHODS = ('heun', 'plms', 'dpmpp_2m', 'dpmpp_3m', 'unipc')
STEPS = (5, 8, 9, 10, 12, 14, 15, 20, 25, 31, 32, 50)


def main():
  process = processes.DiscreteVP.linear()
  a_T, s_T = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
  print('| case | method | ' + ' | '.join(f'{n}' for n in STEPS) + ' |')
  print('|---|---|' + '---|' * len(STEPS))
  for name, (mean, std) in CASES.items():
    mix = oracles.GaussianMixture(np.ones(1), mean[None], np.eye(len(mean))[None] * std**2)
    model = mix.model_fn(process)
    x_T = process.prior_sample(jax.random.PRNGKey(11), (2000, len(mean)))
    ref = mix.pf_ode_map(np.asarray(x_T, np.float64), a_T, s_T)
    rms = lambda x: float(np.sqrt(np.mean(np.sum((np.asarray(x, np.float64) - ref)**2, -1))))
    ddim = {}
    for method in METHODS:
      cells = []
      for n in STEPS:
        x, info = jax.jit(lambda x, m=method, n=n: sampling.sample(
            model, process, method=m, num_steps=n, x_T=x, return_info=True))(x_T)
        nfe = int(info['nfe'])
        if nfe not in ddim:
          ddim[nfe] = rms(jax.jit(lambda x, n=nfe: sampling.sample(
              model, process, method='ddim', num_steps=n, x_T=x))(x_T))
        ratio = rms(x) / ddim[nfe]
        cells.append(f'**{ratio:.2f}**' if ratio > 2 else f'{ratio:.2f}')
      print(f'| {name} | {method} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
