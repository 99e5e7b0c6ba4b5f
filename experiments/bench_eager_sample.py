"""sampling.sample called eagerly against the same call under jax.jit: seconds per call.

Eagerly, every call traces the model into a new scan body and compiles it; under jit the first
call compiles and the others reuse the program. The model: a digits-sized U-Net (random weights,
8x8x1, the size of configs/digits.py's at ch 32), batch 16, DDPM linear schedule.

    python experiments/bench_eager_sample.py [--calls=3] [--methods=dpmpp_2m,unipc] [--steps=10]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from diffusion_jax import cpu_runtime


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--calls', type=int, default=3)
  parser.add_argument('--methods', default='dpmpp_2m,unipc')
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  cpu_runtime.configure()
  from diffusion_jax import models, preconditioning, processes, sampling  # pylint: disable=import-outside-toplevel

  module = models.UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                       dropout=0.0)
  process = processes.DiscreteVP.linear()
  shape = (16, 8, 8, 1)
  params = jax.jit(lambda k: module.init(k, jnp.zeros(shape), jnp.ones(shape[:1]),
                                         train=False))(jax.random.PRNGKey(0))['params']

  def network_fn(p, x, c, cond=None, *, train=False, rngs=None):
    del cond, rngs
    return module.apply({'params': p}, x, c, train=train)

  model_fn = preconditioning.make_model_fn(network_fn, params, process)
  print(f'| method | steps | eager: first call (s) | eager: later calls (s) | jit: first call (s) '
        f'| jit: later calls (s) | eager / jit, later calls |')
  print('|---|---|---|---|---|---|---|')
  for method in args.methods.split(','):
    run = lambda key, m=method: sampling.sample(model_fn, process, method=m,
                                                num_steps=args.steps, key=key, shape=shape)
    times = {}
    for name, fn in (('eager', run), ('jit', jax.jit(run))):
      seconds = []
      for i in range(args.calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.PRNGKey(i)))
        seconds.append(time.perf_counter() - start)
      times[name] = (seconds[0], min(seconds[1:]))
    print(f'| {method} | {args.steps} | {times["eager"][0]:.2f} | {times["eager"][1]:.2f} | '
          f'{times["jit"][0]:.2f} | {times["jit"][1]:.3f} | '
          f'{times["eager"][1] / times["jit"][1]:.0f}x |')


if __name__ == '__main__':
  main()
