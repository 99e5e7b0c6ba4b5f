"""XLA CPU settings measured to train our U-Nets faster, applied when ``diffusion_jax`` is imported.

jaxlib 0.10 hands convolutions fused with their elementwise neighbours to YNNPACK on CPU. For the
DDPM CIFAR-10 U-Net that path is slower than XLA's own (Eigen) convolutions, above all for the
weight gradients (2.2x the forward time at [16, 32, 32, 128] vs 1.0x with Eigen), while YNNPACK's
reductions are faster than XLA's. ``--xla_cpu_experimental_ynn_fusion_type=reduce`` keeps only the
reductions on YNNPACK: on this repository's 2-core CPU the training step of that network went from
2.55 s to 2.08 s at batch 16 (``experiments/bench_train.py`` reports the current figure against
PyTorch).

XLA reads ``XLA_FLAGS`` once, when the first backend starts, and aborts on a flag it does not know.
So the flag is added only for the jaxlib versions it was measured on, only if the user has not set
it, and only has an effect when ``diffusion_jax`` is imported before JAX runs anything. Set
``DIFFUSION_JAX_XLA_DEFAULTS=0`` to leave ``XLA_FLAGS`` untouched.
"""

from __future__ import annotations

import importlib.metadata
import os

# jaxlib versions (prefixes) on which the flags exist and were measured.
TESTED_JAXLIB = ('0.10.',)
CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',)


def apply_defaults() -> list[str]:
  """Appends the CPU flags the user has not set to ``XLA_FLAGS``; returns the flags added."""
  if os.environ.get('DIFFUSION_JAX_XLA_DEFAULTS', '1') == '0':
    return []
  try:
    jaxlib_version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return []
  if not jaxlib_version.startswith(TESTED_JAXLIB):
    return []
  current = os.environ.get('XLA_FLAGS', '')
  added = [f for f in CPU_FLAGS if f.split('=')[0] not in current]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added
