r"""Softmax attention on this CPU: our implementations against PyTorch's fused CPU kernel.

    python experiments/bench_attention.py

The shapes of SD 1.5's attention layers (float32): self-attention at 32x32 and 64x64 latents
(1,024 / 4,096 tokens, 8 heads of 40, batch 8: classifier-free guidance for 4 images),
cross-attention to 77 text tokens, the VAE's single-head mid-block attention at 64x64 (batch 4).
Times: the best of 3 after a warm-up, forward only; ``torch.nn.functional.
scaled_dot_product_attention`` is the peer (its flash-attention CPU kernel).
"""

import functools
import time

import jax
import numpy as np

from diffusion_jax.models import attention

SHAPES = {  # name: (B, T, S, N, d)
    'self-attention, 1,024 tokens': (8, 1024, 1024, 8, 40),
    'self-attention, 4,096 tokens': (8, 4096, 4096, 8, 40),
    'cross-attention, 4,096 x 77': (8, 4096, 77, 8, 40),
    'VAE mid-block, 4,096 tokens': (4, 4096, 4096, 1, 512),
}


def _best(fn, reps=3):
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  import torch  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  print(f'{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} '
        'threads); seconds, forward')
  print('| shape | einsum | chunked | auto is | torch SDPA | torch / chunked |')
  print('|---|---:|---:|---|---:|---:|')
  for name, (b, t, s, n, d) in SHAPES.items():
    q = rng.standard_normal((b, t, n, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, n, d)).astype(np.float32) for _ in range(2))
    row = {}
    for impl in ('einsum', 'chunked'):
      f = jax.jit(functools.partial(attention.dot_product_attention, implementation=impl))
      row[impl] = _best(lambda f=f: f(q, k, v).block_until_ready())
    qt, kt, vt = (torch.from_numpy(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    with torch.no_grad():
      row['torch'] = _best(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
    print(f'| {name} | {row["einsum"]:.3f} | {row["chunked"]:.3f} | '
          f'{attention.default_implementation(t)} | {row["torch"]:.3f} | '
          f'{row["torch"] / row["chunked"]:.2f} |', flush=True)


if __name__ == '__main__':
  main()
